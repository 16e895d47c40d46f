"""What a run reports, and where: the step's log record, the console lines, the progress bar, the trackers.

* ``output_dir/metrics.jsonl`` always holds one JSON object per logging step (at least ``step`` and ``loss``) and one
  per evaluation; TensorBoard / wandb / trackio get the same numbers when asked (``report_to``) and installed.
* The console (stderr) gets the banner, one unwrapped line per logged step, warnings and evaluation lines; on an
  interactive terminal a progress bar with ETA sits below them. stdout is left to the caller.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from gkd.build import Run

__all__ = ["Progress", "Tracker", "banner", "format_record", "log_record", "read_metrics"]


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name if name != "tensorboard" else "tensorboard") is not None
    except (ImportError, ValueError):
        return False


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


class Tracker:
    def __init__(
        self, output_dir: Path, report_to: list[str], enabled: bool = True, config: dict | None = None
    ):
        self.enabled = enabled
        self.path = output_dir / "metrics.jsonl"
        self._backends: list[Any] = []
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        if (
            "all" in report_to
        ):  # transformers' meaning: every installed integration, silently skipping the rest
            report_to = [n for n in ("tensorboard", "wandb", "trackio") if _installed(n)]
        for name in report_to:
            if not _installed(name):
                _warn(f"report_to '{name}' is not installed; logging to metrics.jsonl only")
                continue
            try:
                if name == "tensorboard":
                    from torch.utils.tensorboard import SummaryWriter

                    self._backends.append(("tensorboard", SummaryWriter(str(output_dir / "tensorboard"))))
                elif name == "wandb":
                    import wandb

                    self._backends.append(("wandb", wandb.init(config=config, dir=str(output_dir))))
                elif name == "trackio":
                    import trackio

                    trackio.init(project="gkd", config=config)
                    self._backends.append(("trackio", trackio))
            except Exception as e:  # a logger failing must never stop training
                _warn(f"report_to '{name}' could not start ({e}); logging to metrics.jsonl only")

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as fh:
            fh.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        step = int(record.get("step", 0))
        numeric = {k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        for name, backend in self._backends:
            try:
                if name == "tensorboard":
                    for k, v in numeric.items():
                        backend.add_scalar(k, v, step)
                else:
                    backend.log(numeric, step=step)
            except Exception:  # pragma: no cover - external loggers
                pass

    def close(self) -> None:
        for name, backend in self._backends:
            try:
                if name == "tensorboard":
                    backend.close()
                elif name == "wandb":
                    backend.finish()
            except Exception:  # pragma: no cover
                pass
        self._backends = []


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
        f"{len(run.train_data)} examples, {cfg.max_steps} steps × {cfg.per_device_train_batch_size}"
        f"×{cfg.gradient_accumulation_steps}×{run.dist.world}; {n_train:,} trainable parameters; "
        f"output {run.output_dir}"
    )


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
