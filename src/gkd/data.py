"""Datasets: reading records, turning them into token ids, and batching them.

Records use TRL's formats:
- ``{"prompt": str, "completion": str}`` (the completion is the target);
- ``{"messages": [{"role": ..., "content": ...}, ...]}``: the chat template renders everything before the last
  assistant turn as the prompt, and that last turn is the target;
- ``{"prompt": [messages], "completion": [assistant messages]}`` (TRL's conversational prompt-completion, the
  DistillationTrainer's format): the prompt messages through the chat template, the assistant content the target,
  the same ids as the equivalent ``messages`` record;
- ``{"prompt": str}`` or ``{"prompt": [messages]}`` alone (or ``messages`` ending with a user turn) is a prompt-only
  record, usable when every batch is the student's own samples (λ = 1) or the teacher writes the targets (SeqKD).
Chat prompts always get the chat template with the generation prompt; plain-string prompts only with
``apply_chat_template`` (as one user turn). Extra fields (e.g. ``references``) are kept for metrics and rewards.

Loss and metrics only ever see completion tokens. Prompts longer than ``max_prompt_length`` are truncated from the
left and counted, never silently dropped.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gkd.errors import ConfigError, DataError

__all__ = [
    "Batch",
    "Example",
    "TokenizedDataset",
    "collate",
    "load_records",
    "message_text",
    "read_chat_template",
    "tokenize_records",
    "with_chat_template",
]


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
        raise DataError(
            f"dataset folder '{folder}' has no '{split}*.jsonl' file (it has "
            f"{', '.join(sorted(f.name for f in named))}); add one or set {split_key} to one of "
            f"{', '.join(sorted(set(named.values())))}"
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
        if path.suffix in (".jsonl", ".ndjson") or (path.suffix == ".json" and _is_json_lines(path)):
            return read_jsonl(path, skip_bad_lines)
        return _load_with_datasets(
            "json" if path.suffix == ".json" else path.suffix.lstrip("."), path, split
        ), 0
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
        return _load_with_datasets(None, path, split, config_name, split_key), 0
    if _missing_local(spec):
        raise DataError(f"dataset '{spec}' does not exist; check the path (looked for {path.absolute()})")
    return _load_with_datasets(spec, None, split, config_name, split_key), 0


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
    builder: str | None,
    path: Path | None,
    split: str,
    config_name: str | None = None,
    split_key: str = "split",
) -> list[dict]:
    try:
        with _quiet_datasets() as datasets:
            ds = _load_dataset(datasets, builder, path, split, config_name)
    except Exception as e:  # datasets raises many types; all mean "cannot load this"
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        found = re.match(r"Unknown split \"(.*)\"\. Should be one of \[(.*)\]", first)
        if found:  # name the setting that chose the split, and the splits there are
            have = ", ".join(x.strip().strip("'\"") for x in found.group(2).split(","))
            raise DataError(
                f"dataset '{builder or path}' has no split '{split}' (it has {have}); set {split_key} to one of them"
            ) from e
        raise DataError(f"dataset '{builder or path}' could not be loaded: {first}") from e
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


def split_record(
    record: dict, tokenizer: Any, index: int, source: str, apply_chat_template: bool = False
) -> tuple[str, str | None, bool]:
    """(prompt text, completion text or None, prompt already holds special tokens?) of one record.

    Conversational prompts (``messages``, or ``prompt`` as a list of messages) are rendered with the tokenizer's chat
    template and the generation prompt; a plain-string prompt is too (as one user turn) when ``apply_chat_template``.
    The target is the final assistant turn's text (``messages``) or the completion's (a string, or assistant
    messages), so every format of the same example gives the same ids.
    """
    if record.get("messages") is not None:  # (Arrow files give every record every column, None where absent)
        msgs = record["messages"]
        _check_messages(msgs, "messages", index, source)
        _check_chat_template(tokenizer, source)
        if msgs[-1].get("role") == "assistant":
            prompt = _render(tokenizer, msgs[:-1], "messages", index, source)
            return prompt, message_text(msgs[-1].get("content")), True
        return _render(tokenizer, msgs, "messages", index, source), None, True
    if record.get("prompt") is None:
        keys = ", ".join(sorted(k for k, v in record.items() if v is not None)) or "none"
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
            f"{source} record {index}: 'completion' must be a string or a list of assistant messages, got "
            f"{type(completion).__name__}"
            + (
                " (a conversational completion needs a conversational prompt)"
                if isinstance(completion, list)
                else ""
            )
        )
    if apply_chat_template:
        return (
            _render(tokenizer, [{"role": "user", "content": prompt}], "prompt", index, source),
            completion,
            True,
        )
    return prompt, completion, False


def _conversational(
    prompt: list, completion: Any, tokenizer: Any, index: int, source: str
) -> tuple[str, str | None, bool]:
    """TRL's conversational format: the prompt messages go through the chat template (with the generation prompt,
    or continuing a final assistant turn), the completion's assistant contents are the target."""
    _check_messages(prompt, "prompt", index, source)
    _check_chat_template(tokenizer, source)
    text = _render(tokenizer, prompt, "prompt", index, source)
    if completion is None or isinstance(completion, str):
        return text, completion, True
    _check_messages(completion, "completion", index, source)
    other = [m["role"] for m in completion if m["role"] != "assistant"]
    if other:
        raise DataError(
            f"{source} record {index}: 'completion' messages must be assistant turns (got role '{other[0]}'); "
            "the target is the assistant's text, so put earlier turns in 'prompt'"
        )
    return text, "\n".join(message_text(m.get("content")) for m in completion), True


def _render(tokenizer: Any, msgs: list[dict], key: str, index: int, source: str) -> str:
    """The chat template over ``msgs`` with the generation prompt (a final assistant turn is continued instead, as
    TRL does for a prefilled answer); a template that fails names the record."""
    prefill = msgs[-1].get("role") == "assistant"
    try:
        return tokenizer.apply_chat_template(
            msgs,
            tokenize=False,
            add_generation_prompt=not prefill,
            **({"continue_final_message": True} if prefill else {}),
        )
    except Exception as e:  # jinja2 errors, raise_exception() in templates, bad content types
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{source} record {index}: the chat template failed on its '{key}': {first}") from e


def message_text(content: Any) -> str:
    """The text of a message's ``content``: a string, or the ``text`` parts of a list of content parts (metrics read
    references with it too, so the trained target is the metrics' reference)."""
    if content is None:
        return ""
    if isinstance(content, list):
        return "".join(
            str(part.get("text", "")) if isinstance(part, dict) else str(part)
            for part in content
            if not isinstance(part, dict) or part.get("type", "text") == "text"
        )
    return str(content)


def _check_messages(msgs: Any, key: str, index: int, source: str) -> None:
    if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) and "role" in m for m in msgs):
        raise DataError(
            f"{source} record {index}: '{key}' must be a non-empty list of {{role, content}} messages"
        )


def _check_chat_template(tokenizer: Any, source: str) -> None:
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(
            f"{source} has chat messages but the tokenizer has no chat template; use prompt/completion text "
            "records, a tokenizer with a chat_template, or set chat_template_path"
        )


def check_apply_chat_template(tokenizer: Any) -> None:
    """``apply_chat_template: true`` needs a tokenizer with a chat template (one-line ``ConfigError``)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError(
            "config key 'apply_chat_template: true' wraps prompts in the tokenizer's chat template, but the "
            "tokenizer has none; set chat_template_path (a Jinja file or a tokenizer folder) or "
            "apply_chat_template: false"
        )


# ---------------------------------------------------------------------------------------------------------------
# chat templates from a file or another tokenizer's folder
# ---------------------------------------------------------------------------------------------------------------
_TEMPLATE_SUFFIXES = (".jinja", ".jinja2", ".j2", ".txt")


def read_chat_template(spec: str) -> str:
    """The Jinja chat template of ``spec``: a template file (``.jinja``, ``.j2``, ``.txt``, ...), or a tokenizer
    folder (its ``chat_template.jinja``, or ``chat_template`` in ``tokenizer_config.json`` / ``chat_template.json``),
    or a hub tokenizer id (TRL's ``chat_template_path``). A bad path is a one-line ``ConfigError``."""
    key = "config key 'chat_template_path'"
    path = Path(os.path.expanduser(spec))
    if path.is_file() and path.name in ("tokenizer_config.json", "chat_template.json"):
        return _template_of_folder(path.parent, spec)
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{key}: cannot read '{spec}' ({e}); give a Jinja template file") from e
        if not text.strip():
            raise ConfigError(f"{key}: '{spec}' is empty; give a Jinja chat template file")
        return text
    if path.is_dir():
        return _template_of_folder(path, spec)
    from gkd.io import missing_local_path

    if spec.endswith((*_TEMPLATE_SUFFIXES, ".json")) or missing_local_path(spec):
        raise ConfigError(
            f"{key}: '{spec}' does not exist (looked for {path.absolute()}); give a Jinja template file or a "
            "tokenizer folder"
        )
    try:  # a hub tokenizer id, as TRL allows
        from transformers import AutoTokenizer

        template = AutoTokenizer.from_pretrained(spec).chat_template
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(
            f"{key}: '{spec}' is not a local file or folder and could not be loaded from the hub ({first})"
        ) from e
    if not isinstance(template, str) or not template.strip():
        raise ConfigError(f"{key}: the tokenizer '{spec}' has no chat template; give one that has")
    return template


def _template_of_folder(folder: Path, spec: str) -> str:
    key = "config key 'chat_template_path'"
    for name in ("chat_template.jinja", "chat_template.j2"):
        if (folder / name).is_file():
            return (folder / name).read_text(encoding="utf-8")
    for name in ("tokenizer_config.json", "chat_template.json"):
        f = folder / name
        if not f.is_file():
            continue
        try:
            template = json.loads(f.read_text(encoding="utf-8")).get("chat_template")
        except (OSError, ValueError, AttributeError) as e:
            raise ConfigError(f"{key}: cannot read '{f}' ({e})") from e
        if isinstance(template, list):  # several named templates: the default one
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if isinstance(template, str) and template.strip():
            return template
    raise ConfigError(
        f"{key}: the folder '{spec}' has no chat template (no chat_template.jinja, and no chat_template in "
        "tokenizer_config.json); give a Jinja template file or a tokenizer folder that has one"
    )


def with_chat_template(tokenizer: Any, spec: str, copy: bool = True) -> Any:
    """``tokenizer`` with the chat template of ``spec`` (see :func:`read_chat_template`), checked to render a one-turn
    conversation. A copy unless ``copy=False``: the given tokenizer is left as it was."""
    import copy as _copy

    template = read_chat_template(spec)
    tok = tokenizer
    # shallow: the template is the tokenizer's own attribute (deepcopy fails on some fast tokenizers)
    if copy:
        tok = _copy.copy(tokenizer)
        if isinstance(getattr(tok, "init_kwargs", None), dict):
            tok.init_kwargs = dict(tok.init_kwargs)
    tok.chat_template = template
    try:
        tok.apply_chat_template(
            [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
        )
    except Exception as e:  # jinja2 syntax errors and the like
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(
            f"config key 'chat_template_path': '{spec}' is not a usable Jinja chat template ({type(e).__name__}: "
            f"{first}); fix the template"
        ) from e
    return tok


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
    apply_chat_template: bool = False,
) -> TokenizedDataset:
    """Tokenize prompt and completion separately; completions end with EOS (appended if missing).

    ``apply_chat_template`` also renders plain-string prompts with the chat template, as one user turn (chat records
    always use it). Rendered prompts are tokenized without adding special tokens (the template writes them).
    """
    if not records:
        raise DataError(f"{source} is empty; it needs at least one record")
    if apply_chat_template:
        check_apply_chat_template(tokenizer)
    eos = tokenizer.eos_token_id
    parts = [split_record(rec, tokenizer, i, source, apply_chat_template) for i, rec in enumerate(records)]
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
