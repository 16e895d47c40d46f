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

Multiple choice (:mod:`gkd.metrics.choices`): records with ``choices`` and ``answer`` are scored from the choices'
log-likelihoods, not from generated text (:func:`mc_accuracy`, :func:`mc_correct`); confidence intervals over the
examples are in :mod:`gkd.metrics.bootstrap` (:func:`bootstrap_ci`, :func:`bootstrap_ci_of`).

Diversity is not a per-record metric, so it lives outside the registry: :func:`self_bleu` takes several samples per
input and returns 100 when the samples of each input are identical, lower when they differ.
"""

from __future__ import annotations

from collections.abc import Callable

from gkd.metrics.answers import (
    exact_match,
    exact_match_score,
    extract_final_answer,
    extract_gsm8k_answer,
    final_answer,
    final_answer_score,
    gsm8k_answer,
    gsm8k_answer_score,
)
from gkd.metrics.bootstrap import CONFIDENCE, bootstrap_ci, bootstrap_ci_of
from gkd.metrics.choices import MC_METRICS, answer_index, choices_of, mc_accuracy, mc_correct
from gkd.metrics.overlap import (
    TOKENIZE_MODES,
    bleu,
    bleu_from_statistics,
    bleu_score,
    bleu_statistics,
    chrf,
    chrf_score,
    rouge1,
    rouge1_score,
    rouge2,
    rouge2_score,
    rougeL,
    rougeL_score,
    rougeLsum,
    rougeLsum_score,
    sacrebleu_tokenize,
    self_bleu,
)
from gkd.metrics.records import (
    NoReferenceError,
    check_inputs,
    normalize_whitespace,
    prompt_text_of,
    references_of,
    require_references,
    target_of,
)

Metric = Callable[[list[str], list[dict]], float]

__all__ = [
    "CONFIDENCE",
    "MC_METRICS",
    "METRICS",
    "TOKENIZE_MODES",
    "Metric",
    "NoReferenceError",
    "answer_index",
    "bleu",
    "bleu_from_statistics",
    "bleu_score",
    "bleu_statistics",
    "bootstrap_ci",
    "bootstrap_ci_of",
    "check_inputs",
    "choices_of",
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
    "mc_accuracy",
    "mc_correct",
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
