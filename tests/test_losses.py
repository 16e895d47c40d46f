"""Tests of ``gkd.losses``: the chunked fused loss equals the dense computation (values and gradients), for every
divergence, reduction, chunk size, teacher form and head variant; the nll / sampled_rkl terms; top-k teachers."""

from __future__ import annotations

import dataclasses
import functools
import gc
import itertools
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gkd.divergences import (
    DIVERGENCES,
    BoundDivergence,
    DivergenceSpec,
    check_temperature,
    forward_kl,
    get_divergence,
    jsd,
    log_probs,
    reduce_divergence,
    reduction_weights,
    register_divergence,
    reverse_kl,
)
from gkd.losses import (
    AutogradFallbackWarning,
    Head,
    LossTerms,
    TeacherTopK,
    Workspace,
    chunked_divergence_loss,
    chunked_loss,
    logits_loss,
)

LOSS_SPECS: list[tuple[str, dict[str, Any]]] = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("jsd", {"beta": 0.5}),
    ("jsd", {"beta": 0.9, "temperature": 2.0}),
    ("jsd", {"beta": 0.0, "normalize": True}),
    ("jsd", {"beta": 0.3, "normalize": True, "temperature": 0.5}),
    ("tvd", {}),
    ("skew_forward_kl", {"alpha": 0.1}),
    ("skew_reverse_kl", {"alpha": 0.2, "temperature": 1.5}),
]
LOSS_IDS = [name + "".join(f"-{k}={v}" for k, v in params.items()) for name, params in LOSS_SPECS]

# Valid positions: a prompt prefix and right padding are masked out, one sequence has no valid position at all.
MASK = torch.tensor(
    [
        [0, 0, 1, 1, 1, 1],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 0],
        [0, 1, 1, 1, 1, 1],
    ],
    dtype=torch.bool,
)
N_VALID = int(MASK.sum())  # 11
CHUNKS = [1, 3, 64]  # 64 > N_VALID: a single chunk

VALUE_TOL = {"rtol": 1e-5, "atol": 1e-7}
GRAD_TOL = {"rtol": 1e-4, "atol": 1e-6}


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    """Tiny tensors: avoid OpenMP spin-waiting on a busy 2-core machine; restore the setting afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@dataclass
class Problem:
    """Student hidden [B, T, H] + head (V x H), teacher hidden [B, T, Ht] + head (V x Ht), mask [B, T]."""

    hs: torch.Tensor
    ws: torch.Tensor
    bs: torch.Tensor
    ht: torch.Tensor
    wt: torch.Tensor
    bt: torch.Tensor
    mask: torch.Tensor

    def leaves(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fresh leaf copies of the student's trainable tensors."""
        return tuple(x.detach().clone().requires_grad_(True) for x in (self.hs, self.ws, self.bs))  # type: ignore[return-value]

    def teacher_logits(self) -> torch.Tensor:
        return self.ht @ self.wt.t() + self.bt


def make_problem(
    seed: int = 0, vocab: int = 13, hidden: int = 8, teacher_hidden: int = 6, dtype=torch.float32
):
    gen = torch.Generator().manual_seed(seed)
    b, t = MASK.shape

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    return Problem(
        hs=randn(b, t, hidden),
        ws=randn(vocab, hidden, scale=0.7),
        bs=randn(vocab, scale=0.3),
        ht=randn(b, t, teacher_hidden),
        wt=randn(vocab, teacher_hidden, scale=0.9),
        bt=randn(vocab, scale=0.3),
        mask=MASK,
    )


def _grads(loss: torch.Tensor, *leaves: torch.Tensor) -> list[torch.Tensor]:
    loss.backward()
    return [x.grad if x.grad is not None else torch.zeros_like(x) for x in leaves]


def _assert_same(chunked: torch.Tensor, dense: torch.Tensor, grads_c: list, grads_d: list) -> None:
    torch.testing.assert_close(chunked.detach().to(dense.dtype), dense.detach(), **VALUE_TOL)
    for g_chunked, g_dense in zip(grads_c, grads_d, strict=True):
        torch.testing.assert_close(g_chunked, g_dense, **GRAD_TOL)


# ----------------------------------------------------------------------------------------------------------------
# chunked_divergence_loss == dense path
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("teacher", ["hidden", "logits"])
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("reduction", ["token", "sequence"])
@pytest.mark.parametrize(("name", "params"), LOSS_SPECS, ids=LOSS_IDS)
def test_chunked_divergence_loss_matches_dense(
    name: str, params: dict[str, Any], reduction: str, chunk: int, teacher: str
) -> None:
    """Values and gradients (student hidden, head weight, head bias) of the fused chunked loss equal
    reduce_divergence(D(h_s W_s^T + b_s, teacher logits), mask); guards against chunk-boundary errors, wrong
    reduction weights, a missed temperature, and wrong fused gradients."""
    p = make_problem(seed=zlib.crc32(f"{name}{params}{reduction}".encode()) % 1000)
    hs, ws, bs = p.leaves()
    dense = reduce_divergence(
        get_divergence(name, **params)(hs @ ws.t() + bs, p.teacher_logits()), p.mask, reduction
    )
    grads_d = _grads(dense, hs, ws, bs)

    hs2, ws2, bs2 = p.leaves()
    teacher_kwargs: dict[str, Any] = (
        {"teacher_hidden": p.ht, "teacher_weight": p.wt, "teacher_bias": p.bt}
        if teacher == "hidden"
        else {"teacher_logits": p.teacher_logits()}
    )
    chunked = chunked_divergence_loss(
        hs2,
        ws2,
        p.mask,
        student_bias=bs2,
        divergence=name,
        reduction=reduction,
        chunk_size=chunk,
        **teacher_kwargs,
        **params,
    )
    assert chunked.dim() == 0
    grads_c = _grads(chunked, hs2, ws2, bs2)
    _assert_same(chunked, dense, grads_c, grads_d)
    assert (grads_c[0][~p.mask] == 0).all(), "masked positions must get no gradient"


@pytest.mark.parametrize("reduction", ["token", "sequence"])
def test_chunked_default_chunk_size(reduction: str) -> None:
    """chunk_size=None (the default chunking) equals the dense path too."""
    p = make_problem(seed=3)
    hs, ws, bs = p.leaves()
    dense = reduce_divergence(get_divergence("jsd")(hs @ ws.t() + bs, p.teacher_logits()), p.mask, reduction)
    grads_d = _grads(dense, hs, ws, bs)
    hs2, ws2, bs2 = p.leaves()
    chunked = chunked_divergence_loss(
        hs2, ws2, p.mask, student_bias=bs2, teacher_logits=p.teacher_logits(), reduction=reduction
    )
    _assert_same(chunked, dense, _grads(chunked, hs2, ws2, bs2), grads_d)


@pytest.mark.parametrize("reduction", ["token", "sequence"])
def test_empty_mask_zero_loss_zero_grad(reduction: str) -> None:
    """No valid position: loss exactly 0, gradients exactly 0 (no NaN), like reduce_divergence."""
    p = make_problem(seed=4)
    hs, ws, bs = p.leaves()
    loss = chunked_divergence_loss(
        hs,
        ws,
        torch.zeros_like(p.mask),
        student_bias=bs,
        teacher_hidden=p.ht,
        teacher_weight=p.wt,
        teacher_bias=p.bt,
        reduction=reduction,
    )
    assert loss.item() == 0.0
    for g in _grads(loss, hs, ws, bs):
        assert torch.equal(g, torch.zeros_like(g))


# ----------------------------------------------------------------------------------------------------------------
# Head variants (chunked_loss): padded vocab, scale, no bias, frozen head
# ----------------------------------------------------------------------------------------------------------------

PAD_S, PAD_T = 3, 5  # extra padding rows of the student / teacher head matrices


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("teacher", ["head", "logits"])
@pytest.mark.parametrize("scale", [1.0, 0.37])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_head_variants_match_dense(chunk: int, padded: bool, scale: float, teacher: str, bias: bool) -> None:
    """Head(vocab < rows) uses only the first ``vocab`` rows (extra rows: zero gradient), ``scale`` multiplies the
    hidden states, bias is optional; all equal the dense computation."""
    vocab, temperature = 13, 1.5
    p = make_problem(seed=5, vocab=vocab + PAD_S)
    gen = torch.Generator().manual_seed(6)
    wt_full = torch.randn(vocab + PAD_T, p.ht.shape[-1], generator=gen)
    bt_full = torch.randn(vocab + PAD_T, generator=gen)
    t_scale = 0.6 if scale != 1.0 else 1.0
    hs_all, ws, bs = p.leaves()
    if not padded:
        ws = ws.detach()[:vocab].clone().requires_grad_(True)
        bs = bs.detach()[:vocab].clone().requires_grad_(True)
        wt_full, bt_full = wt_full[:vocab], bt_full[:vocab]
    hs = hs_all.detach()[p.mask].clone().requires_grad_(True)  # [N, H] valid positions
    ht = p.ht[p.mask]
    weights = reduction_weights(p.mask, "token")[p.mask]
    fn = get_divergence("jsd", beta=0.3)

    zt = (ht * t_scale) @ wt_full[:vocab].t() + bt_full[:vocab]
    zs = (hs * scale) @ ws[:vocab].t() + (bs[:vocab] if bias else 0.0)
    dense = (weights * fn(zs, zt, temperature=temperature)).sum()
    grads_d = _grads(dense, hs, ws, *([bs] if bias else []))

    hs2 = hs.detach().clone().requires_grad_(True)
    ws2 = ws.detach().clone().requires_grad_(True)
    bs2 = bs.detach().clone().requires_grad_(True) if bias else None
    head = Head(ws2, bs2, vocab=vocab if padded else None, scale=scale)
    assert head.size == vocab
    teacher_kwargs: dict[str, Any] = (
        {
            "teacher_hidden": ht,
            "teacher_head": Head(wt_full, bt_full, vocab=vocab if padded else None, scale=t_scale),
        }
        if teacher == "head"
        else {"teacher_logits": zt}
    )
    chunked = chunked_loss(
        hs2,
        head,
        LossTerms(divergence=weights),
        divergence=fn,
        temperature=temperature,
        chunk_size=chunk,
        **teacher_kwargs,
    )
    leaves = [hs2, ws2] + ([bs2] if bs2 is not None else [])
    grads_c = _grads(chunked, *leaves)
    _assert_same(chunked, dense, grads_c, grads_d)
    if padded:
        assert torch.equal(ws2.grad[vocab:], torch.zeros_like(ws2.grad[vocab:]))
        if bs2 is not None:
            assert torch.equal(bs2.grad[vocab:], torch.zeros_like(bs2.grad[vocab:]))


def test_teacher_head_size_mismatch() -> None:
    """Teacher and student heads with different effective vocab sizes are rejected."""
    p = make_problem(seed=7)
    with pytest.raises(ValueError, match="outputs"):
        chunked_loss(
            p.hs[p.mask],
            Head(p.ws),
            LossTerms(divergence=torch.ones(N_VALID)),
            divergence=forward_kl,
            teacher_hidden=p.ht[p.mask],
            teacher_head=Head(p.wt, vocab=p.wt.shape[0] - 1),
        )


@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_frozen_head_hidden_gradients(chunk: int) -> None:
    """A frozen head (weight/bias requires_grad False, e.g. LoRA) still yields correct hidden-state gradients and
    leaves the head's .grad untouched."""
    p = make_problem(seed=8)
    hs = p.hs[p.mask].clone().requires_grad_(True)
    weights = reduction_weights(p.mask, "sequence")[p.mask]
    fn = get_divergence("skew_reverse_kl", alpha=0.1)
    zt = p.ht[p.mask] @ p.wt.t() + p.bt
    dense = (weights * fn(hs @ p.ws.t() + p.bs, zt)).sum()
    (gd,) = _grads(dense, hs)
    hs2 = hs.detach().clone().requires_grad_(True)
    ws, bs = p.ws.clone(), p.bs.clone()
    assert not ws.requires_grad
    chunked = chunked_loss(
        hs2, Head(ws, bs), LossTerms(divergence=weights), divergence=fn, teacher_logits=zt, chunk_size=chunk
    )
    (gc,) = _grads(chunked, hs2)
    _assert_same(chunked, dense, [gc], [gd])
    assert ws.grad is None and bs.grad is None


# ----------------------------------------------------------------------------------------------------------------
# nll, sampled_rkl, combinations, stats
# ----------------------------------------------------------------------------------------------------------------


def _targets(n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_nll_equals_cross_entropy(chunk: int) -> None:
    """The nll term with weights 1/N is F.cross_entropy (mean), with equal gradients (SFT / SeqKD path)."""
    p = make_problem(seed=9)
    hs, ws, bs = p.leaves()
    h = hs[p.mask]
    y = _targets(N_VALID, ws.shape[0])
    dense = F.cross_entropy(h @ ws.t() + bs, y)
    grads_d = _grads(dense, hs, ws, bs)
    hs2, ws2, bs2 = p.leaves()
    chunked = chunked_loss(
        hs2[p.mask],
        Head(ws2, bs2),
        LossTerms(logp_weight=torch.full((N_VALID,), 1.0 / N_VALID)),
        targets=y,
        chunk_size=chunk,
    )
    _assert_same(chunked, dense, _grads(chunked, hs2, ws2, bs2), grads_d)


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_all_terms_combined_match_hand_computation(chunk: int) -> None:
    """divergence + nll + sampled_rkl with different per-position weights equals the sum written out by hand:
    w_d * D + w_n * (-log q_y) + w_s * sg(log q_y - log p_y) * log q_y (nll / sampled_rkl at temperature 1)."""
    p = make_problem(seed=10)
    temperature = 2.0
    gen = torch.Generator().manual_seed(11)
    w_div, w_nll, w_srkl = (torch.rand(N_VALID, generator=gen) for _ in range(3))
    y = _targets(N_VALID, p.ws.shape[0], seed=1)
    zt = p.ht[p.mask] @ p.wt.t() + p.bt
    fn = get_divergence("jsd", beta=0.7)

    hs, ws, bs = p.leaves()
    zs = hs[p.mask] @ ws.t() + bs
    logq_y = torch.log_softmax(zs, -1).gather(-1, y[:, None]).squeeze(-1)
    logp_y = torch.log_softmax(zt, -1).gather(-1, y[:, None]).squeeze(-1)
    dense = (
        (w_div * fn(zs, zt, temperature=temperature)).sum()
        - (w_nll * logq_y).sum()
        + (w_srkl * (logq_y - logp_y).detach() * logq_y).sum()
    )
    grads_d = _grads(dense, hs, ws, bs)

    hs2, ws2, bs2 = p.leaves()
    chunked = chunked_loss(
        hs2[p.mask],
        Head(ws2, bs2),
        LossTerms(divergence=w_div, logp_weight=w_nll, sampled_rkl=w_srkl),
        divergence=fn,
        targets=y,
        teacher_logits=zt,
        temperature=temperature,
        chunk_size=chunk,
    )
    _assert_same(chunked, dense, _grads(chunked, hs2, ws2, bs2), grads_d)


def test_logits_loss_matches_chunked() -> None:
    """logits_loss (plain autograd on [N, V] logits) equals the chunked loss with an identity head."""
    p = make_problem(seed=12)
    v = p.ws.shape[0]
    zs = (p.hs[p.mask] @ p.ws.t() + p.bs).requires_grad_(True)
    zt = p.ht[p.mask] @ p.wt.t() + p.bt
    y = _targets(N_VALID, v, seed=2)
    terms = LossTerms(
        divergence=torch.rand(N_VALID), logp_weight=torch.rand(N_VALID), sampled_rkl=torch.rand(N_VALID)
    )
    fn = get_divergence("tvd")
    a = logits_loss(zs, terms, divergence=fn, targets=y, teacher_logits=zt, temperature=0.8)
    (ga,) = _grads(a, zs)
    zs2 = zs.detach().clone().requires_grad_(True)
    b = chunked_loss(
        zs2,
        Head(torch.eye(v)),
        terms,
        divergence=fn,
        targets=y,
        teacher_logits=zt,
        temperature=0.8,
        chunk_size=4,
    )
    _assert_same(b, a, _grads(b, zs2), [ga])


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_stats(chunk: int) -> None:
    """stats holds per-position forward/reverse KL equal to the divergence functions (temperature 1), the student
    entropy, top-1 agreement and the log-probs of the targets, in position order across chunks."""
    p = make_problem(seed=13)
    hs = p.hs[p.mask]
    zs = hs @ p.ws.t() + p.bs
    zt = p.ht[p.mask] @ p.wt.t() + p.bt
    y = _targets(N_VALID, zs.shape[-1], seed=3)
    stats: dict[str, torch.Tensor] = {}
    chunked_loss(
        hs.clone().requires_grad_(True),
        Head(p.ws, p.bs),
        LossTerms(divergence=torch.ones(N_VALID), logp_weight=torch.ones(N_VALID)),
        divergence=get_divergence("jsd"),
        targets=y,
        teacher_hidden=p.ht[p.mask],
        teacher_head=Head(p.wt, p.bt),
        temperature=2.0,
        chunk_size=chunk,
        stats=stats,
    )
    close = {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(stats["forward_kl"], forward_kl(zs, zt), **close)
    torch.testing.assert_close(stats["reverse_kl"], reverse_kl(zs, zt), **close)
    logq, logp = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
    torch.testing.assert_close(stats["entropy"], -(logq.exp() * logq).sum(-1), **close)
    torch.testing.assert_close(stats["top1_agree"], (zs.argmax(-1) == zt.argmax(-1)).float())
    torch.testing.assert_close(stats["student_logp"], logq.gather(-1, y[:, None]).squeeze(-1), **close)
    torch.testing.assert_close(stats["teacher_logp"], logp.gather(-1, y[:, None]).squeeze(-1), **close)


def test_argument_errors() -> None:
    """Missing teacher, divergence weights without a divergence, nll without targets, and sampled_rkl with a
    top-k cache raise ValueError."""
    p = make_problem(seed=14)
    hs, head = p.hs[p.mask], Head(p.ws, p.bs)
    ones = torch.ones(N_VALID)
    zt = p.ht[p.mask] @ p.wt.t() + p.bt
    with pytest.raises(ValueError):
        chunked_loss(hs, head, LossTerms(divergence=ones), divergence=forward_kl)
    with pytest.raises(ValueError):
        chunked_loss(hs, head, LossTerms(divergence=ones), teacher_logits=zt)
    with pytest.raises(ValueError):
        chunked_loss(hs, head, LossTerms(logp_weight=ones))
    with pytest.raises(ValueError):
        chunked_loss(hs, head, LossTerms(sampled_rkl=ones), teacher_logits=zt)
    lp, ids = torch.log_softmax(zt, -1).topk(3, -1)
    with pytest.raises(ValueError, match="top-k"):
        chunked_loss(
            hs,
            head,
            LossTerms(sampled_rkl=ones),
            targets=_targets(N_VALID, 13),
            teacher_topk=TeacherTopK(ids, lp),
        )


# ----------------------------------------------------------------------------------------------------------------
# Sampled reverse KL: unbiased gradient estimator
# ----------------------------------------------------------------------------------------------------------------


def test_sampled_rkl_expected_gradient_is_reverse_kl_gradient() -> None:
    """E_{y~Q}[grad of sg(log q_y - log p_y) log q_y] = grad KL(Q||P) w.r.t. the student logits: the mean of 20k
    per-sample gradients is within 4 standard errors of the exact gradient; guards against a missing stop-gradient,
    a sign error, or the advantage taken as log p - log q."""
    v, n = 5, 20_000
    zs_row = torch.tensor([0.3, -1.2, 1.5, 0.0, -0.4], dtype=torch.float64)
    zt_row = torch.tensor([1.0, 0.2, -0.5, 0.7, -1.5], dtype=torch.float64)
    q = torch.softmax(zs_row, -1)
    y = torch.multinomial(q, n, replacement=True, generator=torch.Generator().manual_seed(0))
    hidden = zs_row.expand(n, v).clone().requires_grad_(True)  # identity head: hidden == student logits
    stats: dict[str, torch.Tensor] = {}
    loss = chunked_loss(
        hidden,
        Head(torch.eye(v, dtype=torch.float64)),
        LossTerms(sampled_rkl=torch.ones(n, dtype=torch.float64)),
        targets=y,
        teacher_logits=zt_row.expand(n, v),
        stats=stats,
    )
    loss.backward()
    per_sample = hidden.grad.numpy()
    mean, se = per_sample.mean(0), per_sample.std(0, ddof=1) / np.sqrt(n)

    logq, logp = np.log(q.numpy()), torch.log_softmax(zt_row, -1).numpy()
    qn = q.numpy()
    rkl = float((qn * (logq - logp)).sum())
    exact = qn * (logq - logp) - qn * rkl  # d KL(Q||P) / d z_s
    zs_leaf = zs_row.clone().requires_grad_(True)
    reverse_kl(zs_leaf, zt_row).backward()
    np.testing.assert_allclose(
        zs_leaf.grad.numpy(), exact, atol=1e-12
    )  # the hand formula is the autograd one

    assert np.all(se > 0)
    assert np.all(np.abs(mean - exact) <= 4 * se), (mean, exact, se)
    # The per-token "reward" log q_y - log p_y averages to the reverse KL itself.
    adv = (stats["student_logp"] - stats["teacher_logp"]).numpy()
    assert abs(adv.mean() - rkl) <= 4 * adv.std(ddof=1) / np.sqrt(n)


# ----------------------------------------------------------------------------------------------------------------
# Top-k + tail teacher cache
# ----------------------------------------------------------------------------------------------------------------


def _np_divergence(name: str, logq: np.ndarray, logp: np.ndarray, **params: Any) -> np.ndarray:
    """Float64 numpy divergence between distributions given as log-probabilities (independent of gkd)."""
    q, p = np.exp(logq), np.exp(logp)

    def kl(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.where(a > 0, a * (np.log(np.where(a > 0, a, 1.0)) - np.log(b)), 0.0).sum(-1)

    if name == "forward_kl":
        return kl(p, q)
    if name == "reverse_kl":
        return kl(q, p)
    if name == "jsd":
        beta = params.get("beta", 0.5)
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if name == "tvd":
        return 0.5 * np.abs(p - q).sum(-1)
    if name == "skew_forward_kl":
        a = params.get("alpha", 0.1)
        return kl(p, a * p + (1 - a) * q)
    if name == "skew_reverse_kl":
        a = params.get("alpha", 0.1)
        return kl(q, a * q + (1 - a) * p)
    raise AssertionError(name)


TOPK_SPECS: list[tuple[str, dict[str, Any]]] = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("jsd", {"beta": 0.5}),
    ("jsd", {"beta": 0.1}),
    ("tvd", {}),
    ("skew_forward_kl", {"alpha": 0.1}),
    ("skew_reverse_kl", {"alpha": 0.3}),
]
TOPK_IDS = [name + "".join(f"-{k}={v}" for k, v in params.items()) for name, params in TOPK_SPECS]


def _topk_cache(zt: torch.Tensor, k: int, temperature: float) -> TeacherTopK:
    lp, ids = torch.log_softmax(zt / temperature, -1).topk(k, -1)
    return TeacherTopK(ids=ids, logprobs=lp)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize(("name", "params"), TOPK_SPECS, ids=TOPK_IDS)
def test_topk_k_equals_v_minus_1_is_exact(name: str, params: dict[str, Any], temperature: float) -> None:
    """With k = V - 1 the tail bucket is the single remaining token, so the (k+1)-category divergence is the full
    divergence (float64, tail mass far from negligible): values and gradients."""
    v = 9
    gen = torch.Generator().manual_seed(15)
    zs = torch.randn(6, v, generator=gen, dtype=torch.float64)
    zt = torch.randn(6, v, generator=gen, dtype=torch.float64)
    fn = get_divergence(name, **params)
    w = torch.full((6,), 1 / 6, dtype=torch.float64)
    h = zs.clone().requires_grad_(True)
    full = (w * fn(h, zt, temperature=temperature)).sum()
    (g_full,) = _grads(full, h)
    h2 = zs.clone().requires_grad_(True)
    cache = _topk_cache(zt, v - 1, temperature)
    assert (cache.logprobs.exp().sum(-1) < 0.999).all()  # the tail carries real mass
    loss = chunked_loss(
        h2,
        Head(torch.eye(v, dtype=torch.float64)),
        LossTerms(divergence=w),
        divergence=fn,
        teacher_topk=cache,
        temperature=temperature,
        chunk_size=4,
    )
    (g_topk,) = _grads(loss, h2)
    torch.testing.assert_close(loss.to(torch.float64), full, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(g_topk, g_full, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(("name", "params"), TOPK_SPECS, ids=TOPK_IDS)
def test_topk_covering_support_approximates_full(name: str, params: dict[str, Any]) -> None:
    """Top-k covering everything but tokens with negligible mass (for teacher and student) approximates the full
    divergence in float32 through the fused path (values and hidden/head gradients)."""
    vocab, negligible = 16, 4
    p = make_problem(seed=16, vocab=vocab)
    bias_s, bias_t = p.bs.clone(), p.bt.clone()
    bias_s[-negligible:] -= 40.0
    bias_t[-negligible:] -= 40.0
    hs, ws = p.hs[p.mask].clone().requires_grad_(True), p.ws.clone().requires_grad_(True)
    zt = p.ht[p.mask] @ p.wt.t() + bias_t
    fn = get_divergence(name, **params)
    w = reduction_weights(p.mask, "token")[p.mask]
    full = (w * fn(hs @ ws.t() + bias_s, zt)).sum()
    grads_full = _grads(full, hs, ws)
    hs2, ws2 = hs.detach().clone().requires_grad_(True), ws.detach().clone().requires_grad_(True)
    loss = chunked_loss(
        hs2,
        Head(ws2, bias_s),
        LossTerms(divergence=w),
        divergence=fn,
        teacher_topk=_topk_cache(zt, vocab - negligible, 1.0),
        chunk_size=3,
    )
    grads = _grads(loss, hs2, ws2)
    torch.testing.assert_close(loss, full, rtol=1e-4, atol=1e-6)
    for a, b in zip(grads, grads_full, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
@pytest.mark.parametrize(("name", "params"), TOPK_SPECS, ids=TOPK_IDS)
def test_topk_small_k_hand_computation(name: str, params: dict[str, Any], temperature: float) -> None:
    """Small k: the divergence on the (k+1)-category distribution (k teacher ids + "everything else"), checked
    against numpy, with gradients w.r.t. student logits checked by central finite differences of that numpy
    computation."""
    v, k, n = 11, 3, 2
    gen = torch.Generator().manual_seed(17)
    zs = torch.randn(n, v, generator=gen, dtype=torch.float64) * 1.5
    zt = torch.randn(n, v, generator=gen, dtype=torch.float64) * 1.5
    cache = _topk_cache(zt, k, temperature)
    ids, lp = cache.ids.numpy(), cache.logprobs.numpy()
    w = np.array([0.25, 0.75])

    def hand(zs_np: np.ndarray) -> float:
        z = zs_np / temperature
        q_full = np.exp(z - z.max(-1, keepdims=True))
        q_full /= q_full.sum(-1, keepdims=True)
        q_k = np.take_along_axis(q_full, ids, -1)
        q = np.concatenate([q_k, 1 - q_k.sum(-1, keepdims=True)], -1)
        p = np.concatenate([np.exp(lp), 1 - np.exp(lp).sum(-1, keepdims=True)], -1)
        return float((w * _np_divergence(name, np.log(q), np.log(p), **params)).sum())

    h = zs.clone().requires_grad_(True)
    loss = chunked_loss(
        h,
        Head(torch.eye(v, dtype=torch.float64)),
        LossTerms(divergence=torch.tensor(w)),
        divergence=get_divergence(name, **params),
        teacher_topk=cache,
        temperature=temperature,
        chunk_size=1,
    )
    loss.backward()
    assert loss.item() == pytest.approx(hand(zs.numpy()), rel=1e-6, abs=1e-9)
    eps = 1e-6
    numeric = np.zeros((n, v))
    for i in range(n):
        for j in range(v):
            up, down = zs.numpy().copy(), zs.numpy().copy()
            up[i, j] += eps
            down[i, j] -= eps
            numeric[i, j] = (hand(up) - hand(down)) / (2 * eps)
    np.testing.assert_allclose(h.grad.numpy(), numeric, rtol=1e-5, atol=1e-8)
    # The cache is not the full divergence: guards against the tail bucket being dropped or ignored.
    full = float((w * get_divergence(name, **params)(zs, zt, temperature=temperature).numpy()).sum())
    assert abs(full - hand(zs.numpy())) > 1e-4


# ----------------------------------------------------------------------------------------------------------------
# Regression tests for bugs found in review (memory held across backward, float64 precision, bound temperature)
# ----------------------------------------------------------------------------------------------------------------


def test_chunked_loss_float64_stays_float64() -> None:
    """float64 hidden states and head give a float64 loss (as the divergences do) that passes gradcheck."""
    gen = torch.Generator().manual_seed(18)
    h = torch.randn(5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    wgt = torch.randn(7, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    weights = torch.full((5,), 0.2, dtype=torch.float64)

    def f(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return chunked_loss(
            hidden,
            Head(weight),
            LossTerms(divergence=weights),
            divergence=forward_kl,
            teacher_logits=zt,
            chunk_size=2,
        )

    assert f(h, wgt).dtype == torch.float64
    assert torch.autograd.gradcheck(f, (h, wgt))


def test_chunked_loss_honours_or_rejects_bound_temperature() -> None:
    """A divergence from get_divergence(..., temperature=2) must either be used at temperature 2 or be rejected;
    silently computing it at temperature 1 is wrong."""
    p = make_problem(seed=19)
    hs = p.hs[p.mask]
    zt = p.ht[p.mask] @ p.wt.t() + p.bt
    fn = get_divergence("forward_kl", temperature=2.0)
    weights = torch.full((N_VALID,), 1.0 / N_VALID)
    dense = (weights * fn(hs @ p.ws.t() + p.bs, zt)).sum()
    try:
        loss = chunked_loss(
            hs, Head(p.ws, p.bs), LossTerms(divergence=weights), divergence=fn, teacher_logits=zt
        )
    except ValueError:
        return
    torch.testing.assert_close(loss, dense, **VALUE_TOL)


def _live_tensor_storage_bytes() -> dict[int, int]:
    """data_ptr -> nbytes of the storages of all tensors that Python can reach (after a full collection)."""
    gc.collect()
    out: dict[int, int] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
            storage = obj.untyped_storage()
            out[storage.data_ptr()] = storage.nbytes()
    return out


def test_forward_keeps_no_per_chunk_logit_tensors() -> None:
    """Between forward and backward the fused loss holds only O(N*H + V*H) gradients, not the per-chunk
    [chunk, V] logit gradients (which would add up to the [N, V] the module exists to avoid)."""
    n, h, v, chunk = 60, 4, 1013, 6
    gen = torch.Generator().manual_seed(20)
    hidden = torch.randn(n, h, generator=gen, requires_grad=True)
    weight = torch.randn(v, h, generator=gen, requires_grad=True)
    bias = torch.randn(v, generator=gen, requires_grad=True)
    t_hidden, t_weight = torch.randn(n, h, generator=gen), torch.randn(v, h, generator=gen)
    weights = torch.full((n,), 1.0 / n)
    before = _live_tensor_storage_bytes()
    loss = chunked_loss(
        hidden,
        Head(weight, bias),
        LossTerms(divergence=weights),
        divergence=get_divergence("jsd"),
        teacher_hidden=t_hidden,
        teacher_head=Head(t_weight),
        chunk_size=chunk,
    )
    after = _live_tensor_storage_bytes()
    new_bytes = sum(nbytes for ptr, nbytes in after.items() if ptr not in before)
    allowed = (
        4 * (n * h + v * h + v) + 4 * chunk * v
    )  # the three gradients, plus slack of one chunk of logits
    assert new_bytes <= allowed, (
        f"{new_bytes} bytes kept alive after forward, allowed {allowed} (N*V*4 = {4 * n * v})"
    )
    loss.backward()
    assert hidden.grad is not None and weight.grad is not None and bias.grad is not None


# ----------------------------------------------------------------------------------------------------------------
# Dispatch through the registry entry, the autograd fallback, the caller-owned workspace
# ----------------------------------------------------------------------------------------------------------------


def _fused_run(
    divergence: Any, seed: int = 21, **kwargs: Any
) -> tuple[torch.Tensor, list[torch.Tensor], list]:
    """chunked_loss of the divergence term on a fixed problem: (loss, [grad hidden, grad weight], warnings)."""
    p = make_problem(seed=seed)
    hs = p.hs[p.mask].clone().requires_grad_(True)
    ws = p.ws.clone().requires_grad_(True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = chunked_loss(
            hs,
            Head(ws, p.bs),
            LossTerms(divergence=reduction_weights(p.mask, "token")[p.mask]),
            divergence=divergence,
            teacher_hidden=p.ht[p.mask],
            teacher_head=Head(p.wt, p.bt),
            chunk_size=4,
            **kwargs,
        )
    return loss, _grads(loss, hs, ws), [w for w in caught if issubclass(w.category, AutogradFallbackWarning)]


def _dense_run(fn: Any, seed: int = 21) -> tuple[torch.Tensor, list[torch.Tensor]]:
    p = make_problem(seed=seed)
    hs = p.hs[p.mask].clone().requires_grad_(True)
    ws = p.ws.clone().requires_grad_(True)
    values = fn(hs @ ws.t() + p.bs, p.ht[p.mask] @ p.wt.t() + p.bt, temperature=1.0)
    loss = (reduction_weights(p.mask, "token")[p.mask] * values).sum()
    return loss, _grads(loss, hs, ws)


def test_user_function_without_closed_form_works_and_warns_once() -> None:
    """Any callable (zs, zt, *, temperature) trains through autograd, with the dense values and gradients, and
    chunked_loss says so once per function: naming it and saying why it is slower."""

    def my_divergence(zs: torch.Tensor, zt: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
        return jsd(zs, zt, beta=0.3, temperature=temperature)

    loss, grads, caught = _fused_run(my_divergence)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "my_divergence" in message and "closed-form" in message and "slower" in message
    dense, grads_d = _dense_run(my_divergence)
    _assert_same(loss, dense, grads, grads_d)
    _, _, again = _fused_run(my_divergence, seed=22)
    assert again == [], "the warning is given once per function"
    _, _, other = _fused_run(lambda zs, zt, *, temperature=1.0: forward_kl(zs, zt, temperature=temperature))
    assert len(other) == 1 and "lambda" in str(other[0].message)


def test_registered_divergences_take_the_closed_form_silently() -> None:
    """get_divergence results, registered functions and keyword partials of them use the closed form (no warning);
    the closed form differs from autograd in the last bits, so bit-equality shows which path ran."""
    fused, grads, caught = _fused_run(get_divergence("jsd", beta=0.3))
    assert caught == []
    for same in (functools.partial(jsd, beta=0.3), get_divergence("jsd", beta=0.3, temperature=1.0)):
        loss, grads_same, caught = _fused_run(same)
        assert caught == [] and torch.equal(loss, fused)
        assert all(torch.equal(a, b) for a, b in zip(grads_same, grads, strict=True))
    _, _, caught = _fused_run(forward_kl)
    assert caught == []


def test_bound_divergence_dispatches_through_its_entry_not_function_identity() -> None:
    """A BoundDivergence whose entry is renamed and whose function is a wrapper still uses the entry's closed form
    (bit-identical to the registered jsd, the wrapper never called); without a closed form it uses the wrapper."""
    calls = []

    @functools.wraps(jsd)
    def wrapped(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(1)
        return jsd(*args, **kwargs)

    renamed = dataclasses.replace(DIVERGENCES["jsd"], name="my_jsd", fn=wrapped)
    reference, grads_ref, _ = _fused_run(get_divergence("jsd", beta=0.3))
    loss, grads, caught = _fused_run(BoundDivergence(renamed, {"beta": 0.3}))
    assert calls == [] and caught == []
    assert torch.equal(loss, reference)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_ref, strict=True))

    no_closed_form = dataclasses.replace(renamed, name="my_slow_jsd", closed_form=None)
    loss, grads, caught = _fused_run(BoundDivergence(no_closed_form, {"beta": 0.3}))
    assert calls and len(caught) == 1 and "my_slow_jsd" in str(caught[0].message)
    _assert_same(loss, reference, grads, grads_ref)


def test_workspace_is_reused_across_calls() -> None:
    """A caller-owned Workspace keeps its buffer between calls (same storage, no reallocation), grows only when a
    call needs more, and gives the results of a call with a temporary workspace bit for bit."""
    workspace = Workspace()
    fresh, grads_fresh, _ = _fused_run(get_divergence("tvd"))
    first, grads_first, _ = _fused_run(get_divergence("tvd"), workspace=workspace)
    (buffer,) = workspace.buffers()
    ptr, nbytes = buffer.data_ptr(), workspace.nbytes
    assert nbytes > 0
    for seed in (21, 23):
        loss, _, _ = _fused_run(get_divergence("tvd"), seed=seed, workspace=workspace)
        (buffer,) = workspace.buffers()
        assert buffer.data_ptr() == ptr and workspace.nbytes == nbytes
    assert torch.equal(first, fresh) and torch.equal(loss, _fused_run(get_divergence("tvd"), seed=23)[0])
    assert all(torch.equal(a, b) for a, b in zip(grads_first, grads_fresh, strict=True))
    # A smaller call (fewer buffers: no stats, no targets) reuses the same buffer too.
    _fused_run(get_divergence("forward_kl"), workspace=workspace)
    assert workspace.buffers()[0].data_ptr() == ptr
    workspace.clear()
    assert workspace.buffers() == [] and workspace.nbytes == 0


def test_workspace_buffer_plan_covers_every_term_combination() -> None:
    """With one Workspace, every combination of terms and stats equals a fresh temporary workspace bit for bit (the
    named buffers never overlap where a term still needs one)."""
    p = make_problem(seed=24)
    y = _targets(N_VALID, p.ws.shape[0], seed=4)
    workspace = Workspace()
    gen = torch.Generator().manual_seed(25)
    w = {k: torch.rand(N_VALID, generator=gen) for k in ("divergence", "logp_weight", "sampled_rkl")}
    for keys in (
        ("divergence",),
        ("logp_weight",),
        ("sampled_rkl",),
        ("logp_weight", "sampled_rkl"),
        tuple(w),
    ):
        for with_stats in (False, True):
            results = []
            for ws_arg in (None, workspace):
                hs = p.hs[p.mask].clone().requires_grad_(True)
                stats: dict[str, torch.Tensor] | None = {} if with_stats else None
                loss = chunked_loss(
                    hs,
                    Head(p.ws, p.bs),
                    LossTerms(**{k: w[k] for k in keys}),
                    divergence=get_divergence("skew_reverse_kl", alpha=0.2),
                    targets=y,
                    teacher_logits=p.ht[p.mask] @ p.wt.t() + p.bt,
                    chunk_size=3,
                    stats=stats,
                    workspace=ws_arg,
                )
                results.append((loss, *_grads(loss, hs), *(stats or {}).values()))
            assert all(torch.equal(a, b) for a, b in zip(*results, strict=True)), (keys, with_stats)


def test_registered_toy_divergence_trains_through_chunked_loss() -> None:
    """Adding a divergence is one registry entry: a squared Hellinger distance without closed form, registered and
    looked up by name, gives chunked_divergence_loss the dense values and gradients (autograd path, with the
    warning), and a few gradient steps reduce it."""

    def hellinger(zs: torch.Tensor, zt: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
        check_temperature(temperature)
        return 1.0 - torch.exp(0.5 * (log_probs(zs, temperature) + log_probs(zt, temperature))).sum(-1)

    register_divergence(DivergenceSpec("toy_hellinger", hellinger, {"temperature": 1.0}, doc="H^2(P, Q)"))
    try:
        p = make_problem(seed=26)
        hs, ws, bs = p.leaves()
        dense = reduce_divergence(
            hellinger(hs @ ws.t() + bs, p.teacher_logits(), temperature=2.0), p.mask, "token"
        )
        grads_d = _grads(dense, hs, ws, bs)
        hs, ws, bs = p.leaves()
        teacher = {"teacher_hidden": p.ht, "teacher_weight": p.wt, "teacher_bias": p.bt}
        with pytest.warns(AutogradFallbackWarning, match="toy_hellinger"):
            loss = chunked_divergence_loss(
                hs, ws, p.mask, student_bias=bs, divergence="toy_hellinger", temperature=2.0, **teacher
            )
        _assert_same(loss, dense, _grads(loss, hs, ws, bs), grads_d)

        hs, ws, bs = p.leaves()
        optimizer = torch.optim.SGD([hs, ws, bs], lr=2.0)
        history = []
        for _ in range(5):
            optimizer.zero_grad()
            loss = chunked_divergence_loss(
                hs, ws, p.mask, student_bias=bs, divergence="toy_hellinger", chunk_size=4, **teacher
            )
            loss.backward()
            optimizer.step()
            history.append(loss.item())
        assert all(b < a for a, b in itertools.pairwise(history)), history
        assert history[-1] < 0.9 * history[0], history
    finally:
        del DIVERGENCES["toy_hellinger"]


def test_logits_loss_honours_or_rejects_bound_temperature() -> None:
    """logits_loss resolves a bound temperature like chunked_loss: used when no other is given, an error when a
    different one is."""
    p = make_problem(seed=27)
    zs = p.hs[p.mask] @ p.ws.t() + p.bs
    zt = p.ht[p.mask] @ p.wt.t() + p.bt
    w = torch.full((N_VALID,), 1.0 / N_VALID)
    bound = get_divergence("forward_kl", temperature=2.0)
    loss = logits_loss(zs, LossTerms(divergence=w), divergence=bound, teacher_logits=zt)
    assert torch.equal(loss, (w * forward_kl(zs, zt, temperature=2.0)).sum())
    with pytest.raises(ValueError, match="give it once"):
        logits_loss(zs, LossTerms(divergence=w), divergence=bound, teacher_logits=zt, temperature=3.0)
    with pytest.raises(ValueError, match="give it once"):
        chunked_loss(
            p.hs[p.mask],
            Head(p.ws, p.bs),
            LossTerms(divergence=w),
            divergence=bound,
            teacher_logits=zt,
            temperature=3.0,
        )


@pytest.mark.parametrize(("logit_scale", "softcap"), [(1.0, 3.0), (0.25, None), (2.0, 1.5)])
@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd"])
def test_transformed_heads_match_dense_autograd(name, logit_scale, softcap):
    """A head with a logit transform (scale, softcap) runs chunked through autograd and equals the dense loss."""
    torch.manual_seed(0)
    n, h, v = 10, 6, 13
    hs = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    ws = torch.randn(v, h, dtype=torch.float64, requires_grad=True)
    ht, wt = torch.randn(n, h, dtype=torch.float64), torch.randn(v, h, dtype=torch.float64)
    head_s = Head(ws, logit_scale=logit_scale, softcap=softcap)
    head_t = Head(wt, logit_scale=logit_scale, softcap=softcap)
    w = torch.rand(n, dtype=torch.float64)
    div = get_divergence(name)
    loss = chunked_loss(
        hs,
        head_s,
        LossTerms(divergence=w),
        divergence=div,
        teacher_hidden=ht,
        teacher_head=head_t,
        chunk_size=3,
    )
    gh, gw = torch.autograd.grad(loss, (hs, ws))

    def transform(z):
        z = z * logit_scale
        return z if softcap is None else torch.tanh(z / softcap) * softcap

    dense = (w * div(transform(hs @ ws.t()), transform(ht @ wt.t()))).sum()
    dh, dw = torch.autograd.grad(dense, (hs, ws))
    torch.testing.assert_close(loss, dense)
    torch.testing.assert_close(gh, dh)
    torch.testing.assert_close(gw, dw)
