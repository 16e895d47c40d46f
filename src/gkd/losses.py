"""The GKD loss over valid positions, computed in chunks straight from hidden states.

A language model's logits are ``hidden @ head.T``. At a vocabulary of 128k, the ``[positions, V]`` logits of a whole
batch (and the five to fifteen temporaries a divergence needs) do not fit in memory. This module never builds them:

1. only the *valid* positions (completion tokens, not prompt or padding) are selected, as ``[N, H]`` hidden states;
2. positions are processed ``chunk_size`` at a time: student and teacher logits of the chunk are formed, the loss terms
   are evaluated, and the gradient w.r.t. the chunk's student logits is turned at once into gradients w.r.t. the
   hidden states and the head (the fused-linear trick);
3. backward only rescales the stored gradients.

Peak memory is therefore O(chunk_size * V) above the inputs instead of O(N * V).

One call evaluates any weighted sum of three per-position terms, each with its own weight vector ``[N]``:

    divergence   w_div[n] * D(p_T || p_S)(position n)              distillation (GKD, supervised KD, ...)
    nll          w_nll[n] * -log p_S(y_n)                           SFT, SeqKD, policy-gradient terms (RL)
    sampled_rkl  w_srkl[n] * sg(log p_S(y_n) - log p_T(y_n)) * log p_S(y_n)
                 the single-sample reverse-KL estimator ("reverse KL as a per-token reward")

The weights carry the reduction (token mean, per-sequence mean, accumulation-wide denominators, advantages).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from gkd.divergences import Divergence, get_divergence, log_probs, reduction_weights

__all__ = ["Head", "LossTerms", "TeacherTopK", "chunked_divergence_loss", "chunked_loss", "logits_loss"]

# Target number of logits elements per chunk (8M floats = 32 MB per temporary).
DEFAULT_CHUNK_ELEMENTS = 1 << 23


@dataclass
class Head:
    """An output head: logits = hidden @ weight[:vocab].T + bias[:vocab].

    ``vocab`` limits the comparison to the tokenizer's real length when the matrices carry padding rows
    (e.g. 151,936 vs 152,064 rows for one tokenizer). ``scale`` multiplies the hidden states first (T5 with tied
    embeddings uses d_model ** -0.5).
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    vocab: int | None = None
    scale: float = 1.0

    @property
    def size(self) -> int:
        return self.vocab if self.vocab is not None else self.weight.shape[0]

    def w(self) -> torch.Tensor:
        return self.weight if self.vocab is None else self.weight[: self.vocab]

    def b(self) -> torch.Tensor | None:
        if self.bias is None:
            return None
        return self.bias if self.vocab is None else self.bias[: self.vocab]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        h = hidden * self.scale if self.scale != 1.0 else hidden
        z = h.to(self.weight.dtype) @ self.w().t()
        b = self.b()
        if b is not None:
            z = z + b
        return z


@dataclass
class TeacherTopK:
    """A teacher stored as its top-k log-probabilities per position plus the remaining mass (a tail bucket).

    The divergence is then computed on the (k + 1)-category distribution: the k token ids and "everything else".
    """

    ids: torch.Tensor  # [N, k] long
    logprobs: torch.Tensor  # [N, k] float, log p_T of those ids (at the loss temperature)


@dataclass
class LossTerms:
    """Per-position weights ``[N]`` of the three loss terms (None = term absent)."""

    divergence: torch.Tensor | None = None
    nll: torch.Tensor | None = None
    sampled_rkl: torch.Tensor | None = None

    def needs_teacher(self) -> bool:
        return self.divergence is not None or self.sampled_rkl is not None

    def needs_targets(self) -> bool:
        return self.nll is not None or self.sampled_rkl is not None


@dataclass
class _Spec:
    divergence: Divergence | None
    temperature: float
    terms: LossTerms
    targets: torch.Tensor | None
    teacher_hidden: torch.Tensor | None
    teacher_head: Head | None
    teacher_logits: torch.Tensor | None
    teacher_topk: TeacherTopK | None
    chunk_size: int
    stats: dict[str, torch.Tensor] | None = field(default=None)


def _topk_tail(logq_full: torch.Tensor, topk: TeacherTopK) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher log-probs on the (k + 1)-category support: the teacher's top-k ids plus a tail bucket."""
    lq = logq_full.gather(-1, topk.ids)
    lp = topk.logprobs.to(lq.dtype)
    tail_q = torch.log1p(-lq.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-7))
    tail_p = torch.log1p(-lp.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-7))
    return torch.cat([lq, tail_q], -1), torch.cat([lp, tail_p], -1)


def _chunk_terms(
    zs: torch.Tensor,
    zt: torch.Tensor | None,
    topk: TeacherTopK | None,
    targets: torch.Tensor | None,
    terms: LossTerms,
    sl: slice,
    spec: _Spec,
) -> torch.Tensor:
    """The weighted loss of one chunk of student logits ``zs`` (differentiable) against teacher logits ``zt``."""
    total = zs.new_zeros((), dtype=torch.float32 if zs.dtype != torch.float64 else torch.float64)
    if terms.divergence is not None:
        assert spec.divergence is not None
        if topk is not None:
            # Compare on the (k+1) support; divergences take log-probs as logits (softmax is the identity on them).
            lq, lp = _topk_tail(log_probs(zs, spec.temperature), topk)
            values = spec.divergence(lq, lp, temperature=1.0)
        else:
            assert zt is not None
            values = spec.divergence(zs, zt, temperature=spec.temperature)
        total = total + (terms.divergence[sl].to(values.dtype) * values).sum()
    if terms.needs_targets():
        assert targets is not None
        logq = log_probs(zs, 1.0)
        logq_y = logq.gather(-1, targets[:, None]).squeeze(-1)
        if terms.nll is not None:
            total = total - (terms.nll[sl].to(logq_y.dtype) * logq_y).sum()
        if terms.sampled_rkl is not None:
            if topk is not None:
                raise ValueError("the sampled-token reverse-KL term needs a live teacher, not a top-k cache")
            assert zt is not None
            logp_y = log_probs(zt, 1.0).gather(-1, targets[:, None]).squeeze(-1)
            advantage = (logq_y - logp_y).detach()
            total = total + (terms.sampled_rkl[sl].to(logq_y.dtype) * advantage * logq_y).sum()
    return total


@torch.no_grad()
def _chunk_stats(zs: torch.Tensor, zt: torch.Tensor | None, targets: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Diagnostics per position (no grad): forward/reverse KL, student entropy, top-1 agreement, log-probs of y."""
    logq = log_probs(zs, 1.0)
    q = logq.exp()
    out = {"entropy": -(q * logq).sum(-1)}
    if zt is not None:
        logp = log_probs(zt, 1.0)
        p = logp.exp()
        out["forward_kl"] = (p * (logp - logq)).sum(-1)
        out["reverse_kl"] = (q * (logq - logp)).sum(-1)
        out["top1_agree"] = (zs.argmax(-1) == zt.argmax(-1)).float()
        if targets is not None:
            out["teacher_logp"] = logp.gather(-1, targets[:, None]).squeeze(-1)
    if targets is not None:
        out["student_logp"] = logq.gather(-1, targets[:, None]).squeeze(-1)
    return out


def _teacher_chunk(spec: _Spec, sl: slice) -> torch.Tensor | None:
    if spec.teacher_logits is not None:
        return spec.teacher_logits[sl]
    if spec.teacher_hidden is not None:
        assert spec.teacher_head is not None
        return spec.teacher_head.logits(spec.teacher_hidden[sl])
    return None


class _FusedChunkedLoss(torch.autograd.Function):
    """Forward computes the loss and its gradients chunk by chunk; backward rescales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, head_scale, vocab, spec: _Spec):  # type: ignore[override]
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        head = Head(weight, bias, vocab, head_scale)
        n = hidden.shape[0]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros_like(bias) if need_b and bias is not None else None
        total = torch.zeros((), dtype=torch.float64)
        w_eff = head.w()
        stats_parts: list[dict[str, torch.Tensor]] = []
        for start in range(0, n, spec.chunk_size):
            sl = slice(start, min(n, start + spec.chunk_size))
            h = hidden[sl]
            hs = h * head_scale if head_scale != 1.0 else h
            with torch.no_grad():
                zt = _teacher_chunk(spec, sl)
            topk = None
            if spec.teacher_topk is not None:
                topk = TeacherTopK(spec.teacher_topk.ids[sl], spec.teacher_topk.logprobs[sl])
            targets = spec.targets[sl] if spec.targets is not None else None
            with torch.enable_grad():
                zs = head.logits(h).detach().requires_grad_(need_h or need_w or need_b)
                loss = _chunk_terms(zs, zt, topk, targets, spec.terms, sl, spec)
                if zs.requires_grad and loss.requires_grad:
                    (g,) = torch.autograd.grad(loss, zs)
            if zs.requires_grad and loss.requires_grad:
                # Outside autograd: these products must not keep the chunk's [chunk, V] gradient alive.
                with torch.no_grad():
                    g = g.to(weight.dtype)
                    if grad_h is not None:
                        gh = g @ w_eff
                        grad_h[sl] = gh * head_scale if head_scale != 1.0 else gh
                    if grad_w is not None:
                        grad_w[: w_eff.shape[0]] += g.t() @ hs.to(weight.dtype)
                    if grad_b is not None:
                        grad_b[: w_eff.shape[0]] += g.sum(0)
            total += loss.detach().to(torch.float64)
            if spec.stats is not None:
                stats_parts.append(_chunk_stats(zs.detach(), zt, targets))
        if spec.stats is not None and stats_parts:
            for key in stats_parts[0]:
                spec.stats[key] = torch.cat([p[key] for p in stats_parts])
        ctx.save_for_backward(
            *(t if t is not None else torch.empty(0) for t in (grad_h, grad_w, grad_b)),
        )
        ctx.has = (grad_h is not None, grad_w is not None, grad_b is not None)
        return total.to(torch.float64 if hidden.dtype == torch.float64 else torch.float32)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        saved = ctx.saved_tensors
        outs = []
        for has, g in zip(ctx.has, saved):
            outs.append(g * grad_out.to(g.dtype) if has else None)
        return outs[0], outs[1], outs[2], None, None, None


def _default_chunk(vocab: int) -> int:
    return max(16, DEFAULT_CHUNK_ELEMENTS // max(vocab, 1))


def chunked_loss(
    student_hidden: torch.Tensor,
    student_head: Head,
    terms: LossTerms,
    *,
    divergence: Divergence | None = None,
    targets: torch.Tensor | None = None,
    teacher_hidden: torch.Tensor | None = None,
    teacher_head: Head | None = None,
    teacher_logits: torch.Tensor | None = None,
    teacher_topk: TeacherTopK | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    stats: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Weighted sum of the loss terms over ``N`` selected positions, never holding ``[N, V]`` logits.

    ``student_hidden`` is ``[N, H]`` (already restricted to valid positions). The teacher is given as hidden states
    plus a head, as logits ``[N, V]``, or as a top-k cache. If ``stats`` is a dict it is filled with per-position
    diagnostics (``forward_kl``, ``reverse_kl``, ``entropy``, ``top1_agree``, ``student_logp``, ``teacher_logp``).
    """
    if terms.needs_teacher() and teacher_hidden is None and teacher_logits is None and teacher_topk is None:
        raise ValueError("a divergence term needs teacher hidden states, teacher logits or a teacher top-k cache")
    if terms.divergence is not None and divergence is None:
        raise ValueError("divergence weights given without a divergence function")
    if terms.needs_targets() and targets is None:
        raise ValueError("nll / sampled_rkl terms need target token ids")
    bound = getattr(divergence, "keywords", {}) or {}
    if "temperature" in bound:
        if temperature != 1.0 and temperature != bound["temperature"]:
            raise ValueError(
                f"the divergence has temperature={bound['temperature']} bound and temperature={temperature} was "
                "passed; give it once"
            )
        temperature = float(bound["temperature"])
        divergence = functools.partial(divergence.func, **{k: v for k, v in bound.items() if k != "temperature"})
    if teacher_head is not None and teacher_head.size != student_head.size:
        raise ValueError(f"teacher head has {teacher_head.size} outputs, student head {student_head.size}")
    spec = _Spec(
        divergence=divergence,
        temperature=temperature,
        terms=terms,
        targets=targets,
        teacher_hidden=teacher_hidden,
        teacher_head=teacher_head,
        teacher_logits=teacher_logits,
        teacher_topk=teacher_topk,
        chunk_size=chunk_size or _default_chunk(student_head.size),
        stats=stats,
    )
    return _FusedChunkedLoss.apply(
        student_hidden, student_head.weight, student_head.bias, student_head.scale, student_head.vocab, spec
    )


def logits_loss(
    student_logits: torch.Tensor,
    terms: LossTerms,
    *,
    divergence: Divergence | None = None,
    targets: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
    teacher_topk: TeacherTopK | None = None,
    temperature: float = 1.0,
    stats: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The same loss from student logits ``[N, V]`` with plain autograd (for models whose head is not exposed)."""
    spec = _Spec(divergence, temperature, terms, targets, None, None, teacher_logits, teacher_topk, 0, stats)
    n = student_logits.shape[0]
    loss = _chunk_terms(student_logits, teacher_logits, teacher_topk, targets, terms, slice(0, n), spec)
    if stats is not None:
        stats.update(_chunk_stats(student_logits.detach(), teacher_logits, targets))
    return loss


def chunked_divergence_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    mask: torch.Tensor,
    *,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    divergence: str = "jsd",
    reduction: str = "token",
    chunk_size: int | None = None,
    **params: object,
) -> torch.Tensor:
    """Reduced divergence over the valid positions of ``mask`` ``[B, T]``, from hidden states ``[B, T, H]``.

    Equal (values and gradients) to ``reduce_divergence(D(h_s @ W_s.T, h_t @ W_t.T), mask, reduction)`` but never
    holds the ``[B*T, V]`` logits. The teacher is hidden states plus head weight (and bias), or logits ``[B, T, V]``.
    """
    fn = get_divergence(divergence, **params)
    temperature = float(params.get("temperature", 1.0))  # type: ignore[arg-type]
    if "temperature" in params:
        fn = get_divergence(divergence, **{k: v for k, v in params.items() if k != "temperature"})
    mask = mask.to(torch.bool)
    weights = reduction_weights(mask, reduction)[mask]
    t_hidden = teacher_hidden[mask] if teacher_hidden is not None else None
    t_logits = teacher_logits[mask] if teacher_logits is not None else None
    t_head = Head(teacher_weight, teacher_bias) if teacher_weight is not None else None
    return chunked_loss(
        student_hidden[mask],
        Head(student_weight, student_bias),
        LossTerms(divergence=weights),
        divergence=fn,
        teacher_hidden=t_hidden,
        teacher_head=t_head,
        teacher_logits=t_logits,
        temperature=temperature,
        chunk_size=chunk_size,
    )
