"""Datasets: reading records, turning them into token ids, and batching them.

Records use TRL's formats:
- ``{"prompt": str, "completion": str}`` (the completion is the target);
- ``{"messages": [{"role": ..., "content": ...}, ...]}``: the chat template renders everything before the last
  assistant turn as the prompt, and that last turn is the target;
- ``{"prompt": str}`` alone (or ``messages`` ending with a user turn) is a prompt-only record, usable when every
  batch is the student's own samples (λ = 1) or the teacher writes the targets (SeqKD).
Extra fields (e.g. ``references``) are kept for metrics and rewards.

Loss and metrics only ever see completion tokens. Prompts longer than ``max_prompt_length`` are truncated from the
left and counted, never silently dropped.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gkd.errors import DataError

__all__ = ["Batch", "Example", "TokenizedDataset", "collate", "load_records", "tokenize_records"]


# ---------------------------------------------------------------------------------------------------------------
# reading records
# ---------------------------------------------------------------------------------------------------------------
def read_jsonl(path: Path, skip_bad_lines: bool = False) -> tuple[list[dict], int]:
    """Records of a JSONL file; a bad line is an error naming file and line, or skipped and counted."""
    records: list[dict] = []
    skipped = 0
    try:
        fh = path.open(encoding="utf-8")
    except OSError as e:
        raise DataError(f"cannot read dataset file '{path}': {e.strerror}") from e
    with fh:
        for lineno, line in enumerate(fh, 1):
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


_SPLIT_NAMES = {"train", "training", "validation", "valid", "val", "dev", "test", "eval", "evaluation"}


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
        if path.suffix in (".jsonl", ".ndjson") or (path.suffix == ".json" and _is_json_lines(path)):
            return read_jsonl(path, skip_bad_lines)
        return _load_with_datasets(
            "json" if path.suffix == ".json" else path.suffix.lstrip("."), path, split
        ), 0
    if path.is_dir():
        jsonl = sorted(path.glob(f"{split}*.jsonl"))
        if not jsonl:  # unnamed files serve every split, but never another split's file
            named = [f for f in path.glob("*.jsonl") if f.stem.split("-")[0].split(".")[0] in _SPLIT_NAMES]
            if named:
                raise DataError(
                    f"dataset folder '{path}' has no '{split}*.jsonl' file (it has "
                    f"{', '.join(sorted(f.name for f in named))}); add one or set {split_key} to one of "
                    f"{', '.join(sorted({f.stem.split('-')[0].split('.')[0] for f in named}))}"
                )
            jsonl = sorted(path.glob("*.jsonl"))
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            return _load_from_disk(path, split), 0
        if jsonl:
            records: list[dict] = []
            skipped = 0
            for f in jsonl:
                r, s = read_jsonl(f, skip_bad_lines)
                records += r
                skipped += s
            return records, skipped
        return _load_with_datasets(None, path, split, config_name), 0
    if _missing_local(spec):
        raise DataError(f"dataset '{spec}' does not exist; check the path (looked for {path.absolute()})")
    return _load_with_datasets(spec, None, split, config_name), 0


def _missing_local(spec: str) -> bool:
    """A spec that does not exist and is evidently a local path (a data file name, or a path that cannot be a hub
    name or whose first folder exists here): failing at once beats minutes of hub retries."""
    from gkd.io import missing_local_path

    return spec.endswith((".jsonl", ".json", ".parquet", ".csv")) or missing_local_path(spec)


def _is_json_lines(path: Path) -> bool:
    with path.open(encoding="utf-8") as fh:
        head = fh.read(1).strip()
    return head == "{"


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
    builder: str | None, path: Path | None, split: str, config_name: str | None = None
) -> list[dict]:
    try:
        with _quiet_datasets() as datasets:
            ds = _load_dataset(datasets, builder, path, split, config_name)
    except Exception as e:  # datasets raises many types; all mean "cannot load this"
        raise DataError(f"dataset '{builder or path}' could not be loaded: {str(e).splitlines()[0]}") from e
    return list(ds)


def _load_dataset(
    datasets: Any, builder: str | None, path: Path | None, split: str, config_name: str | None
) -> Any:
    if builder is not None and path is not None and path.is_file():
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    if path is not None:
        return datasets.load_dataset(str(path), config_name, split=split)
    assert builder is not None
    return datasets.load_dataset(builder, config_name, split=split)


# ---------------------------------------------------------------------------------------------------------------
# records -> token ids
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Example:
    """One tokenized record. ``completion`` is None for prompt-only records."""

    prompt: list[int]
    completion: list[int] | None
    record: dict[str, Any] = field(repr=False)


@dataclass
class TokenizedDataset:
    examples: list[Example]
    truncated_prompts: int = 0
    truncated_completions: int = 0
    skipped_lines: int = 0

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def has_targets(self) -> bool:
        return all(e.completion is not None for e in self.examples)


def split_record(record: dict, tokenizer: Any, index: int, source: str) -> tuple[str, str | None, bool]:
    """(prompt text, completion text or None, prompt already holds special tokens?) of one record."""
    if "messages" in record:
        msgs = record["messages"]
        _check_messages(msgs, "messages", index, source)
        _check_chat_template(tokenizer, source)
        if msgs[-1].get("role") == "assistant":
            prompt = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
            return prompt, str(msgs[-1].get("content", "")), True
        prompt = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return prompt, None, True
    if "prompt" not in record:
        keys = ", ".join(sorted(record)) or "none"
        raise DataError(
            f"{source} record {index} has no 'prompt' field (keys: {keys}); records need prompt[/completion] "
            "or messages"
        )
    prompt = record["prompt"]
    completion = record.get("completion")
    if isinstance(prompt, list):  # TRL's conversational prompt-completion: lists of {role, content}
        return _conversational(prompt, completion, tokenizer, index, source)
    if not isinstance(prompt, str):
        raise DataError(
            f"{source} record {index}: 'prompt' must be a string or a list of {{role, content}} messages, "
            f"got {type(prompt).__name__}"
        )
    if completion is not None and not isinstance(completion, str):
        raise DataError(
            f"{source} record {index}: 'completion' must be a string, got {type(completion).__name__}"
        )
    return prompt, completion, False


def _conversational(
    prompt: list, completion: Any, tokenizer: Any, index: int, source: str
) -> tuple[str, str | None, bool]:
    """TRL's conversational format: the prompt messages go through the chat template (with the generation prompt),
    the completion messages' contents are the target."""
    _check_messages(prompt, "prompt", index, source)
    _check_chat_template(tokenizer, source)
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    if completion is None:
        return text, None, True
    if isinstance(completion, str):
        return text, completion, True
    _check_messages(completion, "completion", index, source)
    return text, "".join(str(m.get("content", "")) for m in completion), True


def _check_messages(msgs: Any, key: str, index: int, source: str) -> None:
    if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) and "role" in m for m in msgs):
        raise DataError(
            f"{source} record {index}: '{key}' must be a non-empty list of {{role, content}} messages"
        )


def _check_chat_template(tokenizer: Any, source: str) -> None:
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(
            f"{source} has chat messages but the tokenizer has no chat template; use prompt/completion text "
            "records or a tokenizer with a chat_template"
        )


def _batch_tokenize(tokenizer: Any, texts: list[str], special: list[bool]) -> list[list[int]]:
    """Token ids of ``texts`` (one batched call per special-token setting; fast tokenizers batch in Rust)."""
    out: list[list[int]] = [[] for _ in texts]
    for flag in (True, False):
        idx = [i for i, f in enumerate(special) if f == flag]
        if idx:
            ids = tokenizer([texts[i] for i in idx], add_special_tokens=flag)["input_ids"]
            for i, row in zip(idx, ids):
                out[i] = list(row)
    return out


def tokenize_records(
    records: list[dict],
    tokenizer: Any,
    *,
    max_prompt_length: int,
    max_completion_length: int,
    source: str = "dataset",
    seq2seq: bool = False,
) -> TokenizedDataset:
    """Tokenize prompt and completion separately; completions end with EOS (appended if missing)."""
    if not records:
        raise DataError(f"{source} is empty; it needs at least one record")
    eos = tokenizer.eos_token_id
    parts = [split_record(rec, tokenizer, i, source) for i, rec in enumerate(records)]
    prompt_ids = _batch_tokenize(tokenizer, [p for p, _, _ in parts], [not t for _, _, t in parts])
    completions = [c for _, c, _ in parts if c is not None]
    completion_ids = iter(_batch_tokenize(tokenizer, completions, [False] * len(completions)))
    examples: list[Example] = []
    trunc_p = trunc_c = 0
    for rec, (_, completion, _), p_ids in zip(records, parts, prompt_ids):
        if seq2seq and (not p_ids or p_ids[-1] != eos):
            p_ids = [*p_ids, eos]  # T5-style encoders expect an EOS at the end of the input
        if len(p_ids) > max_prompt_length:
            p_ids = p_ids[-max_prompt_length:]
            trunc_p += 1
        if not p_ids:
            p_ids = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos]
        c_ids = None
        if completion is not None:
            c_ids = next(completion_ids)
            if not c_ids or c_ids[-1] != eos:
                c_ids = [*c_ids, eos]
            if len(c_ids) > max_completion_length:
                c_ids = c_ids[:max_completion_length]
                trunc_c += 1
        examples.append(Example(p_ids, c_ids, rec))
    if trunc_p == len(records):
        longest = max(len(p) for p in prompt_ids)
        raise DataError(
            f"every prompt of {source} is longer than max_prompt_length={max_prompt_length} (e.g. {longest} "
            "tokens); raise max_prompt_length"
        )
    return TokenizedDataset(examples, trunc_p, trunc_c)


# ---------------------------------------------------------------------------------------------------------------
# batching
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Batch:
    """Left-padded prompts and right-padded completions. Valid completion tokens include the EOS."""

    prompt_ids: torch.Tensor  # [B, P]
    prompt_mask: torch.Tensor  # [B, P] bool
    completion_ids: torch.Tensor  # [B, C]
    completion_mask: torch.Tensor  # [B, C] bool
    records: list[dict]
    on_policy: bool = False
    indices: list[int] | None = None  # positions of the examples in their dataset (for per-example caches)

    @property
    def size(self) -> int:
        return self.prompt_ids.shape[0]

    def num_tokens(self) -> int:
        return int(self.completion_mask.sum())

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            self.prompt_ids.to(device),
            self.prompt_mask.to(device),
            self.completion_ids.to(device),
            self.completion_mask.to(device),
            self.records,
            self.on_policy,
            self.indices,
        )

    def repeat(self, n: int) -> Batch:
        """Each row repeated ``n`` times in place (for several samples per prompt)."""
        if n == 1:
            return self
        return Batch(
            self.prompt_ids.repeat_interleave(n, 0),
            self.prompt_mask.repeat_interleave(n, 0),
            self.completion_ids.repeat_interleave(n, 0),
            self.completion_mask.repeat_interleave(n, 0),
            [r for r in self.records for _ in range(n)],
            self.on_policy,
            None if self.indices is None else [i for i in self.indices for _ in range(n)],
        )


def pad_left(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s) :] = True
    return ids, mask


def pad_right(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, s in enumerate(seqs):
        if s:
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = True
    return ids, mask


def collate(examples: list[Example], pad_id: int, indices: list[int] | None = None) -> Batch:
    p_ids, p_mask = pad_left([e.prompt for e in examples], pad_id)
    c_ids, c_mask = pad_right([e.completion or [] for e in examples], pad_id)
    return Batch(p_ids, p_mask, c_ids, c_mask, [e.record for e in examples], indices=indices)


class BatchStream:
    """An endless, seeded, resumable stream of batches: a fresh permutation of the data every epoch.

    With several processes each rank takes its own slice of every global batch, so ranks see different data.
    """

    def __init__(
        self,
        dataset: TokenizedDataset,
        batch_size: int,
        seed: int,
        pad_id: int,
        rank: int = 0,
        world: int = 1,
    ):
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.pad_id = pad_id
        self.rank = rank
        self.world = world
        self.epoch = 0
        self.position = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.dataset)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def _take(self, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            if self.position >= len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._permutation(self.epoch)
            k = min(n - len(out), len(self._order) - self.position)
            out += self._order[self.position : self.position + k]
            self.position += k
        return out

    def next_indices(self) -> list[int]:
        global_idx = self._take(self.batch_size * self.world)
        return global_idx[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def next(self) -> Batch:
        idx = self.next_indices()
        return collate([self.dataset.examples[i] for i in idx], self.pad_id, idx)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order = self._permutation(self.epoch)
