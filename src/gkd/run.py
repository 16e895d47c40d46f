"""What the step is handed: the :class:`Run` (every component, built once by :func:`gkd.build.build_run`), the
processes (:class:`Dist`), the λ coin (:class:`Coin`) and the phase timer (:class:`Timer`).

They live here, below the step, the state and the builder, so every layer that is handed a run can import its type
without an import cycle.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gkd.config import GKDConfig, Plan
from gkd.data import BatchStream, TokenizedDataset
from gkd.objective import Objective
from gkd.sampling import Sampler, SamplingParams
from gkd.teacher import Reference, TeacherSource, TopKCache

__all__ = ["Coin", "Dist", "Run", "Timer"]


@dataclass
class Timer:
    """Wall-clock seconds per named phase of a step (``time_<name>`` in the step's log record)."""

    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - t0


class Coin:
    """The λ coin: seeded, and drawn by every rank from the same state; rank 0's outcome is broadcast so all ranks
    are on- or off-policy together."""

    def __init__(self, seed: int, dist: Any) -> None:
        self.rng = random.Random(seed)
        self.dist = dist

    def flip(self, lmbda: float) -> bool:
        u = self.rng.random()
        return self.dist.broadcast_flag(u < lmbda if lmbda < 1.0 else True)


class Dist:
    """The processes of the run (accelerate): sums over ranks and rank 0's decisions."""

    def __init__(self, accelerator: Any) -> None:
        self.world = accelerator.num_processes
        self.rank = accelerator.process_index
        self.is_main = accelerator.is_main_process
        self.device = accelerator.device

    def sum(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return float(t.item())

    def broadcast_flag(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        t = torch.tensor([1 if flag else 0], device=self.device)
        torch.distributed.broadcast(t, src=0)
        return bool(t.item())

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


@dataclass
class Run:
    """The components of a run. ``student`` is the trained model (a peft model for LoRA); ``student_forward`` is its
    forward pass at completion positions, wrapped for data parallelism; ``sampling_model`` is what the sampler
    samples (the plain transformers model, or the peft model); ``teacher`` is what the step asks for the teacher's
    view of a batch (:mod:`gkd.teacher`: local, the top-k cache in front of it, or served); ``topk_cache`` is that
    cache (or None), kept for inspection."""

    cfg: GKDConfig
    accelerator: Any
    dist: Dist
    output_dir: Path
    tokenizer: Any
    student: nn.Module
    student_forward: nn.Module
    sampling_model: nn.Module
    teacher: TeacherSource | None
    reference: Reference | None
    topk_cache: TopKCache | None
    train_data: TokenizedDataset
    eval_data: TokenizedDataset | None
    stream: BatchStream
    sampler: Sampler
    sampling: SamplingParams
    objective: Objective
    optimizer: torch.optim.Optimizer
    scheduler: Any
    coin: Coin
    rollout_gen: torch.Generator
    reward_fn: Any
    eos: list[int]
    vocab: int
    resume_dir: Path | None
    plan: Plan
    """Step counts of the run (max_steps from epochs, warm-up, logging/save/eval cadence), see training_plan."""

    @property
    def device(self) -> torch.device:
        return self.dist.device
