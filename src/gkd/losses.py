"""The GKD loss over valid positions, computed in chunks straight from hidden states.

A language model's logits are ``hidden @ head.T``. At a vocabulary of 128k, the ``[positions, V]`` logits of a whole
batch (and the five to fifteen temporaries a divergence needs) do not fit in memory. This module never builds them:

1. only the *valid* positions (completion tokens, not prompt or padding) are selected, as ``[N, H]`` hidden states;
2. positions are processed ``chunk_size`` at a time: student and teacher logits of the chunk are formed, the loss terms
   are evaluated, and the gradient w.r.t. the chunk's student logits is turned at once into gradients w.r.t. the
   hidden states and the head (the fused-linear trick);
3. backward only rescales the stored gradients.

The gradient w.r.t. a chunk's student logits has a closed form for every divergence registered in
``gkd.divergences`` with one (all the built-ins) and for the nll / sampled_rkl terms. It is computed by in-place ops
in five or six ``[chunk, V]`` scratch buffers (logits included) instead of autograd's graph of ten to fifteen fresh
temporaries per chunk. The buffers come from a ``Workspace`` that the caller owns and passes to every call, so that
no step page-faults them in again (on the CPU). The kernel lives in ``gkd.fused``.

Not supported by the closed form, and computed with autograd inside each chunk instead (same values, slower, more
memory): a divergence function without a registry entry or without a closed form (``chunked_loss`` warns once per
function), a top-k teacher cache, and a teacher whose compute dtype differs from the student's.

Peak memory is therefore O(chunk_size * V) above the inputs instead of O(N * V).

One call evaluates any weighted sum of three per-position terms, each with its own weight vector ``[N]``:

    divergence   w_div[n] * D(p_T || p_S)(position n)              distillation (GKD, supervised KD, ...)
    logp_weight  w_lp[n] * -log p_S(y_n)                          SFT, SeqKD, policy-gradient terms (RL)
    sampled_rkl  w_srkl[n] * sg(log p_S(y_n) - log p_T(y_n)) * log p_S(y_n)
                 the single-sample reverse-KL estimator ("reverse KL as a per-token reward")

The weights carry the reduction (token mean, per-sequence mean, accumulation-wide denominators, advantages).
"""

from __future__ import annotations

import functools
import warnings
import weakref

import torch

from gkd.divergences import (
    BoundDivergence,
    Divergence,
    as_bound_divergence,
    check_temperature,
    get_divergence,
    reduction_weights,
)
from gkd.fused import (
    FusedChunkedLoss,
    LossSpec,
    LossTerms,
    Workspace,
    chunk_stats,
    chunk_stats_topk,
    chunk_terms,
    topk_tail,
)
from gkd.outputs import Head, TeacherTopK

__all__ = [
    "AutogradFallbackWarning",
    "Head",
    "LossTerms",
    "TeacherTopK",
    "Workspace",
    "chunked_divergence_loss",
    "chunked_loss",
    "default_chunk",
    "logits_loss",
    "topk_tail",
]

# Target number of logits elements per chunk (8M floats = 32 MB per temporary).
DEFAULT_CHUNK_ELEMENTS = 1 << 23


class AutogradFallbackWarning(UserWarning):
    """A divergence without a closed-form gradient: ``chunked_loss`` runs it through autograd (slower)."""


_WARNED: weakref.WeakSet = weakref.WeakSet()  # divergence functions already warned about (once each)


def _warn_autograd_fallback(divergence: Divergence) -> None:
    bound = as_bound_divergence(divergence)
    key = bound.spec.fn if bound is not None else getattr(divergence, "func", divergence)
    try:
        if key in _WARNED:
            return
        _WARNED.add(key)
    except TypeError:  # not weak-referenceable: warn every time rather than never
        pass
    label = repr(bound.name) if bound is not None else getattr(divergence, "__qualname__", repr(divergence))
    warnings.warn(
        f"divergence {label} has no closed-form gradient, so chunked_loss differentiates it with autograd inside "
        "every chunk: the same values, but slower and with more memory than the built-in divergences. Register it "
        "with gkd.divergences.register_divergence(..., closed_form=...) to make it fast.",
        AutogradFallbackWarning,
        stacklevel=3,
    )


def _resolve_temperature(divergence: Divergence | None, temperature: float) -> float:
    """The temperature to compute at. A divergence with a bound temperature (``get_divergence(..., temperature=2)``
    or a ``functools.partial`` with a ``temperature`` keyword) uses it; passing a different one as well is an error.
    """
    if isinstance(divergence, BoundDivergence):
        bound = divergence.temperature
    elif isinstance(divergence, functools.partial):
        bound = divergence.keywords.get("temperature")
    else:
        bound = None
    if bound is None:
        return temperature
    if temperature != 1.0 and temperature != bound:
        raise ValueError(
            f"the divergence has temperature={bound} bound and temperature={temperature} was passed; give it once"
        )
    return float(bound)


def default_chunk(vocab: int) -> int:
    """Positions per ``[chunk, vocab]`` block: about ``DEFAULT_CHUNK_ELEMENTS`` logits, at least 16 rows."""
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
    workspace: Workspace | None = None,
) -> torch.Tensor:
    """Weighted sum of the loss terms over ``N`` selected positions, never holding ``[N, V]`` logits.

    ``student_hidden`` is ``[N, H]`` (already restricted to valid positions). The teacher is given as hidden states
    plus a head, as logits ``[N, V]``, or as a top-k cache. If ``stats`` is a dict it is filled with per-position
    diagnostics (``forward_kl``, ``reverse_kl``, ``entropy``, ``top1_agree``, ``student_logp``, ``teacher_logp``).

    ``divergence`` is a ``get_divergence(...)`` result (or a registered function such as ``forward_kl``, or a
    ``functools.partial`` of one), which uses its closed-form gradient, or any function
    ``(student_logits, teacher_logits, *, temperature) -> values``, which goes through autograd (and warns once).
    ``workspace``: scratch memory kept across calls (see ``Workspace``); None uses a temporary one.
    """
    if terms.needs_teacher() and teacher_hidden is None and teacher_logits is None and teacher_topk is None:
        raise ValueError(
            "a divergence term needs teacher hidden states, teacher logits or a teacher top-k cache"
        )
    if terms.divergence is not None and divergence is None:
        raise ValueError("divergence weights given without a divergence function")
    if terms.needs_targets() and targets is None:
        raise ValueError("nll / sampled_rkl terms need target token ids")
    temperature = _resolve_temperature(divergence, temperature)
    if teacher_head is not None and teacher_head.size != student_head.size:
        raise ValueError(f"teacher head has {teacher_head.size} outputs, student head {student_head.size}")
    bound = as_bound_divergence(divergence) if divergence is not None else None
    closed_form = bound.closed_form if bound is not None and teacher_topk is None else None
    if terms.divergence is not None:
        check_temperature(temperature)
        if closed_form is None and teacher_topk is None:
            _warn_autograd_fallback(divergence)  # type: ignore[arg-type]
    spec = LossSpec(
        student_head=student_head,
        divergence=divergence,
        closed_form=closed_form,
        closed_form_scratch=bound.spec.scratch_buffers if bound is not None else 0,
        temperature=temperature,
        terms=terms,
        targets=targets,
        teacher_hidden=teacher_hidden,
        teacher_head=teacher_head,
        teacher_logits=teacher_logits,
        teacher_topk=teacher_topk,
        chunk_size=chunk_size or default_chunk(student_head.size),
        stats=stats,
        workspace=workspace,
    )
    return FusedChunkedLoss.apply(student_hidden, student_head.weight, student_head.bias, spec)


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
    temperature = _resolve_temperature(divergence, temperature)
    n = student_logits.shape[0]
    loss = chunk_terms(
        student_logits, teacher_logits, teacher_topk, targets, terms, slice(0, n), divergence, temperature
    )
    if stats is not None:
        if teacher_topk is not None:
            stats.update(chunk_stats_topk(student_logits.detach(), teacher_topk, targets))
        else:
            stats.update(chunk_stats(student_logits.detach(), teacher_logits, targets))
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
    workspace: Workspace | None = None,
    **params: object,
) -> torch.Tensor:
    """Reduced divergence over the valid positions of ``mask`` ``[B, T]``, from hidden states ``[B, T, H]``.

    Equal (values and gradients) to ``reduce_divergence(D(h_s @ W_s.T, h_t @ W_t.T), mask, reduction)`` but never
    holds the ``[B*T, V]`` logits. The teacher is hidden states plus head weight (and bias), or logits ``[B, T, V]``.
    ``params`` are the divergence's parameters, ``temperature`` included.
    """
    fn = get_divergence(divergence, **params)  # a bound temperature is honoured by chunked_loss
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
        chunk_size=chunk_size,
        workspace=workspace,
    )
