"""Records -> token ids: the record formats, chat templates, and the one tokenisation of gkd.

:func:`split_record` turns a record of any TRL format into (prompt text, completion text); chat prompts go through
the tokenizer's chat template (:func:`with_chat_template` replaces it from a file or another tokenizer's folder).
:func:`tokenize_records` tokenizes a list of records into a :class:`TokenizedDataset` of :class:`Example` s; the
``datasets.map`` path (:mod:`gkd.data.arrow`) calls the same row function, so both give the same ids.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gkd.errors import ConfigError, DataError
from gkd.io import missing_local_path

__all__ = [
    "Example",
    "TeacherPrompt",
    "TokenizedDataset",
    "check_apply_chat_template",
    "message_text",
    "read_chat_template",
    "split_record",
    "teacher_prompt_text",
    "tokenize_records",
    "with_chat_template",
]


@dataclass
class Example:
    """One tokenized record. ``completion`` is None for prompt-only records. ``teacher_prompt`` is the teacher's own
    prompt ids (:class:`TeacherPrompt`), None when the teacher sees the student's prompt."""

    prompt: list[int]
    completion: list[int] | None
    record: dict[str, Any] = field(repr=False)
    teacher_prompt: list[int] | None = None


@dataclass
class TeacherPrompt:
    """How the teacher's own view of a record's prompt is built (config keys ``teacher_prompt_field``,
    ``teacher_system_prompt``, ``teacher_chat_template``, ``teacher_chat_template_kwargs``); the student's prompt is
    never changed.

    Chat prompts (``messages``, a list ``prompt``, or a plain prompt with ``apply_chat_template``) are rendered again
    for the teacher: ``system_prompt`` as a system turn first (merged in front of a system turn the record has), the
    ``field``'s text in front of the last user turn's content (a blank line between), with ``chat_template`` (Jinja
    text; None: the tokenizer's own) and ``chat_template_kwargs`` (template variables, e.g. ``enable_thinking``).
    Plain-text prompts get ``system_prompt``, the field's text and the prompt joined by blank lines."""

    field: str | None = None
    system_prompt: str | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def __repr__(self) -> str:  # the datasets cache key (gkd.io.fingerprint) reads it: stable, every setting
        return "TeacherPrompt" + json.dumps(
            [self.field, self.system_prompt, self.chat_template, self.chat_template_kwargs],
            sort_keys=True,
            default=str,
        )


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


def _render(
    tokenizer: Any, msgs: list[dict], key: str, index: int, source: str, extra: dict[str, Any] | None = None
) -> str:
    """The chat template over ``msgs`` with the generation prompt (a final assistant turn is continued instead, as
    TRL does for a prefilled answer); a template that fails names the record. ``extra``: more
    ``apply_chat_template`` arguments (the teacher's template and its variables)."""
    prefill = msgs[-1].get("role") == "assistant"
    try:
        return tokenizer.apply_chat_template(
            msgs,
            tokenize=False,
            add_generation_prompt=not prefill,
            **({"continue_final_message": True} if prefill else {}),
            **(extra or {}),
        )
    except Exception as e:  # jinja2 errors, raise_exception() in templates, bad content types
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{source} record {index}: the chat template failed on its '{key}': {first}") from e


def teacher_prompt_text(
    record: dict,
    tokenizer: Any,
    view: TeacherPrompt,
    index: int,
    source: str,
    apply_chat_template: bool = False,
) -> tuple[str, bool]:
    """(the teacher's prompt text, already holds special tokens?) of a record that :func:`split_record` accepted
    (see :class:`TeacherPrompt`); a missing or non-string field is a one-line ``DataError`` naming the record."""
    extra_text = None
    if view.field is not None:
        extra_text = record.get(view.field)
        if extra_text is None:
            keys = ", ".join(sorted(k for k, v in record.items() if v is not None)) or "none"
            raise DataError(
                f"{source} record {index} has no '{view.field}' field (config key 'teacher_prompt_field'; keys: "
                f"{keys}); give every record the teacher's text, or unset teacher_prompt_field"
            )
        if not isinstance(extra_text, str):
            raise DataError(
                f"{source} record {index}: '{view.field}' (config key 'teacher_prompt_field') must be a string, "
                f"got {type(extra_text).__name__}"
            )
    if record.get("messages") is not None:
        msgs = list(record["messages"])
        if msgs[-1].get("role") == "assistant":
            msgs = msgs[:-1]
    elif isinstance(record.get("prompt"), list):
        msgs = list(record["prompt"])
    elif apply_chat_template:
        msgs = [{"role": "user", "content": record["prompt"]}]
    else:
        parts = [view.system_prompt, extra_text, record["prompt"]]
        return "\n\n".join(p for p in parts if p), False
    if extra_text:
        users = [i for i, m in enumerate(msgs) if m.get("role") == "user"]
        if users:
            m = msgs[users[-1]]
            msgs[users[-1]] = {**m, "content": extra_text + "\n\n" + message_text(m.get("content"))}
        else:
            at = next((i for i, m in enumerate(msgs) if m.get("role") != "system"), len(msgs))
            msgs.insert(at, {"role": "user", "content": extra_text})
    if view.system_prompt:
        if msgs and msgs[0].get("role") == "system":
            first = message_text(msgs[0].get("content"))
            msgs[0] = {**msgs[0], "content": view.system_prompt + ("\n\n" + first if first else "")}
        else:
            msgs.insert(0, {"role": "system", "content": view.system_prompt})
    extra: dict[str, Any] = dict(view.chat_template_kwargs or {})
    if view.chat_template is not None:
        extra["chat_template"] = view.chat_template
    else:
        _check_chat_template(tokenizer, source)
    key = "messages" if record.get("messages") is not None else "prompt"
    return _render(tokenizer, msgs, key, index, source, extra), True


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


def read_chat_template(spec: str, key_name: str = "chat_template_path") -> str:
    """The Jinja chat template of ``spec``: a template file (``.jinja``, ``.j2``, ``.txt``, ...), or a tokenizer
    folder (its ``chat_template.jinja``, or ``chat_template`` in ``tokenizer_config.json`` / ``chat_template.json``),
    or a hub tokenizer id (TRL's ``chat_template_path``). A bad path is a one-line ``ConfigError`` naming the config
    key ``key_name``."""
    key = f"config key '{key_name}'"
    path = Path(os.path.expanduser(spec))
    if path.is_file() and path.name in ("tokenizer_config.json", "chat_template.json"):
        return _template_of_folder(path.parent, spec, key)
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{key}: cannot read '{spec}' ({e}); give a Jinja template file") from e
        if not text.strip():
            raise ConfigError(f"{key}: '{spec}' is empty; give a Jinja chat template file")
        return text
    if path.is_dir():
        return _template_of_folder(path, spec, key)
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


def _template_of_folder(folder: Path, spec: str, key: str = "config key 'chat_template_path'") -> str:
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
    teacher_prompt: TeacherPrompt | None = None,
) -> list[tuple[list[int], list[int] | None, bool, bool, int, list[int] | None]]:
    """(prompt ids, completion ids or None, prompt truncated?, completion truncated?, prompt tokens before
    truncation, the teacher's own prompt ids or None) of each record; ``indices`` are the records' positions in their
    dataset (named in errors). The one tokenisation of gkd: the list path and the ``datasets.map`` path both call it,
    so they give the same ids. The teacher's prompt (``teacher_prompt``) is None where it equals the student's."""
    eos = tokenizer.eos_token_id
    where = range(len(records)) if indices is None else indices
    parts = [split_record(rec, tokenizer, i, source, apply_chat_template) for i, rec in zip(where, records)]
    prompt_ids = _batch_tokenize(tokenizer, [p for p, _, _ in parts], [not t for _, _, t in parts])
    completions = [c for _, c, _ in parts if c is not None]
    completion_ids = iter(_batch_tokenize(tokenizer, completions, [False] * len(completions)))
    teacher_ids: list[list[int] | None] = [None] * len(records)
    if teacher_prompt is not None:
        views = [
            teacher_prompt_text(rec, tokenizer, teacher_prompt, i, source, apply_chat_template)
            for i, rec in zip(where, records)
        ]
        teacher_ids = list(_batch_tokenize(tokenizer, [t for t, _ in views], [not s for _, s in views]))

    def fit(p_ids: list[int]) -> tuple[list[int], bool]:
        trunc = False
        if seq2seq and (not p_ids or p_ids[-1] != eos):
            p_ids = [*p_ids, eos]  # T5-style encoders expect an EOS at the end of the input
        if len(p_ids) > max_prompt_length:
            p_ids = p_ids[-max_prompt_length:]
            trunc = True
        if not p_ids:
            p_ids = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos]
        return p_ids, trunc

    out = []
    for (_, completion, _), p_ids, t_ids in zip(parts, prompt_ids, teacher_ids):
        raw = len(p_ids)
        trunc_c = False
        p_ids, trunc_p = fit(p_ids)
        if t_ids is not None:
            t_ids = fit(t_ids)[0]
            if t_ids == p_ids:  # the teacher's view is the student's: nothing extra is kept
                t_ids = None
        c_ids = None
        if completion is not None:
            c_ids = next(completion_ids)
            if not c_ids or c_ids[-1] != eos:
                c_ids = [*c_ids, eos]
            if len(c_ids) > max_completion_length:
                c_ids = c_ids[:max_completion_length]
                trunc_c = True
        out.append((p_ids, c_ids, trunc_p, trunc_c, raw, t_ids))
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
    teacher_prompt: TeacherPrompt | None = None,
) -> TokenizedDataset:
    """Tokenize prompt and completion separately; completions end with EOS (appended if missing).

    ``apply_chat_template`` also renders plain-string prompts with the chat template, as one user turn (chat records
    always use it). Rendered prompts are tokenized without adding special tokens (the template writes them).
    ``teacher_prompt`` also gives each example the teacher's own prompt (:class:`TeacherPrompt`; the teacher's
    prompt is truncated from the left at ``max_prompt_length`` too).
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
        teacher_prompt=teacher_prompt,
    )
    examples = [Example(p, c, rec, t) for rec, (p, c, _, _, _, t) in zip(records, rows)]
    trunc_p = sum(r[2] for r in rows)
    trunc_c = sum(r[3] for r in rows)
    if trunc_p == len(records):
        raise _all_truncated_error(source, max_prompt_length, max(r[4] for r in rows))
    return TokenizedDataset(examples, trunc_p, trunc_c)
