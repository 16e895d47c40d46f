"""Small file helpers shared by every module that writes: atomic writes and content fingerprints.

A file gkd writes is either complete or absent: it is written to a temporary name beside its destination, flushed
to disk and renamed into place (``os.replace`` is atomic on POSIX), so a run killed mid-write never leaves a
truncated cache, data file or result that a later run would trust. (Whole checkpoint folders get the same treatment
in :mod:`gkd.checkpoint`.)
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = [
    "atomic_open",
    "atomic_write",
    "cannot_be_hub_id",
    "fingerprint",
    "missing_local_path",
    "write_jsonl",
]


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO[Any]]:
    """Open ``path`` for writing so that it appears only when the ``with`` block completes without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Write ``data`` (text or bytes) to ``path`` atomically."""
    with atomic_open(path, "wb" if isinstance(data, bytes) else "w") as fh:
        fh.write(data)


def write_jsonl(path: str | os.PathLike, records: Iterable[Any]) -> None:
    """One JSON value per line, atomically."""
    with atomic_open(path) as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")


def fingerprint(*parts: Any) -> str:
    """A short stable hash (16 hex digits of SHA-256) of JSON-serialisable ``parts`` (others through ``str``).

    Used to key caches by what they were computed from, so a changed input never reads a stale cache.
    """
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\x00")
    return h.hexdigest()[:16]


def cannot_be_hub_id(path: str) -> bool:
    """Whether ``path`` is not a valid hub repo id (``name`` or ``org/name``), so it can only be a local path."""
    # ./x, ../x, .x, /x, ~/x, a/b/c, a\\b: never hub ids (validate_repo_id would say so too; these need no import)
    if path.startswith((".", "/", "~")) or path.count("/") > 1 or os.sep in path.replace("/", ""):
        return True
    try:
        from huggingface_hub.utils import HFValidationError, validate_repo_id
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return False
    try:
        validate_repo_id(path)
    except HFValidationError:
        return True
    return False


def missing_local_path(path: str) -> bool:
    """True when ``path`` is evidently meant as a local path and does not exist, so looking it up on the hub
    would only waste time (retries without network) before failing.

    Evidently local: it cannot be a hub id (it starts with ``./``, ``../``, ``/``, ``~`` or ``.``, has more than one
    ``/``, or has characters a hub id cannot have), or its first component is a folder here (``runs/nope`` when
    ``runs/`` exists). URLs (``scheme://...``) are never local.
    """
    if "://" in path:
        return False
    if os.path.exists(os.path.expanduser(path)):
        return False
    first = path.split("/", 1)[0]
    return cannot_be_hub_id(path) or ("/" in path and bool(first) and os.path.isdir(first))


# What hub_offline_reason found for each hub endpoint (None: reachable), probed once per process; public so that a
# test that takes the network away can start from an empty one.
HUB_PROBES: dict[str, str | None] = {}


def hub_offline_reason(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be reached from here (None: it can): ``HF_HUB_OFFLINE`` /
    ``TRANSFORMERS_OFFLINE`` / ``HF_DATASETS_OFFLINE`` set, or one TCP connection to the hub's host (``HF_ENDPOINT``)
    failing within ``timeout`` seconds. Probed once per process, so a hub id without a network fails in seconds
    instead of after minutes of huggingface_hub's retries; loads then use the local hub cache only."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var} is set"
    from urllib.parse import urlparse

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if endpoint not in HUB_PROBES:
        import socket

        url = urlparse(endpoint)
        host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            HUB_PROBES[endpoint] = None
        except OSError as e:
            HUB_PROBES[endpoint] = f"the hub ({host}) cannot be reached ({e.strerror or type(e).__name__})"
    return HUB_PROBES[endpoint]


def hub_kwargs(path: str) -> dict[str, Any]:
    """``from_pretrained`` arguments for ``path``: ``local_files_only`` when it is not a local path and the hub
    cannot be reached (:func:`hub_offline_reason`), so that only the local hub cache is tried."""
    if os.path.exists(os.path.expanduser(path)) or hub_offline_reason() is None:
        return {}
    return {"local_files_only": True}


def quiet_libraries() -> None:
    """For a process that prints only gkd's own lines (the CLI, study workers): no per-load progress bars or
    advisory warnings from transformers, no tokenizers fork warnings."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


@contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """transformers' "Loading weights" / "Writing model shards" bars off for the duration (restored after), so a
    Python-API user sees gkd's lines only."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
