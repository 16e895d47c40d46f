"""The fast backend: a lean KV-cache decoding loop for the Llama family (Llama, Mistral, Qwen2, Qwen3) and GPT-2.

The decoder step is re-implemented functionally on the weights of the Hugging Face modules. K/V are written into
buffers preallocated for the whole rollout (``[B, kv_heads, P + max_new_tokens, head_dim]``), attention is one
``scaled_dot_product_attention`` call over a slice of those buffers with a precomputed additive mask, rotary tables
are computed once by the model's own rotary module (so the checkpoint's rope scaling is honoured), and small models
get their projections fused into contiguous ``[in, out]`` matrices (oneDNN-packed on the CPU, with the residual add
as a post-op of the matmul). A decode step is then ~20 tensor ops per layer plus ~10 to pick the tokens, and no
other Python. Rows that have emitted an EOS are dropped from the working batch and the K/V buffers once a quarter of
it has (:data:`COMPACT_FRACTION`), so they stop costing compute; every row still takes its own random draw from the
generator, so the tokens are exactly those of a loop that keeps every row to the end.

Which models it runs is decided here too (:func:`fast_path_unsupported_reason`, :func:`auto_fast_reason`, and
:func:`fast_backend_config_reason` from the config alone); :func:`gkd.sampling.local.sample_with` chooses between
this loop and ``model.generate``. The conventions of both are in :mod:`gkd.sampling.local`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gkd.sampling.params import Rollout, SamplingParams, _to_rollout, next_tokens

__all__ = [
    "COMPACT_FRACTION",
    "COMPACT_MIN_STEPS_LEFT",
    "COPY_MAX_BYTES",
    "FAST_VALIDATED_DEVICES",
    "GPT2_FAMILY",
    "LLAMA_FAMILY",
    "ONEDNN_OK",
    "auto_fast_reason",
    "choose_layout",
    "fast_backend_config_reason",
    "fast_path_unsupported_reason",
    "onednn_linear_works",
    "sample_fast",
]

LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")
GPT2_FAMILY = ("gpt2",)
# Rope variants whose frequencies depend on the running sequence length; a precomputed table would be wrong.
_DYNAMIC_ROPE = ("dynamic", "longrope")
# Re-laid-out weight copies are made only while the weights are small (overhead-bound models).
COPY_MAX_BYTES = 256 * 2**20
_SDPA_HAS_GQA = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 5)


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
    cast = x.dtype != torch.float32  # float32 input: skip the no-op casts (two dispatcher calls a norm)
    xf = x.float() if cast else x
    xf = xf * xf.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()  # in place on the fresh [N, 1] mean
    return weight * (xf.to(x.dtype) if cast else xf)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in the "rotate half" layout: ``x * cos + cat(-x2, x1) * sin``.

    ``cat(-x2, x1) * sin`` is computed as ``roll(x, d/2) * cat(-sin1, sin2)`` with the sign folded into a
    precomputed table, which is one kernel instead of three (``roll`` measured faster than a ``flip`` of the
    halves on CPU).
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

    ``layout`` (see :func:`choose_layout`):

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

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ weight.T + bias``, plus ``residual`` when given. oneDNN adds the residual as a post-op of the
        matmul (one kernel and no extra output tensor; the same float32 sum as adding afterwards)."""
        if self.layout == "onednn":
            if residual is not None:
                return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.weight, self.bias, "add")
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        out = torch.mm(x, self.weight) if self.bias is None else torch.addmm(self.bias, x, self.weight)
        return out if residual is None else residual + out


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


def _project(
    x: torch.Tensor, projections: list[_Projection], residual: torch.Tensor | None = None
) -> torch.Tensor:
    if len(projections) == 1:
        return projections[0](x, residual)
    out = torch.cat([proj(x) for proj in projections], dim=-1)
    return out if residual is None else residual + out


def choose_layout(modules: list[nn.Module]) -> str:
    """How to store the weights of ``modules`` for the rollout.

    Re-laid-out copies cost memory equal to the weights (made once per call, the student changes every step),
    so they are only made while the weights are small, which is also where the speed-up matters: large
    models are dominated by the matmuls themselves.
    """
    params = [p for m in modules for p in m.parameters()]
    if sum(p.numel() * p.element_size() for p in params) > COPY_MAX_BYTES:
        return "view"
    if params[0].device.type == "cpu" and params[0].dtype == torch.float32 and onednn_linear_works():
        return "onednn"
    return "copy"


# Whether the oneDNN packed linear ops work here: None until :func:`onednn_linear_works` checks once; False keeps the
# fast loop off the ``"onednn"`` layout.
ONEDNN_OK: bool | None = None


def onednn_linear_works() -> bool:
    """Whether the oneDNN packed linear ops exist in this torch build and agree with ``F.linear`` (checked once).

    They are internal ops (used by ``torch.compile``'s CPU backend), so any failure means: do not use them.
    """
    global ONEDNN_OK
    if ONEDNN_OK is None:
        try:
            with torch.inference_mode():
                gen = torch.Generator().manual_seed(0)
                x, w, b = (torch.randn(*shape, generator=gen) for shape in ((3, 40), (24, 40), (24,)))
                y = _Projection(w, b, "onednn", batch=3)(x)
                ONEDNN_OK = bool(torch.allclose(y, F.linear(x, w, b), rtol=1e-4, atol=1e-4))
        except Exception:  # missing op, changed signature, build without oneDNN, ...
            ONEDNN_OK = False
    return ONEDNN_OK


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
        layout = choose_layout([*layers, model.lm_head])
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

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only these rows (indices into the current rows) of the K/V buffers: finished rows are dropped."""
        self.k_cache = [c.index_select(0, rows) for c in self.k_cache]
        self.v_cache = [c.index_select(0, rows) for c in self.v_cache]

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
            x = _project(a.transpose(1, 2).reshape(batch * steps, nh * hd), w["o"], residual=x)
            h = _rms_norm(x, *w["ln2"])
            gate, up = _project(h, w["gate_up"]).chunk(2, dim=-1)
            x = _project(w["act"](gate) * up, w["down"], residual=x)
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
        layout = choose_layout([*core.h, model.lm_head])
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

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only these rows (indices into the current rows) of the K/V buffers: finished rows are dropped."""
        self.k_cache = [c.index_select(0, rows) for c in self.k_cache]
        self.v_cache = [c.index_select(0, rows) for c in self.v_cache]

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
            x = w["proj"](a.transpose(1, 2).reshape(batch * steps, nh * hd), residual=x)
            h = F.layer_norm(x, width, *w["ln2"])
            x = w["fc_proj"](w["act"](w["fc"](h)), residual=x)
        h = F.layer_norm(x.view(batch, steps, -1)[:, -1], width, *self.ln_f)
        return self.lm_head(h).float()


def _additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
        ~allowed, float("-inf")
    )


# Finished rows are dropped from the working batch (:func:`_decode`) once at least this fraction of it has finished
# (and at least one row) while at least COMPACT_MIN_STEPS_LEFT steps remain: dropping copies every K/V buffer once,
# which only pays off if it saves several steps' worth of compute on the dropped rows. > 1 never drops.
COMPACT_FRACTION = 0.25
COMPACT_MIN_STEPS_LEFT = 4


def sample_fast(
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
        tokens = _decode(decoder, logits, step_mask, next_pos, prompt_len, p, generator)
    return _to_rollout(tokens.clone(), p.eos_token_ids, p.pad_token_id)


def _decode(
    decoder: _LlamaDecoder | _GPT2Decoder,
    logits: torch.Tensor,
    step_mask: torch.Tensor,
    next_pos: torch.Tensor,
    prompt_len: int,
    p: SamplingParams,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """The decode loop after prefill: sample a token per row, feed it back, until every row has stopped.

    Rows that have emitted an EOS are dropped from the working tensors and K/V buffers once enough of them have
    (``COMPACT_FRACTION``), so they stop costing compute; ``rows`` maps working rows to batch rows, and the
    generator still draws for every batch row (:func:`~gkd.sampling.params.next_tokens`), so the tokens are
    exactly those of a loop that never drops a row. Returns the sampled tokens [B, max_new_tokens].
    """
    batch, device = logits.shape[0], logits.device
    tokens = torch.full((batch, p.max_new_tokens), p.pad_token_id, dtype=torch.long, device=device)
    eos = torch.tensor(p.eos_token_ids, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)  # per working row
    rows = None  # batch rows of the working rows once some were dropped (None: all of them, in order)
    # Asking "how many finished?" synchronises with the device; on GPUs only ask every few steps.
    check_every = 1 if device.type == "cpu" else 8
    for t in range(p.max_new_tokens):
        tok = next_tokens(logits, p, generator, rows=rows, batch_size=batch)
        if len(eos):
            tok = tok.masked_fill(finished, p.pad_token_id)
            finished |= torch.isin(tok, eos)
        if rows is None:
            tokens[:, t] = tok
        else:
            tokens[rows, t] = tok
        left = p.max_new_tokens - t - 1
        if left == 0:
            break
        if len(eos) and (t + 1) % check_every == 0:
            working = finished.shape[0]
            done = int(finished.sum())
            if done == working:
                break
            if done >= max(1.0, COMPACT_FRACTION * working) and left >= COMPACT_MIN_STEPS_LEFT:
                alive = (~finished).nonzero().squeeze(-1)
                decoder.keep(alive)
                rows = alive if rows is None else rows[alive]
                tok, finished, step_mask, next_pos = (
                    tok[alive],
                    finished[alive],
                    step_mask[alive],
                    next_pos[alive],
                )
        end = prompt_len + t + 1
        logits = decoder(tok[:, None], next_pos + t, prompt_len + t, step_mask[..., :end])
    return tokens
