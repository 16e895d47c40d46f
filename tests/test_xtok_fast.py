"""The vectorised projection of one-token matches (gkd.align.project_teacher, fast=True) equals the Python walk."""

from __future__ import annotations

import random

import pytest
import torch
from test_xtok_teacher import LETTER_WORDS, WORDS, char_tokenizer

from gkd.align import project_teacher, token_surfaces
from gkd.tasks.base import build_word_tokenizer
from gkd.xtok import student_text, vocab_pair


def as_rows(p):
    """Each position as {student id: log-prob}, its tail, valid and members (order of the support ignored)."""
    out = []
    for i in range(p.ids.shape[0]):
        row = {int(k): round(float(v), 10) for k, v, m in zip(p.ids[i], p.logprobs[i], p.mask[i]) if m}
        out.append((row, round(float(p.tail[i]), 10), bool(p.valid[i]), p.members[i].tolist()))
    return out


@pytest.mark.parametrize("case", ["char-teacher", "permuted", "extra-tokens"])
@pytest.mark.parametrize("fold", ["prefix", "tail"])
def test_fast_projection_equals_the_walk(case, fold, tmp_path):
    if case == "char-teacher":
        words, student = LETTER_WORDS, build_word_tokenizer(LETTER_WORDS)
        teacher = char_tokenizer("abc", str(tmp_path / "t"))
    elif case == "permuted":
        words, student = WORDS, build_word_tokenizer(WORDS)
        teacher = build_word_tokenizer(sorted(WORDS))
    else:
        words, student = WORDS, build_word_tokenizer(WORDS)
        teacher = build_word_tokenizer([*WORDS, "zq", "w1x"])
    pair = vocab_pair(student, teacher)
    rng = random.Random(0)
    for _ in range(5):
        ids = student(" ".join(rng.choice(words) for _ in range(6)))["input_ids"] + [student.eos_token_id]
        text, s_spans, sentinels = student_text(student, ids, pair)
        assert len(sentinels) == 1
        body = text[: sentinels[0][0]]
        enc = teacher(body, add_special_tokens=False, return_offsets_mapping=True)
        t_ids = [*enc["input_ids"], teacher.eos_token_id]
        t_spans = [tuple(o) for o in enc["offset_mapping"]] + [sentinels[0][:2]]
        lp = torch.log_softmax(torch.randn(len(t_ids), len(teacher), dtype=torch.float64), -1)
        fast = project_teacher(pair, text, s_spans, ids, t_spans, t_ids, lp, fold=fold, fast=True)
        slow = project_teacher(pair, text, s_spans, ids, t_spans, t_ids, lp, fold=fold, fast=False)
        assert as_rows(fast) == as_rows(slow)


def byte_level_bpe():
    """A tiny byte-level BPE (GPT-2 style), trained here on a few lines."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(["the cat sat on the mat", "a café, naïve", "the hat"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")


def test_byte_level_surfaces_and_student_spans():
    tok = byte_level_bpe()
    surfaces = token_surfaces(tok)
    assert surfaces[tok.eos_token_id] is None
    ids = tok("the cat sat on a café")["input_ids"]
    assert all(isinstance(surfaces[i], bytes) for i in ids)
    assert b"".join(surfaces[i] for i in ids) == "the cat sat on a café".encode()
    pair = vocab_pair(tok, build_word_tokenizer(["the", "cat"]))
    text, spans, _ = student_text(tok, [*ids, tok.eos_token_id], pair)
    assert text.startswith("the cat sat on a café")
    assert "".join(text[a:b] for a, b in spans[:-1]) == "the cat sat on a café"
