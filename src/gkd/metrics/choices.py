"""Multiple-choice records (MMLU style) and their accuracy from the choices' log-likelihoods.

A multiple-choice record has a prompt (any prompt format), ``choices`` (a list of strings) and ``answer`` (the index
of the correct choice, or the correct choice itself)::

    {"prompt": "Question: 2 + 2 = ?\\nAnswer:", "choices": ["3", "4", "5"], "answer": 1}

The model is not asked to generate: :func:`gkd.evaluation.choice_loglikelihoods` scores each choice's completion
log-likelihood after the prompt and the prediction is the most likely choice, as lm-evaluation-harness does:

* ``mc_accuracy`` (the harness's ``acc``): argmax of the summed log-likelihood of the choice's tokens;
* ``mc_accuracy_norm`` (the harness's ``acc_norm``): argmax of that sum divided by the choice's length in characters,
  which removes the bias towards short choices.

Both are percentages, like every gkd metric. Ties go to the first choice (``numpy.argmax``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gkd.errors import DataError

MC_METRICS = ("mc_accuracy", "mc_accuracy_norm")
"""The multiple-choice metric names: summed and length-normalised log-likelihood."""


def _where(index: int | None) -> str:
    return "record" if index is None else f"record {index}"


def choices_of(record: dict, index: int | None = None) -> list[str]:
    """The record's ``choices``; a one-line :class:`DataError` unless it is a non-empty list of strings."""
    choices = record.get("choices")
    if not isinstance(choices, (list, tuple)) or not choices or not all(isinstance(c, str) for c in choices):
        raise DataError(
            f"{_where(index)} needs 'choices', a non-empty list of strings, for multiple-choice scoring "
            f"(got {type(choices).__name__}); add them or use a generation metric"
        )
    return list(choices)


def answer_index(record: dict, index: int | None = None) -> int:
    """The index of the record's correct choice: ``answer`` as an index into ``choices``, or the correct string.

    A one-line :class:`DataError` when ``answer`` is missing, out of range, or a string that is not a choice.
    """
    choices = choices_of(record, index)
    answer = record.get("answer")
    if isinstance(answer, str) and answer in choices:
        return choices.index(answer)
    if isinstance(answer, (int, np.integer)) and not isinstance(answer, bool) and 0 <= answer < len(choices):
        return int(answer)
    raise DataError(
        f"{_where(index)}: 'answer' must be the index of the correct choice (0 to {len(choices) - 1}) or one of "
        f"its 'choices', got {answer!r}"
    )


def mc_correct(records: Sequence[dict], loglikelihoods: Sequence[Sequence[float]]) -> dict[str, np.ndarray]:
    """Per-example correctness (1.0 or 0.0) of both multiple-choice predictions, ``{metric name: array}``.

    ``loglikelihoods[i][j]`` is the summed log-likelihood of choice ``j`` of ``records[i]``. The metric values are
    the means of these arrays times 100 (:func:`mc_accuracy`).
    """
    if len(records) != len(loglikelihoods):
        raise ValueError(f"got log-likelihoods for {len(loglikelihoods)} records, not {len(records)}")
    plain, norm = [], []
    for i, (rec, lls) in enumerate(zip(records, loglikelihoods)):
        gold, choices = answer_index(rec, i), choices_of(rec, i)
        if len(lls) != len(choices):
            raise ValueError(f"record {i} has {len(choices)} choices but {len(lls)} log-likelihoods")
        lls = np.asarray(lls, dtype=np.float64)
        chars = np.array([max(len(c), 1) for c in choices], dtype=np.float64)  # an empty choice counts as 1
        plain.append(float(np.argmax(lls) == gold))
        norm.append(float(np.argmax(lls / chars) == gold))
    return {"mc_accuracy": np.array(plain), "mc_accuracy_norm": np.array(norm)}


def mc_accuracy(records: Sequence[dict], loglikelihoods: Sequence[Sequence[float]]) -> dict[str, float]:
    """``{"mc_accuracy": percent, "mc_accuracy_norm": percent}`` from each record's choice log-likelihoods."""
    if not records:
        raise ValueError("nothing to score: no records")
    return {name: 100.0 * float(v.mean()) for name, v in mc_correct(records, loglikelihoods).items()}
