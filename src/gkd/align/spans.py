"""Position alignment: which student tokens a teacher token starts with, by character (or byte) offsets."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gkd.align.vocab import Surface

# ---------------------------------------------------------------------------------------------------------------
# Positions
# ---------------------------------------------------------------------------------------------------------------


def spans_from_surfaces(surfaces: Sequence[Surface]) -> list[tuple[int, int]]:
    """Contiguous ``(start, end)`` spans of a tokenization whose surfaces concatenate to the text."""
    spans, start = [], 0
    for s in surfaces:
        spans.append((start, start + len(s)))
        start += len(s)
    return spans


def _as_spans(spans: Sequence[Sequence[int]] | torch.Tensor, who: str) -> torch.Tensor:
    t = torch.as_tensor(spans, dtype=torch.long).reshape(-1, 2)
    if t.numel() == 0:
        return t
    if bool((t[:, 0] < 0).any()) or bool((t[:, 1] <= t[:, 0]).any()):
        raise ValueError(
            f"{who} spans must have 0 <= start < end; a zero-width or reversed span (a special token without text, "
            "or a byte-level token inside a character, given character offsets) cannot be aligned: give special "
            "tokens a sentinel span and byte-level tokenizers byte offsets"
        )
    if bool((t[1:, 0] < t[:-1, 1]).any()):
        raise ValueError(f"{who} spans must be sorted and must not overlap")
    return t


@dataclass(frozen=True)
class SpanAlignment:
    """Where each student token stands in the teacher's tokenization of the same text.

    ``teacher_index[n]``: the teacher token whose span contains the start of student token ``n`` (-1: none, the
    position has no teacher). ``start_matched[n]``: that teacher token starts where student token ``n`` starts, so
    the teacher's distribution there predicts from the same text. ``matched[n]``: it also ends where the student
    token ends (the same span). ``teacher_stop[n]``: one past the last teacher token needed to cover the student
    token (the spine is ``teacher_index[n] : teacher_stop[n]``).
    """

    teacher_index: torch.Tensor
    start_matched: torch.Tensor
    matched: torch.Tensor
    teacher_stop: torch.Tensor

    def describe(self) -> str:
        n = self.matched.numel()
        return (
            f"{int(self.matched.sum())} of {n} student positions matched (same span), "
            f"{int(self.start_matched.sum())} start on a teacher boundary, "
            f"{int((self.teacher_index < 0).sum())} without a teacher token"
        )


def align_spans(
    student_spans: Sequence[Sequence[int]] | torch.Tensor,
    teacher_spans: Sequence[Sequence[int]] | torch.Tensor,
) -> SpanAlignment:
    """Align two tokenizations of one text by their offsets (characters or bytes; see ``SpanAlignment``).

    Spans are ``(start, end)`` pairs, sorted, non-empty and non-overlapping; gaps (text no token covers) are allowed.
    """
    s = _as_spans(student_spans, "student")
    t = _as_spans(teacher_spans, "teacher")
    n = s.shape[0]
    if n == 0 or t.shape[0] == 0:
        none = torch.full((n,), -1, dtype=torch.long)
        false = torch.zeros(n, dtype=torch.bool)
        return SpanAlignment(none, false, false.clone(), none.clone())
    starts, ends = t[:, 0].contiguous(), t[:, 1].contiguous()
    idx = torch.searchsorted(
        ends, s[:, 0].contiguous(), right=True
    )  # first teacher token ending after the start
    inside = idx < t.shape[0]
    safe = idx.clamp(max=t.shape[0] - 1)
    inside &= starts[safe] <= s[:, 0]
    teacher_index = torch.where(inside, safe, torch.full_like(safe, -1))
    start_matched = inside & (starts[safe] == s[:, 0])
    matched = start_matched & (ends[safe] == s[:, 1])
    stop = (torch.searchsorted(ends, s[:, 1].contiguous(), right=False) + 1).clamp(max=t.shape[0])
    teacher_stop = torch.where(inside, stop, torch.full_like(stop, -1))
    return SpanAlignment(teacher_index, start_matched, matched, teacher_stop)
