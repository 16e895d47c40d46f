"""Generating completions for a set of records and scoring them: the one evaluation loop.

:func:`evaluate` is the evaluation of ``gkd eval``, of the trainer (``eval_dataset``) and of the experiment studies:
greedy decoding plus sampling at any number of named temperatures, each with one or more seeded samples per prompt
(several samples add self-BLEU over each prompt's samples). Every completion comes from a
:class:`gkd.sampling.Sampler` (default: the local ``auto`` backend) through :func:`gkd.sampling.generate_ids`, so a
given ``(sampler, seed, batch_size)`` always yields the same completions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

from gkd.data import TokenizedDataset, load_records
from gkd.errors import DataError
from gkd.metrics import prompt_text_of, self_bleu, target_of
from gkd.models import unwrap
from gkd.sampling import LocalSampler, Sampler, eos_ids, generate_ids
from gkd.scoring import DEFAULT_TOKENIZE, TASK_TOKENIZE, get_scorer, resolve_scorer

__all__ = [
    "FEWSHOT_SEPARATOR",
    "eos_ids",
    "evaluate",
    "flatten",
    "generate_ids",
    "generate_texts",
    "load_fewshot",
    "with_fewshot",
]

ScoreFn = Callable[[list[dict], list[str]], dict[str, float]]


def generate_texts(model: Any, tokenizer: Any, dataset: TokenizedDataset, **kw: Any) -> list[str]:
    """Decoded completions (special tokens removed) for every example of ``dataset`` (``kw``: :func:`generate_ids`)."""
    ids = generate_ids(model, tokenizer, dataset, **kw)
    return [tokenizer.decode(t, skip_special_tokens=True).strip() for t in ids]


def evaluate(
    model: Any,
    tokenizer: Any,
    dataset: TokenizedDataset,
    scorer: str | ScoreFn,
    *,
    max_new_tokens: int,
    greedy: bool = True,
    sampled: Mapping[str, float] | None = None,
    seeds: Sequence[int] = (0,),
    top_k: int = 0,
    top_p: float = 1.0,
    batch_size: int = 64,
    sampler: Sampler | None = None,
    tokenize: str | None = None,
) -> dict[str, dict[str, float]]:
    """Score ``model``'s completions of ``dataset``: greedy decoding and sampling, ``{mode: {metric: value}}``.

    * ``scorer``: a name of :mod:`gkd.scoring` (a metric, task metric or task name, through
      :func:`gkd.scoring.resolve_scorer`), or any ``(records, predictions) -> {metric: value}`` callable such as
      ``Task.score``. It sees the dataset's records (prompt/completion or ``messages`` records alike).
    * ``greedy``: score greedy decoding as mode ``"greedy"`` (first).
    * ``sampled``: the sampled modes, name -> temperature, in order (default ``{"sample": 1.0}``; ``{}`` for
      greedy only). Each mode samples once per entry of ``seeds`` (one ``torch.Generator`` per seed, the same seeds
      at every temperature), and its metrics are the mean over those samples. With two or more seeds a mode also
      gets ``self_bleu`` (:func:`gkd.metrics.self_bleu`) over each prompt's samples.
    * ``top_k`` / ``top_p`` / ``batch_size`` / ``max_new_tokens``: as in :func:`generate_ids`; the batch size is
      part of what fixes the samples of a seed.
    * ``sampler``: the backend (default: the local ``auto`` sampler). ``sampler.sync(model)`` is called once,
      before the first completion.
    * ``tokenize``: ``standard`` or ``whitespace`` (the config's ``eval_tokenize``), how a ``scorer`` name
      ``bleu`` / ``rouge*`` and self-BLEU tokenise text (:mod:`gkd.scoring`); default ``standard``. Task names
      and task metrics always score (and self-BLEU) in the tasks' ``whitespace`` mode; with a callable ``scorer``
      (e.g. ``Task.score``) self-BLEU uses ``tokenize`` if given, else ``whitespace``.

    :func:`flatten` turns the result into ``{"greedy/<metric>": value, ...}`` keys. The callers map onto it as::

        gkd eval:      evaluate(m, tok, data, name, sampled={} if greedy_only else {"sample": T}, seeds=(seed,), ...)
        trainer:       flatten(evaluate(m, tok, data, cfg.eval_metric, sampled={"sample": cfg.temperature},
                               seeds=(cfg.seed,), batch_size=cfg.eval_batch_size, sampler=...,
                               tokenize=cfg.eval_tokenize), prefix="eval/")
        experiments:   evaluate(m, tok, data, task.score, sampled={"sample" if t == 1 else f"sample_{t:g}": t
                               for t in temperatures}, seeds=[seed * 1000 + k for k in range(samples)],
                               batch_size=500)
    """
    score, diversity_tokenize = _score_fn(scorer, tokenize)
    if sampled is None:
        sampled = {"sample": 1.0}
    seeds = list(seeds)
    if sampled and not seeds:
        raise ValueError("evaluate needs at least one seed for its sampled modes")
    if sampler is None:
        sampler = LocalSampler("auto")
    records = [e.record for e in dataset.examples]
    common: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "top_k": top_k,
        "top_p": top_p,
        "batch_size": batch_size,
        "sampler": sampler,
        "sync": False,
    }
    sampler.sync(unwrap(model))
    out: dict[str, dict[str, float]] = {}
    if greedy:
        preds = generate_texts(model, tokenizer, dataset, greedy=True, **common)
        out["greedy"] = dict(score(records, preds))
    for mode, temperature in sampled.items():
        sample = partial(
            generate_texts, model, tokenizer, dataset, greedy=False, temperature=temperature, **common
        )
        out[mode] = _sampled_scores(sample, score, records, seeds, diversity_tokenize)
    return out


def _score_fn(scorer: str | ScoreFn, tokenize: str | None) -> tuple[ScoreFn, str]:
    """The scoring function of ``scorer`` and how self-BLEU tokenises its samples (see :func:`evaluate`)."""
    if not isinstance(scorer, str):
        return scorer, tokenize or "whitespace"
    text_tokenize = tokenize or DEFAULT_TOKENIZE
    score = resolve_scorer(scorer, tokenize=text_tokenize)
    # self-BLEU of a task name's (or task metric's) samples: the tasks' token text, as the experiments score it
    return score, TASK_TOKENIZE if get_scorer(scorer).task is not None else text_tokenize


def _sampled_scores(
    sample: Callable[..., list[str]],
    score: ScoreFn,
    records: list[dict],
    seeds: list[int],
    diversity_tokenize: str,
) -> dict[str, float]:
    """One sampled mode: each metric's mean over the seeds' samples, and self-BLEU with two or more seeds."""
    runs = []
    scores: dict[str, float] = {}
    for seed in seeds:
        preds = sample(seed=seed)
        runs.append(preds)
        for key, value in score(records, preds).items():
            scores[key] = scores.get(key, 0.0) + value / len(seeds)
    if len(seeds) > 1:
        scores["self_bleu"] = self_bleu([list(s) for s in zip(*runs)], tokenize=diversity_tokenize)
    return scores


def flatten(results: Mapping[str, Mapping[str, float]], prefix: str = "") -> dict[str, float]:
    """``{mode: {metric: v}}`` -> ``{f"{prefix}{mode}/{metric}": v}``, in order (e.g. ``prefix="eval/"``)."""
    return {f"{prefix}{mode}/{k}": v for mode, scores in results.items() for k, v in scores.items()}


# --------------------------------------------------------------------------------------------------- few-shot

FEWSHOT_SEPARATOR = "\n\n"
"""What follows each shot of a text prompt: a blank line."""


def load_fewshot(path: str, k: int | None = None, key: str = "eval_fewshot_file") -> list[tuple[str, str]]:
    """The first ``k`` (default: all) examples of a few-shot file as ``(prompt, target)`` pairs.

    The file is any dataset gkd reads (JSONL, JSON, CSV, Parquet) of records with a prompt and a target in any
    training format (``prompt``/``completion``, ``messages`` ending with an assistant turn, ...). A file with fewer
    than ``k`` examples, or an example without a target, is a one-line :class:`DataError` naming ``key``.
    """
    records, _ = load_records(path, "train", split_key=key)
    if k is not None and len(records) < k:
        raise DataError(f"{key} '{path}' has {len(records)} examples, fewer than the {k} asked for")
    shots = []
    for i, rec in enumerate(records[:k] if k is not None else records):
        target = target_of({kk: v for kk, v in rec.items() if v is not None})
        try:
            prompt = prompt_text_of(rec)
        except ValueError as e:
            raise DataError(f"{key} '{path}' example {i}: {e}") from None
        if target is None:
            raise DataError(
                f"{key} '{path}' example {i} has no target (a completion or a final assistant turn); "
                "each shot needs its worked answer"
            )
        shots.append((prompt, target))
    return shots


def with_fewshot(records: Sequence[dict], shots: Sequence[tuple[str, str]]) -> list[dict]:
    """``records`` with the ``shots`` (``(prompt, target)`` pairs) in front of each prompt.

    * a text prompt (``{"prompt": str, ...}``) becomes ``shot_prompt + shot_target + "\\n\\n"`` for every shot,
      then the record's own prompt: each shot is written exactly as the model sees a prompt followed by its
      completion (so give the shots the prompt/answer layout of the data, e.g. ``"Question: ...\\nAnswer:"`` and
      ``" ... #### 72"``);
    * a conversation (``messages``, or a conversational ``prompt``) gets each shot as a user turn and an assistant
      turn, after a leading system message and before the record's own turns (the chat template does the rest).

    The target, ``references`` and every other field are kept, so metrics score exactly as without shots.
    """
    if not shots:
        return list(records)
    text = "".join(p + t + FEWSHOT_SEPARATOR for p, t in shots)
    turns = [
        m for p, t in shots for m in ({"role": "user", "content": p}, {"role": "assistant", "content": t})
    ]
    out = []
    for rec in records:
        field = "messages" if rec.get("messages") is not None else "prompt"
        value = rec.get(field)
        if isinstance(value, str):
            out.append({**rec, field: text + value})
        elif isinstance(value, list):
            lead = [m for m in value[:1] if isinstance(m, dict) and m.get("role") == "system"]
            out.append({**rec, field: [*lead, *turns, *value[len(lead) :]]})
        else:
            out.append(rec)  # no prompt: tokenisation reports it
    return out
