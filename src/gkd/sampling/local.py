"""The in-process sampler: :class:`LocalSampler`, the ``"auto"``, ``"fast"`` and ``"generate"`` backends.

GKD trains the student on its own samples, so every training step first samples a completion for each prompt of
the batch. Sampling is not differentiated through, and for small students it is dominated by framework overhead
rather than arithmetic: ``model.generate`` spends most of a decode step in logits processors, stopping criteria,
cache objects and mask construction. This module offers two backends behind one function,
:func:`sample_completions` (:class:`LocalSampler` is that function as a :class:`gkd.sampling.Sampler`):

``"fast"`` (:mod:`gkd.sampling.fast`)
    A lean decoding loop for decoder-only models of the Llama family (Llama, Mistral, Qwen2, Qwen3) and GPT-2.
    The decoder step is re-implemented functionally on the weights of the Hugging Face modules. K/V are written
    into buffers preallocated for the whole rollout (``[B, kv_heads, P + max_new_tokens, head_dim]``), attention
    is one ``scaled_dot_product_attention`` call over a slice of those buffers with a precomputed additive mask,
    rotary tables are computed once by the model's own rotary module (so the checkpoint's rope scaling is
    honoured), and small models get their projections fused into contiguous ``[in, out]`` matrices. A decode
    step is then ~20 tensor ops per layer plus ~10 to pick the tokens, and no other Python.

``"generate"``
    ``model.generate`` with exactly the requested options. It is the fallback for everything the fast path does
    not recognise, and the path for encoder-decoder (T5-style) models.

``"auto"`` picks ``"fast"`` when :func:`~gkd.sampling.fast.fast_path_unsupported_reason` returns ``None``.
Models the fast backend can never run are known from their config alone
(:func:`~gkd.sampling.fast.fast_backend_config_reason`), before any weights are loaded.

Callers do not use these functions directly: every rollout goes through the sampler interface of :mod:`gkd.sampling`
(``get_sampler("auto" | "fast" | "generate")`` is a :class:`LocalSampler` around :func:`sample_with`; ``"vllm"`` is
another implementation of that interface, in :mod:`gkd.sampling.vllm`). This module is the in-process one.

Conventions shared by both backends:

* Prompts are LEFT-padded. Position ids are ``cumsum(attention_mask) - 1`` so a row's result does not depend on
  how much padding it has.
* Randomness comes only from ``generator``, so a seeded generator reproduces a rollout whatever the state of
  the global RNG (which is not advanced). The two backends consume it differently: the same seed gives
  different (equally distributed) samples on each.
* The model's train/eval mode is left untouched: the caller decides whether the policy being sampled is the
  dropout-perturbed one. The fast path has no dropout, so it declines (auto falls back) when the model is in
  train mode with active dropout.
* ``vocab_size`` (the tokenizer's length) restricts every backend to token ids ``< vocab_size``: an LM head
  padded beyond the tokenizer (151,936 rows for Qwen2.5's 151,665 tokens) never yields an id the tokenizer, the
  loss or the teacher cannot handle. Choosing among the real tokens is unchanged (greedy, top-k and top-p see only
  them); a head without padding rows samples exactly as without the restriction.
* Everything runs without autograd (the fast path in inference mode); returned tensors are ordinary tensors
  that can be fed to a training forward pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import torch
from torch import nn

from gkd.errors import ConfigError
from gkd.sampling.fast import (
    _model_device,
    _peft_base,
    auto_fast_reason,
    fast_path_unsupported_reason,
    sample_fast,
)
from gkd.sampling.params import Rollout, SamplingParams, _to_rollout

__all__ = [
    "LOCAL_BACKENDS",
    "LocalSampler",
    "beam_generate",
    "local_sampler",
    "sample_completions",
    "sample_generate",
    "sample_with",
]

LOCAL_BACKENDS = ("auto", "fast", "generate")


class LocalSampler:
    """The in-process backends ``"auto"``, ``"fast"`` and ``"generate"`` (:func:`sample_completions`).

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


def local_sampler(backend: str = "auto") -> LocalSampler:
    """The in-process sampler for a ``rollout_backend`` name, for a model no engine holds (e.g. the teacher).

    A vLLM engine serves only the student it was built for, so ``"vllm"`` maps to ``"auto"`` (correct for any
    model, only slower); the local names map to themselves.
    """
    return LocalSampler("auto" if backend == "vllm" else backend)


def sample_completions(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
    eos_token_ids: list[int],
    pad_token_id: int,
    generator: torch.Generator | None = None,
    backend: str = "auto",
    vocab_size: int | None = None,
) -> Rollout:
    """Sample (or greedily decode) up to ``max_new_tokens`` tokens for each left-padded prompt.

    Tokens are drawn from ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely tokens
    (0 = no limit) and then to the smallest set whose probability reaches ``top_p`` (1.0 = no limit).
    ``greedy=True`` (or ``temperature == 0``) takes the argmax instead. A row stops at its first token in
    ``eos_token_ids``; the loop stops when every row has stopped.

    ``vocab_size`` (the tokenizer's length) excludes ids ``>= vocab_size``: the padding rows of an LM head that
    is larger than the tokenizer are never emitted, greedy or sampled (``None``: every row of the head).

    ``generator`` must live on the model's device. ``backend`` is ``"auto"``, ``"fast"`` or ``"generate"``;
    ``"fast"`` raises :class:`~gkd.errors.ConfigError` (a ``ValueError``) if the model is not supported (see
    :func:`fast_path_unsupported_reason`).
    """
    params = SamplingParams(
        max_new_tokens=int(max_new_tokens),
        eos_token_ids=tuple(eos_token_ids),
        pad_token_id=int(pad_token_id),
        temperature=float(temperature),
        top_k=int(top_k),
        top_p=float(top_p),
        greedy=bool(greedy),
        vocab_size=None if vocab_size is None else int(vocab_size),
    )
    return sample_with(model, input_ids, attention_mask, params, generator, backend)


def sample_with(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    backend: str = "auto",
) -> Rollout:
    """:func:`sample_completions` with the decoding options as one :class:`SamplingParams`."""
    if backend not in ("auto", "fast", "generate"):
        raise ConfigError(
            f"sample_completions backend must be 'auto', 'fast' or 'generate', got {backend!r} "
            "(other backends, e.g. vllm, are samplers: gkd.sampling.get_sampler)"
        )
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise ValueError("input_ids and attention_mask must both be [batch, prompt_len]")
    if input_ids.shape[1] == 0:
        raise ValueError("prompts must contain at least one token")
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("prompts must be LEFT-padded: attention_mask[:, -1] must be 1 for every row")
    if params.temperature == 0 and not params.greedy:  # temperature 0 is greedy decoding
        params = replace(params, greedy=True)
    batch = input_ids.shape[0]
    if params.max_new_tokens <= 0 or batch == 0:
        empty = torch.zeros(batch, 0, dtype=torch.long, device=input_ids.device)
        return Rollout(empty, empty.bool())

    device = _model_device(model)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    if backend != "generate":
        plain = _peft_base(model)  # a LoRA student: its transformers model, adapters read as merged weights
        length = input_ids.shape[1] + params.max_new_tokens
        reason = (
            fast_path_unsupported_reason(model, length)
            if backend == "fast"
            else auto_fast_reason(model, length)
        )
        if reason is None:
            return sample_fast(plain, input_ids, attention_mask, params, generator)
        if backend == "fast":
            raise ConfigError(
                f"rollout_backend: fast does not support this model ({reason}); use rollout_backend: auto"
            )
    return sample_generate(model, input_ids, attention_mask, params, generator)


# ----------------------------------------------------------------------------------------------------------------
# The generate path: fallback and encoder-decoder models


def sample_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    p: SamplingParams,
    generator: torch.Generator | None,
) -> Rollout:
    """``model.generate`` with exactly the requested decoding options, seeded from ``generator``.

    Randomness: one seed is drawn from ``generator`` and generate runs inside ``torch.random.fork_rng`` seeded
    with it, so the global RNG is neither used nor advanced. Padding rows of the head (ids >= ``p.vocab_size``) are
    suppressed by generate's own ``suppress_tokens`` processor, which runs before temperature, top-k and top-p (a
    custom ``logits_processor`` would run after them, and top-k would keep padding rows).
    """
    from transformers import GenerationConfig

    sampling = {} if p.greedy else {"temperature": p.temperature, "top_k": p.top_k, "top_p": p.top_p}
    rows = _output_rows(model)
    padding_rows = {}
    if p.vocab_size is not None and rows is not None and p.vocab_size < rows:
        padding_rows["suppress_tokens"] = list(range(p.vocab_size, rows))
    request = GenerationConfig(
        max_new_tokens=p.max_new_tokens,
        do_sample=not p.greedy,
        num_beams=1,
        eos_token_id=list(p.eos_token_ids) or None,
        pad_token_id=p.pad_token_id,
        use_cache=True,
        **sampling,
        **padding_rows,
    )
    with torch.no_grad(), _neutral_generation_defaults(model):
        if generator is None or p.greedy:
            out = model.generate(
                input_ids=input_ids, attention_mask=attention_mask, generation_config=request
            )
        else:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
            fork_devices = [input_ids.device] if input_ids.device.type == "cuda" else []
            with torch.random.fork_rng(devices=fork_devices):
                torch.manual_seed(seed)
                out = model.generate(
                    input_ids=input_ids, attention_mask=attention_mask, generation_config=request
                )
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    # Decoder-only models return prompt + completion; encoder-decoder models the decoder start token + completion.
    if getattr(model.config, "is_encoder_decoder", False):
        completion = sequences[:, 1:]
    else:
        completion = sequences[:, input_ids.shape[1] :]
    return _to_rollout(completion, p.eos_token_ids, p.pad_token_id)


def beam_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    p: SamplingParams,
    num_beams: int,
    length_penalty: float = 1.0,
) -> Rollout:
    """Beam search (``model.generate(num_beams=..., do_sample=False)``): each prompt's most likely beam.

    Deterministic, so no generator. ``length_penalty`` is transformers': a finished beam's score is its summed
    log-probability divided by ``length ** length_penalty`` (> 0 favours longer completions). Only ``p``'s
    ``max_new_tokens``, EOS / pad ids and ``vocab_size`` apply (padding rows of the head are suppressed); the
    model's own generation defaults are left out, as in :func:`sample_generate`.
    """
    from transformers import GenerationConfig

    rows = _output_rows(model)
    padding_rows = {}
    if p.vocab_size is not None and rows is not None and p.vocab_size < rows:
        padding_rows["suppress_tokens"] = list(range(p.vocab_size, rows))
    request = GenerationConfig(
        max_new_tokens=p.max_new_tokens,
        do_sample=False,
        num_beams=num_beams,
        num_return_sequences=1,
        length_penalty=length_penalty,
        eos_token_id=list(p.eos_token_ids) or None,
        pad_token_id=p.pad_token_id,
        use_cache=True,
        **padding_rows,
    )
    with torch.no_grad(), _neutral_generation_defaults(model):
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=request)
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    if getattr(model.config, "is_encoder_decoder", False):
        completion = sequences[:, 1:]
    else:
        completion = sequences[:, input_ids.shape[1] :]
    return _to_rollout(completion, p.eos_token_ids, p.pad_token_id)


def _output_rows(model: nn.Module) -> int | None:
    """How many logits the model produces per position (rows of its output layer)."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor):
        return int(weight.shape[0])
    rows = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(rows) if isinstance(rows, int) else None


@contextmanager
def _neutral_generation_defaults(model: nn.Module) -> Iterator[None]:
    """Temporarily give the model a blank ``generation_config`` that keeps only the start-of-decoding token ids.

    ``generate`` fills every option the request leaves unset from ``model.generation_config``: a checkpoint's
    repetition penalty, default top-k, minimum length, suppressed tokens or EOS would silently change the
    distribution being sampled (or where it stops). Swapping the config on every Hugging Face model inside
    ``model`` (a PEFT wrapper holds one) for the duration of the call leaves only generate's neutral defaults.
    """
    from transformers import GenerationConfig

    holders = [m for m in model.modules() if isinstance(vars(m).get("generation_config"), GenerationConfig)]
    saved = [m.generation_config for m in holders]
    try:
        for module, original in zip(holders, saved):
            keep = {}
            for name in ("decoder_start_token_id", "bos_token_id"):
                value = getattr(original, name, None)
                value = getattr(module.config, name, None) if value is None else value
                if value is not None:
                    keep[name] = value
            module.generation_config = GenerationConfig(**keep)
        yield
    finally:
        for module, original in zip(holders, saved):
            module.generation_config = original
