"""Generic text metrics for evaluating generations, with a small name -> function registry.

Every metric has the same signature::

    metric(predictions: list[str], records: list[dict]) -> float

``predictions[i]`` is the decoded completion the model produced for ``records[i]`` (EOS and padding already
stripped). A record is in any of the trainer's data formats (see :func:`references_of`): ``{"prompt": str,
"completion": str}``, ``{"messages": [...]}`` (a final assistant turn is the target), TRL's conversational
``{"prompt": [messages], "completion": [messages]}`` or a prompt-only ``{"prompt": ...}``, plus, optionally,
``"references": list[str]`` holding every valid target we know of. The target (completion) is the first
reference, followed by ``references``. A metric that compares against references raises :class:`NoReferenceError`
(a ``ValueError``) on a record that has none.

Each reference-based metric also has a per-example form ``NAME_score(record, prediction) -> float in [0, 1]``
(:func:`exact_match_score`, :func:`final_answer_score`, :func:`bleu_score`, :func:`rouge1_score`,
:func:`rouge2_score`, :func:`rougeL_score`, :func:`rougeLsum_score`), meant as RL rewards. For exact match, final
answer and ROUGE it equals the corpus metric on a one-record corpus divided by 100; :func:`bleu_score` is sentence
BLEU (effective order), since corpus BLEU-4 of one short sentence is often 0.

**All metrics return a percentage: a float in [0, 100]** (100 = perfect). This matches how the GKD paper reports
accuracy, BLEU and ROUGE, and lets tables mix metrics without rescaling.

Tokenisation. BLEU and ROUGE take ``tokenize`` (:data:`TOKENIZE_MODES`):

* ``"standard"``: the standard tokenisations for real text, sacrebleu's ``13a`` (the WMT default: punctuation split
  off, case kept) and rouge-score's default tokenizer (lower-cased, everything but ``[a-z0-9]`` is a separator, no
  stemming). This is what ``eval_metric: bleu`` / ``rouge*`` and the rewards of those names use by default
  (``eval_tokenize``, through :mod:`gkd.scoring`).
* ``"whitespace"``: split on whitespace only and keep every token exactly as written (case, ``~``, ``####`` and
  ``+`` all survive), for the built-in tasks' space-separated token text (one word per token). It is the default of
  the functions here, because the tasks' metrics call them, and it is what the task names always use.

:func:`bleu` also takes any sacrebleu tokenizer name (``"13a"``, ``"none"``, ``"intl"``, ``"zh"``, ...) and the ROUGE
functions ``"default"`` (= standard); ``tokenizer=`` is the ROUGE functions' older name for ``tokenize``.

Diversity is not a per-record metric, so it lives outside the registry: :func:`self_bleu` takes several samples per
input and returns 100 when the samples of each input are identical, lower when they differ.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

from gkd.data import message_text

# sacrebleu and rouge-score (which pulls in nltk, ~1 s) are imported inside the functions that use them, so that
# importing gkd.metrics / gkd.tasks stays cheap.

Metric = Callable[[list[str], list[dict]], float]

__all__ = [
    "METRICS",
    "TOKENIZE_MODES",
    "Metric",
    "NoReferenceError",
    "bleu",
    "bleu_score",
    "check_inputs",
    "chrf",
    "chrf_score",
    "exact_match",
    "exact_match_score",
    "extract_final_answer",
    "extract_gsm8k_answer",
    "final_answer",
    "final_answer_score",
    "get_metric",
    "gsm8k_answer",
    "gsm8k_answer_score",
    "normalize_whitespace",
    "prompt_text_of",
    "references_of",
    "require_references",
    "rouge1",
    "rouge1_score",
    "rouge2",
    "rouge2_score",
    "rougeL",
    "rougeL_score",
    "rougeLsum",
    "rougeLsum_score",
    "sacrebleu_tokenize",
    "self_bleu",
    "target_of",
]


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


# --------------------------------------------------------------------------------------------------- tokenisation

TOKENIZE_MODES = ("standard", "whitespace")
"""The two tokenisations of BLEU and ROUGE: ``standard`` (real text) and ``whitespace`` (the tasks' token text)."""


def sacrebleu_tokenize(tokenize: str) -> str:
    """sacrebleu's tokenizer name for ``tokenize``: ``standard`` -> ``13a``, ``whitespace`` -> ``none``; any other
    name is passed through (sacrebleu checks it)."""
    return {"standard": "13a", "whitespace": "none"}.get(tokenize, tokenize)


def _rouge_tokenize(tokenize: str | None, tokenizer: str | None) -> str:
    """The ROUGE tokenisation from ``tokenize`` or its older name ``tokenizer`` (default ``whitespace``):
    ``standard`` (also ``default``, rouge-score's name) or ``whitespace`` (also ``none``, sacrebleu's name)."""
    if tokenizer is not None:
        if tokenize is not None and tokenize != tokenizer:
            raise ValueError(f"give tokenize={tokenize!r} or tokenizer={tokenizer!r}, not both")
        tokenize = tokenizer
    name = tokenize or "whitespace"
    mode = {"default": "standard", "none": "whitespace"}.get(name, name)
    if mode not in TOKENIZE_MODES:
        raise ValueError(f"unknown rouge tokenize {tokenize!r}; use 'standard' or 'whitespace'")
    return mode


# --------------------------------------------------------------------------------------------------- BLEU


_BLEU: dict[tuple[str, bool], Any] = {}


def _bleu_metric(tokenize: str, sentence: bool) -> Any:
    """A cached sacrebleu ``BLEU`` (corpus, or sentence-level with effective order) for one tokenisation."""
    key = (sacrebleu_tokenize(tokenize), sentence)
    if key not in _BLEU:
        from sacrebleu.metrics import BLEU

        _BLEU[key] = BLEU(tokenize=key[0], effective_order=sentence)
    return _BLEU[key]


def bleu(predictions: list[str], records: list[dict], tokenize: str = "whitespace") -> float:
    """Corpus BLEU-4 (sacrebleu) of the predictions against all references of each record.

    Records may have different numbers of references: sacrebleu's reference streams are padded with ``None``.
    ``tokenize``: ``"whitespace"`` (sacrebleu's ``none``) splits on whitespace only, which is right for the
    space-separated token text of the built-in tasks; ``"standard"`` (``13a``, sacrebleu's default, WMT standard) is
    for real detokenised text; any other sacrebleu tokenizer name is used as is.
    """
    check_inputs(predictions, records)
    refs = [require_references(rec, i) for i, rec in enumerate(records)]
    n_streams = max(len(r) for r in refs)
    streams = [[r[j] if j < len(r) else None for r in refs] for j in range(n_streams)]
    return _clamp(_bleu_metric(tokenize, False).corpus_score(list(predictions), streams).score)


def bleu_score(record: dict, prediction: str, tokenize: str = "whitespace") -> float:
    """Sentence BLEU-4 in [0, 1] against all references of the record, with sacrebleu's effective order (n-gram
    orders longer than the prediction are ignored), so short outputs are not all 0. ``tokenize`` as in :func:`bleu`.
    """
    refs = require_references(record)
    return _clamp(_bleu_metric(tokenize, True).sentence_score(prediction, refs).score) / 100.0


_CHRF: dict[str, Any] = {}


def _chrf_metric() -> Any:
    """A cached sacrebleu ``CHRF`` with its defaults: character 6-grams, no word n-grams, beta 2 (chrF2)."""
    if "chrf" not in _CHRF:
        from sacrebleu.metrics import CHRF

        _CHRF["chrf"] = CHRF()
    return _CHRF["chrf"]


def chrf(predictions: list[str], records: list[dict]) -> float:
    """Corpus chrF (sacrebleu's ``CHRF()``: character n-grams up to 6, beta = 2, whitespace ignored), against all
    references of each record (sacrebleu keeps, per sentence, the reference with the best chrF).

    Character n-grams need no tokenisation, so chrF takes no ``tokenize``. The statistics are summed over the
    corpus before the F-score is taken (sacrebleu's corpus chrF, as WMT reports it), so it is not the mean of
    :func:`chrf_score`.
    """
    check_inputs(predictions, records)
    refs = [require_references(rec, i) for i, rec in enumerate(records)]
    n_streams = max(len(r) for r in refs)
    streams = [[r[j] if j < len(r) else None for r in refs] for j in range(n_streams)]
    return _clamp(_chrf_metric().corpus_score(list(predictions), streams).score)


def chrf_score(record: dict, prediction: str) -> float:
    """Sentence chrF in [0, 1], best over the record's references (equals :func:`chrf` of a one-record corpus
    divided by 100)."""
    refs = require_references(record)
    return _clamp(_chrf_metric().sentence_score(prediction, refs).score) / 100.0


def self_bleu(samples_per_input: list[list[str]], tokenize: str = "whitespace") -> float:
    """Self-BLEU diversity: sentence BLEU of each sample against the *other* samples of the same input, averaged.

    100 means every input's samples are identical (no diversity); lower is more diverse. Sentence BLEU uses
    sacrebleu's effective order (n-gram orders longer than the sample are ignored), so short identical samples still
    score 100. Inputs with fewer than two samples are skipped. This is the diversity measure the GKD paper plots
    against ROUGE-2 when varying the sampling temperature (e.g. ``samples_per_input`` = 5 T=1 samples per prompt).
    ``tokenize`` as in :func:`bleu`.
    """
    metric = _bleu_metric(tokenize, True)
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
    """rouge-score tokenizer that keeps the task's tokens verbatim (no lower-casing, no punctuation stripping);
    with ``use_stemmer``, tokens longer than 3 characters are Porter-stemmed (rouge-score's own rule)."""

    def __init__(self, use_stemmer: bool = False):
        if use_stemmer:
            from nltk.stem import porter

            self._stemmer: Any = porter.PorterStemmer()
        else:
            self._stemmer = None

    def tokenize(self, text: str) -> list[str]:
        tokens = text.split()
        if self._stemmer is None:
            return tokens
        return [self._stemmer.stem(t) if len(t) > 3 else t for t in tokens]


_SCORERS: dict[tuple[str, str, bool], Any] = {}


def _scorer(rouge_type: str, tokenize: str, use_stemmer: bool = False) -> Any:
    """A cached ``rouge_score.rouge_scorer.RougeScorer`` for one ROUGE type, tokenisation (``standard``: the
    package's default tokenizer; ``whitespace``: tokens as written) and stemming choice (``use_stemmer``: Porter
    stemming of tokens longer than 3 characters, rouge-score's ``use_stemmer=True``)."""
    from rouge_score import rouge_scorer

    mode = _rouge_tokenize(tokenize, None)
    key = (rouge_type, mode, bool(use_stemmer))
    if key not in _SCORERS:
        if mode == "whitespace":
            tok = _WhitespaceTokenizer(use_stemmer)
            _SCORERS[key] = rouge_scorer.RougeScorer([rouge_type], tokenizer=tok)
        else:
            _SCORERS[key] = rouge_scorer.RougeScorer([rouge_type], use_stemmer=bool(use_stemmer))
    return _SCORERS[key]


def _best_rouge(scorer: Any, rouge_type: str, prediction: str, refs: list[str]) -> float:
    return max(scorer.score(ref, prediction)[rouge_type].fmeasure for ref in refs)


def _rouge(
    rouge_type: str, predictions: list[str], records: list[dict], tokenize: str, use_stemmer: bool = False
) -> float:
    check_inputs(predictions, records)
    scorer = _scorer(rouge_type, tokenize, use_stemmer)
    total = 0.0
    for i, (pred, rec) in enumerate(zip(predictions, records)):
        total += _best_rouge(scorer, rouge_type, pred, require_references(rec, i))
    return 100.0 * total / len(predictions)


def _rouge_example(
    rouge_type: str, record: dict, prediction: str, tokenize: str, use_stemmer: bool = False
) -> float:
    scorer = _scorer(rouge_type, tokenize, use_stemmer)
    return _best_rouge(scorer, rouge_type, prediction, require_references(record))


def rouge1_score(
    record: dict,
    prediction: str,
    tokenize: str | None = None,
    *,
    tokenizer: str | None = None,
    use_stemmer: bool = False,
) -> float:
    """ROUGE-1 F1 in [0, 1], best over the record's references (same tokenisation and cached scorer as :func:`rouge1`)."""
    return _rouge_example("rouge1", record, prediction, _rouge_tokenize(tokenize, tokenizer), use_stemmer)


def rouge2_score(
    record: dict,
    prediction: str,
    tokenize: str | None = None,
    *,
    tokenizer: str | None = None,
    use_stemmer: bool = False,
) -> float:
    """ROUGE-2 F1 in [0, 1], best over the record's references (same tokenisation and cached scorer as :func:`rouge2`)."""
    return _rouge_example("rouge2", record, prediction, _rouge_tokenize(tokenize, tokenizer), use_stemmer)


def rougeL_score(
    record: dict,
    prediction: str,
    tokenize: str | None = None,
    *,
    tokenizer: str | None = None,
    use_stemmer: bool = False,
) -> float:
    """ROUGE-L F1 in [0, 1], best over the record's references (same tokenisation and cached scorer as :func:`rougeL`)."""
    return _rouge_example("rougeL", record, prediction, _rouge_tokenize(tokenize, tokenizer), use_stemmer)


def rougeLsum_score(
    record: dict,
    prediction: str,
    tokenize: str | None = None,
    *,
    tokenizer: str | None = None,
    use_stemmer: bool = False,
) -> float:
    """ROUGE-Lsum F1 in [0, 1], best over the record's references (as :func:`rougeLsum`)."""
    return _rouge_example("rougeLsum", record, prediction, _rouge_tokenize(tokenize, tokenizer), use_stemmer)


def rouge1(
    predictions: list[str],
    records: list[dict],
    tokenize: str | None = None,
    *,
    tokenizer: str | None = None,
    use_stemmer: bool = False,
) -> float:
    """ROUGE-1 F1 (unigram overlap, rouge-score), best over each record's references, averaged over records.

    ``tokenize``: ``"whitespace"`` (default: tokens as written) or ``"standard"`` (rouge-score's default tokenizer:
    lower-cased, punctuation dropped); ``tokenizer=`` is the older name (``"default"`` = standard).
    ``use_stemmer``: Porter-stem tokens longer than 3 characters before matching (rouge-score's ``use_stemmer=True``,
    what XSum / CNN-DM papers report; ``cats`` and ``cat`` then match). Off by default.
    """
    return _rouge("rouge1", predictions, records, _rouge_tokenize(tokenize, tokenizer), use_stemmer)


def rouge2(
    predictions: list[str],
    records: list[dict],
    tokenize: str | None = None,
    *,
    tokenizer: str | None = None,
    use_stemmer: bool = False,
) -> float:
    """ROUGE-2 F1 (rouge-score), best over each record's references, averaged over records.

    Texts with fewer than two tokens have no bigrams and score 0. ``tokenize`` as in :func:`rouge1`.
    """
    return _rouge("rouge2", predictions, records, _rouge_tokenize(tokenize, tokenizer), use_stemmer)


def rougeL(
    predictions: list[str],
    records: list[dict],
    tokenize: str | None = None,
    *,
    tokenizer: str | None = None,
    use_stemmer: bool = False,
) -> float:
    """ROUGE-L F1 (longest common subsequence), best over each record's references, averaged over records.
    ``tokenize`` as in :func:`rouge1`."""
    return _rouge("rougeL", predictions, records, _rouge_tokenize(tokenize, tokenizer), use_stemmer)


def rougeLsum(
    predictions: list[str],
    records: list[dict],
    tokenize: str | None = None,
    *,
    tokenizer: str | None = None,
    use_stemmer: bool = False,
) -> float:
    """ROUGE-Lsum F1 (summary-level LCS: texts are split into sentences on newlines, the union LCS of each reference
    sentence is counted), best over each record's references, averaged over records. ``tokenize`` as in
    :func:`rouge1`. Without newlines it equals :func:`rougeL`."""
    return _rouge("rougeLsum", predictions, records, _rouge_tokenize(tokenize, tokenizer), use_stemmer)


# --------------------------------------------------------------------------------------------------- registry

METRICS: dict[str, Metric] = {
    "exact_match": exact_match,
    "final_answer": final_answer,
    "bleu": bleu,
    "rouge1": rouge1,
    "rouge2": rouge2,
    "rougeL": rougeL,
    "rougeLsum": rougeLsum,
    "chrf": chrf,
    "gsm8k_answer": gsm8k_answer,
}


def get_metric(name: str) -> Metric:
    """Look a metric up by name; raises ``ValueError`` listing the valid names."""
    try:
        return METRICS[name]
    except KeyError:
        raise ValueError(f"unknown metric {name!r}; valid metrics: {', '.join(sorted(METRICS))}") from None
