"""Adapters from the real benchmarks of the GKD paper to the trainer's record format.

Each adapter maps one example with the dataset's own field layout to ``{"prompt", "completion", "references"}``:

| name    | dataset (hub id)                  | fields used                                         | metric          |
|---------|-----------------------------------|-----------------------------------------------------|-----------------|
| `gsm8k` | ``openai/gsm8k`` (config ``main``) | ``question``, ``answer`` (``... #### 72``)          | `final_answer`  |
| `xsum`  | ``EdinburghNLP/xsum``             | ``document``, ``summary``                           | `rouge2`        |
| `wmt14` | ``wmt/wmt14`` (config ``de-en``)  | ``translation: {"de": ..., "en": ...}``             | `bleu` ("13a")  |

Prompts are built from a ``template`` (overridable); completions are the raw target text, without a leading space
or EOS (the trainer tokenizes prompt and completion separately and appends EOS). Metrics on real text should use
the standard tokenisations: ``functools.partial(gkd.metrics.bleu, tokenize="13a")`` and
``functools.partial(gkd.metrics.rouge2, tokenizer="default")``.

:func:`load_adapted` reads a local ``.jsonl`` / ``.json`` file (as in the tests) or a local dataset directory with
``datasets.load_dataset`` and maps every example. Given a hub id it would download the dataset; nothing in gkd's
tests or demo does that. A training config reads its data through an adapter with ``dataset_adapter: gsm8k`` (the
trainer reads ``dataset`` as usual, any file, folder or hub name, then maps the records with :func:`adapt_records`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable

from gkd.errors import ConfigError, DataError

__all__ = [
    "ADAPTERS",
    "FIELDS",
    "HUB_CONFIGS",
    "adapt_records",
    "check_adapter",
    "gsm8k_record",
    "load_adapted",
    "wmt14_record",
    "xsum_record",
]

GSM8K_TEMPLATE = "Question: {question}\nAnswer:"
XSUM_TEMPLATE = "Document: {document}\nSummary:"
WMT_TEMPLATE = "Translate from {source_name} to {target_name}.\n{source_name}: {source}\n{target_name}:"
LANGUAGE_NAMES = {
    "de": "German",
    "en": "English",
    "fr": "French",
    "cs": "Czech",
    "hi": "Hindi",
    "ru": "Russian",
}

_CALCULATOR = re.compile(r"<<[^<>]*>>")


def gsm8k_record(example: dict, template: str = GSM8K_TEMPLATE, strip_calculator: bool = True) -> dict:
    """GSM8K: the question is the prompt, the worked solution (ending ``#### <answer>``) the completion.

    ``strip_calculator`` removes the ``<<48/2=24>>`` calculator annotations of the original solutions, which a
    model is not expected to write. The final answer after ``####`` is untouched, so ``final_answer`` scores it.
    """
    answer = example["answer"].strip()
    if strip_calculator:
        answer = _CALCULATOR.sub("", answer)
    return {
        "prompt": template.format(question=example["question"].strip()),
        "completion": answer,
        "references": [answer],
    }


def xsum_record(example: dict, template: str = XSUM_TEMPLATE) -> dict:
    """XSum: the article is the prompt, the one-sentence summary the completion."""
    summary = example["summary"].strip()
    return {
        "prompt": template.format(document=example["document"].strip()),
        "completion": summary,
        "references": [summary],
    }


def wmt14_record(
    example: dict, source_lang: str = "en", target_lang: str = "de", template: str = WMT_TEMPLATE
) -> dict:
    """WMT14: ``example["translation"][source_lang]`` -> ``example["translation"][target_lang]``.

    The paper distils en->de; the dataset's ``de-en`` config holds both directions, so pick them here.
    """
    pair = example["translation"]
    if source_lang not in pair or target_lang not in pair:
        raise ValueError(f"languages {source_lang!r}/{target_lang!r} not in translation keys {sorted(pair)}")
    target = pair[target_lang].strip()
    prompt = template.format(
        source=pair[source_lang].strip(),
        source_name=LANGUAGE_NAMES.get(source_lang, source_lang),
        target_name=LANGUAGE_NAMES.get(target_lang, target_lang),
    )
    return {"prompt": prompt, "completion": target, "references": [target]}


ADAPTERS: dict[str, Callable[..., dict]] = {"gsm8k": gsm8k_record, "xsum": xsum_record, "wmt14": wmt14_record}
HUB_CONFIGS: dict[str, str | None] = {"gsm8k": "main", "xsum": None, "wmt14": "de-en"}
FIELDS: dict[str, tuple[str, ...]] = {
    "gsm8k": ("question", "answer"),
    "xsum": ("document", "summary"),
    "wmt14": ("translation",),
}
"""The fields of the dataset's own layout each adapter reads."""


def check_adapter(name: str, key: str = "dataset_adapter") -> None:
    """A ``ConfigError`` (one line, listing the adapters) unless ``name`` is a built-in adapter."""
    if name not in ADAPTERS:
        raise ConfigError(f"config key '{key}' must be one of {', '.join(sorted(ADAPTERS))}, got {name!r}")


def adapt_records(name: str, records: list[dict], source: str = "dataset", **kw) -> list[dict]:
    """``records`` in the layout of benchmark ``name`` mapped to ``{"prompt", "completion", "references"}``.

    A record that lacks a field the adapter reads (or holds an unusable value) is a one-line ``DataError`` naming
    the record and the fields. ``kw`` goes to the adapter (``template``, ``source_lang`` / ``target_lang``, ...).
    """
    check_adapter(name)
    adapter = ADAPTERS[name]
    out = []
    for i, record in enumerate(records):
        try:
            missing = [f for f in FIELDS[name] if f not in record]
            if missing:
                raise KeyError(missing[0])
            out.append(adapter(record, **kw))
        except KeyError as e:
            keys = ", ".join(sorted(record)) or "none"
            already = " (it looks adapted already: drop dataset_adapter)" if "prompt" in record else ""
            raise DataError(
                f"{source} record {i} has no '{e.args[0]}' field (keys: {keys}); dataset_adapter {name} reads "
                f"{', '.join(FIELDS[name])}{already}"
            ) from e
        except (AttributeError, TypeError, ValueError) as e:
            raise DataError(f"{source} record {i}: dataset_adapter {name} cannot read it ({e})") from e
    return out


def load_adapted(
    name: str,
    path_or_hub_id: str,
    split: str,
    *,
    limit: int | None = None,
    config: str | None = None,
    cache_dir: str | None = None,
    **kw,
) -> list[dict]:
    """Load a dataset with ``datasets.load_dataset`` and map it to trainer records with adapter ``name``.

    Args:
        name: ``"gsm8k"``, ``"xsum"`` or ``"wmt14"``.
        path_or_hub_id: a local ``.jsonl`` / ``.json`` file (read with the ``json`` builder; the file *is* the
            split, so ``split`` only labels it), a local dataset directory, or a hub id (downloads!).
        split: split to load from a directory or hub dataset.
        limit: keep only the first ``limit`` examples.
        config: dataset config for hub ids (default: ``HUB_CONFIGS[name]``).
        cache_dir: ``datasets`` cache directory.
        **kw: passed to the adapter (``template``, ``source_lang`` / ``target_lang``, ``strip_calculator``).
    """
    if name not in ADAPTERS:
        raise ValueError(f"unknown dataset adapter {name!r}; valid adapters: {', '.join(sorted(ADAPTERS))}")
    from datasets import load_dataset

    if os.path.isfile(path_or_hub_id) and path_or_hub_id.endswith((".jsonl", ".json")):
        data = load_dataset("json", data_files=path_or_hub_id, split="train", cache_dir=cache_dir)
    elif os.path.isdir(path_or_hub_id):
        data = load_dataset(path_or_hub_id, split=split, cache_dir=cache_dir)
    else:
        data = load_dataset(path_or_hub_id, config or HUB_CONFIGS[name], split=split, cache_dir=cache_dir)
    if limit is not None:
        data = data.select(range(min(limit, len(data))))
    return adapt_records(name, list(data), str(path_or_hub_id), **kw)
