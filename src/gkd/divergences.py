"""Token-level divergences between a teacher and a student, exact over the whole vocabulary.

Every function here is pure: it takes ``student_logits`` and ``teacher_logits`` of shape ``[..., V]`` and returns the
divergence at every position, shape ``[...]``, summed over the vocabulary. Conventions follow the GKD paper
(Agarwal et al., ICLR 2024): **P is the teacher distribution, Q the student distribution.**

    forward_kl        KL(P || Q)                                   mode-covering ("supervised KD" when off-policy)
    reverse_kl        KL(Q || P)                                   mode-seeking
    jsd(beta)         beta*KL(P || M) + (1-beta)*KL(Q || M),  M = beta*P + (1-beta)*Q     (paper Eq. 1)
    tvd               1/2 * sum |P - Q|                            (f-distill)
    skew_forward_kl   KL(P || alpha*P + (1-alpha)*Q)              (DistiLLM)
    skew_reverse_kl   KL(Q || alpha*Q + (1-alpha)*P)              (DistiLLM)

Notes
- ``temperature`` divides both logits before the softmax. It is the *loss* temperature, unrelated to sampling.
- Computation runs in float32 (float64 stays float64) whatever the input dtype.
- Mixtures are formed in probability space and evaluated in log space (``logaddexp``), never by mixing log-probs.
- The raw JSD(beta) vanishes at both ends (about beta*FKL near 0 and (1-beta)*RKL near 1). ``normalize=True`` divides
  by beta*(1-beta), which makes it continuous with ``forward_kl`` at beta=0 and ``reverse_kl`` at beta=1.
- ``-inf`` logits (masked or padded vocabulary entries) are safe: an entry that is ``-inf`` for both models contributes
  exactly 0 to values and gradients. JSD, TVD and the skew KLs are finite even when only one side is ``-inf``. A plain
  KL whose reference distribution puts mass where the other has none is infinite in exact arithmetic; here it is a
  large finite number (log-probabilities are floored at ``LOG_FLOOR``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

__all__ = [
    "DIVERGENCES",
    "LOG_FLOOR",
    "forward_kl",
    "get_divergence",
    "jsd",
    "jsd_upper_bound",
    "reduce_divergence",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "tvd",
]

# Log-probabilities are clamped here so that -inf never meets -inf in a subtraction or a logaddexp.
# exp(LOG_FLOOR) is exactly 0 in every float type, so finite inputs are unaffected.
LOG_FLOOR = -1e30

Divergence = Callable[..., torch.Tensor]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_temperature(temperature: float) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")


def log_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log_softmax(logits / temperature) in float32 (or float64), floored at ``LOG_FLOOR`` instead of -inf."""
    x = logits.to(_compute_dtype(logits))
    if temperature != 1.0:
        x = x / temperature
    return torch.log_softmax(x, dim=-1).clamp(min=LOG_FLOOR)


def _kl_from_log_probs(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p_v (log p_v - log q_v) over the last dimension, from floored log-probs."""
    return (logp.exp() * (logp - logq)).sum(-1)


def _mix(logp: torch.Tensor, logq: torch.Tensor, weight_p: float) -> torch.Tensor:
    """log(weight_p * p + (1 - weight_p) * q), computed stably from log-probs."""
    return torch.logaddexp(logp + math.log(weight_p), logq + math.log1p(-weight_p))


def forward_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0
) -> torch.Tensor:
    """KL(P || Q): expectation under the teacher. Its gradient w.r.t. the student logits is Q - P."""
    _check_temperature(temperature)
    return _kl_from_log_probs(log_probs(teacher_logits, temperature), log_probs(student_logits, temperature))


def reverse_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0
) -> torch.Tensor:
    """KL(Q || P): expectation under the student (mode-seeking)."""
    _check_temperature(temperature)
    return _kl_from_log_probs(log_probs(student_logits, temperature), log_probs(teacher_logits, temperature))


def _check_beta(beta: float, normalize: bool) -> None:
    if not (isinstance(beta, (int, float)) and math.isfinite(beta)):
        raise ValueError(f"jsd: beta must be a number in (0, 1), got {beta!r}")
    if normalize:
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"jsd: beta must be in [0, 1] with normalize=True, got {beta}")
    elif not 0.0 < beta < 1.0:
        raise ValueError(
            f"jsd: beta={beta} is outside (0, 1); the raw JSD(beta) is identically 0 at beta=0 and beta=1. "
            "Use divergence 'forward_kl' (beta=0) or 'reverse_kl' (beta=1), or set normalize=True"
        )


def jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    normalize: bool = False,
) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence JSD(beta) of the GKD paper (Eq. 1).

    JSD(beta) = beta * KL(P || M) + (1 - beta) * KL(Q || M) with M = beta * P + (1 - beta) * Q.
    beta -> 0 behaves like forward KL, beta -> 1 like reverse KL, and the raw value shrinks at both ends.
    With ``normalize=True`` the value is divided by beta * (1 - beta); beta = 0 and beta = 1 are then allowed and
    return ``forward_kl`` and ``reverse_kl`` exactly.
    """
    _check_beta(beta, normalize)
    _check_temperature(temperature)
    if normalize and beta == 0.0:
        return forward_kl(student_logits, teacher_logits, temperature=temperature)
    if normalize and beta == 1.0:
        return reverse_kl(student_logits, teacher_logits, temperature=temperature)
    logp = log_probs(teacher_logits, temperature)
    logq = log_probs(student_logits, temperature)
    logm = _mix(logp, logq, beta)
    value = beta * _kl_from_log_probs(logp, logm) + (1.0 - beta) * _kl_from_log_probs(logq, logm)
    if normalize:
        value = value / (beta * (1.0 - beta))
    return value


def jsd_upper_bound(beta: float) -> float:
    """The bound JSD(beta) <= -beta log beta - (1-beta) log(1-beta) (<= log 2)."""
    return -(beta * math.log(beta) + (1 - beta) * math.log(1 - beta))


def tvd(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0
) -> torch.Tensor:
    """Total variation distance 1/2 * sum_v |P_v - Q_v| (f-distill)."""
    _check_temperature(temperature)
    p = log_probs(teacher_logits, temperature).exp()
    q = log_probs(student_logits, temperature).exp()
    return 0.5 * (p - q).abs().sum(-1)


def _check_alpha(name: str, alpha: float) -> None:
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and 0.0 <= alpha < 1.0):
        raise ValueError(f"{name}: alpha must be in [0, 1), got {alpha!r}")


def skew_forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Skew KL of DistiLLM: KL(P || alpha*P + (1-alpha)*Q). alpha=0 is forward KL."""
    _check_alpha("skew_forward_kl", alpha)
    _check_temperature(temperature)
    logp = log_probs(teacher_logits, temperature)
    logq = log_probs(student_logits, temperature)
    if alpha == 0.0:
        return _kl_from_log_probs(logp, logq)
    return _kl_from_log_probs(logp, _mix(logp, logq, alpha))


def skew_reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Skew reverse KL of DistiLLM: KL(Q || alpha*Q + (1-alpha)*P). alpha=0 is reverse KL."""
    _check_alpha("skew_reverse_kl", alpha)
    _check_temperature(temperature)
    logp = log_probs(teacher_logits, temperature)
    logq = log_probs(student_logits, temperature)
    if alpha == 0.0:
        return _kl_from_log_probs(logq, logp)
    return _kl_from_log_probs(logq, _mix(logq, logp, alpha))


# name -> (function, {parameter: default})
DIVERGENCES: dict[str, tuple[Divergence, dict[str, object]]] = {
    "forward_kl": (forward_kl, {"temperature": 1.0}),
    "reverse_kl": (reverse_kl, {"temperature": 1.0}),
    "jsd": (jsd, {"beta": 0.5, "temperature": 1.0, "normalize": False}),
    "tvd": (tvd, {"temperature": 1.0}),
    "skew_forward_kl": (skew_forward_kl, {"alpha": 0.1, "temperature": 1.0}),
    "skew_reverse_kl": (skew_reverse_kl, {"alpha": 0.1, "temperature": 1.0}),
}


def validate_divergence_params(name: str, params: dict[str, object]) -> None:
    """Raise ValueError if ``name`` is unknown or a parameter is unknown or out of range (no tensors needed)."""
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}; valid names: {', '.join(DIVERGENCES)}")
    _, defaults = DIVERGENCES[name]
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ValueError(
            f"divergence {name!r} takes no parameter {', '.join(unknown)}; "
            f"valid parameters: {', '.join(defaults) or 'none'}"
        )
    merged = {**defaults, **params}
    _check_temperature(merged["temperature"])  # type: ignore[arg-type]
    if name == "jsd":
        _check_beta(merged["beta"], bool(merged["normalize"]))  # type: ignore[arg-type]
    elif name.startswith("skew_"):
        _check_alpha(name, merged["alpha"])  # type: ignore[arg-type]


def get_divergence(name: str, **params: object) -> Divergence:
    """Return the divergence ``name`` with ``params`` bound, e.g. ``get_divergence("jsd", beta=0.9)``.

    Raises ValueError, listing what is valid, for an unknown name, an unknown parameter or an out-of-range value.
    """
    validate_divergence_params(name, params)
    fn, _ = DIVERGENCES[name]
    bound = functools.partial(fn, **params)
    functools.update_wrapper(bound, fn)
    return bound


def reduce_divergence(values: torch.Tensor, mask: torch.Tensor, mode: str = "token") -> torch.Tensor:
    """Reduce per-position divergences ``values`` ``[B, T]`` over the valid positions ``mask`` ``[B, T]``.

    ``mode="token"``: mean over all valid positions of the batch (TRL's convention).
    ``mode="sequence"``: the paper's per-sequence mean (1/L_y), then the mean over sequences that have at least one
    valid position. A batch with no valid position returns 0 with a zero gradient.
    Values at invalid positions are ignored even if they are inf or NaN.
    """
    mask = mask.to(torch.bool)
    masked = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
    if mode == "token":
        return masked.sum() / mask.sum().clamp(min=1)
    if mode == "sequence":
        lengths = mask.sum(-1)
        per_seq = masked.sum(-1) / lengths.clamp(min=1)
        return per_seq.sum() / (lengths > 0).sum().clamp(min=1)
    raise ValueError(f"unknown reduction {mode!r}; valid: 'token', 'sequence'")


def reduction_weights(
    mask: torch.Tensor, mode: str = "token", denominator: float | None = None
) -> torch.Tensor:
    """Per-position weights ``w`` with ``sum(w * values) == reduce_divergence(values, mask, mode)``.

    ``denominator`` overrides the count (valid tokens for "token", non-empty sequences for "sequence"), so that a
    loss split over several micro-batches is normalised by the count of the whole step.
    """
    mask = mask.to(torch.bool)
    w = mask.to(torch.float32)
    if mode == "token":
        count = float(mask.sum()) if denominator is None else float(denominator)
        return w / max(count, 1.0)
    if mode == "sequence":
        lengths = mask.sum(-1, keepdim=True).clamp(min=1).to(torch.float32)
        count = float((mask.sum(-1) > 0).sum()) if denominator is None else float(denominator)
        return w / lengths / max(count, 1.0)
    raise ValueError(f"unknown reduction {mode!r}; valid: 'token', 'sequence'")
