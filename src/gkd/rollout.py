"""Sampling completions from the student ("rollouts") for on-policy distillation.

GKD trains the student on its own samples, so every training step first samples a completion for each prompt of
the batch. Sampling is not differentiated through, and for small students it is dominated by framework overhead
rather than arithmetic: ``model.generate`` spends most of a decode step in logits processors, stopping criteria,
cache objects and mask construction. This module offers two backends behind one function,
:func:`sample_completions`:

``"fast"``
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

``"auto"`` picks ``"fast"`` when :func:`fast_path_unsupported_reason` returns ``None``. Models the fast backend can
never run are known from their config alone (:func:`fast_backend_config_reason`), before any weights are loaded.

Callers do not use this module directly: every rollout goes through the sampler interface of :mod:`gkd.sampling`
(``get_sampler("auto" | "fast" | "generate")`` wraps :func:`sample_completions`; ``"vllm"`` is another
implementation of that interface, in :mod:`gkd.rollout_vllm`). This module is the in-process implementation.

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
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from gkd.errors import ConfigError

__all__ = [
    "Rollout",
    "SamplingParams",
    "auto_fast_reason",
    "fast_backend_config_reason",
    "fast_path_unsupported_reason",
    "sample_completions",
    "sample_with",
]

LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")
GPT2_FAMILY = ("gpt2",)
# Rope variants whose frequencies depend on the running sequence length; a precomputed table would be wrong.
_DYNAMIC_ROPE = ("dynamic", "longrope")
# Re-laid-out weight copies are made only while the weights are small (overhead-bound models).
_COPY_MAX_BYTES = 256 * 2**20
_SDPA_HAS_GQA = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 5)


@dataclass
class Rollout:
    """Sampled completions for a batch of prompts.

    ``completion_ids[b, t]`` is the t-th generated token of row b, or ``pad_token_id`` after the row's first EOS.
    ``completion_mask`` is True for generated tokens up to and including the first EOS. Columns that are padding
    in every row are trimmed, so ``T_new <= max_new_tokens``.
    """

    completion_ids: torch.LongTensor  # [B, T_new]
    completion_mask: torch.BoolTensor  # [B, T_new]


@dataclass(frozen=True)
class SamplingParams:
    """How to decode: the same request for every backend.

    Tokens are drawn from ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely tokens
    (0 = no limit), then to the smallest set whose probability reaches ``top_p`` (1.0 = no limit); ``greedy``
    (or ``temperature == 0``) takes the argmax. A row stops at its first id in ``eos_token_ids`` (kept, and
    counted in the completion mask) or after ``max_new_tokens``; later positions hold ``pad_token_id``.
    ``vocab_size`` (the tokenizer's length) excludes ids ``>= vocab_size`` (padding rows of a larger output
    layer); ``None`` allows every row of the head.
    """

    max_new_tokens: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False
    vocab_size: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "eos_token_ids", tuple(int(e) for e in self.eos_token_ids))
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1 (the tokenizer's length), got {self.vocab_size}")


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
            return _sample_fast(plain, input_ids, attention_mask, params, generator)
        if backend == "fast":
            raise ConfigError(
                f"rollout_backend: fast does not support this model ({reason}); use rollout_backend: auto"
            )
    return _sample_generate(model, input_ids, attention_mask, params, generator)


# ----------------------------------------------------------------------------------------------------------------
# Choosing the next token (shared by the fast path; mirrors what generate's logits processors do)


def _next_tokens(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Pick one token per row from ``logits`` [B, V] (float32). Returns [B] long.

    Same semantics as generate's temperature -> top-k -> top-p chain: top-k keeps exactly ``k`` tokens (via
    ``topk``, which also hands top-p its tokens already sorted); top-p keeps a token while the probability of
    the tokens more likely than it is below ``top_p``, so the most likely token always survives. Columns from
    ``p.vocab_size`` on (padding rows of the head) are cut off first, so they are never chosen.
    """
    if p.vocab_size is not None and p.vocab_size < logits.shape[-1]:
        logits = logits[:, : p.vocab_size]
    if p.greedy:
        return logits.argmax(-1)
    if p.temperature != 1.0:
        logits = logits / p.temperature
    ids = None  # token ids of the columns of `probs`, when they are not simply 0..V-1
    if 0 < p.top_k < logits.shape[-1]:
        logits, ids = torch.topk(logits, p.top_k, dim=-1)
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        if ids is None:
            probs, ids = torch.sort(probs, dim=-1, descending=True)
        mass_before = probs.cumsum(-1) - probs
        probs = probs.masked_fill(mass_before >= p.top_p, 0.0)
    choice = _draw(probs, generator)
    return choice if ids is None else ids.gather(-1, choice[:, None]).squeeze(-1)


def _draw(weights: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One index per row with probability proportional to ``weights`` [B, V] (inverse-CDF sampling).

    One uniform number per row is compared against the float64 cumulative sum: tokens of weight 0 occupy an
    empty interval and can never be drawn. On CPU this is ~20x cheaper than ``torch.multinomial`` or
    exponential-race sampling, which draw (and take logs of) a random number per vocabulary entry.
    """
    cdf = weights.cumsum(-1, dtype=torch.float64)
    u = torch.rand(cdf.shape[0], 1, dtype=torch.float64, device=cdf.device, generator=generator) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_max_(cdf.shape[-1] - 1).squeeze(-1)


def _to_rollout(tokens: torch.Tensor, eos_token_ids: list[int], pad_token_id: int) -> Rollout:
    """Mask everything after each row's first EOS, replace it with padding and trim all-padding columns."""
    if eos_token_ids:
        is_eos = torch.isin(tokens, torch.tensor(eos_token_ids, device=tokens.device))
        eos_before = is_eos.long().cumsum(1) - is_eos.long()
        mask = eos_before == 0
    else:
        mask = torch.ones_like(tokens, dtype=torch.bool)
    ids = tokens.masked_fill(~mask, pad_token_id)
    width = int(mask.sum(1).max()) if tokens.numel() else 0
    return Rollout(ids[:, :width].clone(), mask[:, :width].clone())


# ----------------------------------------------------------------------------------------------------------------
# Which models the fast path understands


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# Devices where the fast loop's output has been checked against model.generate (CPU: tests/test_rollout.py; others:
# benchmarks/gpu_check.py). ``rollout_backend: auto`` takes the fast loop only there; ``fast`` takes it anywhere.
FAST_VALIDATED_DEVICES = ("cpu",)


def auto_fast_reason(model: nn.Module, total_length: int = 0) -> str | None:
    """Why ``rollout_backend: auto`` samples ``model`` with ``model.generate`` instead of the fast loop (``None``:
    it takes the fast loop): the model is not supported, or its device is one the fast loop is not validated on."""
    reason = fast_path_unsupported_reason(model, total_length)
    device = _model_device(model).type
    if reason is None and device not in FAST_VALIDATED_DEVICES:
        reason = (
            f"the fast loop is validated on {', '.join(FAST_VALIDATED_DEVICES)} only, not on {device} yet "
            "(benchmarks/gpu_check.py checks it; rollout_backend: fast uses it anyway)"
        )
    return reason


def fast_path_unsupported_reason(model: nn.Module, total_length: int = 0) -> str | None:
    """Why the fast backend cannot sample from ``model`` (``None`` if it can).

    Support is decided from ``config.model_type`` *and* the exact module structure (plain ``nn.Linear`` /
    ``nn.Embedding`` / ``Conv1D`` layers), so PEFT/LoRA-wrapped, quantized or otherwise patched models fall back
    to ``generate`` instead of silently ignoring the patch. ``total_length`` (prompt + new tokens) is checked
    against sliding windows and learned position tables. Reasons known from the config alone come first (see
    :func:`fast_backend_config_reason`).
    """
    model = _peft_base(model)
    config = getattr(model, "config", None)
    reason = fast_backend_config_reason(config)
    if reason is not None:
        return reason
    if _has_active_dropout(model):
        return "model is in train mode with active dropout (the fast path has no dropout)"
    if config.model_type in GPT2_FAMILY:
        return _gpt2_unsupported_reason(model, total_length)
    return _llama_unsupported_reason(model, total_length)


def fast_backend_config_reason(config: object) -> str | None:
    """Why the fast backend can never sample from a model with this transformers ``config`` (``None`` if it may).

    Judged from the config alone, so it can be checked before any weights are loaded: encoder-decoder models,
    model types outside the supported families, logit softcapping, rope variants whose frequencies depend on the
    running length, GPT-2 with cross-attention. A ``None`` does not promise the fast path: the module structure
    (LoRA, quantization), dropout in train mode and the rollout length are checked on the model itself by
    :func:`fast_path_unsupported_reason`.
    """
    if config is None:
        return "model has no config"
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder model"
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(config, name, None) is not None:
            return f"config.{name} is set"
    model_type = getattr(config, "model_type", None)
    if model_type not in LLAMA_FAMILY + GPT2_FAMILY:
        return f"model_type {model_type!r} is not one of {LLAMA_FAMILY + GPT2_FAMILY}"
    for rope_type in _rope_types(config):
        if any(kind in rope_type for kind in _DYNAMIC_ROPE):
            return f"rope type {rope_type!r} changes with the sequence length"
    if model_type in GPT2_FAMILY and getattr(config, "add_cross_attention", False):
        return "GPT-2 with cross-attention"
    return None


def _rope_types(config: object) -> list[str]:
    """The rope types a config asks for: ``rope_parameters`` (transformers >= 5, possibly one dict per attention
    type) or ``rope_scaling`` (older releases; ``type`` was the key before ``rope_type``)."""
    found = []
    for attr in ("rope_parameters", "rope_scaling"):
        params = getattr(config, attr, None)
        if not isinstance(params, dict):
            continue
        nested = [v for v in params.values() if isinstance(v, dict)]
        for entry in nested or [params]:
            kind = entry.get("rope_type", entry.get("type"))
            if kind is not None:
                found.append(str(kind))
    return found


def _has_active_dropout(model: nn.Module) -> bool:
    for module in model.modules():
        if not module.training:
            continue
        if isinstance(module, nn.Dropout) and module.p > 0:
            return True
        rate = getattr(module, "attention_dropout", 0.0)  # attention modules that call SDPA with dropout_p
        if isinstance(rate, (int, float)) and rate > 0:
            return True
    return False


def _is_linear(module: object) -> bool:
    return type(module) is nn.Linear


def _peft_base(model: nn.Module) -> nn.Module:
    """A peft-wrapped (LoRA) student's transformers model, whose projections are peft LoRA layers that the fast
    loop reads as merged weights (:func:`_weight_and_bias`); any other model as it is."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and hasattr(model, "peft_config"):
        return get_base()
    return model


def _is_lora(module: object, base_type: type) -> bool:
    """A peft LoRA layer over a plain ``base_type`` layer that the fast loop can read as one merged weight: plain
    LoRA adapters (no DoRA or other variant, no LoRA bias)."""
    base = getattr(module, "base_layer", None)
    if type(base) is not base_type or not callable(getattr(module, "get_delta_weight", None)):
        return False
    active = [a for a in getattr(module, "active_adapters", []) if a in getattr(module, "lora_A", {})]
    return not any(
        a in getattr(module, "lora_variant", {}) or getattr(module, "lora_bias", {}).get(a, False)
        for a in active
    )


def _is_projection(module: object) -> bool:
    """A plain ``nn.Linear``, or a plain LoRA layer over one."""
    return _is_linear(module) or _is_lora(module, nn.Linear)


def _weight_and_bias(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight and bias the layer computes with: a LoRA layer's base weight plus every active adapter's
    ``get_delta_weight``, added as peft's ``merge`` adds them (so the fast loop samples exactly what the merged
    model, ``merge_and_unload()``, samples)."""
    base = getattr(module, "base_layer", None)
    if base is None:
        return module.weight, module.bias
    weight = base.weight
    if not getattr(module, "merged", False) and not getattr(module, "disable_adapters", False):
        for adapter in module.active_adapters:
            if adapter in module.lora_A:
                weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
    return weight, base.bias


def _is_rms_norm(module: object) -> bool:
    return isinstance(module, nn.Module) and hasattr(module, "weight") and hasattr(module, "variance_epsilon")


def _llama_unsupported_reason(model: nn.Module, total_length: int) -> str | None:
    core = getattr(model, "model", None)
    layers = getattr(core, "layers", None)
    if core is None or layers is None or not _is_linear(getattr(model, "lm_head", None)):
        return "unexpected module structure (expected model.model.layers and a plain nn.Linear lm_head)"
    if type(getattr(core, "embed_tokens", None)) is not nn.Embedding or not _is_rms_norm(
        getattr(core, "norm", None)
    ):
        return "unexpected embedding or final norm"
    rotary = getattr(core, "rotary_emb", None)
    if rotary is None:
        return "no rotary embedding module"
    attn0 = layers[0].self_attn if len(layers) else None
    inv_freq = getattr(rotary, "inv_freq", None)
    if inv_freq is None or 2 * inv_freq.numel() != getattr(attn0, "head_dim", -1):
        return "rotary embedding does not cover the whole head (partial rotary) or has no inv_freq"
    config = model.config
    window = getattr(config, "sliding_window", None) if config.model_type == "mistral" else None
    for layer in layers[: config.num_hidden_layers]:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        projections = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        projections += [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if not all(_is_projection(m) for m in projections):
            return "attention/MLP projections are not plain nn.Linear or plain LoRA (DoRA, quantization, ...)"
        if not (
            _is_rms_norm(getattr(layer, "input_layernorm", None))
            and _is_rms_norm(layer.post_attention_layernorm)
        ):
            return "unexpected layer norms"
        if hasattr(attn, "q_norm") != hasattr(attn, "k_norm"):
            return "unexpected q/k norms"
        if hasattr(attn, "q_norm") and not (_is_rms_norm(attn.q_norm) and _is_rms_norm(attn.k_norm)):
            return "unexpected q/k norms"
        if not callable(getattr(mlp, "act_fn", None)):
            return "MLP without act_fn"
        layer_window = getattr(attn, "sliding_window", None) or window
        if layer_window is not None and total_length > int(layer_window):
            return f"sliding window {layer_window} is shorter than prompt + completion ({total_length})"
    return None


def _gpt2_unsupported_reason(model: nn.Module, total_length: int) -> str | None:
    from transformers.pytorch_utils import Conv1D

    core = getattr(model, "transformer", None)
    blocks = getattr(core, "h", None)
    if core is None or blocks is None or not _is_linear(getattr(model, "lm_head", None)):
        return "unexpected module structure (expected model.transformer.h and a plain nn.Linear lm_head)"
    if type(core.wte) is not nn.Embedding or type(core.wpe) is not nn.Embedding:
        return "unexpected embeddings"
    if total_length > core.wpe.num_embeddings:
        return f"prompt + completion ({total_length}) exceeds the {core.wpe.num_embeddings} learned positions"
    for block in blocks:
        convs = [block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj]
        if not all(type(m) is Conv1D or _is_lora(m, Conv1D) for m in convs):
            return "attention/MLP layers are not plain Conv1D or plain LoRA (DoRA, quantization, ...)"
        if not (type(block.ln_1) is nn.LayerNorm and type(block.ln_2) is nn.LayerNorm):
            return "unexpected layer norms"
    return None


# ----------------------------------------------------------------------------------------------------------------
# The fast path: functional decoder steps over preallocated K/V buffers


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as the Llama family defines it: normalise in float32, cast back, then scale.

    Written out with the same elementary ops as the reference module, so float32 results are bit-identical;
    this is also about twice as fast on CPU as ``F.rms_norm``, whose kernel is decomposed into more ops.
    """
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in the "rotate half" layout: ``x * cos + cat(-x2, x1) * sin``.

    ``cat(-x2, x1) * sin`` is computed as ``roll(x, d/2) * cat(-sin1, sin2)`` with the sign folded into a
    precomputed table, which is one kernel instead of three.
    """
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin_signed


def _attention(q, k, v, mask, scale, gqa: bool) -> torch.Tensor:
    if gqa and not _SDPA_HAS_GQA:  # torch < 2.5: expand the K/V heads explicitly
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        gqa = False
    if gqa:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


class _Projection:
    """``x @ weight.T + bias`` for 2-D ``x`` [N, in], with the weight stored in the layout that is fastest here.

    ``layout`` (see :func:`_choose_layout`):

    ``"onednn"``  float32 on CPU: the weight is re-packed once per rollout by oneDNN for the decode batch size
                  (the blocked format ``torch.compile`` uses for frozen linear layers). At a batch of 8 rows a
                  step's matmuls run about twice as fast as ``F.linear``, whose MKL kernel is weak for so few
                  rows. Not bit-identical to ``F.linear`` (another summation order), but full float32.
    ``"copy"``    a contiguous ``[in, out]`` copy (other devices/dtypes).
    ``"view"``    no copy at all: a transposed view of the module's weight (large models).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, layout: str, batch: int):
        self.layout, self.bias = layout, bias
        if layout == "onednn":
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), batch)
        elif layout == "copy":
            self.weight = weight.t().contiguous()
        else:
            self.weight = weight.t()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return torch.mm(x, self.weight) if self.bias is None else torch.addmm(self.bias, x, self.weight)


def _projections(linears: list[nn.Linear], layout: str, batch: int) -> list[_Projection]:
    """Linear layers that share an input, fused into one projection unless that would need a copy."""
    parts = [_weight_and_bias(m) for m in linears]  # LoRA layers: the merged weight
    if layout == "view":
        return [_Projection(w, b, layout, batch) for w, b in parts]
    weight = torch.cat([w for w, _ in parts]) if len(parts) > 1 else parts[0][0]
    bias = None
    if any(b is not None for _, b in parts):
        bias = torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for w, b in parts])
    return [_Projection(weight, bias, layout, batch)]


def _project(x: torch.Tensor, projections: list[_Projection]) -> torch.Tensor:
    if len(projections) == 1:
        return projections[0](x)
    return torch.cat([proj(x) for proj in projections], dim=-1)


def _choose_layout(modules: list[nn.Module]) -> str:
    """How to store the weights of ``modules`` for the rollout.

    Re-laid-out copies cost memory equal to the weights (made once per call, the student changes every step),
    so they are only made while the weights are small, which is also where the speed-up matters: large
    models are dominated by the matmuls themselves.
    """
    params = [p for m in modules for p in m.parameters()]
    if sum(p.numel() * p.element_size() for p in params) > _COPY_MAX_BYTES:
        return "view"
    if params[0].device.type == "cpu" and params[0].dtype == torch.float32 and _onednn_linear_works():
        return "onednn"
    return "copy"


_ONEDNN_OK: bool | None = None


def _onednn_linear_works() -> bool:
    """Whether the oneDNN packed linear ops exist in this torch build and agree with ``F.linear`` (checked once).

    They are internal ops (used by ``torch.compile``'s CPU backend), so any failure means: do not use them.
    """
    global _ONEDNN_OK
    if _ONEDNN_OK is None:
        try:
            with torch.inference_mode():
                gen = torch.Generator().manual_seed(0)
                x, w, b = (torch.randn(*shape, generator=gen) for shape in ((3, 40), (24, 40), (24,)))
                y = _Projection(w, b, "onednn", batch=3)(x)
                _ONEDNN_OK = bool(torch.allclose(y, F.linear(x, w, b), rtol=1e-4, atol=1e-4))
        except Exception:  # missing op, changed signature, build without oneDNN, ...
            _ONEDNN_OK = False
    return _ONEDNN_OK


class _LlamaDecoder:
    """Llama/Mistral/Qwen2/Qwen3 decoder over preallocated K/V buffers.

    ``__call__`` runs ``T`` new tokens per row (the whole prompt at prefill, one token per decode step), writes
    their K/V at buffer columns ``[start, start + T)`` and returns float32 logits of each row's last position.
    Hidden states are kept 2-D (``[B * T, hidden]``) so every projection is a single matmul.
    """

    def __init__(self, model: nn.Module, batch: int, length: int):
        core, config = model.model, model.config
        layers = list(core.layers[: config.num_hidden_layers])
        attn0 = layers[0].self_attn
        self.head_dim = attn0.head_dim
        self.n_heads = attn0.q_proj.out_features // self.head_dim
        self.n_kv = attn0.k_proj.out_features // self.head_dim
        self.gqa = self.n_kv != self.n_heads
        self.embed = core.embed_tokens.weight
        self.dtype = self.embed.dtype
        self.norm = (core.norm.weight, core.norm.variance_epsilon)
        layout = _choose_layout([*layers, model.lm_head])
        self.lm_head = _projections([model.lm_head], layout, batch)
        self.layers = [self._layer_weights(layer, layout, batch) for layer in layers]

        # Rotary tables for every position of the rollout, from the model's own rotary module (so rope
        # scaling variants are whatever the checkpoint says). The sign of rotate-half is folded into `sin`.
        positions = torch.arange(length, device=self.embed.device)[None]
        cos, sin = core.rotary_emb(self.embed[:1], position_ids=positions)
        half = self.head_dim // 2
        self.cos = cos[0]
        self.sin = torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1)

        shape = (batch, self.n_kv, length, self.head_dim)
        self.k_cache = [self.embed.new_zeros(shape) for _ in layers]
        self.v_cache = [self.embed.new_zeros(shape) for _ in layers]

    def _layer_weights(self, layer: nn.Module, layout: str, batch: int) -> dict:
        attn, mlp = layer.self_attn, layer.mlp
        qk_norm = hasattr(attn, "q_norm")
        return {
            "ln1": (layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon),
            "qkv": _projections([attn.q_proj, attn.k_proj, attn.v_proj], layout, batch),
            "q_norm": (attn.q_norm.weight, attn.q_norm.variance_epsilon) if qk_norm else None,
            "k_norm": (attn.k_norm.weight, attn.k_norm.variance_epsilon) if qk_norm else None,
            "scale": float(getattr(attn, "scaling", self.head_dim**-0.5)),
            "o": _projections([attn.o_proj], layout, batch),
            "ln2": (layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon),
            "gate_up": _projections([mlp.gate_proj, mlp.up_proj], layout, batch),
            "act": mlp.act_fn,
            "down": _projections([mlp.down_proj], layout, batch),
        }

    def __call__(self, ids: torch.Tensor, pos: torch.Tensor, start: int, mask: torch.Tensor) -> torch.Tensor:
        batch, steps = ids.shape
        nh, nkv, hd = self.n_heads, self.n_kv, self.head_dim
        end = start + steps
        cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]  # [B, 1, T, d]
        x = F.embedding(ids.view(-1), self.embed)  # [B * T, hidden]
        for i, w in enumerate(self.layers):
            h = _rms_norm(x, *w["ln1"])
            qkv = _project(h, w["qkv"]).view(batch, steps, nh + 2 * nkv, hd).transpose(1, 2)
            if w["q_norm"] is None:  # rotate q and k in one go
                qk = _rope(qkv[:, : nh + nkv], cos, sin)
                q, k = qk[:, :nh], qk[:, nh:]
            else:
                q = _rope(_rms_norm(qkv[:, :nh], *w["q_norm"]), cos, sin)
                k = _rope(_rms_norm(qkv[:, nh : nh + nkv], *w["k_norm"]), cos, sin)
            self.k_cache[i][:, :, start:end] = k
            self.v_cache[i][:, :, start:end] = qkv[:, nh + nkv :]
            a = _attention(
                q, self.k_cache[i][:, :, :end], self.v_cache[i][:, :, :end], mask, w["scale"], self.gqa
            )
            x = x + _project(a.transpose(1, 2).reshape(batch * steps, nh * hd), w["o"])
            h = _rms_norm(x, *w["ln2"])
            gate, up = _project(h, w["gate_up"]).chunk(2, dim=-1)
            x = x + _project(w["act"](gate) * up, w["down"])
        h = _rms_norm(x.view(batch, steps, -1)[:, -1], *self.norm)
        return _project(h, self.lm_head).float()


class _GPT2Decoder:
    """GPT-2 decoder (learned positions, pre-LayerNorm, ``Conv1D`` layers that store weights as ``[in, out]``)."""

    def __init__(self, model: nn.Module, batch: int, length: int):
        core, config = model.transformer, model.config
        self.n_heads = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.wte, self.wpe = core.wte.weight, core.wpe.weight
        self.dtype = self.wte.dtype
        self.ln_f = (core.ln_f.weight, core.ln_f.bias, core.ln_f.eps)
        layout = _choose_layout([*core.h, model.lm_head])
        self.lm_head = _Projection(model.lm_head.weight, model.lm_head.bias, layout, batch)

        def conv(module: nn.Module) -> _Projection:
            weight, bias = _weight_and_bias(module)  # LoRA layers: the merged weight
            return _Projection(weight.t(), bias, layout, batch)

        self.blocks = [
            {
                "ln1": (b.ln_1.weight, b.ln_1.bias, b.ln_1.eps),
                "qkv": conv(b.attn.c_attn),
                "scale": float(getattr(b.attn, "scaling", self.head_dim**-0.5)),
                "proj": conv(b.attn.c_proj),
                "ln2": (b.ln_2.weight, b.ln_2.bias, b.ln_2.eps),
                "fc": conv(b.mlp.c_fc),
                "act": b.mlp.act,
                "fc_proj": conv(b.mlp.c_proj),
            }
            for b in core.h
        ]
        shape = (batch, self.n_heads, length, self.head_dim)
        self.k_cache = [self.wte.new_zeros(shape) for _ in self.blocks]
        self.v_cache = [self.wte.new_zeros(shape) for _ in self.blocks]

    def __call__(self, ids: torch.Tensor, pos: torch.Tensor, start: int, mask: torch.Tensor) -> torch.Tensor:
        batch, steps = ids.shape
        nh, hd = self.n_heads, self.head_dim
        end = start + steps
        x = F.embedding(ids.view(-1), self.wte) + F.embedding(pos.reshape(-1), self.wpe)  # [B * T, hidden]
        width = (x.shape[-1],)
        for i, w in enumerate(self.blocks):
            h = F.layer_norm(x, width, *w["ln1"])
            qkv = w["qkv"](h).view(batch, steps, 3 * nh, hd).transpose(1, 2)
            self.k_cache[i][:, :, start:end] = qkv[:, nh : 2 * nh]
            self.v_cache[i][:, :, start:end] = qkv[:, 2 * nh :]
            a = _attention(
                qkv[:, :nh], self.k_cache[i][:, :, :end], self.v_cache[i][:, :, :end], mask, w["scale"], False
            )
            x = x + w["proj"](a.transpose(1, 2).reshape(batch * steps, nh * hd))
            h = F.layer_norm(x, width, *w["ln2"])
            x = x + w["fc_proj"](w["act"](w["fc"](h)))
        h = F.layer_norm(x.view(batch, steps, -1)[:, -1], width, *self.ln_f)
        return self.lm_head(h).float()


def _additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
        ~allowed, float("-inf")
    )


def _sample_fast(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    p: SamplingParams,
    generator: torch.Generator | None,
) -> Rollout:
    """Prefill the prompts, then decode one token per row per step until every row has emitted an EOS."""
    with torch.inference_mode():
        batch, prompt_len = input_ids.shape
        length = prompt_len + p.max_new_tokens
        device = input_ids.device
        family = _GPT2Decoder if model.config.model_type in GPT2_FAMILY else _LlamaDecoder
        decoder = family(model, batch, length)

        # Attention masks are additive (0 or -inf, in the model's dtype), built once: a boolean mask would be
        # converted to this form inside every attention call.
        # Which buffer columns a row may attend to: its real prompt tokens and everything generated.
        key_ok = torch.ones(batch, length, dtype=torch.bool, device=device)
        key_ok[:, :prompt_len] = attention_mask.bool()
        # Prefill: causal and not padding. Padding queries also see themselves, so no softmax row is empty
        # (an empty row gives NaN, which would leak into real rows through 0 * NaN in attention @ V).
        causal = torch.ones(prompt_len, prompt_len, dtype=torch.bool, device=device).tril()
        eye = torch.eye(prompt_len, dtype=torch.bool, device=device)
        prefill_ok = ((causal & key_ok[:, None, :prompt_len]) | eye)[:, None]  # [B, 1, P, P]
        prefill_mask = _additive_mask(prefill_ok, decoder.dtype)
        step_mask = _additive_mask(key_ok[:, None, None, :], decoder.dtype)  # [B, 1, 1, L], sliced per step
        positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        logits = decoder(input_ids, positions, 0, prefill_mask)

        next_pos = attention_mask.long().sum(-1, keepdim=True)  # [B, 1] position of the first new token
        tokens = torch.full((batch, p.max_new_tokens), p.pad_token_id, dtype=torch.long, device=device)
        eos = torch.tensor(p.eos_token_ids, dtype=torch.long, device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        # Asking "all finished?" synchronises with the device; on GPUs only ask every few steps.
        check_every = 1 if device.type == "cpu" else 8
        for t in range(p.max_new_tokens):
            tok = _next_tokens(logits, p, generator)
            if len(eos):
                tok = tok.masked_fill(finished, p.pad_token_id)
                finished |= torch.isin(tok, eos)
            tokens[:, t] = tok
            if t + 1 == p.max_new_tokens or (
                len(eos) and (t + 1) % check_every == 0 and bool(finished.all())
            ):
                break
            end = prompt_len + t + 1
            logits = decoder(tok[:, None], next_pos + t, prompt_len + t, step_mask[..., :end])
    return _to_rollout(tokens.clone(), p.eos_token_ids, p.pad_token_id)


# ----------------------------------------------------------------------------------------------------------------
# The generate path: fallback and encoder-decoder models


def _sample_generate(
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
