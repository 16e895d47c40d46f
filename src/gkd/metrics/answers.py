"""Exact match and final-answer metrics (GSM8K's ``####`` and "The answer is", numbers compared as numbers)."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

# sacrebleu and rouge-score (which pulls in nltk, ~1 s) are imported inside the functions that use them, so that
# importing gkd.metrics / gkd.tasks stays cheap.
from gkd.metrics.records import check_inputs, normalize_whitespace, require_references

# --------------------------------------------------------------------------------------------------- exact match


def _exact_match(prediction: str, refs: list[str]) -> float:
    pred = normalize_whitespace(prediction)
    return float(any(pred == normalize_whitespace(ref) for ref in refs))


def exact_match_score(record: dict, prediction: str) -> float:
    """1.0 if the prediction equals the target or any reference after whitespace normalisation, else 0.0."""
    return _exact_match(prediction, require_references(record))


def exact_match(predictions: list[str], records: list[dict]) -> float:
    """Percent of predictions equal to the completion or to any reference, after whitespace normalisation."""
    check_inputs(predictions, records)
    hits = 0.0
    for i, (pred, rec) in enumerate(zip(predictions, records)):
        hits += _exact_match(pred, require_references(rec, i))
    return 100.0 * hits / len(predictions)


_ANSWER_JUNK = re.compile(r"[\s,$]")


def extract_final_answer(text: str, marker: str = "####") -> str | None:
    """The final answer written after the *last* ``marker`` in ``text``, normalised; ``None`` if there is no marker.

    Only the first line after the marker is kept (a model may ramble on after its answer). Whitespace, thousands
    commas and ``$`` are removed and a trailing ``.`` is dropped, so ``"#### 9 0"`` (the arithmetic task, one digit
    per token), ``"#### 90"`` and ``"#### $90."`` (GSM8K style) all give ``"90"``.
    """
    pos = text.rfind(marker)
    if pos < 0:
        return None
    tail = text[pos + len(marker) :].strip().split("\n", 1)[0]
    return _ANSWER_JUNK.sub("", tail).rstrip(".")


def _same_answer(a: str, b: str) -> bool:
    if a == b:
        return True
    try:  # "90.0" == "90"
        return Decimal(a) == Decimal(b)
    except InvalidOperation:
        return False


def _final_answer(prediction: str, refs: list[str], marker: str) -> float:
    got = extract_final_answer(prediction, marker)
    if got is None or got == "":
        return 0.0
    gold = set()
    for ref in refs:
        ans = extract_final_answer(ref, marker)
        gold.add(ans if ans is not None else _ANSWER_JUNK.sub("", ref).rstrip("."))
    return float(any(_same_answer(got, g) for g in gold))


def final_answer_score(record: dict, prediction: str, marker: str = "####") -> float:
    """1.0 if the prediction's final answer (after ``marker``) equals the gold final answer, else 0.0.

    See :func:`final_answer` for how answers are extracted and compared.
    """
    return _final_answer(prediction, require_references(record), marker)


def final_answer(predictions: list[str], records: list[dict], marker: str = "####") -> float:
    """Percent of predictions whose final answer (after ``marker``) equals the gold final answer.

    The gold answer is extracted from the completion and each reference the same way (a target without the marker
    counts as a bare answer); a prediction without the marker is wrong. Numbers compare numerically when both parse.
    """
    check_inputs(predictions, records)
    hits = 0.0
    for i, (pred, rec) in enumerate(zip(predictions, records)):
        hits += _final_answer(pred, require_references(rec, i), marker)
    return 100.0 * hits / len(predictions)


_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
_THE_ANSWER_IS = re.compile(r"the (?:final )?answer is[:\s]*", re.IGNORECASE)


def _clean_number(text: str) -> str:
    """``text`` with ``$``, thousands commas and whitespace removed and a trailing ``.`` dropped."""
    return _ANSWER_JUNK.sub("", text).rstrip(".")


def extract_gsm8k_answer(text: str) -> str | None:
    """The answer of a GSM8K-style solution, or ``None`` when ``text`` has no number at all.

    In order: (1) what follows the *last* ``####`` (its first line, as :func:`extract_final_answer`; the number in
    it when there is one); (2) the first number after the last "The answer is" / "The final answer is" (any case);
    (3) the last number in the text. Numbers lose ``$``, thousands commas and a trailing ``.``; a leading ``-`` is
    kept. ``"... so 3 + 4 = 7. The answer is $1,200."`` gives ``"1200"``; ``"5 apples and 7 pears"`` gives ``"7"``.
    """
    marked = extract_final_answer(text, "####")
    if marked is not None:
        found = _NUMBER.search(marked)
        if found:
            return _clean_number(found.group())
        if marked:
            return marked
    said = list(_THE_ANSWER_IS.finditer(text))
    if said:
        found = _NUMBER.search(text, said[-1].end())
        if found:
            return _clean_number(found.group())
    numbers = _NUMBER.findall(text)
    return _clean_number(numbers[-1]) if numbers else None


def _gsm8k_or_text(text: str) -> str:
    """:func:`extract_gsm8k_answer`, or the whitespace-normalised text when it holds no number."""
    answer = extract_gsm8k_answer(text)
    return normalize_whitespace(text) if answer is None else answer


def _gsm8k_answer(prediction: str, refs: list[str]) -> float:
    got = _gsm8k_or_text(prediction)
    if not got:
        return 0.0
    return float(any(_same_answer(got, _gsm8k_or_text(ref)) for ref in refs))


def gsm8k_answer_score(record: dict, prediction: str) -> float:
    """1.0 if the prediction's GSM8K answer (:func:`extract_gsm8k_answer`) equals the reference's, else 0.0."""
    return _gsm8k_answer(prediction, require_references(record))


def gsm8k_answer(predictions: list[str], records: list[dict]) -> float:
    """Percent of predictions whose answer equals the reference's, both taken by :func:`extract_gsm8k_answer`
    (``####``, else "The answer is ...", else the last number); numbers compare numerically (``7.0`` = ``7``).

    Unlike :func:`final_answer`, a prediction without ``####`` is not wrong by construction: chain-of-thought
    outputs in the few-shot style ("... The answer is 7.") and bare numbers are scored too. Any of the record's
    references may match. A text without any number (a non-numeric answer) is compared whole, after whitespace
    normalisation.
    """
    check_inputs(predictions, records)
    hits = 0.0
    for i, (pred, rec) in enumerate(zip(predictions, records)):
        hits += _gsm8k_answer(pred, require_references(rec, i))
    return 100.0 * hits / len(predictions)
