"""RL + GKD: rewards and advantages.

The paper's objective on the student's own samples is

    maximise  (1 - α) · E_y~p_S[ r(y) ]  -  α · D(p_T || p_S)(y | x)

The reward term is a policy gradient with detached advantages: its loss is ``-(1 - α) · A(y) · log p_S(y_t)`` at
every completion token ``t`` (the same per-token weights as the distillation term, so both are on one scale); the
divergence term is exactly the on-policy GKD loss. Neither term differentiates through sampling.

A reward is a built-in name or ``module:function``; the function takes ``(prompts, completions, records)`` (lists of
equal length) and returns one float per completion. Built-in rewards are the names of :mod:`gkd.scoring` (the same
vocabulary as the evaluation metrics, scored by the metrics' own per-example functions, in [0, 1]);
:func:`load_reward` and :data:`BUILTIN_REWARDS` are re-exported from there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from gkd.errors import RewardError
from gkd.scoring import BUILTIN_REWARDS, RewardFn, load_reward

__all__ = [
    "BUILTIN_REWARDS",
    "RewardFn",
    "compute_advantages",
    "compute_rewards",
    "discounted_returns",
    "load_reward",
    "score_samples",
]


def score_samples(
    batch: Any,
    reward_fn: RewardFn,
    name: str,
    tokenizer: Any,
    eos_ids: Sequence[int],
    group_size: int,
    mode: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards and detached advantages of a batch of the student's samples (a ``gkd.data.Batch``).

    The reward sees each completion decoded without its EOS and special tokens, the prompt text the record poses
    (``prompt``, or the last user turn of chat records) and the record itself.
    """
    from gkd.metrics import prompt_text_of

    ids, mask = batch.completion_ids, batch.completion_mask
    keep = mask & ~torch.isin(ids, torch.tensor(list(eos_ids), device=ids.device))
    # decoded on the host: one copy of the ids and of the mask, not one per row
    rows = [[t for t, k in zip(r, m) if k] for r, m in zip(ids.tolist(), keep.tolist())]
    texts = tokenizer.batch_decode(rows, skip_special_tokens=True)
    prompts = []
    for record in batch.records:
        try:
            prompts.append(prompt_text_of(record))
        except ValueError:
            prompts.append("")
    rewards = compute_rewards(reward_fn, name, prompts, texts, batch.records)
    return rewards, compute_advantages(rewards, group_size, mode)


def compute_rewards(
    fn: RewardFn, name: str, prompts: Sequence[str], completions: Sequence[str], records: Sequence[dict]
) -> torch.Tensor:
    """Call the reward and check its output: one finite float per completion, or a RewardError naming it."""
    try:
        out = fn(list(prompts), list(completions), list(records))
    except Exception as e:
        raise RewardError(f"reward '{name}' raised {type(e).__name__}: {e}; fix the reward function") from e
    try:
        values = [float(v) for v in out]
    except (TypeError, ValueError) as e:
        raise RewardError(f"reward '{name}' must return a list of floats, got {type(out).__name__}") from e
    if len(values) != len(completions):
        raise RewardError(
            f"reward '{name}' returned {len(values)} values for {len(completions)} completions; "
            "return one float per completion"
        )
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise RewardError(f"reward '{name}' returned a non-finite value ({bad[0]}); return finite floats")
    return torch.tensor(values, dtype=torch.float32)


def compute_advantages(
    rewards: torch.Tensor, group_size: int, mode: str = "group", eps: float = 1e-6
) -> torch.Tensor:
    """Detached advantages of ``rewards`` ``[N]`` laid out as consecutive groups of ``group_size`` per prompt.

    ``group``: (r - mean) / (std + eps) within each prompt's group (GRPO-style).
    ``rloo``: r - mean of the *other* samples of the group (leave-one-out baseline).
    With one sample per prompt the whole batch is the group. A constant reward gives zero advantages.
    """
    r = rewards.detach().to(torch.float32)
    g = group_size if group_size > 1 else r.numel()
    if r.numel() % g != 0:
        raise ValueError(f"{r.numel()} rewards do not split into groups of {g}")
    grouped = r.view(-1, g)
    if g == 1:
        return torch.zeros_like(r)
    if mode == "group":
        mean = grouped.mean(-1, keepdim=True)
        std = grouped.std(-1, keepdim=True, unbiased=False)
        adv = (grouped - mean) / (std + eps)
        adv = torch.where(std > eps, adv, torch.zeros_like(adv))
    elif mode == "rloo":
        total = grouped.sum(-1, keepdim=True)
        adv = grouped - (total - grouped) / (g - 1)
    else:
        raise ValueError(f"unknown advantage {mode!r}; valid: group, rloo")
    return adv.reshape(-1)


def discounted_returns(per_token: torch.Tensor, mask: torch.Tensor, discount: float) -> torch.Tensor:
    """sum_{k>=0} discount^k * per_token[t+k] over valid positions of each row (``[B, T]``)."""
    out = torch.zeros_like(per_token)
    running = torch.zeros_like(per_token[:, 0])
    for t in range(per_token.shape[1] - 1, -1, -1):
        running = torch.where(mask[:, t], per_token[:, t] + discount * running, torch.zeros_like(running))
        out[:, t] = running
    return out
