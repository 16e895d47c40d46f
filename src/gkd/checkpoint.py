"""Checkpoints that survive a kill at any moment.

A checkpoint is the folder ``output_dir/checkpoint-STEP/`` holding the model (``save_pretrained``, so it loads
anywhere with ``from_pretrained``; a LoRA adapter for LoRA runs), the tokenizer, ``optimizer.pt`` (optimizer and
scheduler), ``trainer_state.pt`` (step, data position, every RNG state) and ``trainer_state.json``.

Writes are atomic: everything goes to a hidden temporary folder that is renamed into place only when complete, and
``trainer_state.json`` is written last. A folder without it is incomplete and ignored; a kill during a write leaves
the previous checkpoint untouched. With several processes every rank writes its own files into that folder
(``rng_state-rank{R}.pt``: its random generators and data position; with FSDP ``shard-rank{R}.pt``: its shards of
the model and optimizer), all ranks agree that they are written, then rank 0 writes ``trainer_state.json`` and
renames the folder.

Loading never runs code: every ``.pt`` file is read with ``torch.load(weights_only=True)`` (tensors and plain
data only), so a checkpoint holding any other pickled object is refused with one line (:func:`load_pt`).

The final model (:func:`save_final_model`, what TRL's ``trainer.save_model(output_dir)`` writes) lives in
``output_dir`` itself, beside the checkpoints: ``from_pretrained(output_dir)`` loads it. Its files are listed in
``final_model.json``, so a later run knows exactly which top-level files are a model gkd wrote (``overwrite_output_dir``
removes those and nothing else) and an interrupted write is never mistaken for a complete one (``complete: false``).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from gkd.errors import CheckpointError
from gkd.io import quiet_progress_bars

__all__ = [
    "final_model_files",
    "find_latest",
    "is_complete",
    "load_model_weights",
    "load_pt",
    "load_training_state",
    "resolve_resume",
    "save_checkpoint",
    "save_final_model",
]

_CKPT = re.compile(r"^checkpoint-(\d+)$")
STATE_JSON = "trainer_state.json"
FINAL_JSON = "final_model.json"
"""Lists the files of the final model in ``output_dir`` (written last; ``complete: false`` while they are replaced)."""
_FINAL_TMP = ".final-model.tmp-"


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
    found.extend(output_dir / name for name in final_model_files(output_dir) if (output_dir / name).exists())
    if (output_dir / FINAL_JSON).exists():
        found.append(output_dir / FINAL_JSON)
    return found


def remove_run(output_dir: Path) -> None:
    """Delete what :func:`run_files` lists (``overwrite_output_dir``): checkpoints, logs, the final model."""
    final = final_model_files(output_dir)
    for p in run_files(output_dir):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    _remove_empty_parents(output_dir, final)


def clean_partial(output_dir: Path) -> None:
    """Remove temporary folders left by a write that was killed."""
    if output_dir.is_dir():
        for pattern in (".checkpoint-*.tmp*", f"{_FINAL_TMP}*"):
            for p in output_dir.glob(pattern):
                shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(
    output_dir: Path,
    step: int,
    *,
    model: Any,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any,
    training_state: dict[str, Any],
    info: dict[str, Any],
    keep: int | None = None,
    best: Path | None = None,
    dist: Any = None,
    rank_files: dict[str, Any] | None = None,
) -> Path:
    """Write ``checkpoint-STEP`` atomically; keep only the newest ``keep`` checkpoints, never deleting ``best``
    (:func:`rotate`).

    With several processes (``dist``: :class:`gkd.build.Dist`) every rank calls this: each writes its
    ``rank_files`` (file name -> plain data) into the shared temporary folder, rank 0 the model (``model``:
    ``save_pretrained``), tokenizer, ``optimizer.pt`` (``optimizer`` None: the scheduler only, the optimizer state
    being in the ranks' files) and ``trainer_state.pt``; once every rank has written (a failure on any rank fails
    all of them), rank 0 writes ``trainer_state.json`` and renames the folder into place."""
    rank, world = (dist.rank, dist.world) if dist is not None else (0, 1)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / (
        f".checkpoint-{step}.tmp-{os.getpid()}" if world == 1 else f".checkpoint-{step}.tmp-ranks"
    )
    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    if world > 1:
        dist.barrier()
    error: BaseException | None = None
    try:
        _write_parts(tmp, rank, model, tokenizer, optimizer, scheduler, training_state, rank_files)
    except BaseException as e:  # every rank must learn of it before raising: no rank may hang
        error = e
    if world > 1 and dist.sum(0.0 if error is None else 1.0) > 0 and error is None:
        raise CheckpointError(
            f"checkpoint-{step}: another process failed to write its part; nothing was saved"
        )
    if error is not None:
        if rank == 0:
            shutil.rmtree(
                tmp, ignore_errors=True
            )  # a half-written folder must not stay (on a full disk least of all)
        mapped = _write_error(error, f"checkpoint-{step}", output_dir)
        if mapped is not None:
            raise mapped from error
        raise error
    if rank != 0:
        dist.barrier()  # rank 0 renames the folder into place
        return final
    try:
        (tmp / STATE_JSON).write_text(
            json.dumps({"step": step, "world": world, **info}, indent=2, default=str)
        )
        _fsync_tree(tmp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(e, f"checkpoint-{step}", output_dir) from e  # type: ignore[misc]
    _move_into_place(tmp, final, output_dir / f".checkpoint-{step}.tmp-old-{os.getpid()}")
    if keep is not None:
        rotate(output_dir, keep, best)
    if world > 1:
        dist.barrier()
    return final


def _write_parts(
    tmp: Path,
    rank: int,
    model: Any,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any,
    training_state: dict[str, Any],
    rank_files: dict[str, Any] | None,
) -> None:
    """This rank's ``rank_files`` in ``tmp``; rank 0 also writes the model, tokenizer and training states."""
    for name, obj in (rank_files or {}).items():
        torch.save(obj, tmp / name)
        _fsync_file(tmp / name)
    if rank == 0:
        with quiet_progress_bars():
            model.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        states = {"scheduler": scheduler.state_dict()}
        if optimizer is not None:
            states["optimizer"] = optimizer.state_dict()
        torch.save(states, tmp / "optimizer.pt")
        torch.save(training_state, tmp / "trainer_state.pt")


def _move_into_place(tmp: Path, final: Path, old: Path) -> None:
    """Rename the written folder ``tmp`` to ``final``; a folder already there goes aside to ``old``, then away."""
    if final.exists():
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _write_error(error: BaseException, what: str, folder: Path) -> CheckpointError | None:
    """A failed write as one line: a full disk (ENOSPC, or torch's zip writer failing mid-file) names the folder;
    other OS errors their reason. None for anything else (re-raised as it is)."""
    no_space = (isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)) or (
        isinstance(error, RuntimeError)
        and any(m in str(error) for m in ("No space left", "unexpected pos", "file write failed"))
    )
    if no_space:
        return CheckpointError(
            f"no space left on device writing {what} in {folder}; nothing of it was kept (the last complete "
            "checkpoint is intact): free space, or lower save_total_limit, and resume with resume_from_checkpoint=latest"
        )
    if isinstance(error, OSError):
        return CheckpointError(
            f"cannot write {what} in {folder} ({error.strerror or error}); check the folder"
        )
    return None


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def rotate(output_dir: Path, keep: int, best: Path | None = None) -> None:
    """Delete the oldest checkpoints beyond ``keep``. The ``best`` one is never deleted: it is kept with the newest
    ``keep - 1`` others (at least the newest one, so the run can still resume: transformers' rule)."""
    ckpts = [p for _, p in list_checkpoints(output_dir)]
    protected = best is not None and any(p.name == best.name for p in ckpts)
    others = [p for p in ckpts if not (protected and p.name == best.name)]  # type: ignore[union-attr]
    n_others = max(1, keep - 1) if protected else keep
    for p in others[: max(0, len(others) - n_others)]:
        shutil.rmtree(p, ignore_errors=True)


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
    if not is_complete(path) and (path / FINAL_JSON).exists():
        raise CheckpointError(
            f"resume_from_checkpoint '{spec}' is a run's output_dir (its final model), not a checkpoint; use "
            "resume_from_checkpoint=latest with that output_dir, or one of its checkpoint-STEP folders"
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
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint '{path}' cannot be read ({e}); resume from an earlier one") from e
    return info, load_pt(path / "optimizer.pt"), load_pt(path / "trainer_state.pt")


def load_pt(file: Path, *, missing_ok: bool = False) -> Any:
    """A ``.pt`` file of a checkpoint, read with ``torch.load(weights_only=True)``: tensors and plain data (dicts,
    lists, tuples, numbers, strings) only. Anything else (a pickled object, which could run code while loading) is
    refused with a one-line :class:`CheckpointError`; so is a missing or unreadable file (None if ``missing_ok``)."""
    import pickle

    if missing_ok and not file.exists():
        return None
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"checkpoint file '{file}' holds objects other than tensors and plain data; gkd refuses to load it "
            "(unpickling it could run code): resume from a checkpoint gkd wrote"
        ) from e
    except (OSError, RuntimeError, EOFError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"checkpoint file '{file}' cannot be read ({why}); resume from an earlier one"
        ) from e


# ---------------------------------------------------------------------------------------------------------------
# the final model in output_dir
# ---------------------------------------------------------------------------------------------------------------
def _final_manifest(output_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((output_dir / FINAL_JSON).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _safe_name(name: Any) -> bool:
    """A relative path inside the folder (a manifest never makes gkd touch anything outside it, or a checkpoint)."""
    if not isinstance(name, str) or not name or name.startswith(("/", "\\")):
        return False
    parts = Path(name).parts
    return ".." not in parts and not _CKPT.match(parts[0]) and parts[0] != FINAL_JSON


def final_model_files(output_dir: Path) -> list[str]:
    """The files of the final model in ``output_dir`` (relative names, from ``final_model.json``; [] without one)."""
    return [n for n in _final_manifest(output_dir).get("files", []) if _safe_name(n)]


def final_model_complete(output_dir: Path) -> bool:
    """Whether ``output_dir`` holds a completely written final model."""
    return bool(_final_manifest(output_dir).get("complete"))


def _write_manifest(output_dir: Path, data: dict[str, Any]) -> None:
    from gkd.io import atomic_write

    atomic_write(output_dir / FINAL_JSON, json.dumps(data, indent=2, default=str) + "\n")


def _remove_empty_parents(output_dir: Path, names: list[str]) -> None:
    """The sub-folders of the final model's files ``names`` that are now empty (deepest first; never output_dir)."""
    parents = {parent for n in names for parent in (output_dir / n).parents if output_dir in parent.parents}
    for path in sorted(parents, key=lambda p: -len(p.parts)):
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def save_final_model(
    output_dir: Path, *, model: Any, tokenizer: Any, merged: bool = False, info: dict[str, Any] | None = None
) -> Path:
    """Write ``model`` (``save_pretrained``: full weights, or a LoRA adapter; ``merged``: the adapter merged into
    plain weights) and ``tokenizer`` into ``output_dir`` itself, beside the checkpoints: what TRL's
    ``trainer.save_model(output_dir)`` writes, loadable with ``from_pretrained(output_dir)``.

    Safe against a kill: everything is written to a hidden temporary folder first; then ``final_model.json`` lists
    the old and new files with ``complete: false``, the previous final model's files that the new one does not have
    are removed, each new file is renamed into place (``os.replace``, atomic per file) and ``final_model.json`` is
    rewritten with ``complete: true`` last. Files a run did not list there are never removed.
    """
    from gkd.models import save_merged

    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = output_dir / f"{_FINAL_TMP}{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        if merged:
            save_merged(model, tokenizer, tmp)
        else:
            with quiet_progress_bars():
                model.save_pretrained(str(tmp), safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
        _fsync_tree(tmp)
        new = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        old = final_model_files(output_dir)
        _write_manifest(output_dir, {"complete": False, "files": sorted(set(old) | set(new))})
        gone = sorted(set(old) - set(new))
        for name in gone:
            (output_dir / name).unlink(missing_ok=True)
        _remove_empty_parents(output_dir, gone)
        for name in new:
            dest = output_dir / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.is_dir():  # a folder where a file goes (never one of ours): leave it, fail loudly
                raise CheckpointError(f"cannot write the final model: '{dest}' is a folder; remove it")
            os.replace(tmp / name, dest)
        _write_manifest(output_dir, {"complete": True, "files": new, **(info or {})})
        _fsync_dir(output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output_dir


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_model_weights(model: Any, folder: Path) -> None:
    """Load the weights a checkpoint folder holds into ``model`` in place (``load_best_model_at_end``): the LoRA
    adapter of a peft model, else every weight (read with ``from_pretrained``, so any layout transformers writes
    loads); dtypes and devices stay the model's. A sharded (FSDP) student: into its full copy, then into its shards
    (every rank calls it)."""
    from gkd.fsdp import is_sharded
    from gkd.models import load_model, unwrap

    sharded = model if is_sharded(model) else None
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):  # DDP / accelerate wrappers
        model = model.module
    try:
        if hasattr(model, "peft_config"):
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            state = load_file(str(folder / "adapter_model.safetensors"))
            result = set_peft_model_state_dict(model, state)
            unexpected = list(getattr(result, "unexpected_keys", None) or [])
            if unexpected:
                raise RuntimeError(f"unexpected adapter weights {unexpected[:3]}")
        else:
            loaded = load_model(str(folder), what="checkpoint", dtype="auto")
            with torch.no_grad():
                unwrap(model).load_state_dict(loaded.state_dict())
            del loaded
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(
            f"checkpoint '{folder}' cannot be loaded into the model ({str(e).splitlines()[0]})"
        ) from e
    if sharded is not None:
        sharded.load_full()
