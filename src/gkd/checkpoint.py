"""Checkpoints that survive a kill at any moment.

A checkpoint is the folder ``output_dir/checkpoint-STEP/`` holding the model (``save_pretrained``, so it loads
anywhere with ``from_pretrained``; a LoRA adapter for LoRA runs), the tokenizer, ``optimizer.pt`` (optimizer and
scheduler), ``trainer_state.pt`` (step, data position, every RNG state) and ``trainer_state.json``.

Writes are atomic: everything goes to a hidden temporary folder that is renamed into place only when complete, and
``trainer_state.json`` is written last. A folder without it is incomplete and ignored; a kill during a write leaves
the previous checkpoint untouched.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from gkd.errors import CheckpointError
from gkd.io import quiet_progress_bars

__all__ = ["find_latest", "is_complete", "load_training_state", "resolve_resume", "save_checkpoint"]

_CKPT = re.compile(r"^checkpoint-(\d+)$")
STATE_JSON = "trainer_state.json"


def _fsync_tree(path: Path) -> None:
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_complete(path: Path) -> bool:
    return (path / STATE_JSON).is_file()


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    if not output_dir.is_dir():
        return []
    out = []
    for p in output_dir.iterdir():
        m = _CKPT.match(p.name)
        if m and p.is_dir() and is_complete(p):
            out.append((int(m.group(1)), p))
    return sorted(out)


def find_latest(output_dir: Path) -> Path | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1][1] if ckpts else None


def run_files(output_dir: Path) -> list[Path]:
    """What a previous run left in ``output_dir``: its checkpoints (complete or not) and its metrics log.

    Caches that are keyed by content (``seqkd-*.jsonl``, ``teacher-top*.safetensors``) are not a run: they are
    reused by any run they fit.
    """
    if not output_dir.is_dir():
        return []
    found = sorted(p for p in output_dir.iterdir() if _CKPT.match(p.name) and p.is_dir())
    found.sort(key=lambda p: int(_CKPT.match(p.name).group(1)))  # type: ignore[union-attr]
    for name in ("metrics.jsonl", "merged", "tensorboard"):
        if (output_dir / name).exists():
            found.append(output_dir / name)
    return found


def remove_run(output_dir: Path) -> None:
    """Delete what :func:`run_files` lists (``overwrite_output_dir``)."""
    for p in run_files(output_dir):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def clean_partial(output_dir: Path) -> None:
    """Remove temporary folders left by a write that was killed."""
    if output_dir.is_dir():
        for p in output_dir.glob(".checkpoint-*.tmp*"):
            shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(
    output_dir: Path,
    step: int,
    *,
    model: Any,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    training_state: dict[str, Any],
    info: dict[str, Any],
    keep: int | None = None,
) -> Path:
    """Write ``checkpoint-STEP`` atomically; keep only the newest ``keep`` checkpoints."""
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    with quiet_progress_bars():
        model.save_pretrained(str(tmp), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt"
    )
    torch.save(training_state, tmp / "trainer_state.pt")
    (tmp / STATE_JSON).write_text(json.dumps({"step": step, **info}, indent=2, default=str))
    _fsync_tree(tmp)
    if final.exists():
        old = output_dir / f".checkpoint-{step}.tmp-old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    if keep is not None:
        for _, p in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(p, ignore_errors=True)
    return final


def resolve_resume(spec: str, output_dir: Path) -> Path:
    """``latest`` or a path -> a complete checkpoint folder, or a CheckpointError saying what is wrong."""
    if spec == "latest":
        found = find_latest(output_dir)
        if found is None:
            raise CheckpointError(
                f"resume_from_checkpoint: latest found no complete checkpoint in '{output_dir}'; "
                "start without resume_from_checkpoint"
            )
        return found
    path = Path(os.path.expanduser(spec))
    if not path.exists():
        raise CheckpointError(
            f"resume_from_checkpoint '{spec}' does not exist; pass a checkpoint-STEP folder"
        )
    if not is_complete(path):
        raise CheckpointError(
            f"resume_from_checkpoint '{spec}' is not a complete gkd checkpoint (no {STATE_JSON}); "
            "use an earlier checkpoint-STEP folder"
        )
    return path


def load_training_state(path: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(info from trainer_state.json, optimizer+scheduler states, training state) of a checkpoint."""
    try:
        info = json.loads((path / STATE_JSON).read_text())
        optim = torch.load(path / "optimizer.pt", weights_only=False)
        state = torch.load(path / "trainer_state.pt", weights_only=False)
    except (OSError, json.JSONDecodeError, RuntimeError, EOFError) as e:
        raise CheckpointError(f"checkpoint '{path}' cannot be read ({e}); resume from an earlier one") from e
    return info, optim, state
