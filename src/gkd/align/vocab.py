"""The vocabulary map between two tokenizers (teacher id -> student id by surface string) and its coverage."""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

Surface = str | bytes
Fold = Literal["prefix", "tail"]
_FOLDS = ("prefix", "tail")
_CACHE_SIZE = 512  # label vectors kept per VocabPair (one per distinct spine prefix)


# ---------------------------------------------------------------------------------------------------------------
# Vocabularies
# ---------------------------------------------------------------------------------------------------------------


def _upper_key(prefix: Surface) -> Surface | None:
    """The smallest key greater than every key that starts with ``prefix`` (None: no upper bound)."""
    if isinstance(prefix, bytes):
        p = bytearray(prefix)
        while p and p[-1] == 0xFF:
            p.pop()
        if not p:
            return None
        p[-1] += 1
        return bytes(p)
    s = prefix
    while s and ord(s[-1]) == 0x10FFFF:
        s = s[:-1]
    if not s:
        return None
    return s[:-1] + chr(ord(s[-1]) + 1)


class _Sorted:
    """A vocabulary's surfaces in sorted order: every token that starts with a prefix is one contiguous range."""

    def __init__(self, surfaces: Sequence[Surface | None]) -> None:
        pairs = sorted((s, i) for i, s in enumerate(surfaces) if s)
        self.keys = [s for s, _ in pairs]
        self.ids = torch.tensor([i for _, i in pairs], dtype=torch.long)

    def span(self, prefix: Surface) -> tuple[int, int]:
        lo = bisect.bisect_left(self.keys, prefix)
        upper = _upper_key(prefix)
        hi = len(self.keys) if upper is None else bisect.bisect_left(self.keys, upper, lo)
        return lo, hi

    def ids_with_prefix(self, prefix: Surface) -> torch.Tensor:
        lo, hi = self.span(prefix)
        return self.ids[lo:hi]

    def with_prefix(self, prefix: Surface) -> list[tuple[Surface, int]]:
        lo, hi = self.span(prefix)
        return [(self.keys[k], int(self.ids[k])) for k in range(lo, hi)]


@dataclass(frozen=True)
class Coverage:
    """How much of each vocabulary has a counterpart with the same surface in the other one.

    ``student_mapped`` of ``student_tokens`` student tokens have a teacher token with the same surface;
    ``teacher_mapped`` of ``teacher_tokens`` teacher tokens have a student one (tokens without a surface are not
    counted). ``teacher_mass``, when measured (``VocabPair.mass_coverage``), is the teacher's mean probability mass
    on mapped tokens over the positions it was measured on.
    """

    student_tokens: int
    student_mapped: int
    teacher_tokens: int
    teacher_mapped: int
    teacher_mass: float | None = None

    @property
    def student_share(self) -> float:
        return self.student_mapped / max(self.student_tokens, 1)

    @property
    def teacher_share(self) -> float:
        return self.teacher_mapped / max(self.teacher_tokens, 1)

    def describe(self) -> str:
        """One log line."""
        line = (
            f"tokenizer alignment: {self.student_share:.1%} of the student's {self.student_tokens} tokens and "
            f"{self.teacher_share:.1%} of the teacher's {self.teacher_tokens} have a counterpart with the same text"
        )
        if self.teacher_mass is not None:
            line += f"; {self.teacher_mass:.1%} of the teacher's probability mass is on mapped tokens"
        return line


class VocabPair:
    """The student's and the teacher's vocabularies as surface strings, and the tables the projection needs.

    ``student_surfaces[i]`` is what student token ``i`` contributes to the decoded text (``str`` for character
    offsets, ``bytes`` for byte offsets, the same type on both sides; ``None`` for a token that never matches, such
    as padding). Built once per run: it sorts both vocabularies and computes, for every teacher token, the student
    token with the same surface (``teacher_to_student``) and the longest student token that starts it
    (``teacher_to_student_prefix``), -1 where there is none. ``special`` pairs special tokens by role
    (``{teacher_eos: student_eos}``): both get the sentinel surface ``special_surface(student_id)``. When several
    student tokens share a surface, the lowest id is the one that teacher tokens map to.
    """

    def __init__(
        self,
        student_surfaces: Sequence[Surface | None],
        teacher_surfaces: Sequence[Surface | None],
        special: Mapping[int, int] | None = None,
    ) -> None:
        student = list(student_surfaces)
        teacher = list(teacher_surfaces)
        kinds = {type(s) for s in student + teacher if s is not None}
        if len(kinds) > 1 or not kinds <= {str, bytes}:
            raise TypeError(
                f"surfaces must all be str or all be bytes, got {sorted(k.__name__ for k in kinds)}"
            )
        self.unit: type = kinds.pop() if kinds else str
        self._special: dict[int, Surface] = {}
        for k, (tid, sid) in enumerate(sorted((special or {}).items())):
            if not (0 <= tid < len(teacher) and 0 <= sid < len(student)):
                raise ValueError(f"special pair teacher {tid} -> student {sid} is outside the vocabularies")
            sentinel: Surface = f"\x00{k}\x00" if self.unit is str else f"\x00{k}\x00".encode()
            teacher[tid] = student[sid] = sentinel
            self._special[sid] = sentinel
        self.student_surfaces: list[Surface | None] = student
        self.teacher_surfaces: list[Surface | None] = teacher
        self.student_index: dict[Surface, int] = {}
        for i, s in enumerate(student):
            if s:
                self.student_index.setdefault(s, i)
        self._teacher_exact: dict[Surface, list[int]] = {}
        for i, s in enumerate(teacher):
            if s:
                self._teacher_exact.setdefault(s, []).append(i)
        self._max_student_len = max((len(s) for s in self.student_index), default=0)
        self.teacher_to_student = torch.tensor(
            [self.student_index.get(s, -1) if s else -1 for s in teacher], dtype=torch.long
        )
        self.teacher_to_student_prefix = torch.tensor(
            [self.longest_student_prefix(s) if s else -1 for s in teacher], dtype=torch.long
        )
        self._max_teacher_len = max((len(s) for s in self._teacher_exact), default=0)
        self.student_to_teacher_prefix = torch.tensor(
            [self.longest_teacher_prefix(s) if s else -1 for s in student], dtype=torch.long
        )
        self._student_sorted = _Sorted(student)
        self._teacher_sorted = _Sorted(teacher)
        self._cache: OrderedDict[tuple[Surface, str], torch.Tensor] = OrderedDict()
        self._inside_cache: OrderedDict[tuple[Surface, str], tuple[torch.Tensor, torch.Tensor]] = (
            OrderedDict()
        )
        self._inside_members: OrderedDict[Surface, torch.Tensor] = OrderedDict()

    @property
    def student_size(self) -> int:
        return len(self.student_surfaces)

    @property
    def teacher_size(self) -> int:
        return len(self.teacher_surfaces)

    @property
    def special_ids(self) -> list[int]:
        """The student ids of the special pairs (each writes its sentinel surface)."""
        return list(self._special)

    def special_surface(self, student_id: int) -> Surface:
        """The sentinel surface of a special pair (append it to the text where the EOS tokens stand)."""
        return self._special[student_id]

    def longest_student_prefix(self, s: Surface) -> int:
        """The id of the longest student token whose surface starts ``s`` (the whole of ``s`` included), or -1."""
        for length in range(min(len(s), self._max_student_len), 0, -1):
            sid = self.student_index.get(s[:length])
            if sid is not None:
                return sid
        return -1

    def longest_teacher_prefix(self, s: Surface, exclude: int = -1, longer_than: int = 0) -> int:
        """The lowest id of the longest teacher token whose surface starts ``s`` and is longer than ``longer_than``
        (not ``exclude``), or -1."""
        for length in range(min(len(s), self._max_teacher_len), longer_than, -1):
            for tid in self._teacher_exact.get(s[:length], ()):
                if tid != exclude:
                    return tid
        return -1

    def student_with_prefix(self, prefix: Surface) -> list[tuple[Surface, int]]:
        """(surface, id) of every student token whose surface starts with ``prefix``."""
        return self._student_sorted.with_prefix(prefix)

    def inside_members(self, written: Surface) -> torch.Tensor:
        """``[V_s]``: for every student token ``σ``, the teacher token ``written + σ[:L]`` with the largest ``L``
        (the teacher token, among those that start with ``written``, whose remainder starts ``σ``), or -1."""
        cached = self._inside_members.get(written)
        if cached is not None:
            return cached
        out = torch.full((self.student_size,), -1, dtype=torch.long)
        longest = self._max_teacher_len - len(written)
        for sid, surface in enumerate(self.student_surfaces):
            if not surface:
                continue
            for length in range(min(len(surface), longest), 0, -1):
                tids = self._teacher_exact.get(written + surface[:length])
                if tids:
                    out[sid] = tids[0]
                    break
        self._inside_members[written] = out
        if len(self._inside_members) > _CACHE_SIZE:
            self._inside_members.popitem(last=False)
        return out

    def coverage(self) -> Coverage:
        """Counts of tokens with a same-surface counterpart (see ``Coverage``)."""
        teacher_set = set(self._teacher_exact)
        student_tokens = [s for s in self.student_surfaces if s]
        return Coverage(
            student_tokens=len(student_tokens),
            student_mapped=sum(1 for s in student_tokens if s in teacher_set),
            teacher_tokens=sum(1 for s in self.teacher_surfaces if s),
            teacher_mapped=int((self.teacher_to_student >= 0).sum()),
        )

    def mass_coverage(self, teacher_logprobs: torch.Tensor) -> Coverage:
        """``coverage()`` plus the teacher's mean probability mass on mapped tokens over ``[..., V_t]`` log-probs."""
        p = teacher_logprobs.detach().to(torch.float64).exp().reshape(-1, self.teacher_size)
        mass = p[:, self.teacher_to_student >= 0].sum(-1) / p.sum(-1)
        base = self.coverage()
        return Coverage(
            base.student_tokens,
            base.student_mapped,
            base.teacher_tokens,
            base.teacher_mapped,
            teacher_mass=float(mass.mean()) if mass.numel() else None,
        )

    # -- the leaf -> student token rules --------------------------------------------------------------------------

    def depth_labels(self, prefix: Surface, fold: Fold) -> torch.Tensor:
        """``[V_t]``: the student token that leaf ``prefix + τ`` goes to, for every teacher token ``τ`` (-1: tail).

        The empty prefix uses the precomputed tables. Otherwise: the student token whose surface is ``prefix + τ``;
        failing that, with ``fold="prefix"``, the longest student token that starts ``prefix + τ``.
        """
        if not prefix:
            return self.teacher_to_student_prefix if fold == "prefix" else self.teacher_to_student
        key = (prefix, fold)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        default = self.longest_student_prefix(prefix) if fold == "prefix" else -1
        labels = torch.full((self.teacher_size,), default, dtype=torch.long)
        extensions = [(s, i) for s, i in self._student_sorted.with_prefix(prefix) if len(s) > len(prefix)]
        # Shorter student extensions first, so that for each teacher token the longest one that fits wins.
        for surface, sid in sorted(extensions, key=lambda e: len(e[0])):
            rest = surface[len(prefix) :]
            if fold == "prefix":
                labels[self._teacher_sorted.ids_with_prefix(rest)] = sid
            else:
                for tid in self._teacher_exact.get(rest, ()):
                    labels[tid] = sid
        self._cache[key] = labels
        if len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return labels

    def inside_labels(self, written: Surface, fold: Fold) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher tokens that start with ``written`` (the part of a straddling teacher token before the student
        boundary) and the student token each one's remainder goes to (-1: tail; a remainder that is empty, i.e. a
        teacher token that ends exactly at the boundary, goes to the tail: what follows it is unknown)."""
        key = (written, fold)
        cached = self._inside_cache.get(key)
        if cached is not None:
            return cached
        ids, labels = [], []
        for surface, tid in self._teacher_sorted.with_prefix(written):
            rest = surface[len(written) :]
            if not rest:
                label = -1
            elif fold == "prefix":
                label = self.longest_student_prefix(rest)
            else:
                label = self.student_index.get(rest, -1)
            ids.append(tid)
            labels.append(label)
        out = (torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long))
        self._inside_cache[key] = out
        if len(self._inside_cache) > _CACHE_SIZE:
            self._inside_cache.popitem(last=False)
        return out


def token_surfaces(tokenizer: Any) -> list[Surface | None]:
    """What each token id of a transformers tokenizer contributes to decoded text, for :class:`VocabPair`.

    ``bytes`` for byte-level BPE tokenizers (GPT-2, Llama 3, Qwen: their token strings are bytes written with the
    byte-to-unicode table), else ``str``: SentencePiece's ``▁`` is a space, a WordPiece continuation loses its
    ``##``. Special tokens (EOS, padding, ...) are None: pair them by role with ``VocabPair(special=...)``.
    """
    n = len(tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(list(range(n)))
    special = set(tokenizer.all_special_ids)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = type(getattr(backend, "decoder", None)).__name__ if backend is not None else ""
    out: list[Surface | None] = []
    if decoder == "ByteLevel":
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        to_byte = {c: b for b, c in bytes_to_unicode().items()}
        for i, t in enumerate(tokens):
            ok = t is not None and i not in special and all(c in to_byte for c in t)
            out.append(bytes(to_byte[c] for c in t) if ok else None)
        return out
    for i, t in enumerate(tokens):
        if t is None or i in special:
            out.append(None)
        elif decoder == "WordPiece" and t.startswith("##"):
            out.append(t[2:])
        else:
            out.append(t.replace("\u2581", " "))
    return out
