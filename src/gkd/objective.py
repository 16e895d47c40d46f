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

:class:`Objective` is built once from the config and owns this branching; the step only calls
:meth:`Objective.loss`. The teacher side is the live teacher, or the top-k cache on fixed (off-policy) batches
whose examples it covers. What is not on the fused (hidden states + head, chunked) path: seq2seq students and
heads with a logit transform use full logits; the discounted-RKL estimator runs one extra full-logits student
forward pass to form its returns.
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gkd.config import GKDConfig
from gkd.data import Batch
from gkd.divergences import get_divergence, reduction_weights
from gkd.losses import Head, LossTerms, Workspace, chunked_loss, logits_loss
from gkd.models import Scorer, ScoringOutput, score_positions, unwrap
from gkd.rl import discounted_returns
from gkd.teacher import Teacher, TopKCache

__all__ = ["Objective", "Timer"]


@dataclass
class Timer:
    """Wall-clock seconds per named phase of a step (``time_<name>`` in the step's log record)."""

    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - t0


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
        """Per-position weights of every term except the discounted-RKL returns (which need the models)."""
        valid = batch.completion_mask
        w = self.weights(batch, denominator)
        terms = LossTerms()
        if self.mode == "nll":
            terms.nll = w
        elif self.mode == "sampled_rkl":
            terms.sampled_rkl = self.distill_weight * w
        elif self.mode == "divergence" and self.distill_weight > 0:
            terms.divergence = self.distill_weight * w
        if advantages is not None:
            per_position = advantages.to(valid.device)[:, None].expand_as(valid)[valid]
            terms.nll = _add(terms.nll, self.pg_weight * per_position * w)
        return terms

    # ------------------------------------------------------------------------------------------------------------
    def loss(
        self,
        batch: Batch,
        denominator: float,
        *,
        scorer: nn.Module,
        teacher: Teacher | None,
        reference: Teacher | None = None,
        topk_cache: TopKCache | None = None,
        advantages: torch.Tensor | None = None,
        stats: dict[str, list] | None = None,
        timer: Timer | None = None,
    ) -> torch.Tensor:
        """The micro-batch's loss, already divided by the step-wide ``denominator``; ``stats`` (a dict of lists)
        collects per-position diagnostics (forward/reverse KL, entropy, top-1 agreement, KL to the initial student).
        """
        timer = timer or Timer()
        terms = self.terms(batch, denominator, advantages)
        if self.mode == "discounted_rkl":
            returns = self.discounted_rkl_returns(batch, scorer, teacher)
            terms.nll = _add(terms.nll, self.distill_weight * self.weights(batch, denominator) * returns)
        targets = batch.completion_ids[batch.completion_mask]
        with timer("teacher"):
            teacher_out, teacher_topk = self._teacher_view(batch, terms, teacher, topk_cache)
        with timer("student_forward"):
            student_out = scorer(
                batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask
            )
        with timer("loss"):
            chunk_stats: dict[str, torch.Tensor] | None = {} if stats is not None else None
            loss = self.evaluate(
                student_out, teacher_out, terms, targets, chunk_stats, teacher_topk=teacher_topk
            )
            if reference is not None and (self.kl_to_initial > 0 or stats is not None):
                kl = self._kl_to_initial(batch, student_out, reference, denominator, targets, stats)
                if kl is not None:
                    loss = loss + kl
        if stats is not None and chunk_stats:
            for k, v in chunk_stats.items():
                stats[k].append(v.detach().float().cpu())
        return loss

    def _teacher_view(
        self, batch: Batch, terms: LossTerms, teacher: Teacher | None, topk_cache: TopKCache | None
    ) -> tuple[ScoringOutput | None, Any]:
        """The live teacher's scores, or its cached top-k for a fixed batch the cache covers (divergence term)."""
        if (
            topk_cache is not None
            and not batch.on_policy
            and batch.indices is not None
            and terms.divergence is not None
        ):
            return None, topk_cache.lookup(batch.indices, batch.completion_mask)
        if teacher is not None and terms.needs_teacher():
            if getattr(teacher, "served", False):  # gkd.teacher_client.ServedTeacher: top-k + tail over HTTP
                return None, teacher.topk(batch)
            return teacher.score(batch), None
        return None, None

    def _kl_to_initial(
        self,
        batch: Batch,
        student_out: ScoringOutput,
        reference: Teacher,
        denominator: float,
        targets: torch.Tensor,
        stats: dict[str, list] | None,
    ) -> torch.Tensor | None:
        """κ · KL(p_S ‖ p_S0) as a loss term (kl_to_initial > 0), else None (the same KL is only logged)."""
        ref_out = reference.score(batch)
        ref_stats: dict[str, torch.Tensor] | None = {} if stats is not None else None
        w = self.weights(batch, denominator)
        if self.kl_to_initial > 0:
            terms, out = LossTerms(divergence=self.kl_to_initial * w), student_out
        else:
            terms, out = LossTerms(divergence=torch.zeros_like(w)), _detached(student_out)
        loss = self.evaluate(out, ref_out, terms, targets, ref_stats, divergence=self.reverse_kl)
        if stats is not None and ref_stats:
            stats["kl_to_initial"].append(ref_stats["reverse_kl"].detach().float().cpu())
        return loss if self.kl_to_initial > 0 else None

    def evaluate(
        self,
        student_out: ScoringOutput,
        teacher_out: ScoringOutput | None,
        terms: LossTerms,
        targets: torch.Tensor,
        stats: dict[str, torch.Tensor] | None,
        divergence: Any = None,
        teacher_topk: Any = None,
    ) -> torch.Tensor:
        """The weighted terms from scored outputs: chunked from hidden states when the student exposes its head
        (never the ``[positions, vocab]`` logits), else from logits."""
        div = divergence or self.divergence
        t_hidden = t_head = t_logits = None
        if teacher_out is not None:
            t_hidden, t_head, t_logits = teacher_out.hidden, teacher_out.head, teacher_out.logits
        if student_out.hidden is not None:
            return chunked_loss(
                student_out.hidden,
                student_out.head,
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
            student_out.logits,
            terms,
            divergence=div,
            targets=targets,
            teacher_logits=t_logits,
            teacher_topk=teacher_topk,
            temperature=self.temperature,
            stats=stats,
        )

    @torch.no_grad()
    def discounted_rkl_returns(
        self, batch: Batch, scorer: nn.Module, teacher: Teacher | None
    ) -> torch.Tensor:
        """Per valid position, the discounted sum of future per-token rewards ``log p_T(y) − log p_S(y)``
        (reverse KL as a reward); one full-logits forward pass of each model."""
        assert teacher is not None
        valid = batch.completion_mask
        s = score_positions(
            _scored_model(scorer),
            batch.prompt_ids,
            batch.prompt_mask,
            batch.completion_ids,
            batch.completion_mask,
            vocab=teacher.vocab,
            fused=False,
        )
        t = teacher.score(batch)
        t_logits = t.logits if t.logits is not None else t.head.logits(t.hidden)  # type: ignore[union-attr]
        y = batch.completion_ids[valid]
        lq = torch.log_softmax(s.logits.float(), -1).gather(-1, y[:, None]).squeeze(-1)  # type: ignore[union-attr]
        lp = torch.log_softmax(t_logits.float(), -1).gather(-1, y[:, None]).squeeze(-1)
        per_token = torch.zeros(valid.shape, dtype=torch.float32, device=valid.device)
        per_token[valid] = -(lq - lp)
        return discounted_returns(per_token, valid, self.rkl_discount)[valid]


def _scored_model(scorer: nn.Module) -> nn.Module:
    """The model a (possibly data-parallel wrapped) :class:`gkd.models.Scorer` runs, or ``scorer`` itself."""
    inner = unwrap(scorer)
    return inner.model if isinstance(inner, Scorer) else inner


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
