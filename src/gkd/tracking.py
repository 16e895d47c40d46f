"""Where metrics go: ``output_dir/metrics.jsonl`` always, plus TensorBoard / wandb / trackio when asked and installed.

``metrics.jsonl`` holds one JSON object per logging step (at least ``step`` and ``loss``) and one per evaluation.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import Any

__all__ = ["Tracker", "read_metrics"]


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
