"""The teacher: frozen, in eval mode, no gradients; scores sequences and (for SeqKD) writes targets once.

SeqKD replaces the fixed dataset's targets with the teacher's own samples. They are generated **once** for the whole
dataset and cached on disk (``output_dir/seqkd-<fingerprint>.jsonl``), not per step; a rerun or a resumed run reads
the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gkd.data import Batch, Example, TokenizedDataset
from gkd.evaluation import generate_ids
from gkd.models import ScoringOutput, score_positions

__all__ = ["Teacher", "seqkd_dataset"]


class Teacher:
    """A frozen model that scores (prompt, completion) batches."""

    def __init__(self, model: nn.Module, vocab: int, fused: bool = True) -> None:
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.vocab = vocab
        self.fused = fused

    @torch.no_grad()
    def score(self, batch: Batch) -> ScoringOutput:
        return score_positions(
            self.model,
            batch.prompt_ids,
            batch.prompt_mask,
            batch.completion_ids,
            batch.completion_mask,
            vocab=self.vocab,
            fused=self.fused,
        )


def _fingerprint(dataset: TokenizedDataset, extra: dict[str, Any]) -> str:
    h = hashlib.sha256()
    for e in dataset.examples:
        h.update(json.dumps(e.prompt).encode())
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def seqkd_dataset(
    teacher: nn.Module,
    tokenizer: Any,
    dataset: TokenizedDataset,
    *,
    cache_dir: Path,
    teacher_name: str,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int,
    batch_size: int = 64,
    backend: str = "auto",
    log: Any = print,
) -> TokenizedDataset:
    """The dataset with every completion replaced by a teacher sample, generated once and cached on disk."""
    key = _fingerprint(
        dataset,
        {"teacher": teacher_name, "T": temperature, "k": top_k, "p": top_p, "n": max_new_tokens, "seed": seed},
    )
    path = cache_dir / f"seqkd-{key}.jsonl"
    eos = tokenizer.eos_token_id
    completions: list[list[int]] | None = None
    if path.exists():
        with path.open() as fh:
            completions = [json.loads(line) for line in fh]
        if len(completions) != len(dataset):
            completions = None
    if completions is None:
        log(f"SeqKD: the teacher writes targets for {len(dataset)} prompts (once; cached at {path})")
        ids = generate_ids(
            teacher,
            tokenizer,
            dataset,
            max_new_tokens=max_new_tokens,
            greedy=False,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            batch_size=batch_size,
            seed=seed,
            backend=backend,
        )
        completions = [(t + [eos])[:max_new_tokens] for t in ids]
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        with tmp.open("w") as fh:
            for c in completions:
                fh.write(json.dumps(c) + "\n")
        os.replace(tmp, path)
    examples = [Example(e.prompt, c, e.record) for e, c in zip(dataset.examples, completions)]
    return replace(dataset, examples=examples)
