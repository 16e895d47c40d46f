"""Reading a record for scoring: its target, its references, its prompt text (every record format)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gkd.data import message_text

# sacrebleu and rouge-score (which pulls in nltk, ~1 s) are imported inside the functions that use them, so that
# importing gkd.metrics / gkd.tasks stays cheap.


# --------------------------------------------------------------------------------------------------- helpers


def normalize_whitespace(text: str) -> str:
    """Collapse runs of whitespace to one space and strip both ends."""
    return " ".join(text.split())


class NoReferenceError(ValueError):
    """A metric that compares against references got a record that has none (e.g. a prompt-only record)."""


def _messages(value: Any) -> list[dict]:
    """``value`` as a list of message dicts (anything that is not a dict is ignored)."""
    return [m for m in value if isinstance(m, dict)] if isinstance(value, list) else []


def target_of(record: dict) -> str | None:
    """The record's target text, or ``None`` for a prompt-only record.

    ``completion`` when it is a string; for a conversational completion (a list of messages) the contents of its
    assistant turns joined by newlines; for ``messages`` ending with an assistant turn, that turn's content.
    """
    if "messages" in record:
        msgs = _messages(record["messages"])
        if msgs and msgs[-1].get("role") == "assistant":
            return message_text(msgs[-1].get("content"))
        return None
    completion = record.get("completion")
    if completion is None or isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        turns = [m for m in _messages(completion) if m.get("role", "assistant") == "assistant"]
        return "\n".join(message_text(m.get("content")) for m in turns) if turns else None
    return str(completion)


def references_of(record: dict) -> list[str]:
    """All valid targets of a record: its target (see :func:`target_of`) first, then its ``references``, without
    duplicates, order kept. A prompt-only record without ``references`` has none: ``[]``.

    Every TRL format: ``completion`` (a string, or assistant messages), ``messages`` ending with an assistant turn,
    ``references``. Fields that are None count as absent (Arrow datasets give every record every column).
    """
    record = _present(record)
    target = target_of(record)
    extra = record.get("references") or []
    if isinstance(extra, str):
        extra = [extra]
    refs = ([] if target is None else [target]) + [str(r) for r in extra]
    seen: set[str] = set()
    out = []
    for ref in refs:
        if ref not in seen:
            seen.add(ref)
            out.append(ref)
    return out


def require_references(record: dict, index: int | None = None) -> list[str]:
    """:func:`references_of`, or :class:`NoReferenceError` when the record has none."""
    refs = references_of(record)
    if not refs:
        where = "record" if index is None else f"record {index}"
        raise NoReferenceError(
            f"{where} has no reference to compare with (no completion, no final assistant turn and no "
            "'references'); this metric needs targets"
        )
    return refs


def _present(record: dict) -> dict:
    """``record`` without its None-valued fields (a parquet file of mixed formats has ``messages: None`` rows)."""
    if all(v is not None for v in record.values()):
        return record
    return {k: v for k, v in record.items() if v is not None}


def prompt_text_of(record: dict) -> str:
    """The raw prompt text a task parses: the ``prompt`` string, or, for ``messages`` and a conversational
    ``prompt`` (a list of messages), the content of the last ``user`` turn before the target.

    That is the text a user posed, what tasks parse and rewards read, without the chat template's markup (the
    prompt-only forms too: ``{"prompt": str}``, ``{"prompt": [messages]}``). Fields that are None count as absent.

    Raises ``ValueError`` when the record has no prompt text (no ``prompt`` / ``messages``, or no user turn).
    """
    record = _present(record)
    if "messages" in record:
        msgs = _messages(record["messages"])
        if msgs and msgs[-1].get("role") == "assistant":
            msgs = msgs[:-1]
    elif "prompt" in record:
        prompt = record["prompt"]
        if isinstance(prompt, str):
            return prompt
        msgs = _messages(prompt)
    else:
        raise ValueError(
            f"record has no 'prompt' or 'messages' (keys: {', '.join(sorted(record)) or 'none'})"
        )
    for msg in reversed(msgs):
        if msg.get("role") == "user":
            return message_text(msg.get("content"))
    raise ValueError("record has no user turn to take the prompt from")


def _clamp(score: float) -> float:
    """Clip float noise (sacrebleu can return 100.00000000000004) into [0, 100]."""
    return float(min(100.0, max(0.0, score)))


def check_inputs(predictions: Sequence[str], records: Sequence[dict]) -> None:
    """Raise ``ValueError`` unless there is exactly one prediction per record and at least one of each."""
    if len(predictions) != len(records):
        raise ValueError(f"got {len(predictions)} predictions for {len(records)} records")
    if not predictions:
        raise ValueError("nothing to score: predictions is empty")
