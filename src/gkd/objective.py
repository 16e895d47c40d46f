"""The loss of one micro-batch: which terms, with which per-position weights, against which teacher.

Every training mode of gkd is a weighted sum of per-position terms over the valid completion tokens ``y_t`` of the
batch (``w`` are the reduction weights: a token or per-sequence mean over the whole step, all micro-batches and
ranks; ``α_d`` is ``alpha`` when a reward is set, else 1):

    divergence        α_d · w · D(p_T ‖ p_S)(· | y_<t)                 exact over the vocabulary (GKD, supervised KD)
    nll               w · −log p_S(y_t)                                 divergence: nll (SFT, SeqKD)
    sampled RKL       α_d · w · sg(log p_S − log p_T)(y_t) · log p_S(y_t)   teacher_kl_estimator: sampled
    discounted RKL    α_d · w · G_t · −log p_S(y_t),  G_t = Σ_k γ^k (log p_T − log p_S)(y_{t+k})   rkl_discount > 0
    policy gradient   (1 − α) · w · A(y) · −log p_S(y_t)               RL + GKD; A detached (gkd.rl)
    KL to initial     κ · w · KL(p_S ‖ p_S0)                            kl_to_initial > 0 (the RLEF* regulariser)

:class:`Objective` is built once from the config and owns this branching. It is pure math: it never runs a
model. The step hands it the student's scores ``p_s`` (:class:`gkd.outputs.ScoringOutput`) and the teacher's view
``p_t`` (a ``ScoringOutput``, or a :class:`gkd.outputs.TeacherTopK` from the top-k cache or a served teacher: see
:mod:`gkd.teacher`); :meth:`Objective.loss` turns them into the micro-batch's loss. What is not on the fused (hidden
states + head, chunked) path: seq2seq students and heads with a logit transform use full logits. The discounted-RKL
returns are formed from the same ``p_s`` and ``p_t`` (no second forward pass of either model). Several teachers
(``teachers``, :mod:`gkd.teachers`) hand a ``RoutedView``: each teacher's term on its rows' positions, weighted per
position (:meth:`Objective.routed_loss`).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch

from gkd.align import ProjectedTeacher, projected_divergence
from gkd.config import GKDConfig
from gkd.data import Batch
from gkd.divergences import get_divergence, reduction_weights
from gkd.errors import ModelError
from gkd.losses import LossTerms, Workspace, chunked_loss, default_chunk, logits_loss
from gkd.outputs import Head, ScoringOutput, TeacherTopK, TeacherView
from gkd.rl import discounted_returns
from gkd.teachers import RoutedView
from gkd.xtok import AlignedView

__all__ = ["Objective"]


@dataclass
class Objective:
    """``D(p_T ‖ p_S)`` plus whatever else the config asks for, on one micro-batch (see the module docstring)."""

    mode: str  # "divergence" | "nll" | "sampled_rkl" | "discounted_rkl"
    divergence: Any  # the bound divergence of gkd.divergences (None for nll)
    distill_weight: float  # α with a reward, else 1
    pg_weight: float  # 1 − α with a reward, else 0
    kl_to_initial: float
    reduction: str
    temperature: float  # the loss temperature (not the sampling one)
    chunk_size: int | None
    rkl_discount: float
    workspace: Workspace = field(
        default_factory=Workspace
    )  # scratch space of the fused loss, kept across steps
    reverse_kl: Any = field(default_factory=lambda: get_divergence("reverse_kl"))

    @classmethod
    def from_config(cls, cfg: GKDConfig) -> Objective:
        if cfg.divergence == "nll":
            mode = "nll"
        elif cfg.teacher_kl_estimator == "sampled":
            mode = "discounted_rkl" if cfg.rkl_discount > 0 else "sampled_rkl"
        else:
            mode = "divergence"
        rl = cfg.reward is not None
        return cls(
            mode=mode,
            divergence=None if mode == "nll" else get_divergence(cfg.divergence, **cfg.divergence_params()),
            distill_weight=cfg.alpha if rl else 1.0,
            pg_weight=1.0 - cfg.alpha if rl else 0.0,
            kl_to_initial=cfg.kl_to_initial,
            reduction=cfg.reduction,
            temperature=cfg.loss_temperature,
            chunk_size=cfg.loss_chunk_size,
            rkl_discount=cfg.rkl_discount,
        )

    # ------------------------------------------------------------------------------------------------------------
    def count(self, batch: Batch) -> int:
        """What the step's loss is normalised by, for this micro-batch: valid tokens, or non-empty sequences."""
        if self.reduction == "token":
            return batch.num_tokens()
        return int((batch.completion_mask.sum(-1) > 0).sum())

    def weights(self, batch: Batch, denominator: float) -> torch.Tensor:
        """The reduction weights ``w`` of the batch's valid positions (token or sequence mean over the step)."""
        valid = batch.completion_mask
        return reduction_weights(valid, self.reduction, denominator)[valid].to(valid.device)

    def terms(self, batch: Batch, denominator: float, advantages: torch.Tensor | None) -> LossTerms:
        """Per-position weights of every term except the discounted-RKL returns (which need the scores)."""
        valid = batch.completion_mask
        w = self.weights(batch, denominator)
        terms = LossTerms()
        if self.mode == "nll":
            terms.logp_weight = w
        elif self.mode == "sampled_rkl":
            terms.sampled_rkl = self.distill_weight * w
        elif self.mode == "divergence" and self.distill_weight > 0:
            terms.divergence = self.distill_weight * w
        if advantages is not None:
            per_position = advantages.to(valid.device)[:, None].expand_as(valid)[valid]
            terms.logp_weight = _add(terms.logp_weight, self.pg_weight * per_position * w)
        return terms

    @property
    def needs_teacher(self) -> bool:
        """Whether a micro-batch's loss reads the teacher (the step then asks it for its view of the batch)."""
        if self.mode == "divergence":
            return self.distill_weight > 0
        return self.mode in ("sampled_rkl", "discounted_rkl")

    def uses_reference(self, logging_stats: bool) -> bool:
        """Whether the step scores the batch with the initial student: the KL to it is a term, or only logged."""
        return self.kl_to_initial > 0 or logging_stats

    # ------------------------------------------------------------------------------------------------------------
    def loss(
        self,
        batch: Batch,
        p_s: ScoringOutput,
        p_t: TeacherView | None,
        denominator: float,
        *,
        advantages: torch.Tensor | None = None,
        stats: dict[str, list] | None = None,
        teacher_losses: dict[str, float] | None = None,
    ) -> torch.Tensor:
        """The micro-batch's loss from the student's scores ``p_s`` and the teacher's view ``p_t``, already divided
        by the step-wide ``denominator``; ``stats`` (a dict of lists) collects per-position diagnostics (forward /
        reverse KL, entropy, top-1 agreement). With several teachers (``p_t`` a :class:`gkd.teachers.RoutedView`)
        see :meth:`routed_loss`; ``teacher_losses`` then gathers each teacher's term by name."""
        if isinstance(p_t, RoutedView):
            return self.routed_loss(batch, p_s, p_t, denominator, advantages, stats, teacher_losses)
        terms = self.terms(batch, denominator, advantages)
        if self.mode == "discounted_rkl":  # G_t from the scores already computed: no second forward pass
            returns = self.discounted_rkl_returns(batch, p_s, p_t)
            terms.logp_weight = _add(
                terms.logp_weight, self.distill_weight * self.weights(batch, denominator) * returns
            )
        targets = batch.completion_ids[batch.completion_mask]
        chunk_stats: dict[str, torch.Tensor] | None = {} if stats is not None else None
        loss = self.from_outputs(p_s, p_t, terms, targets, chunk_stats)
        if stats is not None and chunk_stats:
            for k, v in chunk_stats.items():
                stats[k].append(v.detach().float().cpu())
        return loss

    def routed_loss(
        self,
        batch: Batch,
        p_s: ScoringOutput,
        p_t: RoutedView,
        denominator: float,
        advantages: torch.Tensor | None,
        stats: dict[str, list] | None,
        teacher_losses: dict[str, float] | None,
    ) -> torch.Tensor:
        """Several teachers: at each position ``Σ_i r_i · D(p_Ti ‖ p_S)`` (the teacher terms' weights times each
        teacher's per-position weight ``r_i``), plus the terms that read no teacher, once.

        Each teacher's term runs on the student's positions of that teacher's rows only. When one teacher covers the
        whole batch with weight 1 (one teacher, or every row routed to it) this is :meth:`loss` with that teacher's
        view, bit for bit (with a reward's policy-gradient term the terms are summed separately, equal up to float
        rounding). ``stats`` gets each teacher's diagnostics as ``teacher/NAME/KEY`` and, under the plain
        keys, their ``r_i``-weighted sum per position; ``teacher_losses[NAME]`` adds each teacher's term."""
        if self.mode == "discounted_rkl":
            raise ModelError("rkl_discount > 0 needs one teacher; drop rkl_discount or use one teacher")
        if len(p_t.parts) == 1 and p_t.parts[0].everything and advantages is None:
            part = p_t.parts[0]
            own: dict[str, list] | None = defaultdict(list) if stats is not None else None
            loss = self.loss(batch, p_s, part.view, denominator, advantages=advantages, stats=own)
            if stats is not None and own is not None:
                for key, values in own.items():
                    stats[key] += values
                    stats[f"teacher/{part.name}/{key}"] += values
            if teacher_losses is not None:  # no other term (no reward): the teacher's term is the whole loss
                teacher_losses[part.name] = teacher_losses.get(part.name, 0.0) + float(loss.detach())
            return loss
        terms = self.terms(batch, denominator, advantages)
        targets = batch.completion_ids[batch.completion_mask]
        loss: torch.Tensor | float = 0.0
        if terms.logp_weight is not None:  # nll / policy-gradient terms: no teacher in them
            loss = self.from_outputs(p_s, None, LossTerms(logp_weight=terms.logp_weight), targets, None)
        combined: dict[str, torch.Tensor] = {}
        n = int(targets.numel())
        for part in p_t.parts:
            pos = part.positions
            mine = LossTerms(
                divergence=None if terms.divergence is None else terms.divergence[pos] * part.weight,
                sampled_rkl=None if terms.sampled_rkl is None else terms.sampled_rkl[pos] * part.weight,
            )
            part_stats: dict[str, torch.Tensor] | None = {} if stats is not None else None
            term = self.from_outputs(_positions(p_s, pos), part.view, mine, targets[pos], part_stats)
            loss = loss + term
            if teacher_losses is not None:
                teacher_losses[part.name] = teacher_losses.get(part.name, 0.0) + float(term.detach())
            if stats is not None and part_stats:
                for key, value in part_stats.items():
                    value = value.detach().float()
                    stats[f"teacher/{part.name}/{key}"].append(value.cpu())
                    total = combined.setdefault(key, torch.zeros(n, device=value.device))
                    total[pos] += part.weight.to(value.device) * value
        if stats is not None:
            for key, value in combined.items():  # Σ_i r_i · stat_i: r_i sums to 1 at every position
                stats[key].append(value.cpu())
        return loss if isinstance(loss, torch.Tensor) else _zero_loss(p_s)

    def kl_to_initial_term(
        self,
        batch: Batch,
        p_s: ScoringOutput,
        p_ref: ScoringOutput,
        denominator: float,
        stats: dict[str, list] | None,
    ) -> torch.Tensor | float:
        """κ · KL(p_S ‖ p_S0) against the initial student's scores ``p_ref`` as a loss term (kl_to_initial > 0),
        else 0.0: the same KL is then only logged (``stats["kl_to_initial"]``), cut from the graph."""
        targets = batch.completion_ids[batch.completion_mask]
        ref_stats: dict[str, torch.Tensor] | None = {} if stats is not None else None
        w = self.weights(batch, denominator)
        if self.kl_to_initial > 0:
            terms, out = LossTerms(divergence=self.kl_to_initial * w), p_s
        else:
            terms, out = LossTerms(divergence=torch.zeros_like(w)), _detached(p_s)
        loss = self.from_outputs(out, p_ref, terms, targets, ref_stats, divergence=self.reverse_kl)
        if stats is not None and ref_stats:
            stats["kl_to_initial"].append(ref_stats["reverse_kl"].detach().float().cpu())
        return loss if self.kl_to_initial > 0 else 0.0

    def from_outputs(
        self,
        student_out: ScoringOutput,
        teacher: TeacherView | None,
        terms: LossTerms,
        targets: torch.Tensor,
        stats: dict[str, torch.Tensor] | None,
        divergence: Any = None,
    ) -> torch.Tensor:
        """The weighted terms from scored outputs: chunked from hidden states when the student exposes its head
        (never the ``[positions, vocab]`` logits), else from logits. ``teacher`` is a teacher's scores or its
        top-k log-probabilities plus a tail bucket."""
        div = divergence or self.divergence
        if isinstance(teacher, AlignedView):
            return self.aligned_loss(student_out, teacher, terms, targets, div, stats)
        teacher_topk = teacher if isinstance(teacher, TeacherTopK) else None
        t_hidden = t_head = t_logits = None
        if isinstance(teacher, ScoringOutput):
            t_hidden, t_head, t_logits = teacher.hidden, teacher.head, teacher.logits
        if student_out.hidden is not None:
            return chunked_loss(
                student_out.hidden,
                student_out.head,  # type: ignore[arg-type]
                terms,
                divergence=div,
                targets=targets,
                teacher_hidden=t_hidden,
                teacher_head=t_head,
                teacher_logits=t_logits,
                teacher_topk=teacher_topk,
                temperature=self.temperature,
                chunk_size=self.chunk_size,
                stats=stats,
                workspace=self.workspace,
            )
        if t_hidden is not None:
            assert isinstance(t_head, Head)
            t_logits = t_head.logits(t_hidden)
        return logits_loss(
            student_out.logits,  # type: ignore[arg-type]
            terms,
            divergence=div,
            targets=targets,
            teacher_logits=t_logits,
            teacher_topk=teacher_topk,
            temperature=self.temperature,
            stats=stats,
        )

    def aligned_loss(
        self,
        student_out: ScoringOutput,
        teacher: AlignedView,
        terms: LossTerms,
        targets: torch.Tensor,
        divergence: Any,
        stats: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The weighted terms against a teacher with another tokenizer (:mod:`gkd.xtok`): the projected divergence
        (:func:`gkd.align.projected_divergence`) and ``w · −log p_S(y)``, from the student's logits formed a chunk
        of positions at a time (never ``[positions, vocab]`` at once)."""
        if terms.sampled_rkl is not None:
            raise ModelError(
                "teacher_kl_estimator: sampled needs the teacher's probability of the student's token; with a "
                "teacher of another tokenizer use teacher_kl_estimator: exact"
            )
        rows = student_out.hidden if student_out.hidden is not None else student_out.logits
        assert rows is not None
        vocab = student_out.head.size if student_out.head is not None else rows.shape[-1]
        chunk = self.chunk_size or default_chunk(vocab)
        total = rows.new_zeros((), dtype=torch.float32)
        parts: dict[str, list[torch.Tensor]] = {}
        for a in range(0, rows.shape[0], chunk):
            b = min(a + chunk, rows.shape[0])
            z = student_out.head.logits(rows[a:b]) if student_out.hidden is not None else rows[a:b]  # type: ignore[union-attr]
            z = z.float()
            if terms.divergence is not None:
                d = projected_divergence(z, teacher.rows(a, b), divergence, temperature=self.temperature)
                total = total + (terms.divergence[a:b] * d).sum()
            if terms.logp_weight is not None:
                logp = torch.log_softmax(z, -1).gather(-1, targets[a:b, None]).squeeze(-1)
                total = total - (terms.logp_weight[a:b] * logp).sum()
            if stats is not None:
                for k, v in _aligned_stats(
                    z.detach(), teacher.rows(a, b), targets[a:b], self.temperature
                ).items():
                    parts.setdefault(k, []).append(v)
        if stats is not None:
            stats.update({k: torch.cat(v) for k, v in parts.items()})
        return total

    @torch.no_grad()
    def discounted_rkl_returns(
        self, batch: Batch, p_s: ScoringOutput, p_t: TeacherView | None
    ) -> torch.Tensor:
        """Per valid position, the discounted sum of future per-token rewards ``log p_T(y) − log p_S(y)`` (reverse
        KL as a reward), from the scores the step already has (at temperature 1, as sampled)."""
        if not isinstance(p_t, ScoringOutput):
            raise ModelError(
                "a served teacher (teacher_url) gives top-k log-probs, not logits; this loss needs a local teacher"
            )
        valid = batch.completion_mask
        y = batch.completion_ids[valid]
        lq, lp = _target_logprobs(p_s, y), _target_logprobs(p_t, y)
        per_token = torch.zeros(valid.shape, dtype=torch.float32, device=valid.device)
        per_token[valid] = -(lq - lp)
        return discounted_returns(per_token, valid, self.rkl_discount)[valid]


def _target_logprobs(out: ScoringOutput, y: torch.Tensor) -> torch.Tensor:
    """``log p(y_n)`` at each of the ``N`` positions (float32), in chunks of rows: never ``[N, V]`` logits at once."""
    rows = out.hidden if out.hidden is not None else out.logits
    assert rows is not None
    chunk = default_chunk(out.head.size if out.head is not None else rows.shape[-1])
    parts = []
    for a in range(0, rows.shape[0], chunk):
        z = out.head.logits(rows[a : a + chunk]) if out.hidden is not None else rows[a : a + chunk]  # type: ignore[union-attr]
        parts.append(torch.log_softmax(z.float(), -1).gather(-1, y[a : a + chunk, None]).squeeze(-1))
    return torch.cat(parts) if parts else torch.zeros(0, device=y.device)


def _positions(out: ScoringOutput, positions: torch.Tensor) -> ScoringOutput:
    """The scores at a subset of the valid positions (``positions``: ``[N]`` bool), in the same order."""
    return ScoringOutput(
        None if out.hidden is None else out.hidden[positions],
        out.head,
        None if out.logits is None else out.logits[positions],
    )


def _zero_loss(out: ScoringOutput) -> torch.Tensor:
    """A zero loss still attached to the student's graph (a micro-batch no term reads)."""
    rows = out.hidden if out.hidden is not None else out.logits
    assert rows is not None
    return rows.sum() * 0.0


@torch.no_grad()
def _aligned_stats(
    z: torch.Tensor, projected: ProjectedTeacher, targets: torch.Tensor, temperature: float
) -> dict[str, torch.Tensor]:
    """Diagnostics per position against a projected teacher: student entropy and log p_S(y), the forward and
    reverse KL on the projection's categories, and whether the student's top token is the projection's."""
    logq = torch.log_softmax(z, -1)
    out = {
        "entropy": -(logq.exp() * logq).sum(-1),
        "student_logp": logq.gather(-1, targets[:, None]).squeeze(-1),
        "forward_kl": projected_divergence(z, projected, "forward_kl", temperature=temperature),
        "reverse_kl": projected_divergence(z, projected, "reverse_kl", temperature=temperature),
    }
    if projected.ids.shape[1] > 0:
        best = projected.ids.gather(1, projected.logprobs.argmax(-1, keepdim=True)).squeeze(-1)
        out["top1_agree"] = ((z.argmax(-1) == best) & projected.valid).float()
    return out


def _add(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    return b if a is None else a + b


def _detached(out: ScoringOutput) -> ScoringOutput:
    """A scoring output cut from the autograd graph (for statistics that must not train anything)."""
    head = out.head
    if head is not None:
        bias = None if head.bias is None else head.bias.detach()
        head = dataclasses.replace(head, weight=head.weight.detach(), bias=bias)
    return ScoringOutput(
        None if out.hidden is None else out.hidden.detach(),
        head,
        None if out.logits is None else out.logits.detach(),
    )
