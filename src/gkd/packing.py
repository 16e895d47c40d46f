"""Packed forwards: a batch's real tokens only, several sequences to a row, attention never across a sequence.

A :class:`gkd.data.Batch` pads every prompt on the left to the longest prompt and every completion on the right to
the longest completion, so on ragged data most of a padded forward can be pad tokens. :func:`pack_inputs` lays the
same sequences (each the valid prompt, then the valid completion without its last token, which predicts nothing)
end to end instead, with ``position_ids`` that restart at 0 at every sequence and no attention mask.

How the installed transformers (5.x) keeps sequences apart, found in its source and checked by
``tests/test_packing.py``: with ``attention_mask=None`` and such ``position_ids``, ``masking_utils``'
``create_causal_mask`` / ``create_sliding_window_causal_mask`` call ``find_packed_sequence_indices`` (a new
sequence wherever a position is not the previous one + 1) and build a block-diagonal causal mask for the ``sdpa``,
``eager`` and ``flex_attention`` kernels (sliding windows counted in each sequence's own positions), and the
flash-attention kernels read the same ``position_ids`` as variable-length sequences (``cu_seqlens``; they need
the whole batch in one row). Rotary and learned absolute position embeddings both read ``position_ids``, so each
sequence sees exactly the positions it has in the padded batch and its outputs are the padded outputs (up to
floating-point summation order).

Row layout: for the flash kernels one row (their cost is per sequence); for the masked kernels rows of the longest
sequence's length, filled first-fit in decreasing length (a dense mask costs rows x width², which this keeps at or
below the padded batch's). A row's unused tail is filler tokens whose positions restart at 0, a block of its own
that no sequence attends to; their outputs are never read.

:func:`packing_unsupported_reason` says why a model keeps the padded path (encoder-decoder models, attention kernels
that ignore ``position_ids``, modelling code that does not build its masks with ``masking_utils``) and
:func:`packing_probe` checks on two short sequences that the model really keeps them apart.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn
from transformers import masking_utils

__all__ = [
    "PACKING_KERNELS",
    "PackedInputs",
    "pack_inputs",
    "packing_probe",
    "packing_unsupported_reason",
    "wants_one_row",
]

# Attention kernels that keep packed sequences apart from position_ids alone (see the module docstring).
PACKING_KERNELS = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")
_ONE_ROW_KERNELS = ("flash_attention_2", "flash_attention_3")  # variable-length kernels: one row, no filler
_MASK_BUILDERS = ("create_causal_mask", "create_sliding_window_causal_mask")


@dataclass
class PackedInputs:
    """A batch packed into rows: the model's inputs and where to read the outputs.

    ``gather`` indexes the flattened ``[rows * width]`` outputs: entry ``t`` is the output that predicts the
    ``t``-th valid completion token of the batch in row-major order (``completion_mask``'s order), exactly what
    the padded path gathers with ``[:, P - 1:][completion_mask]``."""

    input_ids: torch.Tensor  # [rows, width]
    position_ids: torch.Tensor  # [rows, width]
    gather: torch.Tensor  # [valid completion tokens]
    real_tokens: int  # tokens of the batch's sequences (the rest of the rows is filler)


def _first_fit(lengths: list[int], width: int) -> tuple[list[int], list[int], list[int]]:
    """Each sequence's row and offset, first-fit in decreasing length into rows of ``width``; and each row's fill."""
    row_of, offset_of, used = [0] * len(lengths), [0] * len(lengths), []
    for i in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        row = next((r for r, u in enumerate(used) if u + lengths[i] <= width), len(used))
        if row == len(used):
            used.append(0)
        row_of[i], offset_of[i] = row, used[row]
        used[row] += lengths[i]
    return row_of, offset_of, used


def pack_inputs(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    one_row: bool = False,
) -> PackedInputs | None:
    """The batch's sequences packed into rows (see the module docstring), or ``None`` where the padded path must
    run: a prompt that is not left-padded, a completion mask that is not a prefix, an example with completion
    tokens but no prompt token (nothing to predict its first token from), or no completion token at all.

    Examples without completion tokens are left out (nothing of them is scored)."""
    pm, cm = prompt_mask.bool(), completion_mask.bool()
    batch, p_width = pm.shape
    device = prompt_ids.device
    p_len, n = pm.sum(1), cm.sum(1)
    cols_p = torch.arange(p_width, device=device)
    cols_c = torch.arange(cm.shape[1], device=device)
    if not torch.equal(cols_p >= (p_width - p_len)[:, None], pm) or not torch.equal(cols_c < n[:, None], cm):
        return None
    keep = n > 0
    if not bool(keep.any()) or bool((p_len[keep] == 0).any()):
        return None
    # the padded causal input [prompt | completion[:-1]]; a sequence's tokens are consecutive in its row, and its
    # k-th token has position k. Column P - 1 + j predicts completion token j, so the inputs end at P - 2 + n.
    ids = torch.cat([prompt_ids, completion_ids[:, :-1]], dim=1)
    cols = torch.arange(ids.shape[1], device=device)
    real = torch.cat([pm, cm[:, :-1]], dim=1) & (cols <= p_width - 2 + n[:, None]) & keep[:, None]
    lengths_t = torch.where(keep, p_len + n - 1, 0)
    lengths = lengths_t.tolist()  # the rows are planned on the host (a few numbers per sequence)
    width = sum(lengths) if one_row else max(lengths)
    row_of, offset_of, used = _first_fit(lengths, width)  # examples left out have length 0
    rows = len(used)
    base = torch.tensor([r * width + o for r, o in zip(row_of, offset_of)], device=device)
    # positions: filler restarts at 0 after each row's sequences; real tokens take their place in their sequence
    fill = torch.tensor(used, device=device)
    position_ids = (torch.arange(width, device=device) - fill[:, None]).clamp(min=0).reshape(-1)
    input_ids = torch.zeros(rows * width, dtype=ids.dtype, device=device)
    seq_of = torch.arange(batch, device=device)[:, None].expand_as(real)[real]
    k = real.long().cumsum(1)[real] - 1  # each real token's index in its sequence
    dest = base[seq_of] + k
    input_ids[dest] = ids[real]
    position_ids[dest] = k
    row_i, col_j = cm.nonzero(as_tuple=True)  # row-major, as completion_mask[...] gathers
    gather = base[row_i] + p_len[row_i] - 1 + col_j
    return PackedInputs(
        input_ids.view(rows, width), position_ids.view(rows, width), gather, int(sum(lengths))
    )


def wants_one_row(model: nn.Module) -> bool:
    """Does ``model``'s attention kernel want the whole batch in one row (the variable-length flash kernels)?"""
    return getattr(model.config, "_attn_implementation", None) in _ONE_ROW_KERNELS


def packing_unsupported_reason(model: nn.Module) -> str | None:
    """Why ``model`` (a transformers model, unwrapped) cannot run packed forwards (``None`` if it can, as far as
    its code shows: :func:`packing_probe` checks the numbers)."""
    cfg = model.config
    if getattr(cfg, "is_encoder_decoder", False):
        return "encoder-decoder model (the decoder attends to the padded encoder output)"
    kernel = getattr(cfg, "_attn_implementation", None)
    if kernel not in PACKING_KERNELS:
        return f"attention kernel {kernel!r} is not one that reads packed position_ids ({', '.join(PACKING_KERNELS)})"
    module = sys.modules.get(type(model).__module__)
    if not any(getattr(module, name, None) is getattr(masking_utils, name) for name in _MASK_BUILDERS):
        return f"{type(model).__name__}'s code does not build its attention mask with transformers' masking_utils"
    return None


@torch.no_grad()
def packing_probe(model: nn.Module) -> str | None:
    """Run ``model`` on two short sequences packed in one row and alone; ``None`` if the packed outputs are the
    separate ones (the second sequence does not see the first), else what differed."""
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    first = torch.tensor([[1, 2, 3]], device=device) % vocab
    second = torch.tensor([[4, 5]], device=device) % vocab
    packed_ids = torch.cat([first, second], dim=1)
    positions = torch.tensor([[0, 1, 2, 0, 1]], device=device)
    training = model.training
    model.eval()  # no dropout: the two forwards must be comparable
    try:
        packed = model(input_ids=packed_ids, position_ids=positions, use_cache=False).logits.float()
        alone = model(input_ids=second, use_cache=False).logits.float()
    finally:
        model.train(training)
    scale = float(alone.abs().max()) or 1.0
    err = float((packed[:, 3:] - alone).abs().max()) / scale
    tol = 1e-3 if next(model.parameters()).dtype == torch.float32 else 3e-2
    return (
        None
        if err <= tol
        else f"a packed sequence's outputs change with its neighbour (relative error {err:.1e})"
    )
