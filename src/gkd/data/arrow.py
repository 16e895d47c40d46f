"""Data at scale: ``datasets.map`` (cached, ``num_proc``), one shard per process, streams.

:func:`open_dataset` opens the same sources as :func:`gkd.data.load_records` as a ``datasets.Dataset`` (Arrow,
memory-mapped) or an ``IterableDataset``; :func:`tokenize_dataset` tokenises it with ``map`` into an
:class:`ArrowTokenizedDataset` (read back from the cache by the next run), each process its own shard;
:class:`StreamingDataset` holds a stream of prompts tokenised as they are drawn. :func:`load_with_datasets` is the
training data's way through all this. ``datasets`` and ``pyarrow`` are imported only here, only when used.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from gkd.data.records import _datasets_error, _missing_local, _quiet_datasets, _split_files
from gkd.data.tokenize import (
    Example,
    TeacherPrompt,
    TokenizedDataset,
    _all_truncated_error,
    _tokenize_rows,
    check_apply_chat_template,
)
from gkd.errors import ConfigError, DataError
from gkd.io import fingerprint

__all__ = [
    "COMPLETION_IDS",
    "PROMPT_IDS",
    "ArrowExamples",
    "ArrowTokenizedDataset",
    "StreamingDataset",
    "check_streaming",
    "load_with_datasets",
    "main_process_first",
    "map_tokenize",
    "open_dataset",
    "process_position",
    "read_with_datasets",
    "tokenize_dataset",
    "tokenizer_fingerprint",
]

PROMPT_IDS = "_gkd_prompt_ids"
COMPLETION_IDS = "_gkd_completion_ids"
_TRUNC_PROMPT = "_gkd_prompt_truncated"
_TRUNC_COMPLETION = "_gkd_completion_truncated"
_PROMPT_TOKENS = "_gkd_prompt_tokens"
_TEACHER_PROMPT_IDS = "_gkd_teacher_prompt_ids"  # written only with a teacher_prompt setting
_GKD_COLUMNS = (
    PROMPT_IDS,
    COMPLETION_IDS,
    _TRUNC_PROMPT,
    _TRUNC_COMPLETION,
    _PROMPT_TOKENS,
    _TEACHER_PROMPT_IDS,
)
_MAP_VERSION = 1  # bump when _tokenize_rows changes what it writes: old datasets caches are then not read


def process_position() -> tuple[int, int]:
    """(rank, world) of this process in torch.distributed (accelerate initialises it), (0, 1) without it."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


@contextlib.contextmanager
def main_process_first(rank: int, world: int):
    """The main process runs the block first (it writes the ``datasets`` caches), the others after it (they read
    them): ranks never race on a cache file."""
    barrier = world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
    if barrier and rank != 0:
        torch.distributed.barrier()
    yield
    if barrier and rank == 0:
        torch.distributed.barrier()


def open_dataset(
    spec: str,
    split: str = "train",
    config_name: str | None = None,
    split_key: str = "split",
    streaming: bool = False,
) -> Any:
    """``spec`` as a ``datasets.Dataset`` (Arrow, memory-mapped, converted once and cached by ``datasets``) or, with
    ``streaming``, an ``IterableDataset``: the same sources as :func:`load_records` (a JSONL/JSON/parquet/CSV file,
    a folder of data files with the same split rules, a saved dataset, a hub name), never a list of dicts."""
    path = Path(os.path.expanduser(spec))
    if not path.exists() and _missing_local(spec):
        raise DataError(f"dataset '{spec}' does not exist; check the path (looked for {path.absolute()})")
    try:
        with _quiet_datasets() as datasets:
            if path.is_file():
                builder = (
                    "json"
                    if path.suffix.lower() in (".jsonl", ".ndjson", ".json")
                    else path.suffix.lower().lstrip(".")
                )
                return datasets.load_dataset(
                    builder, data_files=str(path), split="train", streaming=streaming
                )
            if path.is_dir():
                if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
                    ds = datasets.load_from_disk(str(path))
                    if isinstance(ds, datasets.DatasetDict):
                        if split not in ds:
                            raise DataError(
                                f"dataset '{path}' has no split '{split}'; available: {', '.join(ds)}"
                            )
                        ds = ds[split]
                    return ds.to_iterable_dataset() if streaming else ds
                jsonl = _split_files(path, split, split_key)
                if jsonl:
                    files = [str(f) for f in jsonl]
                    return datasets.load_dataset("json", data_files=files, split="train", streaming=streaming)
                return datasets.load_dataset(str(path), config_name, split=split, streaming=streaming)
            return datasets.load_dataset(spec, config_name, split=split, streaming=streaming)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types; all mean "cannot load this"
        err = _datasets_error(e, spec, split, split_key)
        if path.is_file() or path.is_dir():
            err = DataError(
                f"{err}; a JSONL file with bad lines reads line by line with skip_bad_lines: true"
            )
        raise err from e


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A stable key of what a tokenizer does to text (vocabulary, merges, normalisation, template, special ids)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())
    return fingerprint(
        type(tokenizer).__name__,
        body,
        getattr(tokenizer, "chat_template", None),
        tokenizer.eos_token_id,
        tokenizer.bos_token_id,
        list(getattr(tokenizer, "all_special_tokens", [])),
    )


def map_tokenize(
    batch: dict[str, list],
    indices: list[int],
    *,
    tokenizer: Any,
    adapter: str | None,
    adapt: Callable[[list[dict], str], list[dict]] | None,
    offset: int,
    stride: int,
    **settings: Any,
) -> dict[str, list]:
    """``datasets.map(batched=True)`` function: the gkd columns of a batch of rows (and, with an adapter, the
    adapted record fields in place of the original ones). Record ``i`` of the shard is row ``offset + stride*i``
    of the dataset, the index errors name."""
    keys = list(batch)
    n = len(batch[keys[0]]) if keys else len(indices)
    records = [{k: batch[k][i] for k in keys} for i in range(n)]
    rows_index = [offset + stride * i for i in indices]
    out: dict[str, list] = {}
    if adapter is not None:
        assert adapt is not None, (
            "an adapter name comes with its function (gkd.tasks.adapters, given by gkd.build)"
        )
        records = adapt(records, settings["source"])
        names = sorted({k for r in records for k in r})
        out = {k: [r.get(k) for r in records] for k in names}
    rows = _tokenize_rows(records, tokenizer, indices=rows_index, **settings)
    names = _GKD_COLUMNS if settings.get("teacher_prompt") is not None else _GKD_COLUMNS[:-1]
    for name, col in zip(names, zip(*rows) if rows else [()] * len(_GKD_COLUMNS)):
        out[name] = list(col)
    return out


class ArrowExamples(Sequence):
    """The :class:`Example` s of a tokenised ``datasets.Dataset``, read from Arrow when asked for: nothing is held
    as Python objects (a row's ``record`` is its other columns, as ``list(dataset)`` gives them)."""

    def __init__(self, ds: Any) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    @staticmethod
    def _example(row: dict) -> Example:
        record = {k: v for k, v in row.items() if k not in _GKD_COLUMNS}
        return Example(
            list(row[PROMPT_IDS]), _ids(row[COMPLETION_IDS]), record, _ids(row.get(_TEACHER_PROMPT_IDS))
        )

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"example {i} of {n}")
        return self._example(self.ds[int(i)])

    def __iter__(self) -> Iterator[Example]:
        for chunk in self.ds.iter(batch_size=1024):
            keys = list(chunk)
            for i in range(len(chunk[PROMPT_IDS])):
                yield self._example({k: chunk[k][i] for k in keys})


def _ids(value: Any) -> list[int] | None:
    return None if value is None else list(value)


class ArrowTokenizedDataset(TokenizedDataset):
    """A :class:`TokenizedDataset` over a ``datasets.Dataset`` tokenised by ``map`` (cached, ``num_proc``).

    ``shard`` is ``(rank, world)`` when this process holds only its shard (rows ``rank, rank + world, ...``): then
    ``len()`` is the whole dataset's size (the run's plan counts every process's prompts) and ``examples`` are the
    shard's; :class:`BatchStream` draws from the shard."""

    def __init__(
        self,
        ds: Any,
        *,
        total: int,
        shard: tuple[int, int] | None = None,
        truncated_prompts: int = 0,
        truncated_completions: int = 0,
    ) -> None:
        super().__init__(ArrowExamples(ds), truncated_prompts, truncated_completions)  # type: ignore[arg-type]
        self.ds = ds
        self.total = total
        self.shard = shard

    def __len__(self) -> int:
        return self.total

    @property
    def has_targets(self) -> bool:
        return self.ds.data.column(COMPLETION_IDS).null_count == 0


def tokenize_dataset(
    ds: Any,
    tokenizer: Any,
    *,
    max_prompt_length: int,
    max_completion_length: int,
    source: str = "dataset",
    seq2seq: bool = False,
    apply_chat_template: bool = False,
    teacher_prompt: TeacherPrompt | None = None,
    adapter: str | None = None,
    adapt: Callable[[list[dict], str], list[dict]] | None = None,
    num_proc: int | None = None,
    rank: int = 0,
    world: int = 1,
    shard: bool = True,
) -> ArrowTokenizedDataset:
    """Tokenise a ``datasets.Dataset`` with ``map(batched=True, num_proc=...)``: the same ids as
    :func:`tokenize_records` over ``list(ds)``, written next to the dataset's Arrow files and keyed by the dataset,
    the tokenizer and the settings, so the next run reads them back instead of tokenising again.

    With ``world > 1`` and ``shard``, this process tokenises and keeps only its shard (rows ``rank::world``); without
    ``shard`` every process holds the whole dataset and the main process tokenises it first (the others read its
    cache)."""
    if len(ds) == 0:
        raise DataError(f"{source} is empty; it needs at least one record")
    if apply_chat_template:
        check_apply_chat_template(tokenizer)
    total = len(ds)
    sharded = shard and world > 1
    if sharded:
        if total < world:
            raise DataError(f"{source} has {total} records, fewer than the {world} processes; add records")
        ds = ds.shard(num_shards=world, index=rank, contiguous=False)
    settings = {
        "max_prompt_length": max_prompt_length,
        "max_completion_length": max_completion_length,
        "source": source,
        "seq2seq": seq2seq,
        "apply_chat_template": apply_chat_template,
    }
    if teacher_prompt is not None:  # (absent otherwise: the cache key of a run without one is unchanged)
        settings["teacher_prompt"] = teacher_prompt
    offset, stride = (rank, world) if sharded else (0, 1)
    key = fingerprint(
        _MAP_VERSION, ds._fingerprint, tokenizer_fingerprint(tokenizer), settings, adapter, offset, stride
    )
    columns = [c for c in ds.column_names if c in _GKD_COLUMNS or adapter is not None]
    with contextlib.nullcontext() if sharded else main_process_first(rank, world), _quiet_datasets():
        out = ds.map(
            map_tokenize,
            batched=True,
            batch_size=1000,
            with_indices=True,
            num_proc=num_proc if num_proc and num_proc > 1 and len(ds) >= num_proc else None,
            remove_columns=columns or None,
            fn_kwargs={
                "tokenizer": tokenizer,
                "adapter": adapter,
                "adapt": adapt,
                "offset": offset,
                "stride": stride,
                **settings,
            },
            new_fingerprint=key,
            desc=None,
        )
    import pyarrow.compute as pc

    table = out.data
    trunc_p = int(pc.sum(table.column(_TRUNC_PROMPT)).as_py() or 0)
    trunc_c = int(pc.sum(table.column(_TRUNC_COMPLETION)).as_py() or 0)
    if trunc_p == len(out):
        raise _all_truncated_error(
            source, max_prompt_length, int(pc.max(table.column(_PROMPT_TOKENS)).as_py())
        )
    return ArrowTokenizedDataset(
        out,
        total=total,
        shard=(rank, world) if sharded else None,
        truncated_prompts=trunc_p,
        truncated_completions=trunc_c,
    )


class StreamingDataset(TokenizedDataset):
    """Prompts read as a ``datasets`` stream (``dataset_streaming: true``), tokenised as they are drawn: for
    on-policy runs, which use only the prompts. Nothing is indexed: ``examples`` is empty and ``len()`` is 0 (the
    run's length is ``max_steps``); :class:`PromptStream` draws the batches."""

    def __init__(
        self,
        stream: Any,
        tokenizer: Any,
        *,
        max_prompt_length: int,
        max_completion_length: int,
        source: str = "dataset",
        seq2seq: bool = False,
        apply_chat_template: bool = False,
        teacher_prompt: TeacherPrompt | None = None,
        adapter: str | None = None,
        adapt: Callable[[list[dict], str], list[dict]] | None = None,
    ) -> None:
        super().__init__([])
        self.stream = stream
        self.tokenizer = tokenizer
        self.adapter = adapter
        self.adapt = adapt
        self.settings = {
            "max_prompt_length": max_prompt_length,
            "max_completion_length": max_completion_length,
            "source": source,
            "seq2seq": seq2seq,
            "apply_chat_template": apply_chat_template,
        }
        if teacher_prompt is not None:
            self.settings["teacher_prompt"] = teacher_prompt

    @property
    def has_targets(self) -> bool:
        return False


def _stream_examples(data: StreamingDataset, seed: int, epoch: int, skip: int, rank: int, world: int):
    """The examples of this process's part of the stream in epoch ``epoch`` (a seeded buffer shuffle), after the
    first ``skip`` (skipped before they are tokenised)."""
    from datasets.distributed import split_dataset_by_node

    ds = data.stream
    if world > 1:
        ds = split_dataset_by_node(ds, rank=rank, world_size=world)
    ds = ds.shuffle(seed=seed * 1_000_003 + epoch, buffer_size=1000)
    if skip:
        ds = ds.skip(skip)
    offset, stride = (rank, world) if world > 1 else (0, 1)
    ds = ds.map(
        map_tokenize,
        batched=True,
        batch_size=64,
        with_indices=True,
        remove_columns=list(ds.column_names or []) if data.adapter is not None and ds.column_names else None,
        fn_kwargs={
            "tokenizer": data.tokenizer,
            "adapter": data.adapter,
            "adapt": data.adapt,
            "offset": offset,
            "stride": stride,
            **data.settings,
        },
    )
    for row in ds:
        yield ArrowExamples._example(row)


def read_with_datasets(cfg: Any, spec: str, world: int) -> bool:
    """Is the training data read and tokenised through ``datasets`` (Arrow, ``map``, one shard per process)?

    With ``dataset_streaming``, ``dataset_num_proc`` or several processes, yes; else the records are read into
    Python and tokenised in one call (as for records given from Python). A JSONL source with ``skip_bad_lines`` is
    always read line by line (``datasets``' JSON reader stops at a bad line)."""
    if not (cfg.dataset_streaming or cfg.dataset_num_proc is not None or world > 1):
        return False
    if cfg.skip_bad_lines and not cfg.dataset_streaming:
        path = Path(os.path.expanduser(spec))
        return not (
            path.suffix.lower() in (".jsonl", ".ndjson", ".json") or (path.is_dir() and not path.suffix)
        )
    return True


def check_streaming(cfg: Any) -> None:
    """``dataset_streaming`` serves on-policy runs: prompts drawn in order, nothing indexed (one-line errors)."""
    if cfg.off_policy_possible:
        raise ConfigError(
            "config key 'dataset_streaming: true' streams prompts for on-policy steps, but lmbda < 1 (or a linear "
            "lmbda schedule from below 1) draws off-policy batches from the indexed dataset; set lmbda: 1 or "
            "dataset_streaming: false"
        )
    if cfg.seq_kd or cfg.teacher_cache == "topk":
        key = "seq_kd: true" if cfg.seq_kd else "teacher_cache: topk"
        raise ConfigError(
            f"config key 'dataset_streaming: true' cannot be used with {key}, which needs every example up front; "
            "set dataset_streaming: false"
        )
    if cfg.max_steps is None or cfg.max_steps <= 0:
        raise ConfigError(
            "config key 'dataset_streaming: true' needs max_steps > 0 (a stream has no length, so "
            "num_train_epochs cannot set the run's length)"
        )


def load_with_datasets(
    cfg: Any,
    spec: str,
    split: str,
    config_name: str | None,
    split_key: str,
    tokenizer: Any,
    seq2seq: bool,
    log: Any = print,
    adapt: Callable[[list[dict], str], list[dict]] | None = None,
    teacher_prompt: TeacherPrompt | None = None,
) -> TokenizedDataset:
    """The training data (config key ``dataset``) through ``datasets``: streamed (:class:`gkd.data.StreamingDataset`), or tokenised with
    ``map`` (cached, ``dataset_num_proc``), each process its own shard unless the teacher's SeqKD targets or
    top-k cache need every example on every process."""
    rank, world = process_position()
    source = f"dataset '{spec}'"
    settings = {
        "max_prompt_length": cfg.max_prompt_length,
        "max_completion_length": cfg.effective_max_completion_length,
        "source": source,
        "seq2seq": seq2seq,
        "apply_chat_template": cfg.apply_chat_template,
        "teacher_prompt": teacher_prompt,
    }
    if cfg.dataset_streaming:
        check_streaming(cfg)
        if cfg.apply_chat_template:
            check_apply_chat_template(tokenizer)
        stream = open_dataset(spec, split, config_name, split_key, streaming=True)
        return StreamingDataset(stream, tokenizer, adapter=cfg.dataset_adapter, adapt=adapt, **settings)
    with main_process_first(rank, world):  # datasets converts the files to Arrow once, on the main process
        ds = open_dataset(spec, split, config_name, split_key)
    shard = not (cfg.teacher_cache == "topk" or (cfg.seq_kd and cfg.off_policy_possible))
    data = tokenize_dataset(
        ds,
        tokenizer,
        adapter=cfg.dataset_adapter,
        adapt=adapt,
        num_proc=cfg.dataset_num_proc,
        rank=rank,
        world=world,
        shard=shard,
        **settings,
    )
    held = "this process's shard" if data.shard is not None else "the dataset"
    if data.truncated_prompts:
        log(
            f"warning: {source}: {data.truncated_prompts} of {len(data.examples)} prompts of {held} were longer "
            f"than max_prompt_length={cfg.max_prompt_length} and were truncated from the left"
        )
    if data.truncated_completions:
        log(
            f"warning: {source}: {data.truncated_completions} completions of {held} were longer than "
            f"{cfg.effective_max_completion_length} tokens and were truncated"
        )
    return data
