"""Generating completions for a set of records and scoring them: the one evaluation loop.

:func:`evaluate` is the evaluation of ``gkd eval``, of the trainer (``eval_dataset``) and of the experiment studies:
greedy decoding plus sampling at any number of named temperatures, each with one or more seeded samples per prompt
(several samples add self-BLEU over each prompt's samples). Every completion comes from a
:class:`gkd.sampling.Sampler` (default: the local ``auto`` backend) through :func:`generate_ids`, so a given
``(sampler, seed, batch_size)`` always yields the same completions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from gkd.data import TokenizedDataset, collate
from gkd.models import eval_mode, unwrap
from gkd.sampling import LocalSampler, Sampler, SamplingParams, local_sampler

__all__ = ["eos_ids", "evaluate", "flatten", "generate_ids", "generate_texts"]

ScoreFn = Callable[[list[dict], list[str]], dict[str, float]]


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS plus the model's generation-config EOS ids."""
    ids = {int(tokenizer.eos_token_id)}
    gen = getattr(unwrap(model), "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    if isinstance(extra, int):
        ids.add(extra)
    elif isinstance(extra, (list, tuple)):
        ids.update(int(i) for i in extra)
    return sorted(ids)


def _device_of(model: Any) -> torch.device:
    """Where ``model`` computes (its first parameter's device; the CPU for a model without parameters)."""
    param = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
    return param.device if param is not None else torch.device("cpu")


def _sampler(sampler: Sampler | None, backend: str | None) -> Sampler:
    """The sampler to use: ``sampler``, else the legacy ``backend`` name, else the local ``auto`` sampler.

    ``backend`` names an in-process backend. ``"vllm"`` is accepted for the callers that forward
    ``cfg.rollout_backend``: there is no engine to use here (it is built for the trainer's student), so it samples
    in-process with ``auto``, which is correct for any model and only slower.
    """
    if sampler is not None:
        if backend is not None:
            raise TypeError("pass either sampler= or backend=, not both")
        return sampler
    return local_sampler(backend or "auto")


@torch.no_grad()
def generate_ids(
    model: Any,
    tokenizer: Any,
    dataset: TokenizedDataset,
    *,
    max_new_tokens: int,
    greedy: bool,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    batch_size: int = 64,
    seed: int = 0,
    sampler: Sampler | None = None,
    sync: bool = True,
    backend: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[list[int]]:
    """Completion token ids (without the EOS) for every example, in order, in eval mode.

    Examples are decoded ``batch_size`` at a time by ``sampler`` (default: the local ``auto`` sampler), all drawing
    from one ``torch.Generator`` seeded with ``seed`` on the model's device: the completions depend only on the
    sampler, the seed, the batch size and the device (on the CPU, the seed's sequence is the one it always was).
    ``sync`` first calls ``sampler.sync(model)`` (set it to False when the caller just did). ``backend`` is the
    older way to choose a local sampler by name (``"vllm"`` samples in-process with ``auto``).

    Only ids the tokenizer knows are generated (``vocab_size=len(tokenizer)``): an output layer padded beyond the
    tokenizer never yields an id that cannot be decoded.
    """
    sampler = _sampler(sampler, backend)
    m = unwrap(model)
    gen = torch.Generator(device=_device_of(m)).manual_seed(seed)  # draws on the model's device
    out: list[list[int]] = []
    eos = eos_ids(m, tokenizer)
    params = SamplingParams(
        max_new_tokens=max_new_tokens,
        eos_token_ids=tuple(eos),
        pad_token_id=tokenizer.pad_token_id,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        greedy=greedy,
        vocab_size=len(tokenizer),
    )
    if sync:
        sampler.sync(m)
    with eval_mode(model):
        for start in range(0, len(dataset), batch_size):
            batch = collate(dataset.examples[start : start + batch_size], tokenizer.pad_token_id)
            roll = sampler.sample(m, batch.prompt_ids, batch.prompt_mask, params, gen)
            for ids, mask in zip(roll.completion_ids.tolist(), roll.completion_mask.tolist()):
                toks = [t for t, keep in zip(ids, mask) if keep]
                if toks and toks[-1] in eos:
                    toks = toks[:-1]
                out.append(toks)
            if progress is not None:
                progress(batch.size)
    return out


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
    if isinstance(scorer, str):
        from gkd.scoring import DEFAULT_TOKENIZE, TASK_TOKENIZE, get_scorer, resolve_scorer

        text_tokenize = tokenize or DEFAULT_TOKENIZE
        score: ScoreFn = resolve_scorer(scorer, tokenize=text_tokenize)
        # self-BLEU of a task name's (or task metric's) samples: the tasks' token text, as the experiments score it
        diversity_tokenize = TASK_TOKENIZE if get_scorer(scorer).task is not None else text_tokenize
    else:
        score = scorer
        diversity_tokenize = tokenize or "whitespace"
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
        runs = []
        scores: dict[str, float] = {}
        for seed in seeds:
            preds = generate_texts(
                model, tokenizer, dataset, greedy=False, temperature=temperature, seed=seed, **common
            )
            runs.append(preds)
            for key, value in score(records, preds).items():
                scores[key] = scores.get(key, 0.0) + value / len(seeds)
        if len(seeds) > 1:
            from gkd.metrics import self_bleu

            scores["self_bleu"] = self_bleu([list(s) for s in zip(*runs)], tokenize=diversity_tokenize)
        out[mode] = scores
    return out


def flatten(results: Mapping[str, Mapping[str, float]], prefix: str = "") -> dict[str, float]:
    """``{mode: {metric: v}}`` -> ``{f"{prefix}{mode}/{metric}": v}``, in order (e.g. ``prefix="eval/"``)."""
    return {f"{prefix}{mode}/{k}": v for mode, scores in results.items() for k, v in scores.items()}
