"""Generating completions for a set of records and scoring them with a metric."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from gkd.data import TokenizedDataset, collate
from gkd.models import eval_mode, unwrap
from gkd.rollout import sample_completions

__all__ = ["eos_ids", "generate_texts"]


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
    backend: str = "auto",
    progress: Callable[[int], None] | None = None,
) -> list[list[int]]:
    """Completion token ids (without the EOS) for every example, in order, in eval mode.

    Only ids the tokenizer knows are generated (``vocab_size=len(tokenizer)``): an output layer padded beyond the
    tokenizer never yields an id that cannot be decoded.
    """
    gen = torch.Generator().manual_seed(seed)
    out: list[list[int]] = []
    m = unwrap(model)
    eos = eos_ids(m, tokenizer)
    with eval_mode(model):
        for start in range(0, len(dataset), batch_size):
            batch = collate(dataset.examples[start : start + batch_size], tokenizer.pad_token_id)
            roll = sample_completions(
                m,
                batch.prompt_ids,
                batch.prompt_mask,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                greedy=greedy,
                eos_token_ids=eos,
                pad_token_id=tokenizer.pad_token_id,
                generator=gen,
                backend=backend,
                vocab_size=len(tokenizer),
            )
            for ids, mask in zip(roll.completion_ids.tolist(), roll.completion_mask.tolist()):
                toks = [t for t, keep in zip(ids, mask) if keep]
                if toks and toks[-1] in eos:
                    toks = toks[:-1]
                out.append(toks)
            if progress is not None:
                progress(batch.size)
    return out


def generate_texts(model: Any, tokenizer: Any, dataset: TokenizedDataset, **kw: Any) -> list[str]:
    """Decoded completions (special tokens removed) for every example of ``dataset``."""
    ids = generate_ids(model, tokenizer, dataset, **kw)
    return [tokenizer.decode(t, skip_special_tokens=True).strip() for t in ids]
