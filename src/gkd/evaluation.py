"""Generating completions for a set of records and scoring them: the one evaluation loop.

:func:`evaluate` is the evaluation of ``gkd eval``, of the trainer (``eval_dataset``) and of the experiment studies:
greedy decoding (or beam search, ``num_beams``) plus sampling at any number of named temperatures, each with one or
more seeded samples per prompt (several samples add self-BLEU over each prompt's samples). Every sampled or greedy
completion comes from a :class:`gkd.sampling.Sampler` (default: the local ``auto`` backend) through
:func:`gkd.sampling.generate_ids`, so a given ``(sampler, seed, batch_size)`` always yields the same completions;
beam search is transformers' ``model.generate(num_beams=..., do_sample=False)`` (:func:`beam_search_ids`).

Two evaluations as papers report them sit beside generation:

* multiple choice (``mc_accuracy`` / ``mc_accuracy_norm``, :mod:`gkd.metrics.choices`): no generation, each choice's
  log-likelihood after the prompt (:func:`choice_loglikelihoods`), as lm-evaluation-harness's ``acc`` / ``acc_norm``;
* bootstrap confidence intervals (``bootstrap=N``): a 95 % percentile interval of every metric over ``N`` resamples
  of the test set's examples, as ``<metric>_ci_low`` / ``<metric>_ci_high`` (:mod:`gkd.metrics.bootstrap`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch

from gkd.data import TokenizedDataset, collate, load_records
from gkd.errors import ConfigError, DataError
from gkd.metrics import (
    bleu_from_statistics,
    bleu_statistics,
    bootstrap_ci,
    bootstrap_ci_of,
    choices_of,
    mc_accuracy,
    mc_correct,
    prompt_text_of,
    self_bleu,
    target_of,
)
from gkd.models import eval_mode, unwrap
from gkd.sampling import LocalSampler, Sampler, SamplingParams, eos_ids, generate_ids
from gkd.sampling.local import beam_generate
from gkd.scoring import (
    DEFAULT_TOKENIZE,
    MEAN_METRICS,
    TASK_TOKENIZE,
    get_scorer,
    is_mc_metric,
    resolve_scorer,
)

__all__ = [
    "FEWSHOT_SEPARATOR",
    "MC_DELIMITER",
    "beam_search_ids",
    "beam_search_texts",
    "choice_loglikelihoods",
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
    num_beams: int = 1,
    length_penalty: float = 1.0,
    bootstrap: int = 0,
    bootstrap_seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Score ``model``'s completions of ``dataset``: greedy decoding and sampling, ``{mode: {metric: value}}``.

    * ``scorer``: a name of :mod:`gkd.scoring` (a metric, task metric or task name, through
      :func:`gkd.scoring.resolve_scorer`), or any ``(records, predictions) -> {metric: value}`` callable such as
      ``Task.score``. It sees the dataset's records (prompt/completion or ``messages`` records alike). A
      multiple-choice name (``mc_accuracy`` / ``mc_accuracy_norm``) generates nothing: the result is the one mode
      ``"mc"`` with both accuracies (the named one first), from :func:`choice_loglikelihoods`; the decoding
      arguments are not used.
    * ``greedy``: score greedy decoding as mode ``"greedy"`` (first); with ``num_beams`` > 1, beam search instead,
      as mode ``"beam"`` (:func:`beam_search_texts`, with ``length_penalty``).
    * ``sampled``: the sampled modes, name -> temperature, in order (default ``{"sample": 1.0}``; ``{}`` for
      greedy only). Each mode samples once per entry of ``seeds`` (one ``torch.Generator`` per seed, the same seeds
      at every temperature), and its metrics are the mean over those samples. With two or more seeds a mode also
      gets ``self_bleu`` (:func:`gkd.metrics.self_bleu`) over each prompt's samples.
    * ``top_k`` / ``top_p`` / ``batch_size`` / ``max_new_tokens``: as in :func:`generate_ids`; the batch size is
      part of what fixes the samples of a seed.
    * ``sampler``: the backend (default: the local ``auto`` sampler). ``sampler.sync(model)`` is called once,
      before the first completion. Beam search always runs ``model.generate`` in this process.
    * ``tokenize``: ``standard`` or ``whitespace`` (the config's ``eval_tokenize``), how a ``scorer`` name
      ``bleu`` / ``rouge*`` and self-BLEU tokenise text (:mod:`gkd.scoring`); default ``standard``. Task names
      and task metrics always score (and self-BLEU) in the tasks' ``whitespace`` mode; with a callable ``scorer``
      (e.g. ``Task.score``) self-BLEU uses ``tokenize`` if given, else ``whitespace``.
    * ``bootstrap``: with ``N`` > 0, every metric of every mode (not self-BLEU) gets a 95 % percentile bootstrap
      interval over ``N`` resamples of the examples drawn from ``bootstrap_seed``, as ``<metric>_ci_low`` and
      ``<metric>_ci_high`` right after it. A sampled mode resamples the same examples in each seed's samples.
      Metrics that are means of per-example values (exact match, ROUGE, answers, multiple choice) resample those
      values; ``bleu`` is recomputed on each resample from the examples' pooled n-gram statistics
      (:func:`gkd.metrics.bleu_statistics`); any other metric (chrF, task metrics, a callable) is scored from the
      text again on each resample (slower).

    :func:`flatten` turns the result into ``{"greedy/<metric>": value, ...}`` keys. The callers map onto it as::

        gkd eval:      evaluate(m, tok, data, name, sampled={} if greedy_only else {"sample": T}, seeds=(seed,),
                               num_beams=..., bootstrap=..., bootstrap_seed=seed, ...)
        trainer:       flatten(evaluate(m, tok, data, cfg.eval_metric, sampled={"sample": cfg.temperature},
                               seeds=(cfg.seed,), batch_size=cfg.eval_batch_size, sampler=...,
                               tokenize=cfg.eval_tokenize, num_beams=cfg.eval_num_beams, ...), prefix="eval/")
        experiments:   evaluate(m, tok, data, task.score, sampled={"sample" if t == 1 else f"sample_{t:g}": t
                               for t in temperatures}, seeds=[seed * 1000 + k for k in range(samples)],
                               batch_size=500)
    """
    _check_options(num_beams, length_penalty, bootstrap, len(dataset))
    intervals = (
        partial(_with_intervals, n=len(dataset), n_resamples=bootstrap, seed=bootstrap_seed)
        if bootstrap
        else None
    )
    records = [e.record for e in dataset.examples]
    if isinstance(scorer, str) and is_mc_metric(scorer):
        lls = choice_loglikelihoods(model, tokenizer, dataset, batch_size=batch_size)
        return {"mc": _mc_scores(scorer, records, lls, intervals)}
    score, diversity_tokenize = _score_fn(scorer, tokenize)
    fast = _fast_resampling(scorer, tokenize)
    if sampled is None:
        sampled = {"sample": 1.0}
    seeds = list(seeds)
    if sampled and not seeds:
        raise ValueError("evaluate needs at least one seed for its sampled modes")
    if sampler is None:
        sampler = LocalSampler("auto")
    common: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "top_k": top_k,
        "top_p": top_p,
        "batch_size": batch_size,
        "sampler": sampler,
        "sync": False,
    }
    sampler.sync(unwrap(model))
    scored = partial(_scored_runs, score=score, records=records, fast=fast, intervals=intervals)
    out: dict[str, dict[str, float]] = {}
    if greedy and num_beams > 1:
        beams = {"num_beams": num_beams, "length_penalty": length_penalty, "batch_size": batch_size}
        out["beam"] = scored(
            [beam_search_texts(model, tokenizer, dataset, max_new_tokens=max_new_tokens, **beams)]
        )
    elif greedy:
        out["greedy"] = scored([generate_texts(model, tokenizer, dataset, greedy=True, **common)])
    for mode, temperature in sampled.items():
        sample = partial(
            generate_texts, model, tokenizer, dataset, greedy=False, temperature=temperature, **common
        )
        runs = [sample(seed=seed) for seed in seeds]
        out[mode] = scored(runs)
        if len(runs) > 1:
            out[mode]["self_bleu"] = self_bleu([list(s) for s in zip(*runs)], tokenize=diversity_tokenize)
    return out


def _mc_scores(
    name: str, records: list[dict], lls: list[list[float]], intervals: Callable[..., dict[str, float]] | None
) -> dict[str, float]:
    """Both multiple-choice accuracies (``name`` first), with bootstrap intervals over per-example correctness."""
    scores = mc_accuracy(records, lls)
    scores = {name: scores[name], **scores}
    if intervals is None:
        return scores
    per = mc_correct(records, lls)
    return intervals(scores, mean_values={k: 100.0 * v for k, v in per.items()})


def _check_options(num_beams: int, length_penalty: float, bootstrap: int, n: int) -> None:
    """One-line :class:`ConfigError` / :class:`DataError` for beam and bootstrap settings that cannot work."""
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise ConfigError(f"num_beams must be a positive integer (1: greedy decoding), got {num_beams!r}")
    if not np.isfinite(length_penalty):
        raise ConfigError(f"length_penalty must be a finite number, got {length_penalty!r}")
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 0:
        raise ConfigError(
            f"bootstrap must be a number of resamples >= 0 (0: no intervals), got {bootstrap!r}"
        )
    if bootstrap and n < 2:
        raise DataError(f"bootstrap intervals need at least 2 examples, the evaluation data has {n}")


def _score_fn(scorer: str | ScoreFn, tokenize: str | None) -> tuple[ScoreFn, str]:
    """The scoring function of ``scorer`` and how self-BLEU tokenises its samples (see :func:`evaluate`)."""
    if not isinstance(scorer, str):
        return scorer, tokenize or "whitespace"
    text_tokenize = tokenize or DEFAULT_TOKENIZE
    score = resolve_scorer(scorer, tokenize=text_tokenize)
    # self-BLEU of a task name's (or task metric's) samples: the tasks' token text, as the experiments score it
    return score, TASK_TOKENIZE if get_scorer(scorer).task is not None else text_tokenize


RowsFn = Callable[[list[dict], list[str]], np.ndarray]


def _fast_resampling(scorer: str | ScoreFn, tokenize: str | None) -> tuple[str, RowsFn] | None:
    """How a scorer name's bootstrap resamples are scored without recomputing the metric from text:

    * ``("mean", rows)``: the metric is the mean of per-example values (``rows``: one value per example, percent);
    * ``("bleu", rows)``: corpus BLEU from the summed per-example sufficient statistics (``rows``: ``[n, 10]``);
    * ``None``: anything else (chrF, task names and metrics, callables) is recomputed on each resample.
    """
    if not isinstance(scorer, str):
        return None
    text_tokenize = tokenize or DEFAULT_TOKENIZE
    if scorer == "bleu":
        return "bleu", lambda recs, preds: np.array(bleu_statistics(preds, recs, text_tokenize))
    if scorer not in MEAN_METRICS or get_scorer(scorer).kind != "metric":
        return None
    example = get_scorer(scorer, tokenize=text_tokenize).example
    return "mean", lambda recs, preds: np.array([100.0 * example(r, p) for r, p in zip(recs, preds)])


def _scored_runs(
    runs: list[list[str]],
    *,
    score: ScoreFn,
    records: list[dict],
    fast: tuple[str, RowsFn] | None,
    intervals: Callable[..., dict[str, float]] | None,
) -> dict[str, float]:
    """One mode: each metric's mean over the runs (one run per seed), with bootstrap intervals when asked."""
    scores: dict[str, float] = {}
    for preds in runs:
        for key, value in score(records, preds).items():
            scores[key] = scores.get(key, 0.0) + value / len(runs)
    if intervals is None:
        return scores
    if fast is not None and len(scores) == 1:  # per-example rows, computed once
        (name,), (kind, rows) = scores, fast
        arrays = [rows(records, preds) for preds in runs]
        if kind == "mean":
            return intervals(scores, mean_values={name: np.mean(arrays, axis=0)})
        return intervals(
            scores,
            statistic=lambda idx: [float(np.mean([bleu_from_statistics(a[idx].sum(0)) for a in arrays]))],
        )

    def statistic(indices: np.ndarray) -> list[float]:
        sub = [records[i] for i in indices]
        totals = dict.fromkeys(scores, 0.0)
        for preds in runs:
            got = score(sub, [preds[i] for i in indices])
            for key in totals:
                totals[key] += got[key] / len(runs)
        return list(totals.values())

    return intervals(scores, statistic=statistic)


def _with_intervals(
    scores: dict[str, float],
    *,
    n: int,
    n_resamples: int,
    seed: int,
    mean_values: Mapping[str, np.ndarray] | None = None,
    statistic: Callable[[np.ndarray], list[float]] | None = None,
) -> dict[str, float]:
    """``scores`` with ``<metric>_ci_low`` / ``<metric>_ci_high`` after each metric (:mod:`gkd.metrics.bootstrap`)
    over ``n`` examples: from per-example ``mean_values`` (metric -> values), or from a ``statistic`` that
    recomputes every metric (in ``scores``' order) on resampled example indices."""
    names = list(scores)
    if mean_values is not None:
        low, high = bootstrap_ci(np.stack([mean_values[k] for k in names]), n_resamples, seed)
    else:
        assert statistic is not None
        low, high = bootstrap_ci_of(statistic, n, n_resamples, seed)
    out: dict[str, float] = {}
    for k, lo, hi in zip(names, np.atleast_1d(low), np.atleast_1d(high)):
        out.update({k: scores[k], f"{k}_ci_low": float(lo), f"{k}_ci_high": float(hi)})
    return out


def flatten(results: Mapping[str, Mapping[str, float]], prefix: str = "") -> dict[str, float]:
    """``{mode: {metric: v}}`` -> ``{f"{prefix}{mode}/{metric}": v}``, in order (e.g. ``prefix="eval/"``)."""
    return {f"{prefix}{mode}/{k}": v for mode, scores in results.items() for k, v in scores.items()}


# --------------------------------------------------------------------------------------- beam search, multiple choice


def beam_search_ids(
    model: Any,
    tokenizer: Any,
    dataset: TokenizedDataset,
    *,
    num_beams: int,
    max_new_tokens: int,
    length_penalty: float = 1.0,
    batch_size: int = 64,
) -> list[list[int]]:
    """Completion token ids (without the EOS) of beam search with ``num_beams`` beams, for every example, in order.

    transformers' ``model.generate(num_beams=..., do_sample=False)`` on left-padded batches of ``batch_size``
    prompts (:func:`gkd.sampling.local.beam_generate`): the best finished beam of each prompt, its score the
    summed log-probability over ``length ** length_penalty``. Only ids the tokenizer knows are generated.
    """
    m = unwrap(model)
    eos = eos_ids(m, tokenizer)
    params = SamplingParams(
        max_new_tokens=max_new_tokens,
        eos_token_ids=tuple(eos),
        pad_token_id=tokenizer.pad_token_id,
        greedy=True,
        vocab_size=len(tokenizer),
    )
    out: list[list[int]] = []
    with eval_mode(model):
        for start in range(0, len(dataset), batch_size):
            batch = collate(dataset.examples[start : start + batch_size], tokenizer.pad_token_id)
            device = next(m.parameters()).device
            roll = beam_generate(
                m,
                batch.prompt_ids.to(device),
                batch.prompt_mask.to(device),
                params,
                num_beams,
                length_penalty,
            )
            for ids, mask in zip(roll.completion_ids.tolist(), roll.completion_mask.tolist()):
                toks = [t for t, keep in zip(ids, mask) if keep]
                out.append(toks[:-1] if toks and toks[-1] in eos else toks)
    return out


def beam_search_texts(model: Any, tokenizer: Any, dataset: TokenizedDataset, **kw: Any) -> list[str]:
    """Decoded beam-search completions (special tokens removed); ``kw``: :func:`beam_search_ids`."""
    ids = beam_search_ids(model, tokenizer, dataset, **kw)
    return [tokenizer.decode(t, skip_special_tokens=True).strip() for t in ids]


MC_DELIMITER = " "
"""What goes between a prompt and each choice (lm-evaluation-harness's ``target_delimiter``)."""


def choice_loglikelihoods(
    model: Any,
    tokenizer: Any,
    dataset: TokenizedDataset,
    *,
    delimiter: str = MC_DELIMITER,
    batch_size: int = 64,
) -> list[list[float]]:
    """The summed log-likelihood of every choice of every multiple-choice record, ``[example][choice]``.

    Choice ``c`` of a record is scored as the completion ``delimiter + c`` after the record's (tokenized) prompt:
    the completion is tokenized on its own (no special tokens) and appended to the prompt ids, and its tokens'
    log-probabilities under ``model`` (over the tokenizer's vocabulary) are summed. Decoder-only models score
    prompt + completion in one forward; encoder-decoder models read the prompt and score the completion as the
    decoder's labels. ``batch_size`` (prompt, choice) pairs go through the model at a time. A record without
    ``choices`` is a one-line :class:`DataError` (:func:`gkd.metrics.choices_of`).
    """
    m = unwrap(model)
    pairs: list[tuple[int, list[int], list[int]]] = []
    for i, e in enumerate(dataset.examples):
        for choice in choices_of(e.record, i):
            ids = tokenizer(delimiter + choice, add_special_tokens=False)["input_ids"]
            if not ids or not e.prompt:
                what = "choice " + repr(choice) if not ids else "its prompt"
                raise DataError(f"record {i}: {what} is no tokens, so it has no log-likelihood to score")
            pairs.append((i, list(e.prompt), list(ids)))
    scores: list[list[float]] = [[] for _ in dataset.examples]
    with eval_mode(model), torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            lls = _continuation_logprobs(
                m, [p for _, p, _ in chunk], [c for _, _, c in chunk], len(tokenizer)
            )
            for (i, _, _), ll in zip(chunk, lls):
                scores[i].append(ll)
    return scores


def _continuation_logprobs(
    model: Any, prompts: list[list[int]], conts: list[list[int]], vocab: int
) -> list[float]:
    """Summed log-probability of each continuation after its prompt (one batched, right-padded forward)."""
    device = next(model.parameters()).device

    def padded(rows: list[list[int]], fill: int) -> torch.Tensor:
        width = max(len(r) for r in rows)
        return torch.tensor([r + [fill] * (width - len(r)) for r in rows], device=device)

    if getattr(model.config, "is_encoder_decoder", False):
        ids, mask = padded(prompts, 0), padded([[1] * len(p) for p in prompts], 0)
        labels = padded(conts, -100)
        logits = model(input_ids=ids, attention_mask=mask, labels=labels).logits  # [B, L_cont, V]
        starts = [0] * len(conts)
    else:
        seqs = [p + c for p, c in zip(prompts, conts)]
        ids, mask = padded(seqs, 0), padded([[1] * len(s) for s in seqs], 0)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]  # position t predicts token t + 1
        starts = [len(p) - 1 for p in prompts]
    out = []
    for row, (start, cont) in enumerate(zip(starts, conts)):
        # only the continuation's positions go to float32 (not the whole [batch, length, vocab] logits)
        logp = torch.log_softmax(logits[row, start : start + len(cont), :vocab].float(), dim=-1)
        targets = torch.tensor(cont, device=device)
        out.append(float(logp.gather(-1, targets[:, None]).sum()))
    return out


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
