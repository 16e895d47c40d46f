"""Tests of ``gkd.divergences``: an independent float64 numpy reference, properties, known bugs and gradients.

Conventions under test (module docstring of ``gkd.divergences``): P is the teacher, Q the student;
forward_kl = KL(P||Q), reverse_kl = KL(Q||P), jsd(beta) = beta KL(P||M) + (1-beta) KL(Q||M) with
M = beta P + (1-beta) Q, tvd = 1/2 sum |P-Q|, skew_forward_kl = KL(P || alpha P + (1-alpha) Q),
skew_reverse_kl = KL(Q || alpha Q + (1-alpha) P).
"""

from __future__ import annotations

import copy
import functools
import math
import pickle
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gkd.divergences import (
    DIVERGENCES,
    BoundDivergence,
    DivergenceSpec,
    as_bound_divergence,
    check_temperature,
    forward_kl,
    get_divergence,
    jsd,
    jsd_upper_bound,
    log_probs,
    reduce_divergence,
    reduction_weights,
    register_divergence,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    tvd,
    validate_divergence_params,
)

FUNCS: dict[str, Callable[..., torch.Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "tvd": tvd,
    "skew_forward_kl": skew_forward_kl,
    "skew_reverse_kl": skew_reverse_kl,
}

# (name, parameters) covering every divergence, both JSD flavours and the special values beta/alpha = 0 / 1.
SPECS: list[tuple[str, dict[str, Any]]] = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("jsd", {"beta": 0.1}),
    ("jsd", {"beta": 0.5}),
    ("jsd", {"beta": 0.9}),
    ("jsd", {"beta": 0.0, "normalize": True}),
    ("jsd", {"beta": 0.3, "normalize": True}),
    ("jsd", {"beta": 1.0, "normalize": True}),
    ("tvd", {}),
    ("skew_forward_kl", {"alpha": 0.0}),
    ("skew_forward_kl", {"alpha": 0.1}),
    ("skew_forward_kl", {"alpha": 0.5}),
    ("skew_reverse_kl", {"alpha": 0.1}),
    ("skew_reverse_kl", {"alpha": 0.5}),
]
SPEC_IDS = [name + "".join(f"-{k}={v}" for k, v in params.items()) for name, params in SPECS]

SHAPES: list[tuple[int, ...]] = [(7,), (3, 5, 11), (2, 4, 3, 50)]
TEMPERATURES = [1.0, 0.5, 2.0]
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]

HYPOTHESIS = settings(max_examples=50, deadline=None, database=None, derandomize=True)


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    """These tensors are tiny: with several OpenMP threads on a busy 2-core machine, spin-waiting makes each op
    cost milliseconds. Run single-threaded and restore the setting afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ----------------------------------------------------------------------------------------------------------------
# Independent float64 reference (numpy only, never calls gkd)
# ----------------------------------------------------------------------------------------------------------------


def ref_log_softmax(z: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """log softmax(z / T) over the last axis in float64; -inf entries stay -inf (probability exactly 0)."""
    z = np.asarray(z, dtype=np.float64) / temperature
    zmax = np.max(z, axis=-1, keepdims=True)
    shifted = z - zmax
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def ref_softmax(z: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return np.exp(ref_log_softmax(z, temperature))


def ref_kl(logp: np.ndarray, logq: np.ndarray) -> np.ndarray:
    """KL(p || q) = sum_v p_v (log p_v - log q_v) from log-probabilities (so that underflowing probabilities of
    extreme logits stay exact), with 0 log 0 = 0 and +inf where p_v > 0 = q_v."""
    p = np.exp(logp)
    with np.errstate(invalid="ignore"):
        terms = np.where(p > 0, p * (logp - logq), 0.0)
    return terms.sum(-1)


def ref_log_mix(logp: np.ndarray, logq: np.ndarray, weight_p: float) -> np.ndarray:
    """log(weight_p * p + (1 - weight_p) * q): a mixture of probabilities, evaluated in log space so that it does not
    underflow for extreme logits."""
    return np.logaddexp(np.log(weight_p) + logp, np.log1p(-weight_p) + logq)


def ref_divergence(
    name: str,
    student: np.ndarray,
    teacher: np.ndarray,
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    normalize: bool = False,
    alpha: float = 0.1,
) -> np.ndarray:
    """The divergences of the GKD paper / DistiLLM / f-distill straight from their definitions, in float64."""
    logp = ref_log_softmax(teacher, temperature)
    logq = ref_log_softmax(student, temperature)
    if name == "forward_kl" or (name == "skew_forward_kl" and alpha == 0.0):
        return ref_kl(logp, logq)
    if name == "reverse_kl" or (name == "skew_reverse_kl" and alpha == 0.0):
        return ref_kl(logq, logp)
    if name == "jsd":
        if normalize and beta == 0.0:
            return ref_kl(logp, logq)
        if normalize and beta == 1.0:
            return ref_kl(logq, logp)
        logm = ref_log_mix(logp, logq, beta)
        value = beta * ref_kl(logp, logm) + (1.0 - beta) * ref_kl(logq, logm)
        return value / (beta * (1.0 - beta)) if normalize else value
    if name == "tvd":
        return 0.5 * np.abs(np.exp(logp) - np.exp(logq)).sum(-1)
    if name == "skew_forward_kl":
        return ref_kl(logp, ref_log_mix(logp, logq, alpha))
    if name == "skew_reverse_kl":
        return ref_kl(logq, ref_log_mix(logq, logp, alpha))
    raise AssertionError(name)


def ref_chi2(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """chi^2(p || q) = sum p^2 / q - 1 (sets the size of the first-order term of the JSD limits)."""
    return (p * p / q).sum(-1) - 1.0


def _t(x: np.ndarray, dtype: torch.dtype = torch.float64, requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().to(torch.float64).numpy()


def _call(name: str, params: dict[str, Any], s: torch.Tensor, t: torch.Tensor, temperature: float = 1.0):
    return FUNCS[name](s, t, temperature=temperature, **params)


def _compute_tolerance(dtype: torch.dtype) -> dict[str, float]:
    """Results are computed in float32 (float64 for float64 inputs) from the exact input values."""
    if dtype == torch.float64:
        return {"rtol": 1e-9, "atol": 1e-11}
    return {"rtol": 2e-5, "atol": 1e-5}


def _make_logits(
    case: str, shape: tuple[int, ...], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Student and teacher logits: "normal", "neginf" (-inf at the same vocab entries of both) or "extreme"."""
    if case == "extreme":
        # Spreads of +-1e3 (student) and +-1e4 (teacher): near one-hot distributions, huge log-ratios.
        return rng.uniform(-1e3, 1e3, shape), rng.uniform(-1e4, 1e4, shape)
    s = rng.normal(0.0, 2.0, shape)
    t = rng.normal(0.5, 2.5, shape)
    if case == "neginf":
        masked = rng.random(shape) < 0.35
        keep = rng.integers(0, shape[-1], shape[:-1])
        np.put_along_axis(masked, keep[..., None], False, axis=-1)  # at least one live entry per row
        s[masked] = -np.inf
        t[masked] = -np.inf
    return s, t


@st.composite
def logit_pairs(draw: st.DrawFn, bound: float = 8.0, max_vocab: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Student and teacher logits [n, V] with n in 1..3 and V in 2..max_vocab, entries in [-bound, bound]."""
    n = draw(st.integers(1, 3))
    v = draw(st.integers(2, max_vocab))
    elems = st.floats(-bound, bound, allow_nan=False, allow_infinity=False)
    return draw(hnp.arrays(np.float64, (n, v), elements=elems)), draw(
        hnp.arrays(np.float64, (n, v), elements=elems)
    )


# ----------------------------------------------------------------------------------------------------------------
# Values against the reference
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("name", "params"), SPECS, ids=SPEC_IDS)
def test_matches_reference(name: str, params: dict[str, Any], dtype: torch.dtype) -> None:
    """Every divergence equals its definition for all shapes, temperatures, -inf vocab entries, extreme logits and
    input dtypes; guards against wrong formulas, wrong argument order, wrong temperature handling, low-precision
    computation and NaN from masked vocabulary."""
    rng = np.random.default_rng(1234)
    tol = _compute_tolerance(dtype)
    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for case in ("normal", "neginf", "extreme"):
        for shape in SHAPES:
            s_np, t_np = _make_logits(case, shape, rng)
            s, t = _t(s_np, dtype), _t(t_np, dtype)
            for temperature in TEMPERATURES:
                got = _call(name, params, s, t, temperature)
                assert got.shape == shape[:-1]
                assert got.dtype == expected_dtype, "half-precision inputs must be computed in float32"
                # The reference sees exactly the (rounded) values the function received.
                want = ref_divergence(name, _np(s), _np(t), temperature=temperature, **params)
                np.testing.assert_allclose(
                    _np(got), want, **tol, err_msg=f"{case} shape={shape} T={temperature}"
                )


@pytest.mark.parametrize(
    ("dtype", "atol"), [(torch.float16, 2e-3), (torch.bfloat16, 2e-2), (torch.float32, 1e-5)], ids=str
)
@pytest.mark.parametrize(("name", "params"), SPECS, ids=SPEC_IDS)
def test_low_precision_inputs_close_to_float64(
    name: str, params: dict[str, Any], dtype: torch.dtype, atol: float
) -> None:
    """Rounding moderate logits to a low-precision dtype changes the value only by the rounding of the logits;
    guards against accumulating the vocabulary sum in half precision."""
    rng = np.random.default_rng(7)
    s_np, t_np = _make_logits("normal", (4, 50), rng)
    got = _call(name, params, _t(s_np, dtype), _t(t_np, dtype), 1.0)
    want = ref_divergence(name, s_np, t_np, **params)
    np.testing.assert_allclose(_np(got), want, rtol=atol, atol=atol)


@HYPOTHESIS
@given(data=st.data())
def test_matches_reference_hypothesis(data: st.DataObject) -> None:
    """Random logits, divergence, beta/alpha and temperature agree with the float64 reference."""
    name, params = data.draw(st.sampled_from(SPECS))
    params = dict(params)
    if name == "jsd" and 0.0 < params["beta"] < 1.0:
        params["beta"] = data.draw(st.floats(0.01, 0.99))
    if name.startswith("skew_"):
        params["alpha"] = data.draw(st.floats(0.0, 0.95))
    temperature = data.draw(st.floats(0.25, 4.0))
    s_np, t_np = data.draw(logit_pairs())
    got = _call(name, params, _t(s_np), _t(t_np), temperature)
    want = ref_divergence(name, s_np, t_np, temperature=temperature, **params)
    np.testing.assert_allclose(_np(got), want, rtol=1e-9, atol=1e-11)


# ----------------------------------------------------------------------------------------------------------------
# Properties (hypothesis, float64)
# ----------------------------------------------------------------------------------------------------------------


@HYPOTHESIS
@given(pair=logit_pairs())
def test_non_negative(pair: tuple[np.ndarray, np.ndarray]) -> None:
    """All divergences are >= 0 (up to float64 rounding)."""
    s, t = _t(pair[0]), _t(pair[1])
    for name, params in SPECS:
        assert (_call(name, params, s, t) >= -1e-12).all(), name


@HYPOTHESIS
@given(pair=logit_pairs(), shift=st.floats(-50.0, 50.0))
def test_zero_iff_equal(pair: tuple[np.ndarray, np.ndarray], shift: float) -> None:
    """D(P, P) = 0 for logits equal up to a constant shift, and D(P, Q) > 0 when P and Q differ."""
    s_np, t_np = pair
    s = _t(s_np)
    same = _t(s_np + shift)
    p, q = ref_softmax(t_np), ref_softmax(s_np)
    differs = 0.5 * np.abs(p - q).sum(-1) > 1e-3
    for name, params in SPECS:
        np.testing.assert_allclose(_np(_call(name, params, s, same)), 0.0, atol=1e-10, err_msg=name)
        value = _np(_call(name, params, s, _t(t_np)))
        assert (value[differs] > 0).all(), name


@HYPOTHESIS
@given(pair=logit_pairs(bound=30.0), beta=st.floats(0.001, 0.999))
def test_jsd_upper_bound(pair: tuple[np.ndarray, np.ndarray], beta: float) -> None:
    """JSD(beta) <= -beta log beta - (1-beta) log(1-beta) (reached by disjoint supports)."""
    bound = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
    assert jsd_upper_bound(beta) == pytest.approx(bound, rel=1e-12)
    value = _np(jsd(_t(pair[0]), _t(pair[1]), beta=beta))
    assert (value <= bound + 1e-12).all()


def test_jsd_upper_bound_is_tight() -> None:
    """Disjoint supports reach the bound; guards against a bound check that passes only because values are tiny."""
    s = torch.tensor([[40.0, 0.0, -40.0]], dtype=torch.float64)
    t = torch.tensor([[-40.0, 0.0, 40.0]], dtype=torch.float64)
    for beta in (0.1, 0.5, 0.9):
        assert jsd(s, t, beta=beta).item() == pytest.approx(jsd_upper_bound(beta), rel=1e-9)


@HYPOTHESIS
@given(pair=logit_pairs())
def test_jsd_half_symmetric(pair: tuple[np.ndarray, np.ndarray]) -> None:
    """JSD(0.5) is symmetric in teacher and student; JSD(beta)(s, t) = JSD(1-beta)(t, s) in general."""
    s, t = _t(pair[0]), _t(pair[1])
    torch.testing.assert_close(jsd(s, t, beta=0.5), jsd(t, s, beta=0.5), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(jsd(s, t, beta=0.2), jsd(t, s, beta=0.8), rtol=1e-10, atol=1e-14)


def _limit_tolerance(kl: np.ndarray, chi2: np.ndarray, eps: float) -> np.ndarray:
    """|JSD/(beta(1-beta)) - KL| = eps * |KL - chi2/2| + O(eps^2): allow 3x the first-order term."""
    return 3.0 * eps * (kl + chi2) + 1e-10


@HYPOTHESIS
@given(pair=logit_pairs(bound=1.5))
def test_normalized_jsd_limits(pair: tuple[np.ndarray, np.ndarray]) -> None:
    """Normalized JSD tends to forward KL at beta -> 0 and reverse KL at beta -> 1 (error O(beta)), and is exactly
    forward_kl / reverse_kl at beta = 0 / 1; guards against swapped limits and a missing normalisation."""
    s_np, t_np = pair
    s, t = _t(s_np), _t(t_np)
    p, q = ref_softmax(t_np), ref_softmax(s_np)
    fkl = ref_divergence("forward_kl", s_np, t_np)
    rkl = ref_divergence("reverse_kl", s_np, t_np)
    eps = 1e-4
    near0 = _np(jsd(s, t, beta=eps, normalize=True))
    near1 = _np(jsd(s, t, beta=1 - eps, normalize=True))
    assert (np.abs(near0 - fkl) <= _limit_tolerance(fkl, ref_chi2(p, q), eps)).all()
    assert (np.abs(near1 - rkl) <= _limit_tolerance(rkl, ref_chi2(q, p), eps)).all()
    assert torch.equal(jsd(s, t, beta=0.0, normalize=True), forward_kl(s, t))
    assert torch.equal(jsd(s, t, beta=1.0, normalize=True), reverse_kl(s, t))


@HYPOTHESIS
@given(pair=logit_pairs(bound=1.5))
def test_raw_jsd_limits(pair: tuple[np.ndarray, np.ndarray]) -> None:
    """Raw JSD(beta)/beta -> forward KL and JSD(beta)/(1-beta) -> reverse KL (the paper's interpolation)."""
    s_np, t_np = pair
    s, t = _t(s_np), _t(t_np)
    p, q = ref_softmax(t_np), ref_softmax(s_np)
    fkl = ref_divergence("forward_kl", s_np, t_np)
    rkl = ref_divergence("reverse_kl", s_np, t_np)
    eps = 1e-4
    near0 = _np(jsd(s, t, beta=eps)) / eps
    near1 = _np(jsd(s, t, beta=1 - eps)) / eps
    assert (np.abs(near0 - fkl) <= _limit_tolerance(fkl, ref_chi2(p, q), eps)).all()
    assert (np.abs(near1 - rkl) <= _limit_tolerance(rkl, ref_chi2(q, p), eps)).all()


def test_limits_deterministic_relative() -> None:
    """The beta -> 0 / 1 limits with a plain relative tolerance on moderate logits (float32 and float64)."""
    gen = torch.Generator().manual_seed(3)
    s, t = torch.randn(6, 20, generator=gen), torch.randn(6, 20, generator=gen)
    for dtype in (torch.float32, torch.float64):
        sd, td = s.to(dtype), t.to(dtype)
        fkl, rkl = forward_kl(sd, td), reverse_kl(sd, td)
        torch.testing.assert_close(jsd(sd, td, beta=1e-4, normalize=True), fkl, rtol=2e-3, atol=1e-6)
        torch.testing.assert_close(jsd(sd, td, beta=1 - 1e-4, normalize=True), rkl, rtol=2e-3, atol=1e-6)
        torch.testing.assert_close(jsd(sd, td, beta=1e-4) / 1e-4, fkl, rtol=2e-3, atol=1e-6)
        torch.testing.assert_close(jsd(sd, td, beta=1 - 1e-4) / 1e-4, rkl, rtol=2e-3, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Worked example and the mixture bugs other frameworks shipped
# ----------------------------------------------------------------------------------------------------------------

P_EX = (0.7, 0.2, 0.1)
Q_EX = (0.4, 0.4, 0.2)
WORKED = {"forward_kl": 0.1838, "reverse_kl": 0.1920, "jsd0.1": 0.0165, "jsd0.5": 0.0462, "jsd0.9": 0.0171}

JsdFn = Callable[..., torch.Tensor]


def _example_logits() -> tuple[torch.Tensor, torch.Tensor]:
    """(student, teacher) logits = log-probabilities of Q and P."""
    return torch.tensor(Q_EX, dtype=torch.float64).log(), torch.tensor(P_EX, dtype=torch.float64).log()


def _worked_example_holds(jsd_fn: JsdFn) -> bool:
    s, t = _example_logits()
    return all(abs(jsd_fn(s, t, beta=b).item() - WORKED[f"jsd{b}"]) < 5e-5 for b in (0.1, 0.5, 0.9))


def _beta_limits_hold(jsd_fn: JsdFn) -> bool:
    """JSD(beta)/beta -> KL(P||Q) at beta -> 0 and JSD/(1-beta) -> KL(Q||P) at beta -> 1, on fixed logits."""
    gen = torch.Generator().manual_seed(11)
    s = torch.randn(4, 9, generator=gen, dtype=torch.float64)
    t = torch.randn(4, 9, generator=gen, dtype=torch.float64)
    fkl = ref_divergence("forward_kl", _np(s), _np(t))
    rkl = ref_divergence("reverse_kl", _np(s), _np(t))
    eps = 1e-5
    near0 = _np(jsd_fn(s, t, beta=eps)) / eps
    near1 = _np(jsd_fn(s, t, beta=1 - eps)) / eps
    return bool(np.allclose(near0, fkl, rtol=1e-2) and np.allclose(near1, rkl, rtol=1e-2))


def _matches_reference(jsd_fn: JsdFn) -> bool:
    gen = torch.Generator().manual_seed(12)
    s = torch.randn(5, 13, generator=gen, dtype=torch.float64)
    t = torch.randn(5, 13, generator=gen, dtype=torch.float64)
    return all(
        np.allclose(_np(jsd_fn(s, t, beta=b)), ref_divergence("jsd", _np(s), _np(t), beta=b), rtol=1e-8)
        for b in (0.1, 0.3, 0.9)
    )


def _buggy_jsd_log_space_mixture(
    student: torch.Tensor, teacher: torch.Tensor, *, beta: float
) -> torch.Tensor:
    """Bug 1: the mixture taken in log space, log M = beta log P + (1-beta) log Q (not a distribution)."""
    logp, logq = torch.log_softmax(teacher, -1), torch.log_softmax(student, -1)
    logm = beta * logp + (1 - beta) * logq
    kl_pm = (logp.exp() * (logp - logm)).sum(-1)
    kl_qm = (logq.exp() * (logq - logm)).sum(-1)
    return beta * kl_pm + (1 - beta) * kl_qm


def _buggy_jsd_swapped_weights(student: torch.Tensor, teacher: torch.Tensor, *, beta: float) -> torch.Tensor:
    """Bug 2: beta weights swapped in the mixture, M = (1-beta) P + beta Q."""
    logp, logq = torch.log_softmax(teacher, -1), torch.log_softmax(student, -1)
    logm = torch.log((1 - beta) * logp.exp() + beta * logq.exp())
    kl_pm = (logp.exp() * (logp - logm)).sum(-1)
    kl_qm = (logq.exp() * (logq - logm)).sum(-1)
    return beta * kl_pm + (1 - beta) * kl_qm


def test_worked_example() -> None:
    """P=(0.7,0.2,0.1), Q=(0.4,0.4,0.2): FKL 0.1838, RKL 0.1920, JSD(0.1/0.5/0.9) = 0.0165/0.0462/0.0171."""
    s, t = _example_logits()
    assert forward_kl(s, t).item() == pytest.approx(WORKED["forward_kl"], abs=5e-5)
    assert reverse_kl(s, t).item() == pytest.approx(WORKED["reverse_kl"], abs=5e-5)
    for b in (0.1, 0.5, 0.9):
        assert jsd(s, t, beta=b).item() == pytest.approx(WORKED[f"jsd{b}"], abs=5e-5)
        assert get_divergence("jsd", beta=b)(s, t).item() == pytest.approx(WORKED[f"jsd{b}"], abs=5e-5)
    assert _worked_example_holds(jsd) and _beta_limits_hold(jsd) and _matches_reference(jsd)


@pytest.mark.parametrize(
    "buggy",
    [_buggy_jsd_log_space_mixture, _buggy_jsd_swapped_weights],
    ids=["log_space_mixture", "swapped_beta"],
)
def test_shipped_mixture_bugs_are_caught(buggy: JsdFn) -> None:
    """The checks above would have caught the two JSD mixture bugs shipped elsewhere: each buggy variant fails the
    worked example, the beta limits and the reference, while gkd's jsd passes all three (test_worked_example)."""
    assert not _worked_example_holds(buggy)
    assert not _beta_limits_hold(buggy)
    assert not _matches_reference(buggy)


def test_buggy_variants_differ_from_gkd_where_expected() -> None:
    """Sanity of the buggy variants themselves: the swapped-beta bug is invisible at beta = 0.5 (so a test at 0.5
    alone would miss it), the log-space bug is not."""
    s, t = _example_logits()
    assert _buggy_jsd_swapped_weights(s, t, beta=0.5).item() == pytest.approx(
        jsd(s, t, beta=0.5).item(), rel=1e-12
    )
    assert abs(_buggy_jsd_log_space_mixture(s, t, beta=0.5).item() - jsd(s, t, beta=0.5).item()) > 1e-2


# ----------------------------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize(("name", "params"), SPECS, ids=SPEC_IDS)
def test_gradcheck(name: str, params: dict[str, Any], temperature: float) -> None:
    """Autograd gradients w.r.t. student and teacher logits agree with finite differences (float64)."""
    gen = torch.Generator().manual_seed(5)
    s = torch.randn(2, 3, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: _call(name, params, a, b, temperature), (s, t))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_forward_kl_gradient_is_q_minus_p(dtype: torch.dtype, temperature: float) -> None:
    """d KL(P||Q) / d student logits = (Q - P) / T exactly (the standard distillation gradient)."""
    rng = np.random.default_rng(9)
    s_np, t_np = rng.normal(0, 2, (5, 17)), rng.normal(0, 2, (5, 17))
    s = _t(s_np, dtype, requires_grad=True)
    forward_kl(s, _t(t_np, dtype), temperature=temperature).sum().backward()
    expected = (
        ref_softmax(_np(s), temperature) - ref_softmax(t_np.astype(np.float64), temperature)
    ) / temperature
    np.testing.assert_allclose(_np(s.grad), expected, atol=1e-6, rtol=0)


def _grads(name: str, params: dict[str, Any], s: torch.Tensor, t: torch.Tensor, temperature: float = 1.0):
    s = s.detach().clone().requires_grad_(True)
    t = t.detach().clone().requires_grad_(True)
    value = _call(name, params, s, t, temperature)
    value.sum().backward()
    return value.detach(), s.grad, t.grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(("name", "params"), SPECS, ids=SPEC_IDS)
def test_shared_neginf_finite_values_and_grads(name: str, params: dict[str, Any], dtype: torch.dtype) -> None:
    """-inf at the same vocab entries of both (masked/padded vocab) gives finite values, no NaN gradients, and
    exactly zero gradient at the masked entries."""
    rng = np.random.default_rng(21)
    s_np, t_np = _make_logits("neginf", (3, 4, 12), rng)
    masked = torch.from_numpy(np.isneginf(s_np))
    for temperature in (1.0, 0.5):
        value, gs, gt = _grads(name, params, _t(s_np, dtype), _t(t_np, dtype), temperature)
        assert torch.isfinite(value).all()
        assert torch.isfinite(gs).all() and torch.isfinite(gt).all()
        assert (gs[masked] == 0).all() and (gt[masked] == 0).all()


ONE_SIDED_TEACHER_INF = [
    spec
    for spec in SPECS
    if not (spec[0] == "reverse_kl" or (spec[0] == "jsd" and spec[1].get("beta") == 1.0))
]
ONE_SIDED_STUDENT_INF = [
    spec
    for spec in SPECS
    if spec[0] != "forward_kl"
    and not (spec[0] == "jsd" and spec[1].get("beta") == 0.0)
    and not (spec[0] == "skew_forward_kl" and spec[1]["alpha"] == 0.0)
]


def _one_sided(side: str) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(33)
    s = rng.normal(0, 2, (4, 10))
    t = rng.normal(0, 2, (4, 10))
    target = t if side == "teacher" else s
    target[:, [1, 6]] = -np.inf
    target[0, 3] = -np.inf
    return s, t


@pytest.mark.parametrize(
    ("name", "params"), ONE_SIDED_TEACHER_INF, ids=[n + str(p) for n, p in ONE_SIDED_TEACHER_INF]
)
def test_teacher_only_neginf_finite(name: str, params: dict[str, Any]) -> None:
    """Teacher -inf where the student has mass: JSD, TVD, skew KLs and forward KL (0 log 0) are finite, equal the
    reference, and have finite gradients."""
    s_np, t_np = _one_sided("teacher")
    for dtype in (torch.float32, torch.float64):
        value, gs, gt = _grads(name, params, _t(s_np, dtype), _t(t_np, dtype))
        np.testing.assert_allclose(
            _np(value), ref_divergence(name, s_np, t_np, **params), **_compute_tolerance(dtype)
        )
        assert torch.isfinite(gs).all() and torch.isfinite(gt).all()


@pytest.mark.parametrize(
    ("name", "params"), ONE_SIDED_STUDENT_INF, ids=[n + str(p) for n, p in ONE_SIDED_STUDENT_INF]
)
def test_student_only_neginf_finite(name: str, params: dict[str, Any]) -> None:
    """Student -inf where the teacher has mass: JSD, TVD, skew KLs (alpha > 0) and reverse KL are finite, equal the
    reference, and have finite gradients."""
    s_np, t_np = _one_sided("student")
    for dtype in (torch.float32, torch.float64):
        value, gs, gt = _grads(name, params, _t(s_np, dtype), _t(t_np, dtype))
        np.testing.assert_allclose(
            _np(value), ref_divergence(name, s_np, t_np, **params), **_compute_tolerance(dtype)
        )
        assert torch.isfinite(gs).all() and torch.isfinite(gt).all()


@pytest.mark.parametrize(("name", "side"), [("forward_kl", "student"), ("reverse_kl", "teacher")])
def test_unbounded_kl_is_large_not_nan(name: str, side: str) -> None:
    """A KL that is +inf in exact arithmetic is a large finite number (LOG_FLOOR), never NaN, and its gradients are
    not NaN (documented behaviour)."""
    s_np, t_np = _one_sided(side)
    for dtype in (torch.float32, torch.float64):
        value, gs, gt = _grads(name, {}, _t(s_np, dtype), _t(t_np, dtype))
        assert torch.isfinite(value).all() and (value > 1e20).all()
        assert not torch.isnan(gs).any() and not torch.isnan(gt).any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize(("name", "params"), SPECS, ids=SPEC_IDS)
def test_extreme_logits_finite_grads(name: str, params: dict[str, Any], dtype: torch.dtype) -> None:
    """Logit spreads of +-1e3 / +-1e4 give finite values and gradients (no overflow in exp or the mixture)."""
    rng = np.random.default_rng(44)
    s_np, t_np = _make_logits("extreme", (3, 9), rng)
    value, gs, gt = _grads(name, params, _t(s_np, dtype), _t(t_np, dtype))
    assert torch.isfinite(value).all()
    assert torch.isfinite(gs).all() and torch.isfinite(gt).all()


# ----------------------------------------------------------------------------------------------------------------
# Argument validation and get_divergence
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "params"), SPECS, ids=SPEC_IDS)
def test_get_divergence_binds_params(name: str, params: dict[str, Any]) -> None:
    """get_divergence(name, **params) returns the divergence with those parameters bound."""
    gen = torch.Generator().manual_seed(2)
    s = torch.randn(3, 8, generator=gen, dtype=torch.float64)
    t = torch.randn(3, 8, generator=gen, dtype=torch.float64)
    fn = get_divergence(name, **params, temperature=1.5)
    torch.testing.assert_close(fn(s, t), _call(name, params, s, t, 1.5), rtol=0, atol=0)
    np.testing.assert_allclose(_np(fn(s, t)), ref_divergence(name, _np(s), _np(t), temperature=1.5, **params))


def test_get_divergence_defaults() -> None:
    """Defaults: jsd beta 0.5, skew alpha 0.1, temperature 1; every registered name is callable."""
    assert set(DIVERGENCES) == set(FUNCS)
    s, t = _example_logits()
    for name in FUNCS:
        assert torch.isfinite(get_divergence(name)(s, t)).all()
    assert get_divergence("jsd")(s, t).item() == pytest.approx(WORKED["jsd0.5"], abs=5e-5)
    np.testing.assert_allclose(
        _np(get_divergence("skew_forward_kl")(s, t)),
        ref_divergence("skew_forward_kl", _np(s), _np(t), alpha=0.1),
    )


def test_unknown_name_lists_valid_names() -> None:
    """An unknown divergence name raises ValueError naming every valid divergence."""
    with pytest.raises(ValueError) as err:
        get_divergence("kl_forward")
    for name in FUNCS:
        assert name in str(err.value)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("tvd", {"beta": 0.5}),
        ("forward_kl", {"alpha": 0.1}),
        ("jsd", {"alpha": 0.1}),
        ("skew_reverse_kl", {"b": 1}),
    ],
)
def test_unknown_parameter(name: str, params: dict[str, Any]) -> None:
    """A parameter the divergence does not take raises ValueError (not a TypeError at call time)."""
    with pytest.raises(ValueError, match="parameter"):
        get_divergence(name, **params)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("jsd", {"beta": -0.1}),
        ("jsd", {"beta": 1.5}),
        ("jsd", {"beta": float("nan")}),
        ("jsd", {"beta": float("inf")}),
        ("jsd", {"beta": -0.1, "normalize": True}),
        ("jsd", {"beta": 1.01, "normalize": True}),
        ("skew_forward_kl", {"alpha": -0.1}),
        ("skew_forward_kl", {"alpha": 1.0}),
        ("skew_reverse_kl", {"alpha": 1.5}),
        ("skew_reverse_kl", {"alpha": float("nan")}),
        ("forward_kl", {"temperature": 0.0}),
        ("reverse_kl", {"temperature": -1.0}),
        ("tvd", {"temperature": float("inf")}),
        ("jsd", {"temperature": float("nan")}),
    ],
)
def test_out_of_range_parameters(name: str, params: dict[str, Any]) -> None:
    """Out-of-range beta / alpha / temperature raise ValueError, both in get_divergence and in a direct call."""
    with pytest.raises(ValueError):
        get_divergence(name, **params)
    s, t = _example_logits()
    with pytest.raises(ValueError):
        FUNCS[name](s, t, **params)


@pytest.mark.parametrize("beta", [0.0, 1.0, 0])
def test_raw_jsd_at_endpoints_points_to_alternatives(beta: float) -> None:
    """Raw JSD at beta 0 or 1 is identically 0: it must raise and point to forward_kl / reverse_kl / normalize."""
    s, t = _example_logits()
    for call in (lambda: jsd(s, t, beta=beta), lambda: get_divergence("jsd", beta=beta)):
        with pytest.raises(ValueError) as err:
            call()
        message = str(err.value)
        assert "forward_kl" in message and "reverse_kl" in message and "normalize" in message


def test_normalized_endpoints_allowed_via_get_divergence() -> None:
    """get_divergence('jsd', beta=0/1, normalize=True) is forward_kl / reverse_kl exactly."""
    s, t = _example_logits()
    assert torch.equal(get_divergence("jsd", beta=0.0, normalize=True)(s, t), forward_kl(s, t))
    assert torch.equal(get_divergence("jsd", beta=1.0, normalize=True)(s, t), reverse_kl(s, t))


# ----------------------------------------------------------------------------------------------------------------
# Registry entries: bound divergences, closed forms, registering a new divergence
# ----------------------------------------------------------------------------------------------------------------


def _seed_of(name: str, params: dict[str, Any]) -> int:
    return sum(map(ord, name + repr(sorted(params.items())))) % 997


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize(("name", "params"), SPECS, ids=SPEC_IDS)
def test_closed_form_matches_autograd_through_fn(
    name: str, params: dict[str, Any], temperature: float, dtype: torch.dtype
) -> None:
    """Every entry's closed form gives the values of its pure function and scale * d(value)/d(student logits) equal
    to autograd through that function; guards against the fast path drifting from the one source of truth."""
    bound = get_divergence(name, **params)
    assert bound.closed_form is not None, f"{name} has no closed form"
    gen = torch.Generator().manual_seed(_seed_of(name, params))
    zs = (torch.randn(5, 13, generator=gen, dtype=torch.float64) * 2).to(dtype)
    zt = (torch.randn(5, 13, generator=gen, dtype=torch.float64) * 2).to(dtype)
    zs[:, 4] = zt[:, 4] = -float("inf")  # a masked vocabulary entry shared by both
    scale = torch.rand(5, generator=gen, dtype=torch.float64).to(dtype)

    leaf = zs.clone().requires_grad_(True)
    want = bound(leaf, zt, temperature=temperature)
    (scale * want).sum().backward()

    def scratch() -> list[torch.Tensor]:
        return [torch.empty_like(zs) for _ in range(bound.spec.scratch_buffers)]

    values, grad = bound.closed_form(zs.clone(), zt.clone(), temperature, scale, scratch())
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(values, want.detach(), **tol)
    assert grad is not None
    torch.testing.assert_close(grad, leaf.grad, **tol)
    values_only, no_grad = bound.closed_form(zs.clone(), zt.clone(), temperature, None, scratch())
    assert no_grad is None
    torch.testing.assert_close(values_only, want.detach(), **tol)


def test_every_registered_divergence_is_tested() -> None:
    """Every registry entry has a closed form and appears in SPECS (so the closed-form test above covers it), and
    each entry is exactly the pure function with its defaults."""
    assert {name for name, _ in SPECS} == set(DIVERGENCES)
    for name, spec in DIVERGENCES.items():
        assert spec.name == name and spec.fn is FUNCS[name] and spec.closed_form is not None
        assert "temperature" in spec.defaults and spec.doc
        assert set(spec.config_keys) <= set(spec.defaults)


def test_bound_divergence_carries_its_entry() -> None:
    """get_divergence returns a BoundDivergence with .spec, .name, .params; calling it is the pure function with the
    parameters bound, and a temperature given at call time overrides a bound one. It pickles and deep-copies (by
    name) like the functools.partial it replaces."""
    s, t = _example_logits()
    fn = get_divergence("jsd", beta=0.9, temperature=2.0)
    assert isinstance(fn, BoundDivergence)
    assert fn.spec is DIVERGENCES["jsd"] and fn.name == "jsd" and fn.__name__ == "jsd"
    assert dict(fn.params) == {"beta": 0.9, "temperature": 2.0} and fn.temperature == 2.0
    assert get_divergence("jsd").temperature is None
    assert torch.equal(fn(s, t), jsd(s, t, beta=0.9, temperature=2.0))
    assert torch.equal(fn(s, t, temperature=0.5), jsd(s, t, beta=0.9, temperature=0.5))
    assert "beta=0.9" in repr(fn)
    with pytest.raises(TypeError):
        fn.params["beta"] = 0.1  # type: ignore[index]
    for copied in (pickle.loads(pickle.dumps(fn)), copy.deepcopy(fn)):
        assert copied.spec is fn.spec and dict(copied.params) == dict(fn.params)


def test_as_bound_divergence_recognises_registered_functions_only() -> None:
    """Registered functions and keyword partials of them map to their entry; other callables have none."""
    assert as_bound_divergence(forward_kl).spec is DIVERGENCES["forward_kl"]  # type: ignore[union-attr]
    bound = as_bound_divergence(functools.partial(jsd, beta=0.3))
    assert bound is not None and bound.name == "jsd" and dict(bound.params) == {"beta": 0.3}
    same = get_divergence("tvd")
    assert as_bound_divergence(same) is same
    assert as_bound_divergence(lambda s, t, *, temperature=1.0: forward_kl(s, t)) is None
    assert as_bound_divergence(functools.partial(jsd, torch.zeros(3))) is None
    with pytest.raises(ValueError, match="beta"):
        as_bound_divergence(functools.partial(jsd, beta=2.0))


def _toy_hellinger() -> Callable[..., torch.Tensor]:
    def hellinger(
        student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0
    ) -> torch.Tensor:
        """Squared Hellinger distance 1 - sum_v sqrt(P_v Q_v)."""
        check_temperature(temperature)
        logp, logq = log_probs(teacher_logits, temperature), log_probs(student_logits, temperature)
        return 1.0 - torch.exp(0.5 * (logp + logq)).sum(-1)

    return hellinger


def test_register_divergence_is_one_entry() -> None:
    """A new divergence is one register_divergence call: get_divergence, validate_divergence_params and the valid
    names all know it; it has no closed form (the loss then uses autograd)."""
    fn = _toy_hellinger()
    register_divergence(DivergenceSpec("toy_hellinger", fn, {"temperature": 1.0}, doc="squared Hellinger"))
    try:
        s, t = _example_logits()
        bound = get_divergence("toy_hellinger")
        assert bound.closed_form is None
        p, q = np.array(P_EX), np.array(Q_EX)
        assert bound(s, t).item() == pytest.approx(1 - np.sqrt(p * q).sum(), rel=1e-12)
        validate_divergence_params("toy_hellinger", {"temperature": 2.0})
        with pytest.raises(ValueError, match="valid parameters: temperature"):
            get_divergence("toy_hellinger", beta=0.5)
        with pytest.raises(ValueError, match="temperature"):
            get_divergence("toy_hellinger", temperature=0.0)
        with pytest.raises(ValueError, match="toy_hellinger"):
            get_divergence("nope")
        with pytest.raises(ValueError, match="already registered"):
            register_divergence(DivergenceSpec("toy_hellinger", fn, {"temperature": 1.0}))
    finally:
        del DIVERGENCES["toy_hellinger"]
    with pytest.raises(ValueError, match="temperature"):
        register_divergence(DivergenceSpec("no_temperature", fn, {}))
    assert "no_temperature" not in DIVERGENCES


# ----------------------------------------------------------------------------------------------------------------
# Reductions
# ----------------------------------------------------------------------------------------------------------------

MASK = torch.tensor(
    [
        [0, 0, 1, 1, 1, 1],
        [0, 1, 1, 0, 0, 0],
        [0, 0, 0, 0, 0, 0],  # a sequence with no valid position
        [1, 1, 1, 1, 1, 1],
    ],
    dtype=torch.bool,
)


def _hand_reduce(values: np.ndarray, mask: np.ndarray, mode: str) -> float:
    if mode == "token":
        return float(sum(values[i, j] for i, j in zip(*np.nonzero(mask))) / max(mask.sum(), 1))
    per_seq = [values[i][mask[i]].mean() for i in range(mask.shape[0]) if mask[i].any()]
    return float(sum(per_seq) / max(len(per_seq), 1))


@pytest.mark.parametrize("mode", ["token", "sequence"])
def test_reduce_matches_hand_computation(mode: str) -> None:
    """Token mode: mean over valid tokens; sequence mode: mean of per-sequence means over non-empty sequences."""
    values = torch.rand(4, 6, dtype=torch.float64) * 3
    got = reduce_divergence(values, MASK, mode)
    assert got.item() == pytest.approx(_hand_reduce(values.numpy(), MASK.numpy(), mode), rel=1e-12)
    # Not the same numbers: guards against one mode silently implementing the other.
    other = "sequence" if mode == "token" else "token"
    assert got.item() != pytest.approx(_hand_reduce(values.numpy(), MASK.numpy(), other), rel=1e-6)


@pytest.mark.parametrize("mode", ["token", "sequence"])
def test_reduce_empty_mask_is_zero_with_zero_grad(mode: str) -> None:
    """No valid position: the loss is exactly 0 and the gradient exactly 0 (not NaN from 0/0)."""
    values = torch.rand(3, 5, requires_grad=True)
    out = reduce_divergence(values, torch.zeros(3, 5, dtype=torch.bool), mode)
    out.backward()
    assert out.item() == 0.0
    assert values.grad is not None and torch.equal(values.grad, torch.zeros_like(values))


@pytest.mark.parametrize("mode", ["token", "sequence"])
def test_reduce_ignores_nonfinite_masked_values(mode: str) -> None:
    """inf / NaN at masked positions (prompt, padding) affect neither value nor gradient."""
    clean = torch.rand(4, 6, dtype=torch.float64)
    dirty = clean.clone()
    dirty[~MASK] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=torch.float64).repeat(6)[
        : int((~MASK).sum())
    ]
    dirty.requires_grad_(True)
    out = reduce_divergence(dirty, MASK, mode)
    out.backward()
    assert out.item() == pytest.approx(reduce_divergence(clean, MASK, mode).item(), rel=1e-12)
    assert torch.isfinite(dirty.grad).all()
    assert (dirty.grad[~MASK] == 0).all()


@pytest.mark.parametrize("mode", ["token", "sequence"])
def test_reduction_weights_reproduce_reduce(mode: str) -> None:
    """sum(reduction_weights * values) == reduce_divergence, and the gradient of the reduction is the weights."""
    values = torch.rand(4, 6, dtype=torch.float64, requires_grad=True)
    w = reduction_weights(MASK, mode)
    assert (w[~MASK] == 0).all()
    reduce_divergence(values, MASK, mode).backward()
    assert (w.to(torch.float64) * values).sum().item() == pytest.approx(
        reduce_divergence(values, MASK, mode).item(), rel=1e-6
    )
    torch.testing.assert_close(values.grad, w.to(torch.float64), rtol=1e-6, atol=0)


@pytest.mark.parametrize("mode", ["token", "sequence"])
def test_reduction_weights_denominator_splits_micro_batches(mode: str) -> None:
    """With the step-wide denominator, micro-batch losses add up to the full-batch reduction."""
    values = torch.rand(4, 6, dtype=torch.float64)
    full = reduce_divergence(values, MASK, mode).item()
    count = float(MASK.sum()) if mode == "token" else float((MASK.sum(-1) > 0).sum())
    parts = 0.0
    for rows in (slice(0, 1), slice(1, 3), slice(3, 4)):
        w = reduction_weights(MASK[rows], mode, denominator=count).to(torch.float64)
        parts += (w * values[rows]).sum().item()
    assert parts == pytest.approx(full, rel=1e-6)


def test_reduce_unknown_mode() -> None:
    """An unknown reduction mode raises ValueError in both functions."""
    with pytest.raises(ValueError):
        reduce_divergence(torch.rand(2, 3), torch.ones(2, 3, dtype=torch.bool), "mean")
    with pytest.raises(ValueError):
        reduction_weights(torch.ones(2, 3, dtype=torch.bool), "batch")
