"""One step of Algorithm 1 of the GKD paper (Agarwal et al., ICLR 2024), on one screen.

    for each step:
        u ~ U(0, 1)                                          seeded; rank 0 decides for every rank
        if u < λ:  batch = (x, y ~ p_S(· | x))               the student's own samples, no gradient through them
        else:      batch = (x, y) from the dataset           ground truth, or the teacher's samples (SeqKD)
        θ ← θ − η ∇θ D(p_T ‖ p_S^θ)(y | x)                   every completion position, exact over the vocabulary

:func:`gkd_step` is that loop body, with RL + GKD's reward term and gradient accumulation. Its data flow is on the
page: per micro-batch, the teacher's view of the batch, the student's forward pass and the objective, on
consecutive lines. Everything it calls is a component built once from the config by :func:`gkd.build.build_run`
(sampler, teacher, student forward, objective, optimizer) and is public, so tests and benchmarks call the same
pieces: :func:`student_samples` (the rollout), ``run.teacher.view`` (:mod:`gkd.teacher`), ``run.student_forward``
(:class:`gkd.models.StudentForward`), :meth:`gkd.objective.Objective.loss` (pure math over the two),
:func:`optimizer_step`.

The loss of a step is normalised by the valid completion tokens (or sequences) actually in it, counted over all
micro-batches and all processes *after* the rollout, so on-policy steps are never normalised by the dataset's
completion lengths. With ``max_tokens_per_batch`` the step's sequences are regrouped after the rollout into
micro-batches by token count (:func:`by_tokens`): the same sequences and denominator, smaller forwards.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections import defaultdict
from typing import Any

import torch

from gkd import fsdp
from gkd.data import Batch, select_rows, token_groups
from gkd.forward import packed_forward_on
from gkd.rl import score_samples
from gkd.run import Coin, Run, Timer
from gkd.sampling import sample_batch
from gkd.teachers import RoutedTeachers

__all__ = ["Coin", "by_tokens", "gkd_step", "lmbda_at", "optimizer_step", "student_samples"]


def gkd_step(run: Run, step: int, *, log_stats: bool = True) -> dict[str, Any]:
    """One optimizer step (all gradient-accumulation micro-batches) of Algorithm 1; returns its log record."""
    cfg, timer = run.cfg, Timer()
    stats: dict[str, list] | None = defaultdict(list) if log_stats else None
    lmbda = lmbda_at(cfg, step)
    on_policy = run.coin.flip(lmbda)  # u < λ: this step trains on the student's own samples
    batches = [run.stream.next().to(run.device) for _ in range(cfg.gradient_accumulation_steps)]
    with timer("rollout"):
        if on_policy:
            batches = [student_samples(run, b) for b in batches]
    advantages: list[torch.Tensor | None] = [None] * len(batches)
    rl: dict[str, list] = defaultdict(list)
    if run.reward_fn is not None and on_policy:  # RL + GKD: (1 − α) E[r] as a policy gradient
        for i, b in enumerate(batches):
            rewards, advantages[i] = score_samples(
                b, run.reward_fn, str(cfg.reward), run.tokenizer, run.eos, cfg.num_generations, cfg.advantage
            )
            rl["reward"].append(rewards)
            rl["advantage"].append(advantages[i])
    if (
        cfg.max_tokens_per_batch is not None
    ):  # micro-batches by token count, now that the completions are known
        batches, advantages = by_tokens(run, batches, advantages)
    # after the rollout: the tokens this step really trains on, over every micro-batch and rank
    denominator = run.dist.sum(sum(run.objective.count(b) for b in batches))

    total = 0.0
    finite_loss = True
    # several teachers (gkd.teachers): each one's loss term, by name (every name on every rank: they are summed)
    teacher_losses = {n: 0.0 for n in run.teacher.names} if isinstance(run.teacher, RoutedTeachers) else None
    for i, (batch, adv) in enumerate(zip(batches, advantages)):
        last = i == len(batches) - 1  # DDP all-reduces gradients once, after the last micro-batch
        with contextlib.nullcontext() if last else run.accelerator.no_sync(run.student_forward):
            # the teacher's view: its scores, the cached top-k of a fixed batch, or the served teacher's top-k
            with timer("teacher"):
                teacher = run.teacher if run.objective.needs_teacher else None
                p_t = teacher.view(batch) if teacher is not None else None
            # the student's hidden states + head at the completion positions (never [positions, vocab] logits)
            with timer("student_forward"):
                p_s = run.student_forward(
                    batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask
                )
            # Σ w·D(p_T ‖ p_S) and the config's other terms, already divided by the step-wide denominator
            with timer("loss"):
                loss = run.objective.loss(
                    batch, p_s, p_t, denominator, advantages=adv, stats=stats, teacher_losses=teacher_losses
                )
                if run.reference is not None and run.objective.uses_reference(stats is not None):
                    p_ref = run.reference.view(batch)  # RL: KL to the initial student, a term or only logged
                    loss = loss + run.objective.kl_to_initial_term(batch, p_s, p_ref, denominator, stats)
            finite_loss &= bool(torch.isfinite(loss))
            with timer("backward"):
                if denominator > 0 and loss.requires_grad:
                    # DDP averages gradients over ranks, but the loss is already a sum over all ranks' tokens
                    run.accelerator.backward(loss * run.dist.world)
        total += float(loss.detach())
    step_loss = run.dist.sum(total)  # each rank's part of the step's mean (one shared denominator): their sum

    with timer("optimizer"):
        grad_norm, nonfinite = optimizer_step(run, finite_loss and math.isfinite(step_loss))
    return {
        "step": step + 1,
        "loss": step_loss,
        "on_policy": on_policy,
        "lmbda": lmbda,
        "completion_tokens": run.dist.sum(sum(b.num_tokens() for b in batches)),
        "sequences": run.dist.sum(sum(b.size for b in batches)),
        "grad_norm": grad_norm,
        "nonfinite": nonfinite,  # None, or what was not finite (the step was skipped)
        "empty_batch": sum(b.num_tokens() for b in batches) == 0,
        "stats": stats,
        "teacher_loss": {n: run.dist.sum(v) for n, v in (teacher_losses or {}).items()},
        "rl": rl,
        "times": dict(timer.seconds),
    }


def by_tokens(
    run: Run, batches: list[Batch], advantages: list[torch.Tensor | None]
) -> tuple[list[Batch], list[torch.Tensor | None]]:
    """The step's sequences regrouped into micro-batches of at most ``max_tokens_per_batch`` forward tokens
    (:func:`gkd.data.token_groups`), each row's RL advantage moved with it. The same sequences, so the step's
    denominator, loss and gradient do not change; only how many rows each forward holds."""
    packed = packed_forward_on(run.student)
    groups = token_groups(batches, run.cfg.max_tokens_per_batch, packed=packed)
    pad_id = run.tokenizer.pad_token_id if run.tokenizer.pad_token_id is not None else 0
    moved = [
        None if advantages[0] is None else torch.stack([advantages[b][r] for b, r in group])
        for group in groups
    ]
    return [select_rows(batches, group, pad_id) for group in groups], moved


def lmbda_at(cfg: Any, step: int) -> float:
    """λ of step ``step`` (0-based): constant, or ramped linearly from ``lmbda_start`` over the warm-up."""
    if cfg.lmbda_schedule == "linear" and cfg.lmbda_warmup_steps > 0:
        frac = min(1.0, step / cfg.lmbda_warmup_steps)
        return cfg.lmbda_start + frac * (cfg.lmbda - cfg.lmbda_start)
    return cfg.lmbda


def student_samples(run: Run, batch: Batch) -> Batch:
    """The batch's prompts with the student's own completions (``num_generations`` per prompt), no gradient."""
    return sample_batch(
        run.sampler,
        run.sampling_model,
        batch,
        run.sampling,
        run.rollout_gen,
        num_generations=run.cfg.num_generations,
    )


def optimizer_step(run: Run, loss_finite: bool) -> tuple[float, str | None]:
    """Clip, then step the optimizer unless the loss or a gradient is non-finite on any rank: the step is then
    skipped and what was not finite is returned (the loss, or the first parameter with a non-finite gradient).
    With fp16 the loss scaler decides instead: it skips a step whose scaled gradients overflowed and lowers the scale
    (normal while the scale calibrates, not counted as non-finite); a non-finite loss is still reported. The
    schedule advances either way, so a resumed run stays step-aligned.

    A sharded (FSDP2) student is clipped by the global norm over all shards, and after a step its full copy (what
    rollouts sample from) is all-gathered again (:mod:`gkd.fsdp`)."""
    sharded = fsdp.is_sharded(run.student)
    named = [(n, p) for n, p in run.student.named_parameters() if p.requires_grad]
    grad_norm = 0.0
    stepped = False
    if any(p.grad is not None for _, p in named):
        max_norm = run.cfg.max_grad_norm if run.cfg.max_grad_norm > 0 else float("inf")
        if sharded:  # the norm of every shard's gradients together (fp16 needs CUDA; its unscaling first)
            if getattr(run.accelerator, "scaler", None) is not None:
                run.accelerator.unscale_gradients()
            grad_norm = fsdp.clip_grad_norm_([p for _, p in named], max_norm)
        else:  # through accelerate: unscales fp16 gradients first
            norm = run.accelerator.clip_grad_norm_([p for _, p in named], max_norm)
            grad_norm = float(norm) if norm is not None else 0.0
    culprit = None
    if getattr(run.accelerator, "scaler", None) is not None:
        run.optimizer.step()
        stepped = True
        culprit = None if run.dist.sum(0.0 if loss_finite else 1.0) == 0.0 else "loss"
    elif run.dist.sum(0.0 if loss_finite and math.isfinite(grad_norm) else 1.0) == 0.0:
        run.optimizer.step()
        stepped = True
    elif not loss_finite:
        culprit = "loss"
    else:
        bad = (n for n, p in named if fsdp.has_nonfinite_grad(p))
        culprit = next((f"gradient of {n}" for n in bad), "gradient norm (on another rank)")
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()" after a skipped step
        warnings.simplefilter("ignore", UserWarning)
        run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if sharded and stepped:
        run.student.refresh()
    return grad_norm, culprit
