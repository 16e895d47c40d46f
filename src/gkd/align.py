"""Cross-tokenizer distillation: the teacher's distribution at every student position, on the student's vocabulary.

When the teacher's tokenizer differs from the student's, both score the same completion text, each in its own
tokens, and this module turns the teacher's per-position distributions into a distribution over the *student's*
next token at every student position. It is pure math: it takes token surface strings, ids, character (or byte)
offsets and log-probabilities, never a tokenizer object. Three pieces:

1. **Vocabulary mapping** (``VocabPair``): teacher id -> student id for tokens with the same surface string (what
   the token contributes to the decoded text), the longest student token that starts each teacher token, and the
   coverage report (``Coverage``: share of student tokens with a teacher counterpart, share of teacher tokens and of
   teacher probability mass that map).
2. **Position alignment** (``align_spans``): for every student token, the teacher token that contains its start,
   whether a teacher token starts at the same offset, and whether one has exactly the same span (``matched``).
3. **Projection** (``project_teacher``) and its **loss** (``projected_divergence``), for every registered divergence.

What the loss is (docs/teachers.md, "Another tokenizer", has the derivation and measured errors)
-----------------------------------------------------------------------------------------------
At a student position with span ``[a, b)`` (string ``σ``), the teacher tokens ``t_m, t_m+1, ...`` that cover
``[a, b)`` form the *spine*. Walking it, the teacher's probability mass splits exactly into **leaves**: at every
spine depth ``j`` each teacher token ``τ`` other than the realized ``t_j`` is a leaf with mass
``P(t_m) ... P(t_j-1) * P_j(τ)`` (the chain rule along the realized text, then one step off it) and string
``text[a:start_j] + τ``; the realized spine itself, once it reaches ``b``, is the last leaf and belongs to the
realized student token. The masses of all leaves sum to one. Each leaf goes to one student token: the one whose
surface *is* the leaf's string; otherwise (``fold``) the longest student token that starts the leaf's string
(``"prefix"``: the token the student would begin it with) or the tail bucket (``"tail"``). Leaf masses are summed
per student token, which gives the support ``K`` (student ids) with teacher log-probs, plus a tail mass ``τ``.

**Categories on the student's side.** A student token that is no leaf's target joins the category of the leaf its
text begins in: follow the realized teacher tokens as far as the token's text does, then take the longest teacher
token that starts the rest (``ProjectedTeacher.members``). With a character-level teacher, the student's ``"ba"``
and ``"bb"`` join ``"b"``: the leaf ``"b"`` holds the teacher's mass of every text that starts with ``b``, and it
is compared with ``Q(b) + Q(ba) + Q(bb)``; within a category the teacher, not asked how the text goes on, defers to
the student's own split. Every target keeps its own category.

**The student's tail.** The loss compares the two distributions on the categories ``K`` plus the tail. The
student's tail is the teacher's tail ``τ`` (a constant), and its mass on ``K`` is its own distribution conditioned
on ``K`` (tokens in no category are left out)::

    P̃ = (P_K, τ)        Q̃ = ((1 - τ) Q(· | K), τ)        loss = D(P̃ || Q̃) = (1 - τ) D(P(· | K) || Q(· | K))

(the identity holds for every f-divergence, hence every registered divergence). Why: the tail holds strings the
student cannot write as one token here; its probability of them is spread over several of its tokens and is not
observable at this position, so the loss neither rewards nor punishes it for the tail: it compares the teacher's
and the student's distributions where both are defined, weighted by the share of the teacher's mass that is
comparable. A student tail of zero (the mass of its tokens outside ``K``, which is zero when ``K`` is the whole
vocabulary) would make every forward-type KL infinite as soon as the teacher has an extra token.

- *Same tokens under other ids* (a permuted vocabulary): every spine has one token, every leaf is a whole teacher
  token whose surface is a student token, every category one token, ``τ = 0``: the projection is the teacher's
  distribution re-indexed and ``Q̃ = Q``, so the loss and its gradients are the same-tokenizer path's.
- *The teacher's vocabulary is the student's plus extra tokens* (same segmentation): exact on the shared tokens;
  with ``fold="tail"`` the extra tokens' mass is the tail, and the loss is ``(1 - τ) D(P(· | shared) || Q)``.
- *Different segmentations*: the chain rule gives the teacher's exact probability of every leaf; what is
  approximate is the assignment of leaves and categories to student tokens, which cannot see which tokens the
  student's tokenizer would produce after its previous ones (``ProjectedTeacher.restrict`` takes that as a mask).
  Where no teacher token starts at ``a`` (a teacher token straddles the student boundary), the teacher's first
  distribution is conditioned on the part already written: the teacher tokens that start with ``text[start_m:a]``
  are kept (renormalised), their remainders are the leaves' strings, and one that ends exactly at ``a`` is tail (what
  follows it is unknown). A position whose start no teacher token covers has no teacher (``valid`` False, loss 0).

The teacher's log-probabilities are taken as given, at the loss temperature (as for ``TeacherTopK``); the student's
are computed at ``temperature`` inside ``projected_divergence``.

Special tokens (EOS): a pair given to ``VocabPair(special={teacher_id: student_id})`` shares a sentinel surface
(``pair.special_surface(student_id)``); the caller appends it to the text and gives both EOS tokens its span, so EOS
is one more token of the text. Tokens whose surface is ``None`` (padding, unknown) never match anything.
"""

from __future__ import annotations

import bisect
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from gkd.divergences import LOG_FLOOR, BoundDivergence, as_bound_divergence, get_divergence, log_probs
from gkd.outputs import TeacherTopK

__all__ = [
    "Coverage",
    "Fold",
    "ProjectedTeacher",
    "SpanAlignment",
    "VocabPair",
    "align_spans",
    "project_teacher",
    "projected_divergence",
    "spans_from_surfaces",
]

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


# ---------------------------------------------------------------------------------------------------------------
# Projection
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ProjectedTeacher:
    """The teacher at ``N`` student positions, on the student's vocabulary: a top-k-style support plus a tail.

    ``ids [N, k]``: student ids of the support ``K`` (padding where ``mask`` is False); ``logprobs [N, k]``: the
    teacher's log-probabilities of them (``-inf`` at padding); ``tail [N]``: log of the teacher's mass that no
    student token holds (``-inf`` when none); ``valid [N]``: the position has a teacher (a position without one
    contributes 0 to the loss). ``members [N, V_s]`` (optional): for every student token, the support id whose
    category it belongs to (itself for a support id; -1: none, the token is left out of the comparison); None means
    every support id is its own category and no other token belongs to one. It is the size of the student's logits.
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    mask: torch.Tensor
    tail: torch.Tensor
    valid: torch.Tensor
    members: torch.Tensor | None = None

    @classmethod
    def cat(cls, parts: Sequence[ProjectedTeacher]) -> ProjectedTeacher:
        """The positions of several projections (e.g. the completions of a batch) in one, rows padded to one width."""
        if not parts:
            raise ValueError("nothing to concatenate")
        width = max(p.ids.shape[1] for p in parts)
        dtype = parts[0].logprobs.dtype

        def pad(t: torch.Tensor, value: float | bool | int) -> torch.Tensor:
            return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

        with_members = [p.members is not None for p in parts]
        if any(with_members) and not all(with_members):
            raise ValueError("either every part has members or none has")
        return cls(
            ids=torch.cat([pad(p.ids, 0) for p in parts]),
            logprobs=torch.cat([pad(p.logprobs.to(dtype), -math.inf) for p in parts]),
            mask=torch.cat([pad(p.mask, False) for p in parts]),
            tail=torch.cat([p.tail.to(dtype) for p in parts]),
            valid=torch.cat([p.valid for p in parts]),
            members=torch.cat([p.members for p in parts]) if all(with_members) else None,  # type: ignore[misc]
        )

    def rows(self, index: Sequence[int] | torch.Tensor) -> ProjectedTeacher:
        """The positions ``index`` only."""
        index = torch.as_tensor(index, dtype=torch.long)
        members = self.members[index] if self.members is not None else None
        return ProjectedTeacher(
            self.ids[index],
            self.logprobs[index],
            self.mask[index],
            self.tail[index],
            self.valid[index],
            members,
        )

    def restrict(self, allowed: torch.Tensor) -> ProjectedTeacher:
        """The same positions where the student tokens that ``allowed [N, V_s]`` marks False cannot come next (e.g.
        tokens the student's tokenizer never produces after the previous token): the teacher's mass on them is
        renormalised away, and the student's mass on them is one more category that the teacher gives no mass, so
        the loss pushes it down (as the exact sequence-level target does). Needs ``members``."""
        if self.members is None:
            raise ValueError("restrict needs members (project_teacher(..., members=True))")
        neg_inf = torch.full((), -math.inf, dtype=self.logprobs.dtype)
        keep = self.mask & allowed.gather(1, self.ids)
        category_ok = allowed.gather(1, self.members.clamp(min=0)) & (self.members >= 0)
        members = torch.where(allowed & category_ok, self.members, torch.full_like(self.members, -1))
        forbidden = ~allowed
        has = forbidden.any(1)
        rep = forbidden.to(torch.uint8).argmax(1)  # one forbidden id per row names the category
        members = torch.where(forbidden & has[:, None], rep[:, None], members)
        return ProjectedTeacher(
            ids=torch.cat([self.ids, rep[:, None]], 1),
            logprobs=torch.cat([torch.where(keep, self.logprobs, neg_inf), neg_inf.expand(len(rep), 1)], 1),
            mask=torch.cat([keep, has[:, None]], 1),
            tail=self.tail,
            valid=self.valid,
            members=members,
        )

    def to_topk(self) -> TeacherTopK:
        """The support as a ``TeacherTopK`` for the existing top-k loss path.

        That path takes the student's tail as the student's mass outside ``ids``, not the teacher's tail, and each
        id as its own category: it is the same loss when every row's support is the whole student vocabulary, each
        token its own category, with no tail (same tokens under other ids). Raises ValueError otherwise.
        """
        vocab = self.members.shape[1] if self.members is not None else None
        full = bool(self.mask.all()) and bool(self.valid.all()) and bool(torch.isinf(self.tail).all())
        if full and vocab is not None:
            own = self.members.gather(1, self.ids) == self.ids  # type: ignore[union-attr]
            full = bool(own.all()) and self.ids.shape[1] == vocab
        if not full:
            raise ValueError(
                "to_topk needs every position to have a teacher, no tail, and the whole student vocabulary as its "
                "support with each token its own category"
            )
        return TeacherTopK(ids=self.ids, logprobs=self.logprobs)


def _logsumexp_by(labels: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(unique labels, log of the summed exp(values) per label); a label whose values are all -inf gets -inf."""
    uniq, inv = torch.unique(labels, return_inverse=True)
    top = torch.full(uniq.shape, -math.inf, dtype=values.dtype).scatter_reduce(0, inv, values, "amax")
    base = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    total = torch.zeros_like(base).scatter_add(0, inv, torch.exp(values - base[inv]))
    return uniq, base + torch.log(total)


def _log1mexp_sum(lp: torch.Tensor) -> torch.Tensor:
    """log(1 - sum(exp(lp))): a top-k row's tail, -inf when the row holds all the mass."""
    total = torch.logsumexp(lp, 0)
    if float(total) >= 0.0:
        return torch.full((), -math.inf, dtype=lp.dtype)
    return torch.log(-torch.expm1(total))


@dataclass
class _Depth:
    """One teacher token of a spine: the text from the student start to it, the realized id, and the student token
    each teacher token's leaf goes to (``table [V_t]``; -1: the tail, or not in the teacher's row)."""

    prefix: Surface
    realized: int
    table: torch.Tensor
    written: Surface  # the part of a straddling teacher token before the student start (first depth only)


class _Position:
    """The leaves of one student position (``labels``, ``masses``) and its student-side categories (``members``)."""

    def __init__(
        self,
        pair: VocabPair,
        text: Surface,
        a: int,
        b: int,
        student_id: int,
        m: int,
        t_spans: torch.Tensor,
        teacher_ids: Sequence[int],
        teacher: torch.Tensor | TeacherTopK,
        fold: Fold,
        dtype: torch.dtype,
    ) -> None:
        self.pair, self.student_id = pair, student_id
        self.depths: list[_Depth] = []
        self.final: Surface | None = (
            None  # the realized spine's text, once it reaches the student token's end
        )
        labels: list[torch.Tensor] = []
        masses: list[torch.Tensor] = []
        reach = torch.zeros((), dtype=dtype)  # log-probability of the spine so far
        j = m
        while True:
            start = int(t_spans[j, 0])
            if isinstance(teacher, TeacherTopK):
                ids, lp = teacher.ids[j], teacher.logprobs[j].to(dtype)
            else:
                ids, lp = torch.arange(pair.teacher_size), teacher[j].to(dtype)
            written = text[start:a] if j == m and start < a else text[:0]
            if written:
                # A teacher token straddles the student boundary: keep the teacher tokens that start with what is
                # already written before it, renormalised; their remainders are the leaves' strings.
                cand, cand_labels = pair.inside_labels(written, fold)
                table = torch.full((pair.teacher_size,), -1, dtype=torch.long)
                row = torch.full((pair.teacher_size,), -math.inf, dtype=dtype)
                row[ids] = lp
                keep = torch.isfinite(row[cand])
                ids, lp = cand[keep], row[cand][keep]
                table[ids] = cand_labels[keep]
                if lp.numel() == 0:
                    labels.append(torch.tensor([-1]))
                    masses.append(torch.zeros(1, dtype=dtype))
                    break
                lp = lp - torch.logsumexp(lp, 0)
            else:
                table = pair.depth_labels(text[a:start], fold)
                if isinstance(teacher, TeacherTopK):  # the mass outside the row is in no student token
                    labels.append(torch.tensor([-1]))
                    masses.append((reach + _log1mexp_sum(lp)).reshape(1))
                    row_table = torch.full_like(table, -1)
                    row_table[ids] = table[ids]
                    table = row_table
            realized_id = int(teacher_ids[j])
            self.depths.append(_Depth(text[a:start], realized_id, table, written))
            realized = ids == realized_id
            labels.append(table[ids[~realized]])
            masses.append(reach + lp[~realized])
            if not bool(realized.any()):
                break  # the realized teacher token is outside a top-k row: the spine's mass is in that row's tail
            reach = reach + lp[realized][0]
            if int(t_spans[j, 1]) >= b:
                self.final = text[a : int(t_spans[j, 1])]
                labels.append(torch.tensor([student_id]))
                masses.append(reach.reshape(1))
                break
            j += 1
            if j >= t_spans.shape[0]:
                labels.append(torch.tensor([-1]))
                masses.append(reach.reshape(1))
                break
        self.labels = torch.cat(labels)
        self.masses = torch.cat(masses)

    def members(self) -> torch.Tensor:
        """``[V_s]``: the student token whose category each student token joins: the label of the leaf that holds
        the text it begins with (follow the realized teacher tokens as far as the token's text does, then the
        longest teacher token that starts the rest); a leaf's label is its own category; -1: none."""
        pair, first = self.pair, self.depths[0]
        if first.written:
            best = pair.inside_members(first.written)
        else:
            best = pair.student_to_teacher_prefix
        ok = (best >= 0) & (best != first.realized)
        members = torch.where(ok, first.table[best.clamp(min=0)], torch.full_like(best, -1))
        spine_text = self.depths[1].prefix if len(self.depths) > 1 else self.final
        if spine_text:
            for surface, sid in pair.student_with_prefix(spine_text):
                members[sid] = self._walk(surface)
        named = self.labels[self.labels >= 0]
        members[named] = named
        return members

    def _walk(self, surface: Surface) -> int:
        k = 0
        while k + 1 < len(self.depths) and surface.startswith(self.depths[k + 1].prefix):
            k += 1
        if self.final is not None and k == len(self.depths) - 1 and surface.startswith(self.final):
            return self.student_id
        d = self.depths[k]
        if d.written:
            tid = self.pair.longest_teacher_prefix(
                d.written + surface, d.realized, longer_than=len(d.written)
            )
        else:
            tid = self.pair.longest_teacher_prefix(surface[len(d.prefix) :], d.realized)
        return int(d.table[tid]) if tid >= 0 else -1


@torch.no_grad()
def project_teacher(
    pair: VocabPair,
    text: Surface,
    student_spans: Sequence[Sequence[int]] | torch.Tensor,
    student_ids: Sequence[int] | torch.Tensor,
    teacher_spans: Sequence[Sequence[int]] | torch.Tensor,
    teacher_ids: Sequence[int] | torch.Tensor,
    teacher: torch.Tensor | TeacherTopK,
    *,
    fold: Fold = "prefix",
    members: bool = True,
) -> ProjectedTeacher:
    """The teacher's distribution at every student position of one completion, on the student's vocabulary.

    ``text`` is the completion (``str`` or ``bytes``, the unit of the spans, the type of ``pair``'s surfaces);
    ``student_spans``/``student_ids`` and ``teacher_spans``/``teacher_ids`` its two tokenizations (the tokens the
    models were fed as targets). ``teacher`` holds, for each teacher position ``j``, the teacher's log-probabilities
    of the token at ``j`` (the distribution that predicts it, at the loss temperature): ``[n_t, V_t]``, or a
    ``TeacherTopK`` of ``[n_t, k]`` rows (a served teacher or the top-k cache; the mass outside a row goes to the
    tail, and the realized token must be in its row for the chain rule to go on). ``fold`` says where a leaf whose
    string is not a student token goes: ``"prefix"``, the longest student token that starts it, or ``"tail"``.
    ``members``: also give every student token its category (``ProjectedTeacher.members``); False compares the
    support ids alone. See the module docstring for the definition.
    """
    if fold not in _FOLDS:
        raise ValueError(f"fold must be one of {_FOLDS}, got {fold!r}")
    alignment = align_spans(student_spans, teacher_spans)
    s_spans = _as_spans(student_spans, "student")
    t_spans = _as_spans(teacher_spans, "teacher")
    s_ids = [int(i) for i in torch.as_tensor(student_ids).reshape(-1).tolist()]
    t_ids = [int(i) for i in torch.as_tensor(teacher_ids).reshape(-1).tolist()]
    if len(s_ids) != s_spans.shape[0] or len(t_ids) != t_spans.shape[0]:
        raise ValueError("one id per span is needed on each side")
    lp_rows = teacher.logprobs if isinstance(teacher, TeacherTopK) else teacher
    if lp_rows.shape[0] != len(t_ids):
        raise ValueError(f"the teacher has {lp_rows.shape[0]} positions for {len(t_ids)} teacher tokens")
    if not isinstance(teacher, TeacherTopK) and lp_rows.shape[-1] != pair.teacher_size:
        raise ValueError(
            f"teacher log-probs have {lp_rows.shape[-1]} columns, the vocabulary {pair.teacher_size}"
        )
    dtype = lp_rows.dtype if lp_rows.dtype == torch.float64 else torch.float32
    n = len(s_ids)
    rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = []
    member_rows = torch.full((n, pair.student_size), -1, dtype=torch.long) if members else None
    for i in range(n):
        m = int(alignment.teacher_index[i])
        if m < 0:
            rows.append(None)
            continue
        a, b = int(s_spans[i, 0]), int(s_spans[i, 1])
        pos = _Position(pair, text, a, b, s_ids[i], m, t_spans, t_ids, teacher, fold, dtype)
        uniq, lse = _logsumexp_by(pos.labels, pos.masses)
        named = uniq >= 0
        tail = lse[~named][0] if bool((~named).any()) else torch.tensor(-math.inf, dtype=dtype)
        rows.append((uniq[named], lse[named], tail))
        if member_rows is not None:
            member_rows[i] = pos.members()
    width = max((r[0].numel() for r in rows if r is not None), default=0)
    ids = torch.zeros(n, width, dtype=torch.long)
    logprobs = torch.full((n, width), -math.inf, dtype=dtype)
    mask = torch.zeros(n, width, dtype=torch.bool)
    tail = torch.zeros(n, dtype=dtype)  # a position without a teacher: all "tail" on both sides, divergence 0
    valid = torch.zeros(n, dtype=torch.bool)
    for i, row in enumerate(rows):
        if row is None:
            continue
        k = row[0].numel()
        ids[i, :k], logprobs[i, :k], mask[i, :k] = row[0], row[1], True
        tail[i] = row[2]
        valid[i] = True
    return ProjectedTeacher(
        ids=ids, logprobs=logprobs, mask=mask, tail=tail, valid=valid, members=member_rows
    )


# ---------------------------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------------------------


def _bound(divergence: str | object) -> BoundDivergence:
    if isinstance(divergence, str):
        return get_divergence(divergence)
    bound = as_bound_divergence(divergence)
    if bound is None:
        raise ValueError(f"{divergence!r} is not a registered divergence (gkd.divergences.get_divergence)")
    return bound


def _student_on_support(logq: torch.Tensor, projected: ProjectedTeacher) -> torch.Tensor:
    """``[N, k]``: the student's log-mass of each support id's category (-inf at padding)."""
    neg_inf = torch.full((), -math.inf, dtype=logq.dtype)
    if projected.members is None:
        return torch.where(projected.mask, logq.gather(-1, projected.ids), neg_inf)
    n, vocab = logq.shape
    k = projected.ids.shape[1]
    # column of each support id in its row (k: no column), then the column of each student token's category
    col_of = torch.full((n, vocab + 1), k, dtype=torch.long)
    col_of.scatter_(
        1,
        torch.where(projected.mask, projected.ids, vocab),
        torch.where(projected.mask, torch.arange(k).expand(n, k), k),
    )
    col = col_of.gather(1, torch.where(projected.members >= 0, projected.members, vocab))
    top = torch.full((n, k + 1), -math.inf, dtype=logq.dtype).scatter_reduce(1, col, logq.detach(), "amax")
    top = torch.where(torch.isfinite(top), top, torch.zeros((), dtype=logq.dtype))
    total = torch.zeros((n, k + 1), dtype=logq.dtype).scatter_add(
        1, col, torch.exp(logq - top.gather(1, col))
    )
    return torch.where(projected.mask, (top + torch.log(total))[:, :k], neg_inf)


def projected_divergence(
    student_logits: torch.Tensor,
    projected: ProjectedTeacher,
    divergence: str | object,
    *,
    temperature: float | None = None,
) -> torch.Tensor:
    """The divergence at every student position ``[N]`` against a projected teacher (0 where ``valid`` is False).

    ``student_logits`` is ``[N, V_s]``; ``divergence`` a registered name, a ``get_divergence(...)`` result or a
    registered function. The comparison is ``D(P̃ || Q̃)`` on the support's categories plus the tail, with the
    student's tail set to the teacher's and its mass on the categories conditioned on them (module docstring): for
    every registered divergence, ``(1 - τ) D(P(· | K) || Q(· | K))``. ``temperature`` (default: the divergence's
    bound one, else 1) applies to the student's logits; the teacher's log-probs were taken at it. Differentiable
    w.r.t. the logits.
    """
    bound = _bound(divergence)
    if temperature is None:
        temperature = bound.temperature if bound.temperature is not None else 1.0
    params = {k: v for k, v in bound.params.items() if k != "temperature"}
    logq = log_probs(student_logits, temperature)
    dtype = logq.dtype
    mask = projected.mask
    any_named = mask.any(-1, keepdim=True)
    zero = torch.zeros((), dtype=dtype)
    neg_inf = torch.full((), -math.inf, dtype=dtype)
    lq = _student_on_support(logq, projected)
    lp = torch.where(mask, projected.logprobs.to(dtype), neg_inf)
    tail = projected.tail.to(dtype)
    # A row with no support and no tail (everything restricted away) compares nothing: it counts as invalid.
    valid = projected.valid & (torch.isfinite(lp).any(-1) | torch.isfinite(tail))
    tail = torch.where(valid, tail, zero)[:, None]
    # log Q(K) and log P(K) (= log(1 - τ)), on rows with at least one support id (the others are all tail).
    log_qk = torch.logsumexp(torch.where(any_named, lq, zero), -1, keepdim=True)
    log_pk = torch.logsumexp(torch.where(any_named, lp, zero), -1, keepdim=True)
    log_pk = torch.where(torch.isfinite(log_pk), log_pk, torch.full((), LOG_FLOOR, dtype=dtype))
    q_named = torch.where(mask & valid[:, None], lq - log_qk + log_pk, neg_inf)
    q = torch.cat([q_named, tail], -1)
    p = torch.cat([torch.where(valid[:, None], lp, neg_inf), tail], -1)
    values = bound.spec.fn(q, p, temperature=1.0, **params)
    return torch.where(valid, values, torch.zeros((), dtype=values.dtype))
