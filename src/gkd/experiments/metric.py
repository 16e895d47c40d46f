"""A ``gkd study``'s metric on the user's data: the scoring function of a metric name or ``module:function``, and
the names of the evaluation modes (``greedy`` for temperature 0, ``T=<t>`` for the others)."""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["metric_scorer", "score_modes"]


def score_modes(temperatures: tuple[float, ...]) -> dict[str, float]:
    """A ``gkd study`` evaluation's modes: ``greedy`` for temperature 0, ``T=<t>`` for each other temperature."""
    return {("greedy" if t == 0 else f"T={t:g}"): float(t) for t in temperatures}


def metric_scorer(
    metric: str, tokenize: str = "standard"
) -> Callable[[list[dict], list[str]], dict[str, float]]:
    """The scoring function of a study's ``metric``: a name of :mod:`gkd.scoring` (:func:`gkd.scoring.resolve_scorer`),
    or ``module:function`` taking ``(prompts, completions, records)`` and returning one score in [0, 1] per completion
    (a reward's signature, :func:`gkd.scoring.load_reward`), reported as ``{metric: 100 × mean}``."""
    from gkd.metrics import prompt_text_of
    from gkd.scoring import load_reward, names, resolve_scorer

    if metric in names():
        return resolve_scorer(metric, key="metric", tokenize=tokenize)
    fn = load_reward(metric, key="metric")

    def score(records: list[dict], predictions: list[str]) -> dict[str, float]:
        values = list(fn([prompt_text_of(r) for r in records], predictions, records))
        return {metric: 100.0 * sum(float(v) for v in values) / max(1, len(values))}

    return score
