"""The fused chunked loss kernel behind ``gkd.losses.chunked_loss`` (call it through ``gkd.losses``).

The kernel walks the ``N`` selected positions ``chunk_size`` at a time. For each chunk it forms the student (and
teacher) logits, evaluates the weighted loss terms, and turns the gradient w.r.t. the chunk's student logits at once
into gradients w.r.t. the hidden states and the head (the fused-linear trick); backward only rescales them. A call
takes one of two paths, for all of its chunks:

    closed form  a divergence with a closed form (``BoundDivergence.closed_form``), the nll / sampled_rkl terms and
                 the diagnostics, computed by in-place ops in ``[chunk, V]`` buffers carved out of a ``Workspace``
                 (``BufferPlan`` says which buffer plays which role); no autograd graph.
    autograd     anything else: a divergence without a closed form, a top-k teacher, or student and teacher that
                 compute in different dtypes. The readable functions run under autograd inside the chunk.

Both paths give the same values and gradients up to float rounding (tests/test_losses.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from gkd.divergences import LOG_FLOOR, ClosedForm, Divergence, compute_dtype, log_probs, log_softmax_into
from gkd.outputs import Head, TeacherTopK


@dataclass
class LossTerms:
    """Per-position weights ``[N]`` of the three loss terms (None = term absent)."""

    divergence: torch.Tensor | None = None  # w · D(p_T ‖ p_S) at each position
    logp_weight: torch.Tensor | None = (
        None  # w · −log p_S(y): SFT's NLL, the policy gradient, discounted-RKL returns
    )
    sampled_rkl: torch.Tensor | None = None  # w · sg(log p_S − log p_T)(y) · log p_S(y)

    def needs_teacher(self) -> bool:
        return self.divergence is not None or self.sampled_rkl is not None

    def needs_targets(self) -> bool:
        return self.logp_weight is not None or self.sampled_rkl is not None


# ---------------------------------------------------------------------------------------------------------------
# Scratch memory
# ---------------------------------------------------------------------------------------------------------------


class Workspace:
    """Scratch memory of the chunked loss's closed-form path, owned by the caller and reused across calls.

    Create one per training loop and pass it to every ``chunked_loss(..., workspace=ws)``. The reason: on the CPU
    the scratch space of a realistic vocabulary is tens of MB, and an allocation that large is always a fresh mmap
    (glibc's mmap threshold never exceeds 32 MiB). Allocating it at every step would page-fault and zero every page
    again, which costs more than the arithmetic of the loss; a kept workspace is faulted in once.

    It holds at most one flat buffer per (device, dtype), grown when a call needs more. Only CPU buffers are kept:
    on an accelerator the caching allocator already recycles the memory, and holding it between steps would take
    it from the rollout. ``clear()``, or dropping the object, frees the memory.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def take(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A flat buffer of at least ``numel`` elements; it leaves the workspace until ``give_back``."""
        flat = self._buffers.pop((str(device), dtype), None)
        if flat is None or flat.numel() < numel:
            flat = None  # free the old buffer before allocating the larger one
            flat = torch.empty(numel, dtype=dtype, device=device)
        return flat

    def give_back(self, flat: torch.Tensor) -> None:
        """Return a buffer from ``take``; it is kept for the next call if it lives on the CPU."""
        if flat.device.type == "cpu":
            self._buffers[(str(flat.device), flat.dtype)] = flat

    def buffers(self) -> list[torch.Tensor]:
        """The buffers held now."""
        return list(self._buffers.values())

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def clear(self) -> None:
        """Free the buffers held."""
        self._buffers.clear()


STATS_SCRATCH = 3  # scratch buffers of the diagnostics (_chunk_stats_into)


@dataclass
class ChunkBuffers:
    """One chunk's ``[rows, V]`` buffers, by role (views into the workspace; see ``BufferPlan``)."""

    student: torch.Tensor
    teacher: torch.Tensor
    loss_scratch: list[torch.Tensor]
    target_logq: torch.Tensor | None
    stats_scratch: list[torch.Tensor]


@dataclass(frozen=True)
class BufferPlan:
    """How many ``[chunk, V]`` buffers the closed-form path needs, and which plays which role.

    Buffer 0 holds the student logits and buffer 1 the teacher logits. Scratch buffers follow:

    - ``loss_scratch``: the divergence's closed form (``DivergenceSpec.scratch_buffers``), or one buffer for the
      teacher log-probs of the sampled_rkl term;
    - ``target_logq``: log q for the nll / sampled_rkl terms, in the last buffer, after the loss scratch, because it
      holds those terms' gradient while the divergence runs;
    - ``stats_scratch``: the diagnostics run before the loss terms, so they reuse the first buffers.
    """

    loss_scratch: int
    target_logq: bool
    stats_scratch: int

    @staticmethod
    def for_terms(terms: LossTerms, divergence_scratch: int, stats: bool) -> BufferPlan:
        loss = divergence_scratch if terms.divergence is not None else 0
        if terms.sampled_rkl is not None:
            loss = max(loss, 1)
        return BufferPlan(loss, terms.needs_targets(), STATS_SCRATCH if stats else 0)

    @property
    def n_scratch(self) -> int:
        return max(self.loss_scratch + int(self.target_logq), self.stats_scratch)

    @property
    def n_buffers(self) -> int:
        return 2 + self.n_scratch

    def carve(self, flat: torch.Tensor, rows: int, cols: int, used_rows: int) -> ChunkBuffers:
        """The chunk's buffers: buffer ``i`` starts at ``i * rows * cols`` in ``flat`` and has ``used_rows`` rows."""
        views = [flat[i * rows * cols :][: used_rows * cols].view(-1, cols) for i in range(self.n_buffers)]
        scratch = views[2:]
        return ChunkBuffers(
            student=views[0],
            teacher=views[1],
            loss_scratch=scratch[: self.loss_scratch],
            target_logq=scratch[-1] if self.target_logq else None,
            stats_scratch=scratch[: self.stats_scratch],
        )


# ---------------------------------------------------------------------------------------------------------------
# What one call computes
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class LossSpec:
    """Everything the kernel needs besides the tensors it differentiates (hidden states, head weight and bias)."""

    student_head: Head
    divergence: Divergence | None
    closed_form: ClosedForm | None
    closed_form_scratch: int
    temperature: float
    terms: LossTerms
    targets: torch.Tensor | None
    teacher_hidden: torch.Tensor | None
    teacher_head: Head | None
    teacher_logits: torch.Tensor | None
    teacher_topk: TeacherTopK | None
    chunk_size: int
    stats: dict[str, torch.Tensor] | None
    workspace: Workspace | None

    def closed_form_dtype(self) -> torch.dtype | None:
        """The compute dtype of the closed-form path, or None when the call must go through autograd (a divergence
        without closed form, a top-k teacher, or student and teacher computing in different dtypes)."""
        if self.teacher_topk is not None or (self.terms.divergence is not None and self.closed_form is None):
            return None
        if self.student_head.transformed or (self.teacher_head is not None and self.teacher_head.transformed):
            return None  # no closed form through a logit transform: autograd inside each chunk
        dtype = compute_dtype(self.student_head.weight)
        teacher = self.teacher_logits if self.teacher_logits is not None else None
        if teacher is None and self.teacher_head is not None:
            teacher = self.teacher_head.weight
        if teacher is not None and compute_dtype(teacher) != dtype:
            return None
        return dtype


# ---------------------------------------------------------------------------------------------------------------
# Autograd path (also used by gkd.losses.logits_loss)
# ---------------------------------------------------------------------------------------------------------------


def topk_tail(logq_full: torch.Tensor, topk: TeacherTopK) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher log-probs on the (k + 1)-category support: the teacher's top-k ids plus a tail bucket."""
    lq = logq_full.gather(-1, topk.ids)
    lp = topk.logprobs.to(lq.dtype)
    tail_q = torch.log1p(-lq.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-7))
    tail_p = torch.log1p(-lp.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-7))
    return torch.cat([lq, tail_q], -1), torch.cat([lp, tail_p], -1)


def chunk_terms(
    zs: torch.Tensor,
    zt: torch.Tensor | None,
    topk: TeacherTopK | None,
    targets: torch.Tensor | None,
    terms: LossTerms,
    sl: slice,
    divergence: Divergence | None,
    temperature: float,
) -> torch.Tensor:
    """The weighted loss of one chunk of student logits ``zs`` (differentiable) against teacher logits ``zt``."""
    total = zs.new_zeros((), dtype=torch.float32 if zs.dtype != torch.float64 else torch.float64)
    if terms.divergence is not None:
        assert divergence is not None
        if topk is not None:
            # Compare on the (k+1) support; divergences take log-probs as logits (softmax is the identity on them).
            lq, lp = topk_tail(log_probs(zs, temperature), topk)
            values = divergence(lq, lp, temperature=1.0)
        else:
            assert zt is not None
            values = divergence(zs, zt, temperature=temperature)
        total = total + (terms.divergence[sl].to(values.dtype) * values).sum()
    if terms.needs_targets():
        assert targets is not None
        logq = log_probs(zs, 1.0)
        logq_y = logq.gather(-1, targets[:, None]).squeeze(-1)
        if terms.logp_weight is not None:
            total = total - (terms.logp_weight[sl].to(logq_y.dtype) * logq_y).sum()
        if terms.sampled_rkl is not None:
            if topk is not None:
                raise ValueError("the sampled-token reverse-KL term needs a live teacher, not a top-k cache")
            assert zt is not None
            logp_y = log_probs(zt, 1.0).gather(-1, targets[:, None]).squeeze(-1)
            advantage = (logq_y - logp_y).detach()
            total = total + (terms.sampled_rkl[sl].to(logq_y.dtype) * advantage * logq_y).sum()
    return total


@torch.no_grad()
def chunk_stats(
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
def chunk_stats_topk(
    zs: torch.Tensor, topk: TeacherTopK, targets: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """``chunk_stats`` against a top-k teacher: the KLs on the (k + 1)-category support (teacher top-k + tail),
    top-1 agreement exact (the teacher's argmax is its first cached id)."""
    out = chunk_stats(zs, None, targets)
    lq, lp = topk_tail(log_probs(zs, 1.0), topk)
    out["forward_kl"] = (lp.exp() * (lp - lq)).sum(-1)
    out["reverse_kl"] = (lq.exp() * (lq - lp)).sum(-1)
    best = topk.logprobs.argmax(-1, keepdim=True)
    out["top1_agree"] = (zs.argmax(-1) == topk.ids.gather(-1, best).squeeze(-1)).float()
    return out


def _teacher_chunk(spec: LossSpec, sl: slice) -> torch.Tensor | None:
    if spec.teacher_logits is not None:
        return spec.teacher_logits[sl]
    if spec.teacher_hidden is not None:
        assert spec.teacher_head is not None
        return spec.teacher_head.logits(spec.teacher_hidden[sl])
    return None


ChunkResult = tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor] | None]


def _autograd_chunk(spec: LossSpec, head: Head, sl: slice, h: torch.Tensor, need_grad: bool) -> ChunkResult:
    """One chunk through autograd: (loss, gradient w.r.t. the chunk's student logits or None, diagnostics)."""
    targets = spec.targets[sl] if spec.targets is not None else None
    with torch.no_grad():
        zt = _teacher_chunk(spec, sl)
    topk = None
    if spec.teacher_topk is not None:
        topk = dataclasses.replace(
            spec.teacher_topk, ids=spec.teacher_topk.ids[sl], logprobs=spec.teacher_topk.logprobs[sl]
        )
    g = None
    with torch.enable_grad():
        # the gradient is taken w.r.t. the head's raw logits, through its transform (softcapping, scaling)
        raw = head.raw_logits(h).detach().requires_grad_(need_grad)
        zs = head.transform(raw)
        loss = chunk_terms(zs, zt, topk, targets, spec.terms, sl, spec.divergence, spec.temperature)
        if raw.requires_grad and loss.requires_grad:
            (g,) = torch.autograd.grad(loss, raw)
    stats = None
    if spec.stats is not None:
        if topk is not None:
            stats = chunk_stats_topk(zs.detach(), topk, targets)
        else:
            stats = chunk_stats(zs.detach(), zt, targets)
    return loss, g, stats


# ---------------------------------------------------------------------------------------------------------------
# Closed-form path
# ---------------------------------------------------------------------------------------------------------------


def _logits_into(head: Head, hidden: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = head.logits(hidden)`` converted to ``out``'s dtype, without a temporary when the dtypes agree."""
    h = hidden * head.scale if head.scale != 1.0 else hidden
    weight, bias = head.w(), head.b()
    if h.dtype == weight.dtype == out.dtype:
        torch.mm(h, weight.t(), out=out)
        return out if bias is None else out.add_(bias)
    return out.copy_(head.logits(hidden))


def _teacher_chunk_into(spec: LossSpec, sl: slice, out: torch.Tensor) -> torch.Tensor | None:
    if spec.teacher_logits is not None:
        return out.copy_(spec.teacher_logits[sl])
    if spec.teacher_hidden is not None:
        assert spec.teacher_head is not None
        return _logits_into(spec.teacher_head, spec.teacher_hidden[sl], out)
    return None


@torch.no_grad()
def _chunk_stats_into(
    zs: torch.Tensor, zt: torch.Tensor | None, targets: torch.Tensor | None, work: list[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``chunk_stats`` computed in three scratch buffers of the chunk's shape; ``zs`` and ``zt`` are left intact."""
    logq = log_softmax_into(zs, work[0])
    q = torch.exp(logq, out=work[2])
    out = {"entropy": -torch.mul(q, logq, out=work[1]).sum(-1)}
    if targets is not None:
        out["student_logp"] = logq.gather(-1, targets[:, None]).squeeze(-1)
    if zt is not None:
        logp = log_softmax_into(zt, work[1])
        if targets is not None:
            out["teacher_logp"] = logp.gather(-1, targets[:, None]).squeeze(-1)
        out["top1_agree"] = (zs.argmax(-1) == zt.argmax(-1)).float()
        diff = logq.sub_(logp)  # log q - log p
        out["reverse_kl"] = q.mul_(diff).sum(-1)
        out["forward_kl"] = -torch.exp(logp, out=logp).mul_(diff).sum(-1)
    return out


def _closed_form_terms(
    zs: torch.Tensor,
    zt: torch.Tensor | None,
    targets: torch.Tensor | None,
    spec: LossSpec,
    sl: slice,
    need_grad: bool,
    buffers: ChunkBuffers,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``chunk_terms`` and its gradient w.r.t. ``zs`` in closed form: (loss, gradient or None).

    ``zs``, ``zt`` and the scratch buffers are overwritten; the gradient is returned in one of them.
    """
    terms = spec.terms
    total = zs.new_zeros(())
    grad = None
    if terms.needs_targets():
        assert targets is not None and buffers.target_logq is not None
        y = targets[:, None]
        logq = log_softmax_into(zs, buffers.target_logq)  # temperature 1: zs is left as it is
        logq_y = logq.gather(-1, y).squeeze(-1)
        coef = torch.zeros_like(logq_y)  # d loss / d log q(y), per position
        if terms.logp_weight is not None:
            w = terms.logp_weight[sl].to(logq_y.dtype)
            total = total - (w * logq_y).sum()
            coef = coef - w
        if terms.sampled_rkl is not None:
            assert zt is not None
            scratch = buffers.loss_scratch[0]
            logp_y = (
                torch._log_softmax(zt, -1, False, out=scratch).clamp_(min=LOG_FLOOR).gather(-1, y).squeeze(-1)
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
        values, g = spec.closed_form(zs, zt, spec.temperature, w if need_grad else None, buffers.loss_scratch)
        total = total + (w.to(values.dtype) * values).sum()
        if g is not None:
            grad = g if grad is None else g.add_(grad)
    return total, grad


def _closed_form_chunk(
    spec: LossSpec, head: Head, sl: slice, h: torch.Tensor, need_grad: bool, buffers: ChunkBuffers
) -> ChunkResult:
    """One chunk in closed form: logits and every temporary live in ``buffers``; no autograd graph."""
    targets = spec.targets[sl] if spec.targets is not None else None
    zs = _logits_into(head, h, buffers.student)
    with_teacher = spec.terms.needs_teacher() or spec.stats is not None
    zt = _teacher_chunk_into(spec, sl, buffers.teacher) if with_teacher else None
    stats = _chunk_stats_into(zs, zt, targets, buffers.stats_scratch) if spec.stats is not None else None
    loss, g = _closed_form_terms(zs, zt, targets, spec, sl, need_grad, buffers)
    return loss, g, stats


# ---------------------------------------------------------------------------------------------------------------
# The autograd function
# ---------------------------------------------------------------------------------------------------------------


class _HeadGrads:
    """Gradients w.r.t. the hidden states, the head weight and the head bias, accumulated chunk by chunk."""

    def __init__(self, hidden: torch.Tensor, head: Head, need_h: bool, need_w: bool, need_b: bool) -> None:
        self.head = head
        self.w_eff = head.w()
        self.hidden = torch.zeros_like(hidden) if need_h else None
        self.weight = torch.zeros_like(head.weight) if need_w else None
        self.bias = torch.zeros_like(head.bias) if need_b and head.bias is not None else None

    def add(self, sl: slice, h: torch.Tensor, g: torch.Tensor) -> None:
        """Add the gradient ``g`` w.r.t. the logits of the chunk ``sl``, whose hidden states are ``h``."""
        # Outside autograd: these products must not keep the chunk's [chunk, V] gradient alive.
        with torch.no_grad():
            scale, dtype, rows = self.head.scale, self.head.weight.dtype, self.w_eff.shape[0]
            g = g.to(dtype)
            if self.hidden is not None:
                gh = g @ self.w_eff
                self.hidden[sl] = gh * scale if scale != 1.0 else gh
            if self.weight is not None:
                hs = h * scale if scale != 1.0 else h
                self.weight[:rows].addmm_(g.t(), hs.to(dtype))
            if self.bias is not None:
                self.bias[:rows] += g.sum(0)

    def as_tuple(self) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        return self.hidden, self.weight, self.bias


def _store_stats(stats: dict[str, torch.Tensor] | None, parts: list[dict[str, torch.Tensor]]) -> None:
    if stats is not None and parts:
        for key in parts[0]:
            stats[key] = torch.cat([p[key] for p in parts])


class FusedChunkedLoss(torch.autograd.Function):
    """Forward computes the loss and its gradients chunk by chunk; backward rescales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, spec: LossSpec):  # type: ignore[override]
        head = dataclasses.replace(spec.student_head, weight=weight, bias=bias)
        grads = _HeadGrads(hidden, head, *ctx.needs_input_grad[:3])
        need_grad = any(ctx.needs_input_grad[:3])
        n = hidden.shape[0]
        dtype = spec.closed_form_dtype() if n else None
        workspace = spec.workspace if spec.workspace is not None else Workspace()
        plan = BufferPlan.for_terms(spec.terms, spec.closed_form_scratch, spec.stats is not None)
        rows, cols = min(n, spec.chunk_size), head.size
        flat = None if dtype is None else workspace.take(plan.n_buffers * rows * cols, dtype, hidden.device)
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)  # the loss stays on the device
        stats_parts: list[dict[str, torch.Tensor]] = []
        try:
            for start in range(0, n, spec.chunk_size):
                sl = slice(start, min(n, start + spec.chunk_size))
                if flat is not None:
                    buffers = plan.carve(flat, rows, cols, sl.stop - start)
                    loss, g, stats = _closed_form_chunk(spec, head, sl, hidden[sl], need_grad, buffers)
                else:
                    loss, g, stats = _autograd_chunk(spec, head, sl, hidden[sl], need_grad)
                if g is not None:
                    grads.add(sl, hidden[sl], g)
                del g
                if stats is not None:
                    stats_parts.append(stats)
                total += loss.detach().to(torch.float64)
        finally:
            if flat is not None:
                workspace.give_back(flat)
        _store_stats(spec.stats, stats_parts)
        saved = grads.as_tuple()
        ctx.save_for_backward(*(t if t is not None else hidden.new_empty(0) for t in saved))
        ctx.has = tuple(t is not None for t in saved)
        return total.to(torch.float64 if hidden.dtype == torch.float64 else torch.float32)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        unit = bool(grad_out == 1)  # the usual case: hand the stored gradients over as they are (no copy)
        outs = [
            ((g if unit else g * grad_out.to(g.dtype)) if has else None)
            for has, g in zip(ctx.has, ctx.saved_tensors)
        ]
        return outs[0], outs[1], outs[2], None
