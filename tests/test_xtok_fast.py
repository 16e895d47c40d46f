"""The vectorised projection of one-token matches (gkd.align.project_teacher, fast=True) equals the Python walk."""

from __future__ import annotations

import random

import pytest
import torch
from test_xtok_teacher import LETTER_WORDS, WORDS, char_tokenizer

from gkd.align import project_teacher
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
