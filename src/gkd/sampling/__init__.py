"""One sampler interface for every caller: the trainer's rollouts, evaluation, SeqKD and ``gkd generate``.

A rollout backend is anything that implements :class:`Sampler`, two methods:

``sample(model, prompt_ids, prompt_mask, params, generator) -> Rollout``
    The completions of LEFT-padded prompts (``[B, P]`` ids and mask), decoded as :class:`SamplingParams` says,
    without gradient. All randomness comes from ``generator`` (a seeded ``torch.Generator``; ``None``: unseeded),
    so every backend is seeded the same way and a seeded generator reproduces its samples. Greedy decoding
    draws nothing from it.
``sync(model) -> None``
    Make the backend sample ``model``'s CURRENT weights. A no-op for in-process backends (they read the
    module's weights directly); a weight push for an engine that holds its own copy (vLLM). Callers sync after
    the weights change and before sampling: :func:`sample_batch` does it before each rollout,
    :func:`gkd.evaluation.evaluate` once before its first sample.

Adding a rollout backend means implementing this one interface (and naming it in :func:`get_sampler` if it should
be reachable from ``rollout_backend``); the trainer, :func:`gkd.evaluation.evaluate`,
:func:`generate_ids` and :func:`gkd.teacher.seqkd_dataset` then use it unchanged.

Backends:

* ``"auto"``, ``"fast"``, ``"generate"``: :class:`LocalSampler`, in-process, a thin wrapper around
  :func:`gkd.sampling.local.sample_completions` (which stays the implementation and documents the decoding
  conventions; the fast KV-cache loop is :mod:`gkd.sampling.fast`). Tested here (CPU).
* ``"vllm"``: :class:`gkd.sampling.vllm.VLLMSampler`, a colocated vLLM engine holding a copy of the STUDENT's
  weights (built from ``model_path``). **Untested in this project**: vLLM needs a CUDA GPU and is not installed
  here, so only its error messages are exercised. It can only sample the model it was built for, so SeqKD (which
  samples the teacher) uses the local ``auto`` sampler when ``rollout_backend: vllm``
  (see :func:`gkd.teacher.seqkd_dataset`).

What is not supported: sampling with gradients, beam search, per-row sampling parameters, right-padded prompts.

The package: :mod:`gkd.sampling.params` (:class:`SamplingParams`, :class:`Rollout`, the token choice),
:mod:`gkd.sampling.fast` (the KV-cache decoders), :mod:`gkd.sampling.local` (:class:`LocalSampler`: the fast loop or
``model.generate``), :mod:`gkd.sampling.vllm` (:class:`~gkd.sampling.vllm.VLLMSampler`); this module holds the
interface and what every caller shares: :func:`get_sampler`, :func:`sample_batch` (a training step's rollout) and
:func:`generate_ids` (a dataset's completions, for evaluation and SeqKD).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from gkd.data import Batch, TokenizedDataset, collate
from gkd.errors import ConfigError
from gkd.forward import unwrap
from gkd.models import eval_mode
from gkd.sampling.local import LOCAL_BACKENDS, LocalSampler, local_sampler
from gkd.sampling.params import Rollout, SamplingParams
from gkd.sampling.vllm import VLLMSampler

__all__ = [
    "BACKENDS",
    "LOCAL_BACKENDS",
    "LocalSampler",
    "Rollout",
    "Sampler",
    "SamplingParams",
    "eos_ids",
    "generate_ids",
    "get_sampler",
    "local_sampler",
    "sample_batch",
]

BACKENDS = (*LOCAL_BACKENDS, "vllm")


@runtime_checkable
class Sampler(Protocol):
    """A rollout backend (see the module docstring for the contract)."""

    def sample(
        self,
        model: nn.Module,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        params: SamplingParams,
        generator: torch.Generator | None,
    ) -> Rollout:
        """Completions of the left-padded prompts (no gradient); randomness only from ``generator``."""
        ...

    def sync(self, model: nn.Module) -> None:
        """Make the next samples come from ``model``'s current weights."""
        ...


def get_sampler(backend: str, *, model_path: str | None = None, **options: Any) -> Sampler:
    """The sampler a ``rollout_backend`` name stands for.

    ``"auto"`` / ``"fast"`` / ``"generate"`` give a :class:`LocalSampler` (no options). ``"vllm"`` builds a
    colocated engine from ``model_path`` (the STUDENT's weights; ``options`` go to
    :class:`gkd.sampling.vllm.VLLMSampler`, e.g. ``gpu_memory_utilization``); without vLLM or a GPU it raises a
    one-line :class:`~gkd.errors.ConfigError`, as it does for an unknown name.
    """
    if backend in LOCAL_BACKENDS:
        if options:
            raise ConfigError(f"rollout_backend {backend} takes no options, got {', '.join(sorted(options))}")
        return LocalSampler(backend)
    if backend == "vllm":
        if model_path is None:
            raise ConfigError("rollout_backend: vllm needs the student's model path to build its engine")
        return VLLMSampler(str(model_path), **options)
    raise ConfigError(f"rollout_backend must be one of {', '.join(BACKENDS)}, got {backend!r}")


def sample_batch(
    sampler: Sampler,
    model: nn.Module,
    batch: Batch,
    params: SamplingParams,
    generator: torch.Generator | None,
    *,
    num_generations: int = 1,
    sync: bool = True,
) -> Batch:
    """``batch`` (each prompt repeated ``num_generations`` times) with its completions replaced by ``model``'s samples.

    This is the on-policy rollout of a training step: the result has ``on_policy=True``, detached completion
    tensors, the batch's prompts and records, and no ``indices`` (they locate the dataset's completions, which these
    are not, so per-example caches such as the teacher's top-k cache cannot apply). ``sync`` first calls
    ``sampler.sync(model)`` (free in-process, a weight push for vLLM) so the samples come from the current weights.
    """
    batch = batch.repeat(num_generations)
    if sync:
        sampler.sync(model)
    roll = sampler.sample(model, batch.prompt_ids, batch.prompt_mask, params, generator)
    return replace(
        batch,
        completion_ids=roll.completion_ids.detach(),
        completion_mask=roll.completion_mask.detach(),
        on_policy=True,
        indices=None,
    )


# ---------------------------------------------------------------------------------------------------------------
# a dataset's completions, batch by batch: evaluation, SeqKD targets, gkd generate
# ---------------------------------------------------------------------------------------------------------------
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
