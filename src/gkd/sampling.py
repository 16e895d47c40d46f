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
:func:`gkd.evaluation.generate_ids` and :func:`gkd.teacher.seqkd_dataset` then use it unchanged.

Backends:

* ``"auto"``, ``"fast"``, ``"generate"``: :class:`LocalSampler`, in-process, a thin wrapper around
  :func:`gkd.rollout.sample_completions` (which stays the implementation and documents the decoding conventions).
  Tested here (CPU).
* ``"vllm"``: :class:`gkd.rollout_vllm.VLLMSampler`, a colocated vLLM engine holding a copy of the STUDENT's
  weights (built from ``model_path``). **Untested in this project**: vLLM needs a CUDA GPU and is not installed
  here, so only its error messages are exercised. It can only sample the model it was built for, so SeqKD (which
  samples the teacher) uses the local ``auto`` sampler when ``rollout_backend: vllm``
  (see :func:`gkd.teacher.seqkd_dataset`).

What is not supported: sampling with gradients, beam search, per-row sampling parameters, right-padded prompts.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from gkd.data import Batch
from gkd.errors import ConfigError
from gkd.rollout import Rollout, SamplingParams, sample_with

__all__ = [
    "BACKENDS",
    "LOCAL_BACKENDS",
    "LocalSampler",
    "Rollout",
    "Sampler",
    "SamplingParams",
    "get_sampler",
    "local_sampler",
    "sample_batch",
]

LOCAL_BACKENDS = ("auto", "fast", "generate")
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


class LocalSampler:
    """The in-process backends ``"auto"``, ``"fast"`` and ``"generate"`` (:func:`gkd.rollout.sample_completions`).

    ``generator`` must live on the model's device (as for ``sample_completions``). ``sync`` is a no-op: the
    module's weights are read at every call.
    """

    def __init__(self, backend: str = "auto") -> None:
        if backend not in LOCAL_BACKENDS:
            raise ConfigError(
                f"LocalSampler backend must be one of {', '.join(LOCAL_BACKENDS)}, got {backend!r}"
            )
        self.backend = backend

    def __repr__(self) -> str:
        return f"LocalSampler({self.backend!r})"

    def sample(
        self,
        model: nn.Module,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        params: SamplingParams,
        generator: torch.Generator | None = None,
    ) -> Rollout:
        return sample_with(model, prompt_ids, prompt_mask, params, generator, self.backend)

    def sync(self, model: nn.Module) -> None:
        return None


def get_sampler(backend: str, *, model_path: str | None = None, **options: Any) -> Sampler:
    """The sampler a ``rollout_backend`` name stands for.

    ``"auto"`` / ``"fast"`` / ``"generate"`` give a :class:`LocalSampler` (no options). ``"vllm"`` builds a
    colocated engine from ``model_path`` (the STUDENT's weights; ``options`` go to
    :class:`gkd.rollout_vllm.VLLMSampler`, e.g. ``gpu_memory_utilization``); without vLLM or a GPU it raises a
    one-line :class:`~gkd.errors.ConfigError`, as it does for an unknown name.
    """
    if backend in LOCAL_BACKENDS:
        if options:
            raise ConfigError(f"rollout_backend {backend} takes no options, got {', '.join(sorted(options))}")
        return LocalSampler(backend)
    if backend == "vllm":
        if model_path is None:
            raise ConfigError("rollout_backend: vllm needs the student's model path to build its engine")
        from gkd.rollout_vllm import VLLMSampler

        return VLLMSampler(str(model_path), **options)
    raise ConfigError(f"rollout_backend must be one of {', '.join(BACKENDS)}, got {backend!r}")


def local_sampler(backend: str = "auto") -> LocalSampler:
    """The in-process sampler for a ``rollout_backend`` name, for a model no engine holds (e.g. the teacher).

    A vLLM engine serves only the student it was built for, so ``"vllm"`` maps to ``"auto"`` (correct for any
    model, only slower); the local names map to themselves.
    """
    return LocalSampler("auto" if backend == "vllm" else backend)


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
