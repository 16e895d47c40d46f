"""A local teacher with another tokenizer: its view of a batch, projected onto the student's vocabulary.

When the teacher folder's tokenizer differs from the student's, ``gkd distill`` aligns instead of refusing
(:func:`gkd.loading.load_models` builds an :class:`AlignedTeacher`). Both models score the same text, each in its
own tokens, and :mod:`gkd.align` turns the teacher's distributions into one over the student's next token at every
student position (docs/teachers.md, "Another tokenizer", defines the loss). Per completion of a batch:

1. the student's completion tokens are decoded into text, with the span of text each token wrote (incremental
   decoding; paired special tokens such as EOS write a sentinel, :meth:`gkd.align.VocabPair.special_surface`);
2. the text between sentinels is tokenized with the teacher's tokenizer (``return_offsets_mapping``), the paired
   teacher special ids stand where the sentinels are;
3. the teacher scores those tokens after its own prompt (the record's prompt rendered with the teacher's tokenizer
   and chat template, plus the run's teacher view: ``teacher_prompt_field`` ...);
4. :func:`gkd.align.project_teacher` projects its log-probabilities (at the loss temperature) onto the student's
   positions. The view is an :class:`AlignedView`; :class:`gkd.objective.Objective` turns it into
   :func:`gkd.align.projected_divergence`, chunk by chunk of positions.

Special tokens of the two tokenizers are paired by their text (``<eos>`` with ``<eos>``) and the teacher's EOS with
the student's EOS, so a permuted vocabulary projects to exactly the teacher's distribution re-indexed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from gkd.align import ProjectedTeacher, VocabPair, project_teacher, token_surfaces
from gkd.data import Batch, Example, TokenizedDataset
from gkd.data.tokenize import TeacherPrompt, teacher_prompt_text
from gkd.divergences import log_probs
from gkd.forward import score_positions
from gkd.teacher import seqkd_dataset

__all__ = ["AlignedTeacher", "AlignedView", "aligned_seqkd_dataset", "student_text", "vocab_pair"]


@dataclass
class AlignedView:
    """The projected teacher at the batch's ``N`` valid positions (row-major, the loss's order).

    ``projected.members`` is None; the categories live in ``member_table [R, V_s]`` (the distinct rows) and
    ``member_index [N]`` (each position's row, -1: none), so memory is ``R × V_s`` longs, not ``N × V_s``.
    """

    projected: ProjectedTeacher
    member_table: torch.Tensor | None = None
    member_index: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return int(self.projected.valid.numel())

    def rows(self, a: int, b: int) -> ProjectedTeacher:
        """Positions ``a:b`` with their ``members`` rows expanded (a chunk's worth only)."""
        part = self.projected.rows(torch.arange(a, b))
        if self.member_table is not None and self.member_index is not None:
            idx = self.member_index[a:b]
            part.members = self.member_table[idx.clamp_min(0)]
            part.members[idx < 0] = -1
        return part


def _as_text(surface: Any) -> str | None:
    """A surface as text: bytes of a byte-level token decoded (None when they are part of a character)."""
    if isinstance(surface, bytes):
        try:
            return surface.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return surface


def vocab_pair(student_tokenizer: Any, teacher_tokenizer: Any) -> VocabPair:
    """The two vocabularies by surface text, special tokens paired by their text and EOS with EOS."""
    student = [_as_text(s) for s in token_surfaces(student_tokenizer)]
    teacher = [_as_text(s) for s in token_surfaces(teacher_tokenizer)]
    s_special = {student_tokenizer.convert_ids_to_tokens(i): i for i in student_tokenizer.all_special_ids}
    special = {}
    for tid in teacher_tokenizer.all_special_ids:
        sid = s_special.get(teacher_tokenizer.convert_ids_to_tokens(tid))
        if sid is not None and sid not in special.values():
            special[tid] = sid
    t_eos, s_eos = teacher_tokenizer.eos_token_id, student_tokenizer.eos_token_id
    if t_eos is not None and s_eos is not None:
        special = {t: s for t, s in special.items() if t != t_eos and s != s_eos}
        special[t_eos] = s_eos
    return VocabPair(student, teacher, special=special)


def student_text(
    tokenizer: Any, ids: list[int], pair: VocabPair
) -> tuple[str, list[tuple[int, int]], list[tuple[int, int, int]]]:
    """The text the student's tokens ``ids`` write, each token's ``(start, end)`` span in it (``start == end``: it
    writes nothing visible and has no teacher), and the paired special tokens as ``(start, end, student_id)``.

    Ordinary tokens are decoded incrementally between special tokens; a token's span is its surface at the end of
    the text it added (so a word-level token ``b`` after ``a`` spans ``b``, not the space decoding puts before it).
    """
    specials = set(pair.special_ids)
    text, spans, sentinels, seg, seg_start, prev = "", [], [], [], 0, ""
    for tid in ids:
        if tid in specials:
            s = pair.special_surface(tid)
            assert isinstance(s, str)
            spans.append((len(text), len(text) + len(s)))
            sentinels.append((len(text), len(text) + len(s), tid))
            text += s
            seg, seg_start, prev = [], len(text), ""
            continue
        seg.append(tid)
        cur = tokenizer.decode(seg, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        text = text[:seg_start] + cur
        end = len(text)
        piece = cur[len(prev) :]  # what this token added (decoding is prefix-stable for whole tokens)
        surface = pair.student_surfaces[tid] if 0 <= tid < pair.student_size else None
        if isinstance(surface, str) and surface and cur.endswith(surface):
            spans.append((end - len(surface), end))
        else:
            spans.append((end - len(piece), end))
        prev = cur
    return text, spans, sentinels


def _teacher_tokens(
    tokenizer: Any, text: str, sentinels: list[tuple[int, int, int]], pair: VocabPair
) -> tuple[list[int], list[tuple[int, int]]]:
    """The teacher's tokens of ``text`` and their spans: each stretch between sentinels tokenized with offsets, the
    paired teacher special id at each sentinel."""
    to_teacher = {}
    for tid, s in enumerate(pair.teacher_surfaces):
        if s is not None and s in {pair.special_surface(sid) for _, _, sid in sentinels}:
            to_teacher[s] = tid
    ids: list[int] = []
    spans: list[tuple[int, int]] = []
    start = 0
    for a, b, sid in [*sentinels, (len(text), len(text), -1)]:
        if a > start:
            enc = tokenizer(text[start:a], add_special_tokens=False, return_offsets_mapping=True)
            for tid, (x, y) in zip(enc["input_ids"], enc["offset_mapping"]):
                ids.append(int(tid))
                spans.append((start + int(x), start + int(y)))
        if sid >= 0:
            ids.append(to_teacher[pair.special_surface(sid)])
            spans.append((a, b))
        start = b
    return ids, spans


def _clean(spans: list[tuple[int, int]]) -> list[int]:
    """Indices of the spans that can be aligned: non-empty, sorted, not overlapping the previous kept one."""
    keep, last = [], 0
    for i, (a, b) in enumerate(spans):
        if b > a and a >= last:
            keep.append(i)
            last = b
    return keep


class AlignedTeacher:
    """A frozen local teacher whose tokenizer differs from the student's (see the module docstring)."""

    own_prompt = True

    def __init__(
        self,
        model: nn.Module,
        student_tokenizer: Any,
        teacher_tokenizer: Any,
        vocab: int,
        *,
        temperature: float = 1.0,
        teacher_prompt: TeacherPrompt | None = None,
        apply_chat_template: bool = False,
        fused: bool = True,
    ) -> None:
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.vocab = vocab  # the student's vocabulary (what the projection lives on)
        self.student_tokenizer, self.teacher_tokenizer = student_tokenizer, teacher_tokenizer
        self.pair = vocab_pair(student_tokenizer, teacher_tokenizer)
        self.temperature = temperature
        self.prompt_view = teacher_prompt or TeacherPrompt()
        self.apply_chat_template = apply_chat_template
        self.fused = fused

    @property
    def device(self) -> torch.device:
        param = next(iter(self.model.parameters()), None)
        return param.device if param is not None else torch.device("cpu")

    def describe(self) -> str:
        """The one line a run logs: that it aligns, and the vocabularies' coverage."""
        return (
            "the teacher's tokenizer differs from the student's: its distributions are projected onto the "
            f"student's vocabulary (docs/teachers.md, 'Another tokenizer'); {self.pair.coverage().describe()}"
        )

    def prompt_ids(self, record: dict) -> list[int]:
        """The record's prompt as the teacher's tokens (its own chat template and the run's teacher view)."""
        text, special = teacher_prompt_text(
            record, self.teacher_tokenizer, self.prompt_view, 0, "teacher", self.apply_chat_template
        )
        return list(self.teacher_tokenizer(text, add_special_tokens=not special)["input_ids"])

    @torch.no_grad()
    def view(self, batch: Batch) -> AlignedView:
        """The projected teacher at the batch's valid completion positions."""
        per: list[tuple[str, list, list[int], list, list[int], list[int]]] = []
        for i in range(batch.size):
            s_ids = [int(t) for t in batch.completion_ids[i][batch.completion_mask[i]].tolist()]
            text, s_spans, sentinels = student_text(self.student_tokenizer, s_ids, self.pair)
            t_ids, t_spans = _teacher_tokens(self.teacher_tokenizer, text, sentinels, self.pair)
            per.append((text, s_spans, s_ids, t_spans, t_ids, self.prompt_ids(batch.records[i])))
        rows = self._score([p[5] for p in per], [p[4] for p in per])
        parts, tables, index = [], [], []
        for (text, s_spans, s_ids, t_spans, t_ids, _), lp in zip(per, rows):
            parts.append(self._project(text, s_spans, s_ids, t_spans, t_ids, lp, tables, index))
        if not parts:
            empty = ProjectedTeacher(
                torch.zeros(0, 0, dtype=torch.long),
                torch.zeros(0, 0),
                torch.zeros(0, 0, dtype=torch.bool),
                torch.zeros(0),
                torch.zeros(0, dtype=torch.bool),
            )
            return AlignedView(empty)
        projected = ProjectedTeacher.cat(parts)
        device = batch.completion_ids.device
        projected = ProjectedTeacher(
            *(t.to(device) for t in (projected.ids, projected.logprobs, projected.mask, projected.tail)),
            projected.valid.to(device),
        )
        table = torch.cat(tables).to(device) if tables else None
        return AlignedView(projected, table, torch.cat(index).to(device) if index else None)

    def _score(self, prompts: list[list[int]], completions: list[list[int]]) -> list[torch.Tensor]:
        """The teacher's log-probabilities (at the loss temperature) at every token of each completion."""
        device = self.device
        pad = self.teacher_tokenizer.pad_token_id or 0
        width_p = max(len(p) for p in prompts)
        width_c = max(1, max(len(c) for c in completions))
        p_ids = torch.full((len(prompts), width_p), pad, dtype=torch.long)
        p_mask = torch.zeros_like(p_ids, dtype=torch.bool)
        c_ids = torch.full((len(prompts), width_c), pad, dtype=torch.long)
        c_mask = torch.zeros_like(c_ids, dtype=torch.bool)
        for i, (p, c) in enumerate(zip(prompts, completions)):
            if p:
                p_ids[i, width_p - len(p) :], p_mask[i, width_p - len(p) :] = torch.tensor(p), True
            if c:
                c_ids[i, : len(c)], c_mask[i, : len(c)] = torch.tensor(c), True
        out = score_positions(
            self.model,
            p_ids.to(device),
            p_mask.to(device),
            c_ids.to(device),
            c_mask.to(device),
            vocab=self.pair.teacher_size,
            fused=self.fused,
        )
        lp = log_probs(out.full_logits().float(), self.temperature).cpu()
        return list(lp.split([len(c) for c in completions]))

    def _project(
        self,
        text: str,
        s_spans: list[tuple[int, int]],
        s_ids: list[int],
        t_spans: list[tuple[int, int]],
        t_ids: list[int],
        lp: torch.Tensor,
        tables: list[torch.Tensor],
        index: list[torch.Tensor],
    ) -> ProjectedTeacher:
        """One completion's projection; its distinct members rows go to ``tables`` and their indices to ``index``."""
        n = len(s_ids)
        s_keep, t_keep = _clean(s_spans), _clean(t_spans)
        offset = sum(int(t.shape[0]) for t in tables)
        ids = torch.zeros(n, 0, dtype=torch.long)
        if not s_keep or not t_keep:
            index.append(torch.full((n,), -1, dtype=torch.long))
            return ProjectedTeacher(
                ids, torch.zeros(n, 0), torch.zeros(n, 0, dtype=torch.bool), torch.zeros(n),
                torch.zeros(n, dtype=torch.bool),
            )  # fmt: skip
        part = project_teacher(
            self.pair,
            text,
            [s_spans[i] for i in s_keep],
            [s_ids[i] for i in s_keep],
            [t_spans[j] for j in t_keep],
            [t_ids[j] for j in t_keep],
            lp[t_keep],
        )
        members = part.members
        assert members is not None
        table, inverse = torch.unique(members, dim=0, return_inverse=True)
        tables.append(table)
        full_index = torch.full((n,), -1, dtype=torch.long)
        keep = torch.tensor(s_keep, dtype=torch.long)
        full_index[keep] = inverse + offset
        index.append(full_index)
        k = part.ids.shape[1]
        out = ProjectedTeacher(
            torch.zeros(n, k, dtype=torch.long),
            torch.full((n, k), -math.inf, dtype=part.logprobs.dtype),
            torch.zeros(n, k, dtype=torch.bool),
            torch.zeros(n, dtype=part.tail.dtype),
            torch.zeros(n, dtype=torch.bool),
        )
        out.ids[keep], out.logprobs[keep], out.mask[keep] = part.ids, part.logprobs, part.mask
        out.tail[keep], out.valid[keep] = part.tail, part.valid
        return out


def aligned_seqkd_dataset(
    teacher: AlignedTeacher, dataset: TokenizedDataset, *, max_completion_length: int, **kwargs: Any
) -> TokenizedDataset:
    """SeqKD with a teacher of another tokenizer: the teacher writes its targets in its own tokens after its own
    prompts (:func:`gkd.teacher.seqkd_dataset`, generated once and cached, the key covering the teacher's prompt
    ids); each target's text is tokenized again for the student (its EOS where the teacher wrote its EOS, at most
    ``max_completion_length`` tokens). ``kwargs`` go to ``seqkd_dataset``."""
    t_tok, s_tok = teacher.teacher_tokenizer, teacher.student_tokenizer
    for_teacher = replace(
        dataset,
        examples=[Example(teacher.prompt_ids(e.record), e.completion, e.record) for e in dataset.examples],
    )
    written = seqkd_dataset(teacher.model, t_tok, for_teacher, **kwargs)
    examples = []
    for e, t in zip(dataset.examples, written.examples):
        ids = list(t.completion or [])
        ended = bool(ids) and ids[-1] == t_tok.eos_token_id
        text = t_tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        student_ids = list(s_tok(text, add_special_tokens=False)["input_ids"])
        if ended or not student_ids:
            student_ids.append(s_tok.eos_token_id)
        examples.append(Example(e.prompt, student_ids[:max_completion_length], e.record, e.teacher_prompt))
    return replace(dataset, examples=examples)
