"""RL + GKD: rewards and advantages.

The paper's objective on the student's own samples is

    maximise  (1 - α) · E_y~p_S[ r(y) ]  -  α · D(p_T || p_S)(y | x)

The reward term is a policy gradient with detached advantages: its loss is ``-(1 - α) · A(y) · log p_S(y_t)`` at
every completion token ``t`` (the same per-token weights as the distillation term, so both are on one scale); the
divergence term is exactly the on-policy GKD loss. Neither term differentiates through sampling.

A reward is a built-in name or ``module:function``; the function takes ``(prompts, completions, records)`` (lists of
equal length) and returns one float per completion.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence

import torch

from gkd.errors import ConfigError, RewardError

__all__ = ["BUILTIN_REWARDS", "RewardFn", "compute_advantages", "compute_rewards", "load_reward"]

RewardFn = Callable[[Sequence[str], Sequence[str], Sequence[dict]], Sequence[float]]


def _per_example(score: Callable[[dict, str], float]) -> RewardFn:
    def reward(prompts: Sequence[str], completions: Sequence[str], records: Sequence[dict]) -> list[float]:
        return [float(score(rec, c)) for rec, c in zip(records, completions)]

    return reward


def _references(record: dict) -> list[str]:
    refs = list(record.get("references") or [])
    if record.get("completion") is not None and record["completion"] not in refs:
        refs.append(record["completion"])
    return refs


def _exact_match(record: dict, prediction: str) -> float:
    norm = " ".join(prediction.split())
    return float(any(norm == " ".join(r.split()) for r in _references(record)))


def _rouge2(record: dict, prediction: str) -> float:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge2"])
    refs = _references(record) or [""]
    return max(scorer.score(r, prediction)["rouge2"].fmeasure for r in refs)


def _bleu(record: dict, prediction: str) -> float:
    import sacrebleu

    refs = _references(record) or [""]
    return sacrebleu.sentence_bleu(prediction, refs, tokenize="none").score / 100.0


def _task_reward(module: str, name: str) -> Callable[[dict, str], float]:
    def score(record: dict, prediction: str) -> float:
        fn = getattr(importlib.import_module(module), name)
        return float(fn(record, prediction))

    return score


BUILTIN_REWARDS: dict[str, Callable[[], RewardFn]] = {
    "exact_match": lambda: _per_example(_exact_match),
    "rouge2": lambda: _per_example(_rouge2),
    "bleu": lambda: _per_example(_bleu),
    "final_answer": lambda: _per_example(_task_reward("gkd.tasks.arithmetic", "final_answer_score")),
    "faithfulness": lambda: _per_example(_task_reward("gkd.tasks.summarization", "faithfulness_score")),
    "set_match": lambda: _per_example(_task_reward("gkd.tasks.summarization", "set_match_score")),
    "item_f1": lambda: _per_example(_task_reward("gkd.tasks.summarization", "item_f1_score")),
}


def load_reward(spec: str) -> RewardFn:
    """A built-in reward by name, or ``package.module:function``."""
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]()
    if ":" not in spec:
        raise ConfigError(
            f"config key 'reward' must be a built-in reward ({', '.join(BUILTIN_REWARDS)}) or module:function, "
            f"got {spec!r}"
        )
    module_name, fn_name = spec.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(
            f"reward '{spec}': cannot import module '{module_name}' ({e}); check PYTHONPATH"
        ) from e
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ConfigError(f"reward '{spec}': module '{module_name}' has no function '{fn_name}'")
    return fn


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
