"""The GKD loss over valid positions, computed in chunks straight from hidden states.

A language model's logits are ``hidden @ head.T``. At a vocabulary of 128k, the ``[positions, V]`` logits of a whole
batch (and the five to fifteen temporaries a divergence needs) do not fit in memory. This module never builds them:

1. only the *valid* positions (completion tokens, not prompt or padding) are selected, as ``[N, H]`` hidden states;
2. positions are processed ``chunk_size`` at a time: student and teacher logits of the chunk are formed, the loss terms
   are evaluated, and the gradient w.r.t. the chunk's student logits is turned at once into gradients w.r.t. the
   hidden states and the head (the fused-linear trick);
3. backward only rescales the stored gradients.

The gradient w.r.t. a chunk's student logits has a closed form for every divergence of ``gkd.divergences`` and for
the nll / sampled_rkl terms (see ``_CLOSED_FORM``). It is computed by in-place ops in five or six ``[chunk, V]``
scratch buffers (logits included) instead of autograd's graph of ten to fifteen fresh temporaries per chunk; on the
CPU a large scratch space is kept between calls, so no step page-faults it in again (``clear_workspace()`` frees
it). Any other divergence function, and the top-k teacher, go through autograd inside the chunk (the generic
fallback).

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
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from gkd.divergences import (
    LOG_FLOOR,
    Divergence,
    _check_alpha,
    _check_beta,
    _check_temperature,
    _compute_dtype,
    forward_kl,
    get_divergence,
    jsd,
    log_probs,
    reduction_weights,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    tvd,
)

__all__ = [
    "Head",
    "LossTerms",
    "TeacherTopK",
    "chunked_divergence_loss",
    "chunked_loss",
    "clear_workspace",
    "logits_loss",
]

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
    closed_form: Callable[..., tuple[torch.Tensor, torch.Tensor | None]] | None = field(default=None)


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


# ---------------------------------------------------------------------------------------------------------------
# Closed-form gradients w.r.t. the student logits
# ---------------------------------------------------------------------------------------------------------------
# ``_<name>_grad(zs, zt, temperature, scale, work, **params)`` returns the divergence per position ``[c]`` and, when
# ``scale`` (per-position weights ``[c]``) is given, ``scale[:, None] * dD/dzs`` ``[c, V]``. ``zs``/``zt`` are the
# chunk's student/teacher logits in the compute dtype (float32, or float64), held in scratch buffers that these
# functions overwrite, like the three ``work`` buffers of the same shape; the gradient is returned in one of them.
# Nothing of size [c, V] is allocated: every op writes into a buffer, so a chunk costs no page faults and a few
# passes over memory. With q = softmax(zs / T), any F(q) has dF/dzs = q * (dF/dq - <q, dF/dq>) / T, and here:
#   forward_kl       KL(P || Q)                                 (q - p) / T
#   reverse_kl       KL(Q || P)                                 q * (log q - log p - KL(Q || P)) / T
#   jsd(β)           β KL(P || M) + (1-β) KL(Q || M),           (1-β) q * (log q - log m - KL(Q || M)) / T
#                    M = β P + (1-β) Q                          (divided by β(1-β) when normalized)
#   tvd              ½ Σ |p - q|                                ½ q * (s - <q, s>) / T,  s = sign(q - p)
#   skew_forward_kl  KL(P || M), M = α P + (1-α) Q              (1-α) q * (<q, r> - r) / T,  r = p / m
#   skew_reverse_kl  KL(Q || M), M = α Q + (1-α) P              q * (g - <q, g>) / T,  g = log q - log m - α q / m
# Mixtures are formed in probability space (log of a lerp, floored at LOG_FLOOR) rather than with logaddexp of
# log-probabilities: the same value up to float rounding, and an entry that is zero in both distributions still
# contributes exactly zero. Values agree with ``gkd.divergences`` and gradients with autograd through it to float
# rounding; the one exception is a forward-type KL whose *student* logit is -inf where the teacher has mass (an
# infinite divergence, reported as a huge finite one), where the gradient is q - p instead of autograd's
# clamp-masked value. Student logits computed from hidden states are always finite.
GradResult = tuple[torch.Tensor, torch.Tensor | None]


def _log_softmax_into(x: torch.Tensor, out: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``out = divergences.log_probs(x, temperature)`` with no allocation; divides ``x`` by the temperature in place."""
    if temperature != 1.0:
        x.div_(temperature)
    torch._log_softmax(x, -1, False, out=out)
    return out.clamp_(min=LOG_FLOOR)


def _rowdot(a: torch.Tensor, b: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """``(a * b).sum(-1)`` with the product written into ``tmp``."""
    return torch.mul(a, b, out=tmp).sum(-1)


def _log_mix_into(a: torch.Tensor, b: torch.Tensor, weight_a: float, out: torch.Tensor) -> torch.Tensor:
    """``out = log(weight_a * a + (1 - weight_a) * b)`` floored at LOG_FLOOR, for probabilities ``a`` and ``b``."""
    return torch.lerp(b, a, weight_a, out=out).log_().clamp_(min=LOG_FLOOR)


def _scaled(grad: torch.Tensor, scale: torch.Tensor, factor: float) -> torch.Tensor:
    return grad.mul_((scale.to(grad.dtype) * factor)[:, None])


def _forward_kl_grad(
    zs: torch.Tensor,
    zt: torch.Tensor,
    temperature: float,
    scale: torch.Tensor | None,
    work: list[torch.Tensor],
) -> GradResult:
    _check_temperature(temperature)
    logq = _log_softmax_into(zs, work[0], temperature)
    logp = _log_softmax_into(zt, work[1], temperature)
    p = torch.exp(logp, out=zt)
    values = _rowdot(p, logp.sub_(logq), work[2])
    if scale is None:
        return values, None
    grad = torch.exp(logq, out=zs).sub_(p)  # q - p
    return values, _scaled(grad, scale, 1.0 / temperature)


def _reverse_kl_grad(
    zs: torch.Tensor,
    zt: torch.Tensor,
    temperature: float,
    scale: torch.Tensor | None,
    work: list[torch.Tensor],
) -> GradResult:
    _check_temperature(temperature)
    logq = _log_softmax_into(zs, work[0], temperature)
    ratio = _log_softmax_into(zt, work[1], temperature).neg_().add_(logq)  # log q - log p
    q = torch.exp(logq, out=zs)
    values = _rowdot(q, ratio, work[2])
    if scale is None:
        return values, None
    return values, _scaled(ratio.sub_(values[:, None]).mul_(q), scale, 1.0 / temperature)


def _jsd_grad(
    zs: torch.Tensor,
    zt: torch.Tensor,
    temperature: float,
    scale: torch.Tensor | None,
    work: list[torch.Tensor],
    *,
    beta: float = 0.5,
    normalize: bool = False,
) -> GradResult:
    _check_beta(beta, normalize)
    _check_temperature(temperature)
    if normalize and beta == 0.0:
        return _forward_kl_grad(zs, zt, temperature, scale, work)
    if normalize and beta == 1.0:
        return _reverse_kl_grad(zs, zt, temperature, scale, work)
    logq = _log_softmax_into(zs, work[0], temperature)
    logp = _log_softmax_into(zt, work[1], temperature)
    q, p = torch.exp(logq, out=zs), torch.exp(logp, out=zt)
    logm = _log_mix_into(p, q, beta, work[2])
    r, d = logq.sub_(logm), logp.sub_(logm)  # log q - log m, log p - log m
    kl_p = _rowdot(p, d, work[2])
    kl_q = _rowdot(q, r, work[2])
    values = beta * kl_p + (1.0 - beta) * kl_q
    if normalize:
        values = values / (beta * (1.0 - beta))
    if scale is None:
        return values, None
    factor = (1.0 / beta if normalize else 1.0 - beta) / temperature
    return values, _scaled(r.sub_(kl_q[:, None]).mul_(q), scale, factor)


def _tvd_grad(
    zs: torch.Tensor,
    zt: torch.Tensor,
    temperature: float,
    scale: torch.Tensor | None,
    work: list[torch.Tensor],
) -> GradResult:
    _check_temperature(temperature)
    q = torch.exp(_log_softmax_into(zs, work[0], temperature), out=zs)
    p = torch.exp(_log_softmax_into(zt, work[1], temperature), out=zt)
    diff = torch.sub(p, q, out=work[0])
    values = 0.5 * torch.abs(diff, out=work[1]).sum(-1)
    if scale is None:
        return values, None
    sign = diff.sign_().neg_()  # sign(q - p)
    return values, _scaled(sign.sub_(_rowdot(q, sign, work[1])[:, None]).mul_(q), scale, 0.5 / temperature)


def _skew_forward_kl_grad(
    zs: torch.Tensor,
    zt: torch.Tensor,
    temperature: float,
    scale: torch.Tensor | None,
    work: list[torch.Tensor],
    *,
    alpha: float = 0.1,
) -> GradResult:
    _check_alpha("skew_forward_kl", alpha)
    if alpha == 0.0:
        return _forward_kl_grad(zs, zt, temperature, scale, work)
    _check_temperature(temperature)
    q = torch.exp(_log_softmax_into(zs, work[0], temperature), out=zs)
    logp = _log_softmax_into(zt, work[1], temperature)
    p = torch.exp(logp, out=zt)
    d = logp.sub_(_log_mix_into(p, q, alpha, work[2]))  # log p - log m
    values = _rowdot(p, d, work[0])
    if scale is None:
        return values, None
    ratio = d.clamp_(max=-math.log(alpha)).exp_()  # p / m <= 1 / α (the clamp only acts where p = m = 0)
    grad = ratio.sub_(_rowdot(q, ratio, work[0])[:, None]).mul_(q)
    return values, _scaled(grad, scale, -(1.0 - alpha) / temperature)


def _skew_reverse_kl_grad(
    zs: torch.Tensor,
    zt: torch.Tensor,
    temperature: float,
    scale: torch.Tensor | None,
    work: list[torch.Tensor],
    *,
    alpha: float = 0.1,
) -> GradResult:
    _check_alpha("skew_reverse_kl", alpha)
    if alpha == 0.0:
        return _reverse_kl_grad(zs, zt, temperature, scale, work)
    _check_temperature(temperature)
    logq = _log_softmax_into(zs, work[0], temperature)
    q = torch.exp(logq, out=zs)
    p = torch.exp(_log_softmax_into(zt, work[1], temperature), out=zt)
    r = logq.sub_(_log_mix_into(q, p, alpha, work[2]))  # log q - log m
    values = _rowdot(q, r, work[1])
    if scale is None:
        return values, None
    r.clamp_(max=-math.log(alpha))  # q / m <= 1 / α (the clamp only acts where q = m = 0)
    g = r.sub_(torch.exp(r, out=work[1]).mul_(alpha))  # log q - log m - α q / m
    return values, _scaled(g.sub_(_rowdot(q, g, work[1])[:, None]).mul_(q), scale, 1.0 / temperature)


_CLOSED_FORM: dict[Callable[..., torch.Tensor], Callable[..., GradResult]] = {
    forward_kl: _forward_kl_grad,
    reverse_kl: _reverse_kl_grad,
    jsd: _jsd_grad,
    tvd: _tvd_grad,
    skew_forward_kl: _skew_forward_kl_grad,
    skew_reverse_kl: _skew_reverse_kl_grad,
}


def _closed_form(divergence: Divergence | None) -> Callable[..., GradResult] | None:
    """The closed-form value-and-gradient of ``divergence`` (a function of ``gkd.divergences`` or a
    ``functools.partial`` of one with keyword parameters), or None when it is unknown (autograd is used)."""
    fn, params = divergence, {}
    if isinstance(divergence, functools.partial):
        if divergence.args:
            return None
        fn, params = divergence.func, dict(divergence.keywords)
    impl = _CLOSED_FORM.get(fn)  # type: ignore[arg-type]
    if impl is None or "temperature" in params:
        return None
    return functools.partial(impl, **params) if params else impl


def _chunk_terms_closed(
    zs: torch.Tensor,
    zt: torch.Tensor | None,
    targets: torch.Tensor | None,
    terms: LossTerms,
    sl: slice,
    spec: _Spec,
    need_grad: bool,
    work: list[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``_chunk_terms`` and its gradient w.r.t. ``zs`` in closed form: (loss, gradient or None).

    ``zs``, ``zt`` and ``work`` (three buffers for a divergence, plus one for the nll / sampled_rkl terms) are
    scratch space of the chunk's shape; the gradient is returned in one of them.
    """
    total = zs.new_zeros(())
    grad = None
    if terms.needs_targets():
        assert targets is not None
        y = targets[:, None]
        logq = _log_softmax_into(zs, work[-1])  # temperature 1: zs is left as it is
        logq_y = logq.gather(-1, y).squeeze(-1)
        coef = torch.zeros_like(logq_y)  # d loss / d log q(y), per position
        if terms.nll is not None:
            w = terms.nll[sl].to(logq_y.dtype)
            total = total - (w * logq_y).sum()
            coef = coef - w
        if terms.sampled_rkl is not None:
            assert zt is not None
            logp_y = (
                torch._log_softmax(zt, -1, False, out=work[0]).clamp_(min=LOG_FLOOR).gather(-1, y).squeeze(-1)
            )
            advantage = logq_y - logp_y
            w = terms.sampled_rkl[sl].to(logq_y.dtype)
            total = total + (w * advantage * logq_y).sum()
            coef = coef + w * advantage
        if need_grad:  # d log q(y) / d zs = onehot(y) - q
            grad = logq.exp_().mul_(-coef[:, None]).scatter_add_(-1, y, coef[:, None])
    if terms.divergence is not None:
        assert spec.closed_form is not None and zt is not None
        w = terms.divergence[sl]
        values, g = spec.closed_form(zs, zt, spec.temperature, w if need_grad else None, work[:3])
        total = total + (w.to(values.dtype) * values).sum()
        if g is not None:
            grad = g if grad is None else g.add_(grad)
    return total, grad


# Scratch space of the closed-form path. On the CPU a workspace of at least KEEP_WORKSPACE_BYTES is kept between
# calls: an allocation that large is always served by a fresh mmap (glibc's mmap threshold never exceeds 32 MiB),
# so freeing it after a call and allocating it again in the next one page-faults and zeroes every page again, which
# costs more than the arithmetic of the loss (about 0.75 ms per MB here). Smaller workspaces are recycled by malloc
# and are not kept. ``clear_workspace()`` frees what is kept.
KEEP_WORKSPACE_BYTES = 32 * 2**20
_WORKSPACE: dict[tuple[str, torch.dtype], torch.Tensor] = {}


def clear_workspace() -> None:
    """Free the scratch buffers that the chunked loss keeps between calls (CPU only)."""
    _WORKSPACE.clear()


def _take_workspace(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    flat = _WORKSPACE.pop((str(device), dtype), None)
    if flat is None or flat.numel() < numel:
        flat = None  # free the old buffer before allocating the larger one
        flat = torch.empty(numel, dtype=dtype, device=device)
    return flat


def _give_back_workspace(flat: torch.Tensor) -> None:
    if flat.device.type == "cpu" and flat.numel() * flat.element_size() >= KEEP_WORKSPACE_BYTES:
        _WORKSPACE[(str(flat.device), flat.dtype)] = flat


def _logits_into(head: Head, hidden: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = head.logits(hidden)`` converted to ``out``'s dtype, without a temporary when the dtypes agree."""
    h = hidden * head.scale if head.scale != 1.0 else hidden
    weight, bias = head.w(), head.b()
    if h.dtype == weight.dtype == out.dtype:
        torch.mm(h, weight.t(), out=out)
        return out if bias is None else out.add_(bias)
    return out.copy_(head.logits(hidden))


@torch.no_grad()
def _chunk_stats(
    zs: torch.Tensor, zt: torch.Tensor | None, targets: torch.Tensor | None
) -> dict[str, torch.Tensor]:
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


@torch.no_grad()
def _chunk_stats_topk(
    zs: torch.Tensor, topk: TeacherTopK, targets: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """``_chunk_stats`` against a top-k teacher: the KLs on the (k + 1)-category support (teacher top-k + tail),
    top-1 agreement exact (the teacher's argmax is its first cached id)."""
    out = _chunk_stats(zs, None, targets)
    lq, lp = _topk_tail(log_probs(zs, 1.0), topk)
    out["forward_kl"] = (lp.exp() * (lp - lq)).sum(-1)
    out["reverse_kl"] = (lq.exp() * (lq - lp)).sum(-1)
    best = topk.logprobs.argmax(-1, keepdim=True)
    out["top1_agree"] = (zs.argmax(-1) == topk.ids.gather(-1, best).squeeze(-1)).float()
    return out


@torch.no_grad()
def _chunk_stats_into(
    zs: torch.Tensor, zt: torch.Tensor | None, targets: torch.Tensor | None, work: list[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``_chunk_stats`` computed in three scratch buffers of the chunk's shape; ``zs`` and ``zt`` are left intact."""
    logq = _log_softmax_into(zs, work[0])
    q = torch.exp(logq, out=work[2])
    out = {"entropy": -torch.mul(q, logq, out=work[1]).sum(-1)}
    if targets is not None:
        out["student_logp"] = logq.gather(-1, targets[:, None]).squeeze(-1)
    if zt is not None:
        logp = _log_softmax_into(zt, work[1])
        if targets is not None:
            out["teacher_logp"] = logp.gather(-1, targets[:, None]).squeeze(-1)
        out["top1_agree"] = (zs.argmax(-1) == zt.argmax(-1)).float()
        diff = logq.sub_(logp)  # log q - log p
        out["reverse_kl"] = q.mul_(diff).sum(-1)
        out["forward_kl"] = -torch.exp(logp, out=logp).mul_(diff).sum(-1)
    return out


def _teacher_chunk(spec: _Spec, sl: slice) -> torch.Tensor | None:
    if spec.teacher_logits is not None:
        return spec.teacher_logits[sl]
    if spec.teacher_hidden is not None:
        assert spec.teacher_head is not None
        return spec.teacher_head.logits(spec.teacher_hidden[sl])
    return None


def _closed_form_dtype(spec: _Spec, weight: torch.Tensor) -> torch.dtype | None:
    """The compute dtype of the closed-form path, or None when the chunk must go through autograd (an unknown
    divergence, a top-k teacher, or student and teacher computing in different dtypes)."""
    if spec.teacher_topk is not None or (spec.terms.divergence is not None and spec.closed_form is None):
        return None
    dtype = _compute_dtype(weight)
    teacher = spec.teacher_logits if spec.teacher_logits is not None else None
    if teacher is None and spec.teacher_head is not None:
        teacher = spec.teacher_head.weight
    if teacher is not None and _compute_dtype(teacher) != dtype:
        return None
    return dtype


def _teacher_chunk_into(spec: _Spec, sl: slice, out: torch.Tensor) -> torch.Tensor | None:
    if spec.teacher_logits is not None:
        return out.copy_(spec.teacher_logits[sl])
    if spec.teacher_hidden is not None:
        assert spec.teacher_head is not None
        return _logits_into(spec.teacher_head, spec.teacher_hidden[sl], out)
    return None


class _FusedChunkedLoss(torch.autograd.Function):
    """Forward computes the loss and its gradients chunk by chunk; backward rescales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, head_scale, vocab, spec: _Spec):  # type: ignore[override]
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        need_grad = need_h or need_w or need_b
        head = Head(weight, bias, vocab, head_scale)
        n = hidden.shape[0]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros_like(bias) if need_b and bias is not None else None
        total = torch.zeros((), dtype=torch.float64)
        w_eff = head.w()
        stats_parts: list[dict[str, torch.Tensor]] = []
        terms = spec.terms
        closed = _closed_form_dtype(spec, weight) if n else None
        flat = None
        if closed is not None:
            rows, cols = min(n, spec.chunk_size), head.size
            n_work = (3 if terms.divergence is not None else 0) + (1 if terms.needs_targets() else 0)
            if terms.sampled_rkl is not None:
                n_work = max(n_work, 2)  # log p_T(y) needs a buffer besides log q
            if spec.stats is not None:
                n_work = max(n_work, 3)
            n_buffers = 2 + n_work
            flat = _take_workspace(n_buffers * rows * cols, closed, hidden.device)
            with_teacher = terms.needs_teacher() or spec.stats is not None
        for start in range(0, n, spec.chunk_size):
            sl = slice(start, min(n, start + spec.chunk_size))
            h = hidden[sl]
            hs = h * head_scale if head_scale != 1.0 else h
            targets = spec.targets[sl] if spec.targets is not None else None
            g = None
            if flat is not None:
                # Closed form: logits and every temporary live in the workspace; no autograd graph.
                buffers = [
                    flat[i * rows * cols :][: (sl.stop - start) * cols].view(-1, cols)
                    for i in range(n_buffers)
                ]
                zs = _logits_into(head, h, buffers[0])
                zt = _teacher_chunk_into(spec, sl, buffers[1]) if with_teacher else None
                if spec.stats is not None:
                    stats_parts.append(_chunk_stats_into(zs, zt, targets, buffers[2:5]))
                loss, g = _chunk_terms_closed(zs, zt, targets, terms, sl, spec, need_grad, buffers[2:])
            else:
                with torch.no_grad():
                    zt = _teacher_chunk(spec, sl)
                topk = None
                if spec.teacher_topk is not None:
                    topk = TeacherTopK(spec.teacher_topk.ids[sl], spec.teacher_topk.logprobs[sl])
                with torch.enable_grad():
                    zs = head.logits(h).detach().requires_grad_(need_grad)
                    loss = _chunk_terms(zs, zt, topk, targets, terms, sl, spec)
                    if zs.requires_grad and loss.requires_grad:
                        (g,) = torch.autograd.grad(loss, zs)
                if spec.stats is not None:
                    if topk is not None:
                        stats_parts.append(_chunk_stats_topk(zs.detach(), topk, targets))
                    else:
                        stats_parts.append(_chunk_stats(zs.detach(), zt, targets))
            if g is not None:
                # Outside autograd: these products must not keep the chunk's [chunk, V] gradient alive.
                with torch.no_grad():
                    g = g.to(weight.dtype)
                    if grad_h is not None:
                        gh = g @ w_eff
                        grad_h[sl] = gh * head_scale if head_scale != 1.0 else gh
                    if grad_w is not None:
                        grad_w[: w_eff.shape[0]].addmm_(g.t(), hs.to(weight.dtype))
                    if grad_b is not None:
                        grad_b[: w_eff.shape[0]] += g.sum(0)
                del g
            total += loss.detach().to(torch.float64)
        if flat is not None:
            _give_back_workspace(flat)
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
        unit = bool(grad_out == 1)  # the usual case: hand the stored gradients over as they are (no copy)
        for has, g in zip(ctx.has, saved):
            outs.append((g if unit else g * grad_out.to(g.dtype)) if has else None)
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
        raise ValueError(
            "a divergence term needs teacher hidden states, teacher logits or a teacher top-k cache"
        )
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
        divergence = functools.partial(
            divergence.func, **{k: v for k, v in bound.items() if k != "temperature"}
        )
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
        closed_form=_closed_form(divergence) if teacher_topk is None else None,
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
        if teacher_topk is not None:
            stats.update(_chunk_stats_topk(student_logits.detach(), teacher_topk, targets))
        else:
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
