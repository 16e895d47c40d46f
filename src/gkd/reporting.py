"""What a run reports, and where: the step's log record, the console lines, the progress bar, the trackers.

* ``output_dir/metrics.jsonl`` always holds one JSON object per logging step (at least ``step`` and ``loss``) and one
  per evaluation; the ``report_to`` trackers (TensorBoard, wandb, trackio, MLflow, ... through accelerate) get the
  same numbers when installed (TensorBoard writes under ``output_dir/tensorboard/<run_name>``).
* The console (stderr) gets the banner, one unwrapped line per logged step, warnings and evaluation lines; on an
  interactive terminal a progress bar with ETA sits below them. stdout is left to the caller.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from gkd.run import Run

__all__ = ["Progress", "Tracker", "banner", "format_record", "log_record", "read_metrics"]


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


# pip package of each report_to name (for the "not installed" warning)
_PIP = {"comet_ml": "comet-ml"}


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def _tracker_name(tracker: Any) -> str:
    """``report_to`` name of an entry of ``Accelerator.log_with`` (a LoggerType, or a GeneralTracker object)."""
    value = getattr(tracker, "value", None)  # LoggerType (an Enum): its value is the name
    if isinstance(value, str):
        return value
    if isinstance(tracker, str):
        return tracker
    return str(getattr(tracker, "name", tracker))


def _sanitized(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """The config as trackers accept it (transformers' ``to_sanitized_dict``): bool/int/float/str values, the rest
    (None, lists, the lora mapping) as their string."""
    if config is None:
        return None
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in config.items()}


class Tracker:
    """Where a run's numbers go: ``output_dir/metrics.jsonl`` (always, one JSON object per record) and the trackers
    of ``report_to``, through accelerate (``Accelerator(log_with=...)``, built by :func:`gkd.build.make_accelerator`
    with the installed ones: ``init_trackers``, ``log``, and at :meth:`close` every tracker's ``finish``).

    A ``report_to`` name that is not installed gets one warning line naming the package to install, and the run goes
    on; so does a tracker that fails to start or to log (a logger must never stop training). ``all``: every installed
    tracker. Only the main process writes (``enabled``)."""

    def __init__(
        self,
        output_dir: Path,
        report_to: list[str],
        enabled: bool = True,
        config: dict | None = None,
        *,
        accelerator: Any = None,
        project_name: str | None = None,
        log: Callable[[str], None] | None = None,
    ):
        self.enabled = enabled
        self.path = output_dir / "metrics.jsonl"
        self._accelerator = None
        self.trackers: list[str] = []
        """The report_to trackers that started."""
        if not enabled:
            return
        warn = (lambda m: log(f"warning: {m}")) if log is not None else _warn
        output_dir.mkdir(parents=True, exist_ok=True)
        available = [_tracker_name(t) for t in (getattr(accelerator, "log_with", None) or [])]
        for name in report_to:
            if name != "all" and name not in available:
                warn(
                    f"report_to '{name}' is not installed (pip install {_PIP.get(name, name)}); logging to "
                    "metrics.jsonl only"
                )
        if not available:
            return
        try:
            accelerator.init_trackers(project_name or output_dir.resolve().name, config=_sanitized(config))
        except Exception as e:  # a logger failing must never stop training
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            warn(f"report_to {', '.join(available)} could not start ({first}); logging to metrics.jsonl only")
            for tracker in list(getattr(accelerator, "trackers", [])):
                with contextlib.suppress(Exception):
                    tracker.finish()
            accelerator.trackers = []
            return
        self._accelerator = accelerator
        self.trackers = available

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as fh:
            fh.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        if self._accelerator is None:
            return
        step = int(record.get("step", 0))
        numeric = {k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        with contextlib.suppress(Exception):  # a tracker failing to log must never stop training
            self._accelerator.log(numeric, step=step)

    def close(self) -> None:
        """Finish every tracker (``Accelerator.end_training`` without its destroying the process group, which the
        caller may still use after ``train()``)."""
        if self._accelerator is None:
            return
        for tracker in list(self._accelerator.trackers):
            with contextlib.suppress(Exception):  # pragma: no cover - external loggers
                tracker.finish()
        self._accelerator.trackers = []
        self._accelerator = None


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(output_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------------------------
# the step's log record
# ---------------------------------------------------------------------------------------------------------------
def log_record(raw: dict[str, Any], lr: float, wall: float, skipped_steps: int) -> dict[str, Any]:
    """The flat record of one step (what ``metrics.jsonl`` and the trackers get) from :func:`gkd.step.gkd_step`'s
    result: means of the per-position diagnostics, RL statistics, the time split."""
    tokens = raw["completion_tokens"]
    record: dict[str, Any] = {
        "step": raw["step"],
        "loss": raw["loss"],
        "on_policy": raw["on_policy"],
        "lmbda": raw["lmbda"],
        "lr": lr,
        "grad_norm": raw["grad_norm"],
        "completion_tokens": tokens,
        "gen_len": tokens / max(1.0, raw["sequences"]),
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "step_s": wall,
        "skipped_steps": skipped_steps,
    }
    for k, v in raw["times"].items():
        record[f"time_{k}"] = v
    if raw["nonfinite"]:
        record["nonfinite"] = raw["nonfinite"]
    for k, parts in (raw["stats"] or {}).items():
        cat = torch.cat(parts) if parts else torch.zeros(0)
        if cat.numel():
            record[k] = float(cat.mean())
    for name, value in (raw.get("teacher_loss") or {}).items():  # several teachers: each one's loss term
        record[f"teacher/{name}/loss"] = value
    if raw["rl"]:
        r, a = torch.cat(raw["rl"]["reward"]), torch.cat(raw["rl"]["advantage"])
        record.update(
            reward_mean=float(r.mean()),
            reward_std=float(r.std(unbiased=False)),
            advantage_mean=float(a.mean()),
            advantage_std=float(a.std(unbiased=False)),
            advantage_abs_max=float(a.abs().max()),
        )
    if raw["empty_batch"]:
        record["empty_batch"] = True
    return record


_SHOWN = [
    ("loss", "loss", ".4f"),
    ("forward_kl", "fkl", ".4f"),
    ("reverse_kl", "rkl", ".4f"),
    ("entropy", "ent", ".3f"),
    ("top1_agree", "top1", ".3f"),
    ("reward_mean", "reward", ".3f"),
    ("gen_len", "len", ".1f"),
    ("tokens_per_s", "tok/s", ".0f"),
    ("lr", "lr", ".2e"),
]


def format_record(r: dict[str, Any]) -> str:
    """One console line for a step record."""
    parts = [f"step {r['step']}", "on" if r.get("on_policy") else "off"]
    for key, label, fmt in _SHOWN:
        if key in r:
            parts.append(f"{label} {format(r[key], fmt)}")
    times = [
        f"{k[5:]} {r[k]:.2f}s" for k in ("time_rollout", "time_teacher", "time_student_forward") if r.get(k)
    ]
    if times:
        parts.append("(" + ", ".join(times) + ")")
    return " | ".join(parts)


def banner(run: Run) -> str:
    """The first line of a run: the method, λ, the data and batch geometry, the trainable size, the output."""
    cfg = run.cfg
    n_train = sum(p.numel() for p in run.student.parameters() if p.requires_grad)
    mode = "SFT" if cfg.divergence == "nll" else f"{cfg.divergence}"
    if cfg.divergence == "jsd":
        mode += f"(β={cfg.beta}{', normalized' if cfg.jsd_normalize else ''})"
    extra = f", RL α={cfg.alpha} reward={cfg.reward}" if run.reward_fn is not None else ""
    return (
        f"gkd: {mode}, λ={cfg.lmbda}{' (SeqKD targets)' if cfg.seq_kd else ''}{extra}; "
        f"{len(run.train_data)} examples, {_steps(run)} × {cfg.per_device_train_batch_size}"
        f"×{cfg.gradient_accumulation_steps}×{run.dist.world}; {n_train:,} trainable parameters; "
        f"output {run.output_dir}"
    )


def _steps(run: Run) -> str:
    """``N steps``, with the epochs they make when ``max_steps`` came from ``num_train_epochs``."""
    plan = run.plan
    if run.cfg.max_steps > 0:
        return f"{plan.max_steps} steps"
    epochs = run.cfg.num_train_epochs
    return f"{plan.max_steps} steps ({epochs:g} epoch{'' if epochs == 1 else 's'} of {plan.steps_per_epoch})"


class Progress:
    """A rich progress bar with ETA on an interactive terminal; nothing otherwise.

    Step lines go through :meth:`print`: above the bar on a terminal, else to ``log`` one unwrapped line each (so a
    log file holds one line per step, greppable). ``show_bar`` (config key ``progress``) hides only the bar.
    """

    def __init__(self, total: int, start: int, show_bar: bool, log: Callable[[str], None]) -> None:
        self._log = log
        self._bar = None
        if not (show_bar and sys.stderr.isatty()):
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        self._bar = RichProgress(
            TextColumn("[bold]gkd"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            console=Console(stderr=True, soft_wrap=True),
            transient=True,
        )
        self._task = self._bar.add_task("train", total=total, completed=start, info="")
        self._bar.start()

    def update(self, step: int, record: dict[str, Any]) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=f"loss {record['loss']:.4f}")

    def print(self, text: str) -> None:
        if self._bar is not None:
            self._bar.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            self._log(text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
