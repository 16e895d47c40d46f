"""The training state beyond the weights, and checkpoints of a whole run.

A resumed run must continue exactly as if it had never stopped (tested by killing a run with ``kill -9``): besides
model, optimizer and scheduler, a checkpoint holds the step, the data stream's position, every random generator
(the λ coin, the rollout sampler, torch / Python / NumPy) and the skip counters. Checkpoint files are written
atomically by :mod:`gkd.checkpoint`.

With several processes each rank saves and restores its own generators and data position
(``rng_state-rank{R}.pt``; the rollout sampler and torch generators are seeded per rank), and with FSDP its own
shards of the model and optimizer. Everything is saved as tensors and plain data (NumPy's state as a list), so
that resuming reads it with ``torch.load(weights_only=True)``.

The best evaluation so far (``metric_for_best_model``) is part of the state: :class:`BestMetric` says which value of
an evaluation picks it and which way is better; ``TrainState.best_*`` and the checkpoint that holds it remember it.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from gkd import checkpoint as ckpt
from gkd.config import RESUME_KEYS, GKDConfig
from gkd.errors import CheckpointError, ConfigError, TrainingError
from gkd.scoring import resolve_scorer

if TYPE_CHECKING:
    from gkd.run import Run

__all__ = [
    "BestMetric",
    "TrainState",
    "check_resume_compat",
    "metric_names",
    "public_config",
    "restore",
    "save",
]


@dataclass
class TrainState:
    """Counters of the loop that a checkpoint carries."""

    step: int = 0
    skipped_steps: int = 0
    nonfinite_in_a_row: int = 0
    last_loss: float = float("nan")
    best_metric: float | None = None
    """The best value of ``metric_for_best_model`` so far (None: no evaluation tracked yet)."""
    best_step: int | None = None
    """The step of that evaluation."""
    best_checkpoint: str | None = None
    """The name of the checkpoint folder holding the best evaluated model (``checkpoint-STEP``), once one was saved
    at a best evaluation's step: never removed by ``save_total_limit``; ``load_best_model_at_end`` loads it."""
    log_history: list[dict[str, Any]] = field(default_factory=list)
    """transformers' ``TrainerState.log_history``, as TRL scripts read it: one dict per logged step (``loss``,
    ``learning_rate``, ``grad_norm``, ``epoch``, ``step`` and gkd's diagnostics), per evaluation (``eval_<metric>``,
    ``epoch``, ``step``) and, last, the run's summary (``train_runtime``, ``train_loss``, ...)."""

    @property
    def global_step(self) -> int:
        """transformers' name of :attr:`step`: optimizer steps taken."""
        return self.step


class BestMetric:
    """Which evaluation value picks the best model (``metric_for_best_model``) and which way is better."""

    def __init__(self, key: str | None, name: str, greater: bool) -> None:
        self.key = key
        """The evaluation record's key (``eval/greedy/exact_match``); None: the first greedy metric, taken at the
        first evaluation."""
        self.name = name
        self.greater = greater

    @staticmethod
    def record_key(name: str) -> str:
        """``metric_for_best_model`` as an evaluation key. With or without transformers' ``eval_`` prefix (or
        ``eval/``) and the decoding mode: ``exact_match``, ``eval_exact_match``, ``greedy/exact_match`` and
        ``eval/greedy/exact_match`` are all ``eval/greedy/exact_match``; ``sample/exact_match`` is the sampled
        score."""
        for prefix in ("eval/", "eval_"):
            if name.startswith(prefix):
                name = name[len(prefix) :]
                break
        return f"eval/{name}" if "/" in name else f"eval/greedy/{name}"

    @classmethod
    def of(cls, cfg: GKDConfig, run: Run) -> BestMetric | None:
        """None when no best is tracked (none of load_best_model_at_end, save_strategy: best, metric_for_best_model;
        or no evaluations); a ConfigError for a metric the evaluation does not produce."""
        if not (cfg.load_best_model_at_end or run.plan.save_best or cfg.metric_for_best_model is not None):
            return None
        if not run.plan.evaluate:
            if cfg.load_best_model_at_end or run.plan.save_best:
                key = "load_best_model_at_end" if cfg.load_best_model_at_end else "save_strategy: best"
                raise ConfigError(
                    f"config key '{key}' needs evaluations: give an eval dataset (eval_dataset) and leave "
                    "eval_strategy on (steps or epoch)"
                )
            return None
        known = _evaluation_keys(cfg, run)
        key = cls.record_key(cfg.metric_for_best_model) if cfg.metric_for_best_model else None
        if key is not None and key.rsplit("/", 1)[-1] == "loss":
            example = metric_names(known)[0] if known else "exact_match"
            raise ConfigError(
                f"config key 'metric_for_best_model: {cfg.metric_for_best_model}': gkd evaluates generated "
                f"completions with eval_metric and computes no eval loss; name a metric, e.g. {example}"
            )
        if key is not None and known is not None and key not in known:
            raise ConfigError(
                f"config key 'metric_for_best_model: {cfg.metric_for_best_model}' is not a value of the evaluation "
                f"(eval_metric: {cfg.eval_metric or 'exact_match'}); use one of {', '.join(metric_names(known))}"
            )
        if key is None and known:
            key = known[0]
        name = key[len("eval/") :] if key else "eval_metric"
        greater = cfg.greater_is_better
        if greater is None:  # transformers: lower is better for a loss, higher for anything else
            greater = "loss" not in (cfg.metric_for_best_model or name)
        return cls(key, name, greater)

    def value(self, out: dict[str, float]) -> float:
        """The metric's value in an evaluation record."""
        if self.key is None:
            self.key = next((k for k in out if k.startswith("eval/greedy/")), None)
            if self.key is not None:
                self.name = self.key[len("eval/") :]
        if self.key not in out:
            raise TrainingError(
                f"metric_for_best_model: the evaluation has no '{self.name}'; it has "
                f"{', '.join(metric_names([k for k in out if k.startswith('eval/')]))}"
            )
        return float(out[self.key])

    def better(self, value: float, best: float | None) -> bool:
        if not math.isfinite(value):
            return False
        return best is None or (value > best if self.greater else value < best)

    def track(self, out: dict[str, float], st: TrainState, run: Run) -> bool:
        """Note a new best value of the evaluation record ``out`` in ``st``; True (on every process) when this
        evaluation is the best so far (the main process, which evaluates, decides)."""
        improved = False
        if run.dist.is_main:
            value = self.value(out)
            if self.better(value, st.best_metric):
                st.best_metric = value
                improved = True
        improved = run.dist.broadcast_flag(improved)
        if improved:
            st.best_step = st.step
        return improved


def _evaluation_keys(cfg: GKDConfig, run: Run) -> list[str] | None:
    """The keys of the trainer's evaluation record (``eval/<mode>/<metric>``, greedy first), from scoring one
    record; None when that cannot be told before the first evaluation."""
    try:
        score = resolve_scorer(cfg.eval_metric or "exact_match")
        record = run.eval_data.examples[0].record  # type: ignore[union-attr]
        names = list(score([record], [""]))
    except Exception:
        return None
    return [f"eval/{mode}/{n}" for mode in ("greedy", "sample") for n in names]


def metric_names(keys: list[str]) -> list[str]:
    """``eval/greedy/x`` -> ``x``, ``eval/sample/x`` -> ``sample/x``: as metric_for_best_model names them."""
    return [k.removeprefix("eval/").removeprefix("greedy/") for k in keys]


def save(run: Run, state: TrainState) -> Path | None:
    """Write ``checkpoint-STEP`` atomically (every process takes part, see :func:`gkd.checkpoint.save_checkpoint`);
    returns its path on the main process, None elsewhere.

    At the step of the best evaluation so far the checkpoint becomes ``state.best_checkpoint`` (recorded in it, and
    kept by ``save_total_limit``)."""
    from gkd import fsdp

    run.accelerator.wait_for_everyone()
    if state.best_step is not None and state.best_step == state.step:
        state.best_checkpoint = f"checkpoint-{state.step}"
    own = rank_state(run)
    training_state = {**dataclasses.asdict(state), "coin_rng": run.coin.rng.getstate(), **own}
    sharded = fsdp.is_sharded(run.student)
    rank_files: dict[str, Any] = {}
    if run.dist.world > 1:
        rank_files[f"rng_state-rank{run.dist.rank}.pt"] = own
    if sharded:
        rank_files[f"shard-rank{run.dist.rank}.pt"] = fsdp.local_shards(run.student, run.optimizer)  # type: ignore[arg-type]
    path = ckpt.save_checkpoint(
        run.output_dir,
        state.step,
        model=run.student,
        tokenizer=run.tokenizer,
        optimizer=None if sharded else run.optimizer,
        scheduler=run.scheduler,
        training_state=training_state,
        info={**best_info(run, state), "config": public_config(run.cfg)},
        keep=run.cfg.save_total_limit,
        best=run.output_dir / state.best_checkpoint if state.best_checkpoint else None,
        dist=run.dist,
        rank_files=rank_files,
    )
    run.accelerator.wait_for_everyone()
    return path if run.dist.is_main else None


def rank_state(run: Run) -> dict[str, Any]:
    """This process's data position and random generators, as tensors and plain data."""
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    return {
        "stream": run.stream.state_dict(),
        "rollout_gen": run.rollout_gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
        "numpy_rng": [str(name), [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
    }


def load_rank_state(run: Run, saved: dict[str, Any]) -> None:
    """:func:`rank_state` back into this process."""
    run.stream.load_state_dict(saved["stream"])
    run.rollout_gen.set_state(saved["rollout_gen"])
    torch.set_rng_state(saved["torch_rng"])
    random.setstate(_tuples(saved["python_rng"]))
    name, keys, pos, has_gauss, cached = saved["numpy_rng"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))


def _tuples(value: Any) -> Any:
    """Python's random state with its tuples back (a list may come back from a serializer)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list | tuple) else value


def public_config(cfg: GKDConfig) -> dict[str, Any]:
    """The config as written to checkpoints and sent to trackers: secrets (``hub_token``) redacted, as transformers'
    ``TrainingArguments.to_dict`` does."""
    return {
        k: f"<{k.upper()}>" if k.endswith("_token") and v is not None else v for k, v in cfg.to_dict().items()
    }


def best_info(run: Run, state: TrainState) -> dict[str, Any]:
    """transformers' ``trainer_state.json`` fields for the best evaluation (empty before one was tracked)."""
    if state.best_step is None:
        return {}
    return {
        "best_metric": state.best_metric,
        "best_global_step": state.best_step,
        "best_model_checkpoint": str(run.output_dir / state.best_checkpoint)
        if state.best_checkpoint
        else None,
    }


def restore(run: Run, path: Path) -> TrainState:
    """Load the optimizer, scheduler, stream and RNG states of checkpoint ``path`` into ``run``: this rank's own
    ones when the checkpoint has them (several processes), and with FSDP this rank's shards of model and optimizer.
    """
    from gkd import fsdp

    info, optim, saved = ckpt.load_training_state(path)
    rank, world = run.dist.rank, run.dist.world
    if fsdp.is_sharded(run.student):
        if int(info.get("world", 1)) != world:
            raise CheckpointError(
                f"checkpoint '{path}' was written by {info.get('world', 1)} processes; a sharded (fsdp) run "
                f"resumes with the same number, not {world}"
            )
        shards = ckpt.load_pt(path / f"shard-rank{rank}.pt", missing_ok=True)
        if shards is None:
            raise CheckpointError(
                f"checkpoint '{path}' holds no sharded state (it was written without fsdp); resume it without fsdp"
            )
        try:
            fsdp.load_shards(run.student, run.optimizer, shards)  # type: ignore[arg-type]
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint '{path}': its shards do not fit this run ({e})") from e
    elif "optimizer" in optim:
        run.optimizer.load_state_dict(optim["optimizer"])
    elif int(info.get("world", 1)) != world:  # sharded by another number of processes: that is the cause
        n = int(info.get("world", 1))
        raise CheckpointError(
            f"checkpoint '{path}' was written by {n} processes (sharded with fsdp), this run has {world}; relaunch "
            f"with torchrun --nproc_per_node {n} (and fsdp: full_shard)"
        )
    else:
        raise CheckpointError(f"checkpoint '{path}' was written by a sharded (fsdp) run; resume it with fsdp")
    run.scheduler.load_state_dict(optim["scheduler"])
    run.coin.rng.setstate(_tuples(saved["coin_rng"]))
    own = ckpt.load_pt(path / f"rng_state-rank{rank}.pt", missing_ok=True) if world > 1 else None
    load_rank_state(run, own if own is not None else saved)
    return TrainState(
        step=int(saved["step"]),
        skipped_steps=int(saved.get("skipped_steps", 0)),
        nonfinite_in_a_row=int(saved.get("nonfinite_in_a_row", 0)),
        last_loss=float(saved.get("last_loss", float("nan"))),
        best_metric=saved.get("best_metric"),
        best_step=saved.get("best_step"),
        best_checkpoint=saved.get("best_checkpoint"),
        log_history=list(saved.get("log_history", [])),
    )


def check_resume_compat(cfg: GKDConfig, path: Path) -> None:
    """Refuse to resume a checkpoint written with different models, LoRA, batch geometry, divergence or dtype."""
    info, _, _ = ckpt.load_training_state(path)
    saved = info.get("config", {})
    for key in RESUME_KEYS:
        ours: Any = getattr(cfg, key)
        theirs = saved.get(key)
        if dataclasses.is_dataclass(ours) and isinstance(theirs, dict):  # LoRA: the adapter's shape only
            shape = ("r", "alpha", "dropout", "target_modules")
            ours = {k: v for k, v in dataclasses.asdict(ours).items() if k in shape}
            theirs = {k: v for k, v in theirs.items() if k in shape}
        if key in saved and theirs != ours:
            raise CheckpointError(
                f"checkpoint '{path}' was written with {key}={theirs!r} but this config has {key}={ours!r}; "
                "resume with the same config or start a fresh output_dir"
            )
