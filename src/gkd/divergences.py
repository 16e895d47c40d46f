"""Token-level divergences between a teacher and a student, exact over the whole vocabulary.

Every divergence is one registry entry (``DivergenceSpec`` in ``DIVERGENCES``) holding:

- its **pure function**: it takes ``student_logits`` and ``teacher_logits`` of shape ``[..., V]`` and returns the
  divergence at every position, shape ``[...]``, summed over the vocabulary (differentiable with autograd);
- its **parameters** with their defaults, and the one **check** of their ranges (``validate_divergence_params``,
  ``get_divergence`` and the function itself all use it);
- optionally its **closed form**: the value and the gradient w.r.t. the student logits written into scratch buffers,
  which the chunked loss (``gkd.losses``) uses instead of autograd. A divergence without one still trains, through
  autograd, and the loss says so with a warning.

The function and its closed form are written next to each other below and registered together. Adding a divergence is
one ``register_divergence(DivergenceSpec(...))`` call (plus tests). ``get_divergence(name, **params)`` returns a
``BoundDivergence``: a callable that carries its entry and parameters, through which the loss finds the closed form.

Conventions follow the GKD paper (Agarwal et al., ICLR 2024): **P is the teacher distribution, Q the student
distribution.**

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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch

__all__ = [
    "DIVERGENCES",
    "LOG_FLOOR",
    "BoundDivergence",
    "ClosedForm",
    "Divergence",
    "DivergenceSpec",
    "as_bound_divergence",
    "check_temperature",
    "compute_dtype",
    "forward_kl",
    "get_divergence",
    "jsd",
    "jsd_upper_bound",
    "log_probs",
    "log_softmax_into",
    "reduce_divergence",
    "reduction_weights",
    "register_divergence",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "tvd",
    "validate_divergence_params",
]

# Log-probabilities are clamped here so that -inf never meets -inf in a subtraction or a logaddexp.
# exp(LOG_FLOOR) is exactly 0 in every float type, so finite inputs are unaffected.
LOG_FLOOR = -1e30

Divergence = Callable[..., torch.Tensor]
"""A divergence function ``(student_logits, teacher_logits, *, temperature) -> values [...]``."""

GradResult = tuple[torch.Tensor, torch.Tensor | None]
ClosedForm = Callable[..., GradResult]
"""``closed_form(zs, zt, temperature, scale, scratch, **params) -> (values, gradient or None)``; see below."""


# ---------------------------------------------------------------------------------------------------------------
# Shared pieces: dtype, temperature, log-probabilities
# ---------------------------------------------------------------------------------------------------------------


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype divergences compute in for input ``x``: float64 for float64, float32 for everything else."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def check_temperature(temperature: float) -> None:
    """Raise ValueError unless ``temperature`` is a positive finite number."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")


def log_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log_softmax(logits / temperature) in float32 (or float64), floored at ``LOG_FLOOR`` instead of -inf."""
    x = logits.to(compute_dtype(logits))
    if temperature != 1.0:
        x = x / temperature
    return torch.log_softmax(x, dim=-1).clamp(min=LOG_FLOOR)


def _kl_from_log_probs(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p_v (log p_v - log q_v) over the last dimension, from floored log-probs."""
    return (logp.exp() * (logp - logq)).sum(-1)


def _mix(logp: torch.Tensor, logq: torch.Tensor, weight_p: float) -> torch.Tensor:
    """log(weight_p * p + (1 - weight_p) * q), computed stably from log-probs."""
    return torch.logaddexp(logp + math.log(weight_p), logq + math.log1p(-weight_p))


# ---------------------------------------------------------------------------------------------------------------
# The closed-form contract
# ---------------------------------------------------------------------------------------------------------------
# ``closed_form(zs, zt, temperature, scale, scratch, **params)`` returns the divergence per position ``[c]`` and, when
# ``scale`` (per-position weights ``[c]``) is given, ``scale[:, None] * dD/dzs`` ``[c, V]``, else None. ``zs``/``zt``
# are a chunk's student/teacher logits in the compute dtype (float32, or float64), held in scratch buffers that the
# closed form overwrites, like the ``scratch`` buffers of the same shape (``DivergenceSpec.scratch_buffers`` of them);
# the gradient is returned in one of these buffers. Nothing of size [c, V] is allocated: every op writes into a
# buffer, so a chunk costs no page faults and a few passes over memory. Parameters are validated when the divergence
# is bound (``BoundDivergence``), not again here.
#
# With q = softmax(zs / T), any F(q) has dF/dzs = q * (dF/dq - <q, dF/dq>) / T, and here:
#   forward_kl       KL(P || Q)                                 (q - p) / T
#   reverse_kl       KL(Q || P)                                 q * (log q - log p - KL(Q || P)) / T
#   jsd(β)           β KL(P || M) + (1-β) KL(Q || M),           (1-β) q * (log q - log m - KL(Q || M)) / T
#                    M = β P + (1-β) Q                          (divided by β(1-β) when normalized)
#   tvd              ½ Σ |p - q|                                ½ q * (s - <q, s>) / T,  s = sign(q - p)
#   skew_forward_kl  KL(P || M), M = α P + (1-α) Q              (1-α) q * (<q, r> - r) / T,  r = p / m
#   skew_reverse_kl  KL(Q || M), M = α Q + (1-α) P              q * (g - <q, g>) / T,  g = log q - log m - α q / m
# Mixtures are formed in probability space (log of a lerp, floored at LOG_FLOOR) rather than with logaddexp of
# log-probabilities: the same value up to float rounding, and an entry that is zero in both distributions still
# contributes exactly zero. Values agree with the pure functions and gradients with autograd through them to float
# rounding (tests/test_divergences.py checks every entry); the one exception is a forward-type KL whose *student*
# logit is -inf where the teacher has mass (an infinite divergence, reported as a huge finite one), where the
# gradient is q - p instead of autograd's clamp-masked value. Student logits computed from hidden states are always
# finite.


def log_softmax_into(x: torch.Tensor, out: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``out = log_probs(x, temperature)`` with no allocation; divides ``x`` by the temperature in place."""
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


# ---------------------------------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------------------------------


def _no_params(params: Mapping[str, object]) -> None:
    """The check of a divergence whose only parameter is the temperature (checked for every divergence)."""


@dataclass(frozen=True, eq=False)
class DivergenceSpec:
    """One divergence: its pure function, parameters, the check of their ranges and an optional closed form.

    ``fn(student_logits, teacher_logits, *, temperature=1.0, **params)`` returns the value at every position.
    ``defaults`` lists every keyword parameter of ``fn`` with its default (``temperature`` included).
    ``check(params)`` raises ValueError for out-of-range values; it receives the defaults merged with the given
    parameters (the temperature is checked for every divergence before it).
    ``closed_form``, if given, follows the closed-form contract above and needs ``scratch_buffers`` scratch buffers.
    ``config_keys`` maps a parameter to the ``GKDConfig`` field that sets it (e.g. ``{"alpha": "skew_alpha"}``).
    """

    name: str
    fn: Divergence
    defaults: Mapping[str, object]
    check: Callable[[Mapping[str, object]], None] = _no_params
    closed_form: ClosedForm | None = None
    scratch_buffers: int = 3
    doc: str = ""
    config_keys: Mapping[str, str] = field(default_factory=dict)

    def validate(self, params: Mapping[str, object]) -> None:
        """Raise ValueError if a parameter is unknown or out of range."""
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise ValueError(
                f"divergence {self.name!r} takes no parameter {', '.join(unknown)}; "
                f"valid parameters: {', '.join(self.defaults) or 'none'}"
            )
        merged = {**self.defaults, **params}
        check_temperature(merged["temperature"])  # type: ignore[arg-type]
        self.check(merged)


DIVERGENCES: dict[str, DivergenceSpec] = {}
"""name -> registry entry. Add entries with ``register_divergence``."""


def register_divergence(spec: DivergenceSpec, *, replace: bool = False) -> DivergenceSpec:
    """Add ``spec`` to ``DIVERGENCES`` (a divergence known to ``get_divergence``, the config and the loss).

    ``spec.defaults`` must include ``temperature`` (the loss passes it to every divergence). A name that is taken
    raises ValueError unless ``replace=True``. Returns ``spec``.
    """
    if spec.name in DIVERGENCES and not replace:
        raise ValueError(f"divergence {spec.name!r} is already registered; pass replace=True to replace it")
    if "temperature" not in spec.defaults:
        raise ValueError(f"divergence {spec.name!r}: defaults must include 'temperature'")
    unknown_keys = sorted(set(spec.config_keys) - set(spec.defaults))
    if unknown_keys:
        raise ValueError(f"divergence {spec.name!r}: config_keys names unknown parameters {unknown_keys}")
    if spec.scratch_buffers < 0:
        raise ValueError(f"divergence {spec.name!r}: scratch_buffers must be >= 0")
    DIVERGENCES[spec.name] = spec
    return spec


class BoundDivergence:
    """A registered divergence with its parameters bound; what ``get_divergence(name, **params)`` returns.

    ``bound(student_logits, teacher_logits)`` is ``spec.fn(student_logits, teacher_logits, **params)``; a
    ``temperature`` given at call time overrides a bound one. ``closed_form`` is the entry's closed form with the
    parameters bound (the temperature excepted, which the caller passes), or None when the entry has none.
    """

    def __init__(self, spec: DivergenceSpec, params: Mapping[str, object] | None = None) -> None:
        params = dict(params or {})
        spec.validate(params)
        self._spec = spec
        self._params = params
        self.__name__ = self.__qualname__ = spec.name
        self.__doc__ = spec.fn.__doc__

    @property
    def spec(self) -> DivergenceSpec:
        return self._spec

    @property
    def name(self) -> str:
        return self._spec.name

    @property
    def params(self) -> Mapping[str, object]:
        """The bound parameters, as given to ``get_divergence`` (read-only)."""
        return MappingProxyType(self._params)

    @property
    def temperature(self) -> float | None:
        """The bound temperature, or None when the temperature is left to the caller."""
        value = self._params.get("temperature")
        return None if value is None else float(value)  # type: ignore[arg-type]

    @property
    def closed_form(self) -> ClosedForm | None:
        """``closed_form(zs, zt, temperature, scale, scratch)`` with this divergence's parameters bound, or None."""
        impl = self._spec.closed_form
        if impl is None:
            return None
        params = {k: v for k, v in self._params.items() if k != "temperature"}
        return functools.partial(impl, **params) if params else impl

    def __call__(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float | None = None
    ) -> torch.Tensor:
        kwargs = dict(self._params)
        if temperature is not None:
            kwargs["temperature"] = temperature
        return self._spec.fn(student_logits, teacher_logits, **kwargs)

    def __repr__(self) -> str:
        args = "".join(f", {k}={v!r}" for k, v in self._params.items())
        return f"get_divergence({self.name!r}{args})"

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        # A registered divergence pickles (and deep-copies) by name: the entry holds functions, the name is enough.
        if DIVERGENCES.get(self.name) is self._spec:
            return _rebind, (self.name, dict(self._params))
        return BoundDivergence, (self._spec, dict(self._params))


def _rebind(name: str, params: dict[str, object]) -> BoundDivergence:
    return BoundDivergence(DIVERGENCES[name], params)


# ---------------------------------------------------------------------------------------------------------------
# The divergences: each pure function, then its closed form, then its registry entry
# ---------------------------------------------------------------------------------------------------------------


def forward_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0
) -> torch.Tensor:
    """KL(P || Q): expectation under the teacher. Its gradient w.r.t. the student logits is Q - P."""
    check_temperature(temperature)
    return _kl_from_log_probs(log_probs(teacher_logits, temperature), log_probs(student_logits, temperature))


def _forward_kl_closed_form(
    zs: torch.Tensor,
    zt: torch.Tensor,
    temperature: float,
    scale: torch.Tensor | None,
    scratch: list[torch.Tensor],
) -> GradResult:
    logq = log_softmax_into(zs, scratch[0], temperature)
    logp = log_softmax_into(zt, scratch[1], temperature)
    p = torch.exp(logp, out=zt)
    values = _rowdot(p, logp.sub_(logq), scratch[2])
    if scale is None:
        return values, None
    grad = torch.exp(logq, out=zs).sub_(p)  # q - p
    return values, _scaled(grad, scale, 1.0 / temperature)


register_divergence(
    DivergenceSpec(
        "forward_kl",
        forward_kl,
        {"temperature": 1.0},
        closed_form=_forward_kl_closed_form,
        doc="KL(P || Q), mode-covering (supervised KD when off-policy)",
    )
)


def reverse_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0
) -> torch.Tensor:
    """KL(Q || P): expectation under the student (mode-seeking)."""
    check_temperature(temperature)
    return _kl_from_log_probs(log_probs(student_logits, temperature), log_probs(teacher_logits, temperature))


def _reverse_kl_closed_form(
    zs: torch.Tensor,
    zt: torch.Tensor,
    temperature: float,
    scale: torch.Tensor | None,
    scratch: list[torch.Tensor],
) -> GradResult:
    logq = log_softmax_into(zs, scratch[0], temperature)
    ratio = log_softmax_into(zt, scratch[1], temperature).neg_().add_(logq)  # log q - log p
    q = torch.exp(logq, out=zs)
    values = _rowdot(q, ratio, scratch[2])
    if scale is None:
        return values, None
    return values, _scaled(ratio.sub_(values[:, None]).mul_(q), scale, 1.0 / temperature)


register_divergence(
    DivergenceSpec(
        "reverse_kl",
        reverse_kl,
        {"temperature": 1.0},
        closed_form=_reverse_kl_closed_form,
        doc="KL(Q || P), mode-seeking",
    )
)


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
    check_temperature(temperature)
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


def _jsd_closed_form(
    zs: torch.Tensor,
    zt: torch.Tensor,
    temperature: float,
    scale: torch.Tensor | None,
    scratch: list[torch.Tensor],
    *,
    beta: float = 0.5,
    normalize: bool = False,
) -> GradResult:
    if normalize and beta == 0.0:
        return _forward_kl_closed_form(zs, zt, temperature, scale, scratch)
    if normalize and beta == 1.0:
        return _reverse_kl_closed_form(zs, zt, temperature, scale, scratch)
    logq = log_softmax_into(zs, scratch[0], temperature)
    logp = log_softmax_into(zt, scratch[1], temperature)
    q, p = torch.exp(logq, out=zs), torch.exp(logp, out=zt)
    logm = _log_mix_into(p, q, beta, scratch[2])
    r, d = logq.sub_(logm), logp.sub_(logm)  # log q - log m, log p - log m
    kl_p = _rowdot(p, d, scratch[2])
    kl_q = _rowdot(q, r, scratch[2])
    values = beta * kl_p + (1.0 - beta) * kl_q
    if normalize:
        values = values / (beta * (1.0 - beta))
    if scale is None:
        return values, None
    factor = (1.0 / beta if normalize else 1.0 - beta) / temperature
    return values, _scaled(r.sub_(kl_q[:, None]).mul_(q), scale, factor)


register_divergence(
    DivergenceSpec(
        "jsd",
        jsd,
        {"beta": 0.5, "temperature": 1.0, "normalize": False},
        check=lambda p: _check_beta(p["beta"], bool(p["normalize"])),  # type: ignore[arg-type]
        closed_form=_jsd_closed_form,
        doc="generalized JSD(beta) of the GKD paper (Eq. 1); normalize=True divides by beta(1-beta)",
        config_keys={"beta": "beta", "normalize": "jsd_normalize"},
    )
)


def jsd_upper_bound(beta: float) -> float:
    """The bound JSD(beta) <= -beta log beta - (1-beta) log(1-beta) (<= log 2)."""
    return -(beta * math.log(beta) + (1 - beta) * math.log(1 - beta))


def tvd(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0
) -> torch.Tensor:
    """Total variation distance 1/2 * sum_v |P_v - Q_v| (f-distill)."""
    check_temperature(temperature)
    p = log_probs(teacher_logits, temperature).exp()
    q = log_probs(student_logits, temperature).exp()
    return 0.5 * (p - q).abs().sum(-1)


def _tvd_closed_form(
    zs: torch.Tensor,
    zt: torch.Tensor,
    temperature: float,
    scale: torch.Tensor | None,
    scratch: list[torch.Tensor],
) -> GradResult:
    q = torch.exp(log_softmax_into(zs, scratch[0], temperature), out=zs)
    p = torch.exp(log_softmax_into(zt, scratch[1], temperature), out=zt)
    diff = torch.sub(p, q, out=scratch[0])
    values = 0.5 * torch.abs(diff, out=scratch[1]).sum(-1)
    if scale is None:
        return values, None
    sign = diff.sign_().neg_()  # sign(q - p)
    return values, _scaled(sign.sub_(_rowdot(q, sign, scratch[1])[:, None]).mul_(q), scale, 0.5 / temperature)


register_divergence(
    DivergenceSpec(
        "tvd",
        tvd,
        {"temperature": 1.0},
        closed_form=_tvd_closed_form,
        doc="total variation distance 1/2 sum |P - Q| (f-distill)",
    )
)


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
    check_temperature(temperature)
    logp = log_probs(teacher_logits, temperature)
    logq = log_probs(student_logits, temperature)
    if alpha == 0.0:
        return _kl_from_log_probs(logp, logq)
    return _kl_from_log_probs(logp, _mix(logp, logq, alpha))


def _skew_forward_kl_closed_form(
    zs: torch.Tensor,
    zt: torch.Tensor,
    temperature: float,
    scale: torch.Tensor | None,
    scratch: list[torch.Tensor],
    *,
    alpha: float = 0.1,
) -> GradResult:
    if alpha == 0.0:
        return _forward_kl_closed_form(zs, zt, temperature, scale, scratch)
    q = torch.exp(log_softmax_into(zs, scratch[0], temperature), out=zs)
    logp = log_softmax_into(zt, scratch[1], temperature)
    p = torch.exp(logp, out=zt)
    d = logp.sub_(_log_mix_into(p, q, alpha, scratch[2]))  # log p - log m
    values = _rowdot(p, d, scratch[0])
    if scale is None:
        return values, None
    ratio = d.clamp_(max=-math.log(alpha)).exp_()  # p / m <= 1 / α (the clamp only acts where p = m = 0)
    grad = ratio.sub_(_rowdot(q, ratio, scratch[0])[:, None]).mul_(q)
    return values, _scaled(grad, scale, -(1.0 - alpha) / temperature)


register_divergence(
    DivergenceSpec(
        "skew_forward_kl",
        skew_forward_kl,
        {"alpha": 0.1, "temperature": 1.0},
        check=lambda p: _check_alpha("skew_forward_kl", p["alpha"]),  # type: ignore[arg-type]
        closed_form=_skew_forward_kl_closed_form,
        doc="KL(P || alpha P + (1-alpha) Q) (DistiLLM); alpha=0 is forward KL",
        config_keys={"alpha": "skew_alpha"},
    )
)


def skew_reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Skew reverse KL of DistiLLM: KL(Q || alpha*Q + (1-alpha)*P). alpha=0 is reverse KL."""
    _check_alpha("skew_reverse_kl", alpha)
    check_temperature(temperature)
    logp = log_probs(teacher_logits, temperature)
    logq = log_probs(student_logits, temperature)
    if alpha == 0.0:
        return _kl_from_log_probs(logq, logp)
    return _kl_from_log_probs(logq, _mix(logq, logp, alpha))


def _skew_reverse_kl_closed_form(
    zs: torch.Tensor,
    zt: torch.Tensor,
    temperature: float,
    scale: torch.Tensor | None,
    scratch: list[torch.Tensor],
    *,
    alpha: float = 0.1,
) -> GradResult:
    if alpha == 0.0:
        return _reverse_kl_closed_form(zs, zt, temperature, scale, scratch)
    logq = log_softmax_into(zs, scratch[0], temperature)
    q = torch.exp(logq, out=zs)
    p = torch.exp(log_softmax_into(zt, scratch[1], temperature), out=zt)
    r = logq.sub_(_log_mix_into(q, p, alpha, scratch[2]))  # log q - log m
    values = _rowdot(q, r, scratch[1])
    if scale is None:
        return values, None
    r.clamp_(max=-math.log(alpha))  # q / m <= 1 / α (the clamp only acts where q = m = 0)
    g = r.sub_(torch.exp(r, out=scratch[1]).mul_(alpha))  # log q - log m - α q / m
    return values, _scaled(g.sub_(_rowdot(q, g, scratch[1])[:, None]).mul_(q), scale, 1.0 / temperature)


register_divergence(
    DivergenceSpec(
        "skew_reverse_kl",
        skew_reverse_kl,
        {"alpha": 0.1, "temperature": 1.0},
        check=lambda p: _check_alpha("skew_reverse_kl", p["alpha"]),  # type: ignore[arg-type]
        closed_form=_skew_reverse_kl_closed_form,
        doc="KL(Q || alpha Q + (1-alpha) P) (DistiLLM); alpha=0 is reverse KL",
        config_keys={"alpha": "skew_alpha"},
    )
)


# ---------------------------------------------------------------------------------------------------------------
# Looking divergences up
# ---------------------------------------------------------------------------------------------------------------


def _registered(name: str) -> DivergenceSpec:
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}; valid names: {', '.join(DIVERGENCES)}")
    return DIVERGENCES[name]


def validate_divergence_params(name: str, params: Mapping[str, object]) -> None:
    """Raise ValueError if ``name`` is unknown or a parameter is unknown or out of range (no tensors needed)."""
    _registered(name).validate(params)


def get_divergence(name: str, **params: object) -> BoundDivergence:
    """Return the divergence ``name`` with ``params`` bound, e.g. ``get_divergence("jsd", beta=0.9)``.

    Raises ValueError, listing what is valid, for an unknown name, an unknown parameter or an out-of-range value.
    """
    return BoundDivergence(_registered(name), params)


def as_bound_divergence(divergence: object) -> BoundDivergence | None:
    """The registered divergence that ``divergence`` is, with its parameters bound; None for any other callable.

    Recognised: a ``BoundDivergence`` (returned as is), a registered pure function such as ``forward_kl``, and a
    ``functools.partial`` of one with keyword parameters only (``partial(jsd, beta=0.9)``; the parameters are
    validated). Anything else (a user function, a wrapper, a partial with positional arguments) has no registry
    entry, hence no closed form, and gives None.
    """
    if isinstance(divergence, BoundDivergence):
        return divergence
    fn, params = divergence, {}
    if isinstance(divergence, functools.partial):
        if divergence.args:
            return None
        fn, params = divergence.func, dict(divergence.keywords)
    for spec in DIVERGENCES.values():
        if spec.fn is fn:
            return BoundDivergence(spec, params)
    return None


# ---------------------------------------------------------------------------------------------------------------
# Reductions over positions
# ---------------------------------------------------------------------------------------------------------------


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
