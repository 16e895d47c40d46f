"""Generic text metrics for evaluating generations, with a small name -> function registry.

Every metric has the same signature::

    metric(predictions: list[str], records: list[dict]) -> float

``predictions[i]`` is the decoded completion the model produced for ``records[i]`` (EOS and padding already
stripped). A record is in the trainer's data format: ``{"prompt": str, "completion": str}`` plus, optionally,
``"references": list[str]`` holding every valid target we know of. When ``references`` is missing, the completion
is the only reference. When it is present, the completion is added to it if it is not already there.

**All metrics return a percentage: a float in [0, 100]** (100 = perfect). This matches how the GKD paper reports
accuracy, BLEU and ROUGE, and lets tables mix metrics without rescaling.

Tokenisation. The built-in tasks write text as space-separated tokens, one word per token, so BLEU uses
sacrebleu's ``tokenize="none"`` (split on whitespace only) and ROUGE uses a whitespace tokenizer that keeps tokens
exactly as written (case, ``~``, ``####`` and ``+`` all survive). For real English text pass
``tokenize="13a"`` to :func:`bleu` and ``tokenizer="default"`` to :func:`rouge2` / :func:`rougeL` (rouge-score's
own lower-casing, punctuation-stripping tokenizer), e.g. with ``functools.partial``.

Diversity is not a per-record metric, so it lives outside the registry: :func:`self_bleu` takes several samples per
input and returns 100 when the samples of each input are identical, lower when they differ.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

# sacrebleu and rouge-score (which pulls in nltk, ~1 s) are imported inside the functions that use them, so that
# importing gkd.metrics / gkd.tasks stays cheap.

Metric = Callable[[list[str], list[dict]], float]

__all__ = [
    "METRICS",
    "Metric",
    "bleu",
    "check_inputs",
    "exact_match",
    "extract_final_answer",
    "final_answer",
    "get_metric",
    "normalize_whitespace",
    "references_of",
    "rouge2",
    "rougeL",
    "self_bleu",
]


# --------------------------------------------------------------------------------------------------- helpers


def normalize_whitespace(text: str) -> str:
    """Collapse runs of whitespace to one space and strip both ends."""
    return " ".join(text.split())


def references_of(record: dict) -> list[str]:
    """All valid targets of a record: its ``references`` (if any) with its ``completion`` first and no duplicates."""
    refs = [record["completion"], *record.get("references", [])]
    seen: set[str] = set()
    out = []
    for ref in refs:
        if ref not in seen:
            seen.add(ref)
            out.append(ref)
    return out


def _clamp(score: float) -> float:
    """Clip float noise (sacrebleu can return 100.00000000000004) into [0, 100]."""
    return float(min(100.0, max(0.0, score)))


def check_inputs(predictions: Sequence[str], records: Sequence[dict]) -> None:
    """Raise ``ValueError`` unless there is exactly one prediction per record and at least one of each."""
    if len(predictions) != len(records):
        raise ValueError(f"got {len(predictions)} predictions for {len(records)} records")
    if not predictions:
        raise ValueError("nothing to score: predictions is empty")


# --------------------------------------------------------------------------------------------------- exact match


def exact_match(predictions: list[str], records: list[dict]) -> float:
    """Percent of predictions equal to the completion or to any reference, after whitespace normalisation."""
    check_inputs(predictions, records)
    hits = 0
    for pred, rec in zip(predictions, records):
        pred = normalize_whitespace(pred)
        hits += any(pred == normalize_whitespace(ref) for ref in references_of(rec))
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


def final_answer(predictions: list[str], records: list[dict], marker: str = "####") -> float:
    """Percent of predictions whose final answer (after ``marker``) equals the gold final answer.

    The gold answer is extracted from the completion and each reference the same way (a target without the marker
    counts as a bare answer); a prediction without the marker is wrong. Numbers compare numerically when both parse.
    """
    check_inputs(predictions, records)
    hits = 0
    for pred, rec in zip(predictions, records):
        got = extract_final_answer(pred, marker)
        if got is None or got == "":
            continue
        gold = set()
        for ref in references_of(rec):
            ans = extract_final_answer(ref, marker)
            gold.add(ans if ans is not None else _ANSWER_JUNK.sub("", ref).rstrip("."))
        hits += any(_same_answer(got, g) for g in gold)
    return 100.0 * hits / len(predictions)


# --------------------------------------------------------------------------------------------------- BLEU


def bleu(predictions: list[str], records: list[dict], tokenize: str = "none") -> float:
    """Corpus BLEU-4 (sacrebleu) of the predictions against all references of each record.

    Records may have different numbers of references: sacrebleu's reference streams are padded with ``None``.
    ``tokenize="none"`` splits on whitespace only, which is right for the space-separated token text of the
    built-in tasks; use ``"13a"`` (sacrebleu's default, WMT standard) for real detokenised text.
    """
    check_inputs(predictions, records)
    from sacrebleu.metrics import BLEU

    refs = [references_of(rec) for rec in records]
    n_streams = max(len(r) for r in refs)
    streams = [[r[j] if j < len(r) else None for r in refs] for j in range(n_streams)]
    return _clamp(BLEU(tokenize=tokenize).corpus_score(list(predictions), streams).score)


def self_bleu(samples_per_input: list[list[str]], tokenize: str = "none") -> float:
    """Self-BLEU diversity: sentence BLEU of each sample against the *other* samples of the same input, averaged.

    100 means every input's samples are identical (no diversity); lower is more diverse. Sentence BLEU uses
    sacrebleu's effective order (n-gram orders longer than the sample are ignored), so short identical samples still
    score 100. Inputs with fewer than two samples are skipped. This is the diversity measure the GKD paper plots
    against ROUGE-2 when varying the sampling temperature (e.g. ``samples_per_input`` = 5 T=1 samples per prompt).
    """
    from sacrebleu.metrics import BLEU

    metric = BLEU(tokenize=tokenize, effective_order=True)
    scores = []
    for samples in samples_per_input:
        if len(samples) < 2:
            continue
        for i, hyp in enumerate(samples):
            others = samples[:i] + samples[i + 1 :]
            scores.append(metric.sentence_score(hyp, others).score)
    if not scores:
        raise ValueError("self_bleu needs at least one input with two or more samples")
    return _clamp(sum(scores) / len(scores))


# --------------------------------------------------------------------------------------------------- ROUGE


class _WhitespaceTokenizer:
    """rouge-score tokenizer that keeps the task's tokens verbatim (no lower-casing, no punctuation stripping)."""

    def tokenize(self, text: str) -> list[str]:
        return text.split()


_SCORERS: dict[tuple[str, str], Any] = {}


def _scorer(rouge_type: str, tokenizer: str) -> Any:
    """A cached ``rouge_score.rouge_scorer.RougeScorer`` for one ROUGE type and tokenizer."""
    from rouge_score import rouge_scorer

    key = (rouge_type, tokenizer)
    if key not in _SCORERS:
        if tokenizer == "whitespace":
            _SCORERS[key] = rouge_scorer.RougeScorer([rouge_type], tokenizer=_WhitespaceTokenizer())
        elif tokenizer == "default":
            _SCORERS[key] = rouge_scorer.RougeScorer([rouge_type])
        else:
            raise ValueError(f"unknown rouge tokenizer {tokenizer!r}; use 'whitespace' or 'default'")
    return _SCORERS[key]


def _rouge(rouge_type: str, predictions: list[str], records: list[dict], tokenizer: str) -> float:
    check_inputs(predictions, records)
    scorer = _scorer(rouge_type, tokenizer)
    total = 0.0
    for pred, rec in zip(predictions, records):
        total += max(scorer.score(ref, pred)[rouge_type].fmeasure for ref in references_of(rec))
    return 100.0 * total / len(predictions)


def rouge2(predictions: list[str], records: list[dict], tokenizer: str = "whitespace") -> float:
    """ROUGE-2 F1 (rouge-score), best over each record's references, averaged over records.

    Texts with fewer than two tokens have no bigrams and score 0.
    """
    return _rouge("rouge2", predictions, records, tokenizer)


def rougeL(predictions: list[str], records: list[dict], tokenizer: str = "whitespace") -> float:
    """ROUGE-L F1 (longest common subsequence), best over each record's references, averaged over records."""
    return _rouge("rougeL", predictions, records, tokenizer)


# --------------------------------------------------------------------------------------------------- registry

METRICS: dict[str, Metric] = {
    "exact_match": exact_match,
    "final_answer": final_answer,
    "bleu": bleu,
    "rouge2": rouge2,
    "rougeL": rougeL,
}


def get_metric(name: str) -> Metric:
    """Look a metric up by name; raises ``ValueError`` listing the valid names."""
    try:
        return METRICS[name]
    except KeyError:
        raise ValueError(f"unknown metric {name!r}; valid metrics: {', '.join(sorted(METRICS))}") from None
