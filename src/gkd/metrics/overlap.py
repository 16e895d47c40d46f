"""Text-overlap metrics: tokenisation rules, sacrebleu BLEU and chrF, Self-BLEU, ROUGE (rouge-score, optional stemming)."""

from __future__ import annotations

from typing import Any

# sacrebleu and rouge-score (which pulls in nltk, ~1 s) are imported inside the functions that use them, so that
# importing gkd.metrics / gkd.tasks stays cheap.
from gkd.metrics.records import _clamp, check_inputs, require_references

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


def bleu_statistics(
    predictions: list[str], records: list[dict], tokenize: str = "whitespace"
) -> list[list[int]]:
    """Each example's BLEU sufficient statistics, ``[sys_len, ref_len, correct_1..4, total_1..4]`` (sacrebleu's).

    Corpus BLEU pools these over the corpus: :func:`bleu_from_statistics` of their column sums equals
    :func:`bleu` of the same examples, so a resample of the corpus (bootstrap intervals) is scored without
    tokenising again. ``tokenize`` as in :func:`bleu`.
    """
    check_inputs(predictions, records)
    metric = _bleu_metric(tokenize, True)  # a segment's counts do not depend on the effective order
    out = []
    for i, (pred, rec) in enumerate(zip(predictions, records)):
        seg = metric.sentence_score(pred, require_references(rec, i))
        out.append([seg.sys_len, seg.ref_len, *seg.counts, *seg.totals])
    return out


def bleu_from_statistics(stats: Any) -> float:
    """Corpus BLEU-4 (percent) from summed :func:`bleu_statistics` (10 numbers), with corpus BLEU's smoothing."""
    from sacrebleu.metrics import BLEU

    stats = [int(v) for v in stats]
    score = BLEU.compute_bleu(stats[2:6], stats[6:10], stats[0], stats[1], smooth_method="exp")
    return _clamp(score.score)


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
