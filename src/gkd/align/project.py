"""The teacher's distribution projected onto the student's vocabulary at a student position, and its loss."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gkd.align.spans import SpanAlignment, _as_spans, align_spans
from gkd.align.vocab import _FOLDS, Fold, Surface, VocabPair
from gkd.divergences import LOG_FLOOR, BoundDivergence, as_bound_divergence, get_divergence, log_probs
from gkd.outputs import TeacherTopK

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


def _matched_members(pair: VocabPair, surface: Surface, sid: int, tid: int, fold: Fold) -> torch.Tensor:
    """The members row ``[V_s]`` of a student token ``sid`` written by exactly one teacher token ``tid`` (the same
    text ``surface``): it depends on these only, not on the teacher's probabilities."""
    one = torch.tensor([[0, len(surface)]])
    probe = _Position(
        pair,
        surface,
        0,
        len(surface),
        sid,
        0,
        one,
        [tid],
        torch.zeros(1, pair.teacher_size),
        fold,
        torch.float32,
    )
    return probe.members()


def _project_matched(
    pair: VocabPair,
    text: Surface,
    s_spans: torch.Tensor,
    s_ids: list[int],
    alignment: SpanAlignment,
    t_ids: list[int],
    lp_rows: torch.Tensor,
    fold: Fold,
    dtype: torch.dtype,
    member_rows: torch.Tensor | None,
) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The rows of the positions whose span is exactly one teacher token's, all at once.

    There every leaf is a whole teacher token, so a position's projection is a scatter-logsumexp of the teacher's
    row by one label vector shared by all such positions (``depth_labels("")``: teacher id -> student token, -1 the
    tail), except that the realized teacher token goes to the realized student token. The groups are the label
    vector's distinct values plus one slot for the realized student token; a group that only the realized token
    was in drops out. Returns {position: (support ids, their log-probs, tail)} and fills their ``member_rows`` (one
    walk per distinct (student token, teacher token) pair of the completion)."""
    where = torch.nonzero(alignment.matched, as_tuple=False).reshape(-1)
    if where.numel() == 0:
        return {}
    base = pair.depth_labels(text[:0], fold)
    uniq, inverse = torch.unique(base, return_inverse=True)  # [U], [V_t]
    u = uniq.numel()
    count = torch.bincount(inverse, minlength=u)
    rows = torch.arange(where.numel())
    tm = torch.tensor([t_ids[int(alignment.teacher_index[i])] for i in where.tolist()], dtype=torch.long)
    sid = torch.tensor([s_ids[i] for i in where.tolist()], dtype=torch.long)
    at = torch.searchsorted(uniq, sid).clamp(max=u - 1)
    present = uniq[at] == sid
    col = torch.where(
        present, at, torch.full_like(at, u)
    )  # the realized student token's group (u: its own slot)
    groups = inverse.expand(where.numel(), -1).clone()
    groups[rows, tm] = col
    values = lp_rows[alignment.teacher_index[where]].to(dtype)  # [P, V_t]
    top = torch.full((where.numel(), u + 1), -math.inf, dtype=dtype).scatter_reduce(1, groups, values, "amax")
    base_top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    total = torch.zeros_like(base_top).scatter_add(1, groups, torch.exp(values - base_top.gather(1, groups)))
    lse = base_top + torch.log(total)
    members_in = torch.cat(
        [count.expand(where.numel(), -1), torch.zeros(where.numel(), 1, dtype=count.dtype)], 1
    )
    members_in[rows, inverse[tm]] -= 1
    members_in[rows, col] += 1
    labels = torch.cat([uniq.expand(where.numel(), -1), sid[:, None]], 1)
    keep = members_in > 0
    out = {}
    walked: dict[tuple[int, int, Surface], torch.Tensor] = {}
    for r, i in enumerate(where.tolist()):
        named = keep[r] & (labels[r] >= 0)
        is_tail = keep[r] & (labels[r] == -1)
        tail = lse[r][is_tail][0] if bool(is_tail.any()) else torch.tensor(-math.inf, dtype=dtype)
        out[i] = (labels[r][named], lse[r][named], tail)
        if member_rows is not None:
            key = (int(sid[r]), int(tm[r]), text[int(s_spans[i, 0]) : int(s_spans[i, 1])])
            if key not in walked:
                walked[key] = _matched_members(pair, key[2], key[0], key[1], fold)
            member_rows[i] = walked[key]
    return out


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
    fast: bool = True,
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
    support ids alone. ``fast``: project the positions whose span is exactly one teacher token's (the common case)
    all at once (:func:`_project_matched`), walking only the rest in Python; the result is the same. See the module
    docstring for the definition.
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
    quick: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    if fast and not isinstance(teacher, TeacherTopK):
        quick = _project_matched(
            pair, text, s_spans, s_ids, alignment, t_ids, lp_rows, fold, dtype, member_rows
        )
    for i in range(n):
        m = int(alignment.teacher_index[i])
        if m < 0:
            rows.append(None)
            continue
        if i in quick:
            rows.append(quick[i])
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
