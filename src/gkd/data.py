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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gkd.errors import ConfigError, DataError

__all__ = [
    "ArrowTokenizedDataset",
    "Batch",
    "BatchStream",
    "Example",
    "TokenizedDataset",
    "collate",
    "load_records",
    "make_stream",
    "message_text",
    "open_dataset",
    "read_chat_template",
    "tokenize_dataset",
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
    from gkd.io import missing_local_path

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
    from gkd.io import hub_offline_reason

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


def _tokenize_rows(
    records: list[dict],
    tokenizer: Any,
    *,
    indices: Sequence[int] | None = None,
    max_prompt_length: int,
    max_completion_length: int,
    source: str,
    seq2seq: bool,
    apply_chat_template: bool,
) -> list[tuple[list[int], list[int] | None, bool, bool, int]]:
    """(prompt ids, completion ids or None, prompt truncated?, completion truncated?, prompt tokens before
    truncation) of each record; ``indices`` are the records' positions in their dataset (named in errors). The one
    tokenisation of gkd: the list path and the ``datasets.map`` path both call it, so they give the same ids."""
    eos = tokenizer.eos_token_id
    where = range(len(records)) if indices is None else indices
    parts = [split_record(rec, tokenizer, i, source, apply_chat_template) for i, rec in zip(where, records)]
    prompt_ids = _batch_tokenize(tokenizer, [p for p, _, _ in parts], [not t for _, _, t in parts])
    completions = [c for _, c, _ in parts if c is not None]
    completion_ids = iter(_batch_tokenize(tokenizer, completions, [False] * len(completions)))
    out = []
    for (_, completion, _), p_ids in zip(parts, prompt_ids):
        raw = len(p_ids)
        trunc_p = trunc_c = False
        if seq2seq and (not p_ids or p_ids[-1] != eos):
            p_ids = [*p_ids, eos]  # T5-style encoders expect an EOS at the end of the input
        if len(p_ids) > max_prompt_length:
            p_ids = p_ids[-max_prompt_length:]
            trunc_p = True
        if not p_ids:
            p_ids = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos]
        c_ids = None
        if completion is not None:
            c_ids = next(completion_ids)
            if not c_ids or c_ids[-1] != eos:
                c_ids = [*c_ids, eos]
            if len(c_ids) > max_completion_length:
                c_ids = c_ids[:max_completion_length]
                trunc_c = True
        out.append((p_ids, c_ids, trunc_p, trunc_c, raw))
    return out


def _all_truncated_error(source: str, max_prompt_length: int, longest: int) -> DataError:
    return DataError(
        f"every prompt of {source} is longer than max_prompt_length={max_prompt_length} (e.g. {longest} "
        "tokens); raise max_prompt_length"
    )


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
    rows = _tokenize_rows(
        records,
        tokenizer,
        max_prompt_length=max_prompt_length,
        max_completion_length=max_completion_length,
        source=source,
        seq2seq=seq2seq,
        apply_chat_template=apply_chat_template,
    )
    examples = [Example(p, c, rec) for rec, (p, c, _, _, _) in zip(records, rows)]
    trunc_p = sum(r[2] for r in rows)
    trunc_c = sum(r[3] for r in rows)
    if trunc_p == len(records):
        raise _all_truncated_error(source, max_prompt_length, max(r[4] for r in rows))
    return TokenizedDataset(examples, trunc_p, trunc_c)


# ---------------------------------------------------------------------------------------------------------------
# data at scale: datasets.map (cached, num_proc), one shard per process, streams
# ---------------------------------------------------------------------------------------------------------------
PROMPT_IDS = "_gkd_prompt_ids"
COMPLETION_IDS = "_gkd_completion_ids"
_TRUNC_PROMPT = "_gkd_prompt_truncated"
_TRUNC_COMPLETION = "_gkd_completion_truncated"
_PROMPT_TOKENS = "_gkd_prompt_tokens"
_GKD_COLUMNS = (PROMPT_IDS, COMPLETION_IDS, _TRUNC_PROMPT, _TRUNC_COMPLETION, _PROMPT_TOKENS)
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
    from gkd.io import fingerprint

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


def _map_tokenize(
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
    for name, col in zip(_GKD_COLUMNS, zip(*rows) if rows else [()] * len(_GKD_COLUMNS)):
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
        return Example(list(row[PROMPT_IDS]), _ids(row[COMPLETION_IDS]), record)

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
    from gkd.io import fingerprint

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
    offset, stride = (rank, world) if sharded else (0, 1)
    key = fingerprint(
        _MAP_VERSION, ds._fingerprint, tokenizer_fingerprint(tokenizer), settings, adapter, offset, stride
    )
    columns = [c for c in ds.column_names if c in _GKD_COLUMNS or adapter is not None]
    with contextlib.nullcontext() if sharded else main_process_first(rank, world), _quiet_datasets():
        out = ds.map(
            _map_tokenize,
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
        _map_tokenize,
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


class _StreamBase:
    """What both batch streams hold: the data, the batch size, the seed, the pad id and this process's place."""

    def __init__(self, dataset: Any, batch_size: int, seed: int, pad_id: int, rank: int, world: int) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.pad_id = pad_id
        self.rank = rank
        self.world = world
        self.epoch = 0
        self.position = 0


class BatchStream(_StreamBase):
    """An endless, seeded, resumable stream of batches: a fresh permutation of the data every epoch.

    With several processes each rank takes its own slice of every global batch, so ranks see different data. A
    dataset that holds only this process's shard (:class:`ArrowTokenizedDataset` with ``shard``) is drawn on its
    own instead: each epoch a permutation of the shard (seeded as the whole dataset's), ``batch_size`` rows a batch,
    so rank ``r`` trains on rows ``r, r + world, ...`` only. With one process both are the same stream.
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
        super().__init__(dataset, batch_size, seed, pad_id, rank, world)
        self.local = world > 1 and getattr(dataset, "shard", None) is not None
        self.drawn = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.dataset.examples)))
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
        self.drawn += n
        return out

    def next_indices(self) -> list[int]:
        """The dataset positions of the next batch (for a shard, of the whole dataset: row ``rank + world * i``)."""
        if self.local:
            return [self.rank + self.world * i for i in self._take(self.batch_size)]
        global_idx = self._take(self.batch_size * self.world)
        return global_idx[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def next(self) -> Batch:
        idx = self.next_indices()
        held = [(i - self.rank) // self.world for i in idx] if self.local else idx
        return collate([self.dataset.examples[i] for i in held], self.pad_id, idx)

    def state_dict(self) -> dict[str, int]:
        if self.local:  # shards can differ in length by one: each rank resumes from the count drawn
            return {"epoch": self.epoch, "position": self.position, "drawn": self.drawn}
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if self.local and "drawn" in state:
            self.drawn = int(state["drawn"])
            self.epoch, self.position = divmod(self.drawn, len(self.dataset.examples))
        else:
            self.epoch = int(state["epoch"])
            self.position = int(state["position"])
        self._order = self._permutation(self.epoch)


class PromptStream(_StreamBase):
    """Batches of prompts read in order from a :class:`StreamingDataset` (``dataset_streaming: true``): each epoch
    the stream again, shuffled through a seeded buffer, this process's part of it (``split_dataset_by_node``).

    Resuming is exact: the state is (epoch, prompts drawn in it), and a resumed stream skips the prompts already
    drawn (read again, not tokenised) before it draws the next."""

    def __init__(
        self,
        dataset: StreamingDataset,
        batch_size: int,
        seed: int,
        pad_id: int,
        rank: int = 0,
        world: int = 1,
    ):
        super().__init__(dataset, batch_size, seed, pad_id, rank, world)
        self._it: Iterator[Example] | None = None

    def next(self) -> Batch:
        examples: list[Example] = []
        while len(examples) < self.batch_size:
            if self._it is None:
                self._it = _stream_examples(
                    self.dataset, self.seed, self.epoch, self.position, self.rank, self.world
                )
            try:
                example = next(self._it)
            except StopIteration:
                if self.position == 0:
                    raise DataError("the streamed dataset is empty; it needs at least one record") from None
                self.epoch += 1
                self.position = 0
                self._it = None
                continue
            examples.append(example)
            self.position += 1
        return collate(examples, self.pad_id)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._it = None


def make_stream(
    dataset: TokenizedDataset, batch_size: int, seed: int, pad_id: int, rank: int = 0, world: int = 1
) -> BatchStream | PromptStream:
    """The run's batch stream: a :class:`PromptStream` over a streamed dataset, else a :class:`BatchStream`."""
    if isinstance(dataset, StreamingDataset):
        return PromptStream(dataset, batch_size, seed, pad_id, rank, world)
    return BatchStream(dataset, batch_size, seed, pad_id, rank, world)
