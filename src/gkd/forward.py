"""The forward pass at the completion positions: what predicts each valid completion token, for the loss.

:func:`score_positions` runs a model on ``[left-padded prompt | right-padded completion]`` and returns a
:class:`gkd.outputs.ScoringOutput`: with a model whose output head is a plain linear layer, the final hidden states
at the valid positions plus the :class:`gkd.outputs.Head` (with the logit transform the model's forward applies), so
the loss applies the head chunk by chunk and never holds ``[positions, vocab]`` logits; otherwise (seq2seq, unknown
logit transforms) the logits at those positions. :class:`StudentForward` is the same as an ``nn.Module``, so that
data-parallel wrappers see the student's forward pass. The local teacher, the sharded student (:mod:`gkd.fsdp`),
the served teacher's client and ``gkd diagnose`` score through the same function; the teacher server applies the
same head (:func:`head_of`).

Packed forwards (:mod:`gkd.packing`, config key ``packed_forward``): a model that :func:`set_packed_forward`
turned on runs on the batch's real tokens only, several sequences to a row, and returns the same
:class:`ScoringOutput` (the outputs at the valid completion positions, in the same order), so the loss never
knows. A batch that cannot be packed (see :func:`gkd.packing.pack_inputs`) takes the padded path.
"""

from __future__ import annotations

import torch
from torch import nn

from gkd.errors import ConfigError
from gkd.outputs import Head, ScoringOutput
from gkd.packing import pack_inputs, packing_probe, packing_unsupported_reason, wants_one_row

__all__ = [
    "Scorer",
    "StudentForward",
    "causal_inputs",
    "fused_head_supported",
    "fused_head_unsupported_reason",
    "head_of",
    "is_seq2seq",
    "packed_forward_on",
    "score_positions",
    "set_packed_forward",
    "unwrap",
]

# Config attributes that change logits after the head; models carrying them use the plain-logits path.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling")


def unwrap(model: nn.Module) -> nn.Module:
    """The underlying transformers model (through DDP / accelerate wrappers and peft)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and model.__class__.__name__.startswith("Peft"):
        model = get_base()
    return model


def is_seq2seq(model: nn.Module) -> bool:
    """Is ``model`` (through any wrapper) an encoder-decoder model (T5-style)?"""
    return bool(getattr(unwrap(model).config, "is_encoder_decoder", False))


def fused_head_unsupported_reason(model: nn.Module) -> str | None:
    """Why the loss cannot run chunked from this model's hidden states and head (``None`` if it can); it then
    scores from full logits at the completion positions, which costs ``[positions, vocab]`` memory."""
    m = unwrap(model)
    if is_seq2seq(m):
        return "encoder-decoder model"
    cfg = m.config
    kind = getattr(cfg, "model_type", None)
    for attr in _LOGIT_TRANSFORMS:
        if kind not in _FUSED_TRANSFORMS.get(attr, ()) and getattr(cfg, attr, None) not in (None, 1.0, 0.0):
            return (
                f"config.{attr} may transform the logits after the head ({kind} is not known to gkd's loss)"
            )
    head = m.get_output_embeddings()
    base = getattr(m, m.base_model_prefix, None)
    if not isinstance(head, nn.Linear) or not isinstance(base, nn.Module):
        return f"the output head is a {type(head).__name__}, not a plain linear layer"
    return None


# Logit transforms the fused loss applies itself (see Head), by model type: applied only for the families whose
# forward is known to apply them (another model may carry the attribute and ignore it).
_FUSED_TRANSFORMS = {
    "final_logit_softcapping": ("gemma2", "gemma3", "gemma3_text"),  # cap * tanh(logits / cap)
    "logit_scale": ("cohere", "cohere2"),  # logits * logit_scale
    "logits_scaling": (
        "granite",
        "granitemoe",
        "granitemoeshared",
        "granitemoehybrid",
    ),  # logits / logits_scaling
}


def head_of(model: nn.Module, linear: nn.Linear, vocab: int | None) -> Head:
    """The :class:`Head` of ``model``: its output layer plus the logit transform its forward applies."""
    cfg = model.config
    kind = getattr(cfg, "model_type", None)
    applies = {attr for attr, kinds in _FUSED_TRANSFORMS.items() if kind in kinds}
    scale = 1.0
    if "logit_scale" in applies and getattr(cfg, "logit_scale", None):
        scale *= float(cfg.logit_scale)
    if "logits_scaling" in applies and getattr(cfg, "logits_scaling", None):
        scale /= float(cfg.logits_scaling)
    softcap = getattr(cfg, "final_logit_softcapping", None) if "final_logit_softcapping" in applies else None
    return Head(linear.weight, linear.bias, vocab, logit_scale=scale, softcap=softcap or None)


def fused_head_supported(model: nn.Module) -> bool:
    """Can the loss run chunked from this model's hidden states and head (:func:`fused_head_unsupported_reason`)?"""
    return fused_head_unsupported_reason(model) is None


def causal_inputs(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input ids, attention mask and position ids of ``[left-padded prompt | right-padded completion]``.

    The last completion column is never an input (nothing is predicted after it).
    """
    ids = torch.cat([prompt_ids, completion_ids[:, :-1]], dim=1)
    mask = torch.cat([prompt_mask, completion_mask[:, :-1]], dim=1).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


def score_positions(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    vocab: int | None = None,
    fused: bool = True,
    packed: bool | None = None,
) -> ScoringOutput:
    """Run ``model`` on prompt + completion and return what predicts each valid completion token.

    Causal LMs: the output at column ``P - 1 + j`` predicts completion token ``j`` (P = padded prompt width).
    Seq2seq LMs: the prompt is the encoder input and the decoder output at ``j`` predicts completion token ``j``.
    With ``fused`` and a supported model, only the base model runs; the head is applied later, in chunks, by the
    loss. Otherwise logits are computed at the valid positions only (``logits_to_keep`` is not needed: hidden
    states are gathered before the head where possible).

    ``packed``: run on the real tokens only (:mod:`gkd.packing`); ``None`` follows the model's setting
    (:func:`set_packed_forward`, off unless turned on). The outputs are the padded path's, in the same order.
    """
    m = unwrap(model)
    if packed if packed is not None else packed_forward_on(m):
        out = _score_packed(model, m, prompt_ids, prompt_mask, completion_ids, completion_mask, vocab, fused)
        if out is not None:
            return out
    valid = completion_mask.bool()
    if is_seq2seq(m):
        start = m.config.decoder_start_token_id
        if start is None:
            start = m.config.pad_token_id
        dec_in = torch.cat([torch.full_like(completion_ids[:, :1], start), completion_ids[:, :-1]], dim=1)
        dec_mask = torch.cat([torch.ones_like(completion_mask[:, :1]), completion_mask[:, :-1]], dim=1).long()
        out = model(
            input_ids=prompt_ids,
            attention_mask=prompt_mask.long(),
            decoder_input_ids=dec_in,
            decoder_attention_mask=dec_mask,
        )
        logits = out.logits[valid]
        return ScoringOutput(None, None, logits[:, :vocab] if vocab is not None else logits)
    ids, mask, positions = causal_inputs(prompt_ids, prompt_mask, completion_ids, completion_mask)
    p = prompt_ids.shape[1]
    if fused and fused_head_supported(m):
        base = getattr(m, m.base_model_prefix)
        out = base(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
        hidden = out.last_hidden_state[:, p - 1 :][valid]
        lin = m.get_output_embeddings()
        return ScoringOutput(hidden, head_of(m, lin, vocab), None)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
    logits = out.logits[:, p - 1 :][valid]
    return ScoringOutput(None, None, logits[:, :vocab] if vocab is not None else logits)


def _score_packed(
    model: nn.Module,
    m: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    vocab: int | None,
    fused: bool,
) -> ScoringOutput | None:
    """:func:`score_positions` on the packed batch (``None``: this batch cannot be packed, run it padded)."""
    if is_seq2seq(m):
        return None
    packed = pack_inputs(prompt_ids, prompt_mask, completion_ids, completion_mask, one_row=wants_one_row(m))
    if packed is None:
        return None
    # no attention mask: transformers builds the block-diagonal causal mask from the restarting position ids
    inputs = {"input_ids": packed.input_ids, "position_ids": packed.position_ids, "use_cache": False}
    if fused and fused_head_supported(m):
        hidden = getattr(m, m.base_model_prefix)(**inputs).last_hidden_state
        return ScoringOutput(
            hidden.reshape(-1, hidden.shape[-1])[packed.gather],
            head_of(m, m.get_output_embeddings(), vocab),
            None,
        )
    logits = model(**inputs).logits
    logits = logits.reshape(-1, logits.shape[-1])[packed.gather]
    return ScoringOutput(None, None, logits[:, :vocab] if vocab is not None else logits)


def packed_forward_on(model: nn.Module) -> bool:
    """Does ``model`` score packed by default (:func:`set_packed_forward`)?"""
    return bool(getattr(unwrap(model), "gkd_packed_forward", False))


def set_packed_forward(model: nn.Module, mode: bool | str, *, probe: bool | None = None) -> str | None:
    """Turn packed forwards on for ``model`` where ``mode`` (``packed_forward``: ``"auto"``, ``True`` or
    ``False``) allows it; returns why it stays off (``None`` when on). ``"auto"`` packs where the model supports it
    (:func:`gkd.packing.packing_unsupported_reason`); ``True`` on a model that cannot pack is a
    :class:`ConfigError`. ``probe`` also checks the numbers on two short sequences (:func:`gkd.packing.packing_probe`);
    ``None``: only for modelling code shipped with a checkpoint (``trust_remote_code``), which gkd's tests do not
    cover (transformers' own families are held to the padded path by ``tests/test_packing.py``)."""
    m = unwrap(model)
    reason = "packed_forward: false" if mode is False else packing_unsupported_reason(m)
    if probe is None:
        probe = not type(m).__module__.startswith("transformers.")
    if reason is None and probe:
        reason = packing_probe(m)
    if mode is True and reason is not None:
        raise ConfigError(f"packed_forward: true, but {reason}; set packed_forward: auto (or false)")
    m.gkd_packed_forward = reason is None
    return reason


class StudentForward(nn.Module):
    """The student's forward pass at the completion positions (``score_positions`` as a module, so that data-parallel
    wrappers, DDP via accelerate, see it): hidden states + head, or logits where the head cannot run chunked."""

    def __init__(self, model: nn.Module, vocab: int | None, fused: bool = True) -> None:
        super().__init__()
        self.model = model
        self.vocab = vocab
        self.fused = fused

    def forward(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        completion_ids: torch.Tensor,
        completion_mask: torch.Tensor,
    ) -> ScoringOutput:
        return score_positions(
            self.model,
            prompt_ids,
            prompt_mask,
            completion_ids,
            completion_mask,
            vocab=self.vocab,
            fused=self.fused,
        )


Scorer = StudentForward  # the earlier name
