"""Reading records: a JSONL/JSON/CSV/Parquet file, a local folder (split files, a saved dataset) or a hub dataset.

:func:`load_records` gives the records as Python dicts (and how many bad lines were skipped); a bad line of a JSONL
file is an error naming the file and the line. A spec that is evidently a local path but does not exist fails at
once, never after minutes of hub retries. ``datasets`` is imported only for the sources that need it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any

from gkd.errors import DataError
from gkd.io import hub_offline_reason, missing_local_path

__all__ = ["load_records", "read_jsonl"]


def read_jsonl(path: Path, skip_bad_lines: bool = False) -> tuple[list[dict], int]:
    """Records of a JSONL file; a bad line is an error naming file and line, or skipped and counted."""
    records: list[dict] = []
    skipped = 0
    try:
        fh = path.open("rb")
    except OSError as e:
        raise DataError(f"cannot read dataset file '{path}': {e.strerror}") from e
    with fh:
        for lineno, raw in enumerate(fh, 1):
            if lineno == 1:
                raw = raw.removeprefix(
                    b"\xef\xbb\xbf"
                )  # a UTF-8 BOM (Windows tools write one): not part of the record
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}:{lineno}: not UTF-8 (byte 0x{raw[e.start]:02x}); re-save the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                if skip_bad_lines:
                    skipped += 1
                    continue
                raise DataError(
                    f"{path}:{lineno}: not valid JSON ({e.msg}); fix the line or set skip_bad_lines: true"
                ) from e
            if not isinstance(obj, dict):
                if skip_bad_lines:
                    skipped += 1
                    continue
                raise DataError(f"{path}:{lineno}: a record must be a JSON object, got {type(obj).__name__}")
            records.append(obj)
    return records, skipped


# The file-name keywords of each split, as ``datasets`` reads a folder of data files (``dev.jsonl`` is the validation
# split, ``eval-00.jsonl`` the test split).
_SPLIT_KEYWORDS = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "dev", "val"),
    "test": ("test", "testing", "eval", "evaluation"),
}
_SPLIT_OF_KEYWORD = {kw: name for name, kws in _SPLIT_KEYWORDS.items() for kw in kws}


def _file_split(f: Path) -> str | None:
    """The split a data file's name says it holds (``train-00.jsonl``, ``my_dev.jsonl``), or None (``data.jsonl``)."""
    for word in re.split(r"[-._ 0-9]+", f.stem.lower()):
        if word in _SPLIT_OF_KEYWORD:
            return _SPLIT_OF_KEYWORD[word]
    return None


def _split_files(folder: Path, split: str, split_key: str) -> list[Path]:
    """The JSONL files of ``split`` in ``folder`` (or its ``data/`` subfolder, the hub's layout): those whose name
    starts with the split's name or says it is that split (``dev.jsonl`` for ``validation``, as ``datasets`` reads
    folders). Files that name no split serve every split, but a folder never gives another split's file."""
    files = sorted(folder.glob("*.jsonl")) or sorted(folder.glob("data/*.jsonl"))
    if not files:
        return []
    wanted = _SPLIT_OF_KEYWORD.get(split.lower(), split.lower())
    mine = [f for f in files if f.name.startswith(split) or _file_split(f) == wanted]
    if mine:
        return mine
    named = {f: _file_split(f) for f in files if _file_split(f) is not None}
    if named:
        rest = [f.name for f in files if f not in named]
        unnamed = (
            f", and {len(rest)} file(s) that name no split ({', '.join(rest[:3])}{', ...' if len(rest) > 3 else ''}), "
            "which a folder with split-named files does not use"
            if rest
            else ""
        )
        raise DataError(
            f"dataset folder '{folder}' has no '{split}*.jsonl' file (it has "
            f"{', '.join(sorted(f.name for f in named))}{unnamed}); add one, rename the files, or set {split_key} "
            f"to one of {', '.join(sorted(set(named.values())))}"
        )
    return files


def load_records(
    spec: str,
    split: str = "train",
    config_name: str | None = None,
    skip_bad_lines: bool = False,
    split_key: str = "split",
) -> tuple[list[dict], int]:
    """Records from a JSONL/JSON file, a local folder or a ``datasets`` hub name. Returns (records, skipped lines).

    ``split_key`` is the setting that chose ``split`` (``dataset_split``, ``eval_split``, ``--split``), named in the
    error when a folder has no file for it.

    A spec that is evidently a local path (``./x``, ``a/b/c``, ``runs/x`` when ``runs/`` exists, ``x.jsonl``) but
    does not exist is a ``DataError`` at once; only names that can be hub datasets are looked up on the hub.
    """
    path = Path(os.path.expanduser(spec))
    if path.is_file():
        suffix = path.suffix.lower()  # data.JSONL is a JSONL file
        if suffix in (".jsonl", ".ndjson") or (suffix == ".json" and _is_json_lines(path)):
            return read_jsonl(path, skip_bad_lines)
        if suffix in _BUILDERS:
            return _load_with_datasets(_BUILDERS[suffix], path, split), 0
        # any other local file (data.txt, no suffix): JSONL if it looks like it, never a hub builder's name
        if _is_json_lines(path):
            return read_jsonl(path, skip_bad_lines)
        raise DataError(
            f"dataset '{spec}' is a {suffix or 'suffix-less'} file that is not JSON lines; gkd reads JSONL (one JSON "
            "object a line), JSON, CSV and Parquet files: convert it to one of them"
        )
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            return _load_from_disk(path, split), 0
        jsonl = _split_files(path, split, split_key)
        if jsonl:
            records: list[dict] = []
            skipped = 0
            for f in jsonl:
                r, s = read_jsonl(f, skip_bad_lines)
                records += r
                skipped += s
            return records, skipped
        if (path / "config.json").is_file() and (any(path.glob("*.safetensors")) or any(path.glob("*.bin"))):
            raise DataError(
                f"dataset '{spec}' is a model folder (config.json and weights), not data; set dataset to a JSONL "
                "file, a data folder or a datasets hub name"
            )
        return _load_with_datasets(None, path, split, config_name, split_key), 0
    if _missing_local(spec):
        raise DataError(f"dataset '{spec}' does not exist; check the path (looked for {path.absolute()})")
    return _load_with_datasets(spec, None, split, config_name, split_key), 0


def _missing_local(spec: str) -> bool:
    """A spec that does not exist and is evidently a local path (a data file name, or a path that cannot be a hub
    name or whose first folder exists here): failing at once beats minutes of hub retries."""
    return spec.lower().endswith((".jsonl", ".ndjson", *_BUILDERS)) or missing_local_path(spec)


# local data files that ``datasets`` reads with a builder of that name (by suffix, any case)
_BUILDERS = {".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}


def _is_json_lines(path: Path) -> bool:
    """Does the file start (after a BOM and blank space) with a JSON object?"""
    with path.open("rb") as fh:
        head = fh.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()
    return head[:1] == b"{"


@contextlib.contextmanager
def _quiet_datasets():
    """No "Generating train split" / "Loading dataset" progress bars from datasets: gkd reports what it read."""
    import datasets

    was_enabled = datasets.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield datasets
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _load_from_disk(path: Path, split: str) -> list[dict]:
    with _quiet_datasets() as datasets:
        ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"dataset '{path}' has no split '{split}'; available: {', '.join(ds)}")
        ds = ds[split]
    return list(ds)


def _load_with_datasets(
    builder: str | None,
    path: Path | None,
    split: str,
    config_name: str | None = None,
    split_key: str = "split",
) -> list[dict]:
    offline = hub_offline_reason() if path is None else None  # a hub name: no network, the local cache only
    try:
        with _quiet_datasets() as datasets, _hub_offline(offline is not None):
            ds = _load_dataset(datasets, builder, path, split, config_name)
    except Exception as e:  # datasets raises many types; all mean "cannot load this"
        if offline is not None:
            raise DataError(
                f"dataset '{builder}' is not a local path nor in the local datasets cache, and {offline}; download "
                "it where there is a network, or give a local file or folder"
            ) from e
        raise _datasets_error(e, builder or path, split, split_key) from e
    return list(ds)


@contextlib.contextmanager
def _hub_offline(offline: bool):
    """``datasets`` and huggingface_hub in offline mode for one load (their flags are read at import)."""
    if not offline:
        yield
        return
    import datasets.config
    import huggingface_hub.constants as hub

    saved = datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE = saved


def _datasets_error(e: Exception, name: Any, split: str, split_key: str) -> DataError:
    """A one-line ``DataError`` for what ``datasets`` raised loading ``name`` (a missing split names the setting)."""
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    found = re.match(r"Unknown split \"(.*)\"\. Should be one of \[(.*)\]", first)
    if found:  # name the setting that chose the split, and the splits there are
        have = ", ".join(x.strip().strip("'\"") for x in found.group(2).split(","))
        return DataError(
            f"dataset '{name}' has no split '{split}' (it has {have}); set {split_key} to one of them"
        )
    return DataError(f"dataset '{name}' could not be loaded: {first}")


def _load_dataset(
    datasets: Any, builder: str | None, path: Path | None, split: str, config_name: str | None
) -> Any:
    if builder is not None and path is not None and path.is_file():
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    if path is not None:
        return datasets.load_dataset(str(path), config_name, split=split)
    assert builder is not None
    return datasets.load_dataset(builder, config_name, split=split)
