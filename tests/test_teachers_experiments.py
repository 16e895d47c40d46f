"""experiments/teachers.py (RESULTS.md section 15): the parts its numbers rest on, checked without running the rows
(each row is tens of gkd commands; their pipelines are the CLI's, tested in test_teacher_view.py, test_teachers.py
and test_xtok_teacher.py): the paired intervals of its report, and the two BPE conventions of row (a)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))

import teachers


def test_the_report_gives_paired_t_intervals():
    a, b = [80.0, 82.5, 81.0, 83.0, 79.5], [78.0, 79.0, 80.5, 79.0, 78.5]
    d = [x - y for x, y in zip(a, b)]
    mean = sum(d) / len(d)
    se = stats.sem(d)
    half = stats.t.ppf(0.975, len(d) - 1) * se
    line = teachers.paired_line("a − b", a, b)
    assert (
        line == f"| a − b | {mean:+.1f} ± {se:.1f} | [{mean - half:+.1f}, {mean + half:+.1f}] | excludes 0 |"
    )
    runs = {
        "a": [{"greedy/m": x, "sample/m": x, "seconds": 1.0} for x in a],
        "b": [{"greedy/m": x, "sample/m": x, "seconds": 1.0} for x in b],
    }
    text = teachers.report("t", {"ref": {"greedy/m": 1.0, "sample/m": 2.0}}, runs, [("a", "b")], "m")
    assert text.count(line.replace("a − b", "a − b (greedy)")) == 1
    assert "| a | 81.2 ± 0.7 |" in text


def test_the_two_bpe_conventions_of_row_a(tmp_path):
    from gkd.tasks.base import build_word_tokenizer

    words = ["Q", ":", *"abcdefgh", *"ABCDEFGH"]
    build_word_tokenizer(words, str(tmp_path / "words"))
    texts = ["Q a B c D e : b d", "Q F g H a b : f h", "Q c d E f G : e g"] * 50
    from transformers import AutoTokenizer

    gpt2 = AutoTokenizer.from_pretrained(
        str(teachers.bpe_tokenizer(texts, tmp_path / "words", tmp_path / "gpt2", words=True, vocab_size=300))
    )
    across = AutoTokenizer.from_pretrained(
        str(
            teachers.bpe_tokenizer(
                texts, tmp_path / "words", tmp_path / "across", words=False, vocab_size=300
            )
        )
    )
    text = "Q a B c : b d"
    # GPT-2's convention: a space starts the next word's token, never ends one
    assert gpt2.tokenize(text)[1:] == ["Ġa", "ĠB", "Ġc", "Ġ:", "Ġb", "Ġd"]
    # merges across spaces: some token ends with a space, so its form tells whether text follows
    assert any(t.endswith("Ġ") for t in across.tokenize(text))
    for tok in (gpt2, across):
        assert tok.decode(tok(text)["input_ids"]) == text
        assert (
            json.loads((Path(tok.name_or_path) / "tokenizer_config.json").read_text())["eos_token"] == "<eos>"
        )
