"""The teacher: frozen, in eval mode, no gradients; its view of a batch for the loss, and (for SeqKD) targets once.

One interface, every kind of teacher. The step asks ``teacher.view(batch)`` and hands the answer to the objective
(:mod:`gkd.objective`), which never calls a model itself. What a view is (:data:`gkd.outputs.TeacherView`):

    Teacher          a local model: its scores at the batch's valid completion positions (hidden states + head,
                     or logits), a :class:`gkd.outputs.ScoringOutput`
    CachedTeacher    the top-k cache for fixed batches it covers (a :class:`gkd.outputs.TeacherTopK`: top-k
                     log-probabilities plus a tail bucket, no forward pass), else its live teacher's scores
    ServedTeacher    (:mod:`gkd.teacher_client`, ``teacher_url``) top-k + tail from an HTTP server
    Reference        the initial student of an RL run (the KL-to-initial term): a ``Teacher`` under its own name
    AlignedTeacher   (:mod:`gkd.xtok`) a local teacher with another tokenizer: its scores of the same text in its
                     own tokens, projected onto the student's vocabulary (a ``gkd.xtok.AlignedView``)

A view is computed without gradients, on the batch's device, at the batch's valid positions in row-major order
(the loss's order). A teacher scores the completion after its own prompt when the batch carries one
(``batch.teacher_prompt_ids``: ``teacher_prompt_field``, ``teacher_system_prompt``, ``teacher_chat_template``);
the completion is the same tokens, so its positions are the student's. The reference scores the student's prompt. A teacher kind must implement ``view`` and expose ``vocab``; it need not run a model.

SeqKD replaces the fixed dataset's targets with the teacher's own samples. They are generated **once** for the whole
dataset and cached on disk (``output_dir/seqkd-<fingerprint>.jsonl``), not per step; a rerun or a resumed run reads
the cache.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from gkd.data import Batch, Example, TokenizedDataset, collate
from gkd.divergences import log_probs
from gkd.forward import score_positions
from gkd.io import atomic_write, fingerprint, write_jsonl
from gkd.losses import default_chunk
from gkd.outputs import ScoringOutput, TeacherTopK, TeacherView
from gkd.sampling import LocalSampler, Sampler, generate_ids, local_sampler

__all__ = [
    "CachedTeacher",
    "Reference",
    "Teacher",
    "TeacherSource",
    "TopKCache",
    "build_topk_cache",
    "seqkd_dataset",
]


class TeacherSource(Protocol):
    """What the step needs from any kind of teacher (see the module docstring)."""

    vocab: int

    def view(self, batch: Batch) -> TeacherView:
        """The teacher's view of ``batch`` at its valid completion positions, without gradients."""
        ...


class Teacher:
    """A frozen model that scores (prompt, completion) batches: the completions after the teacher's own prompts
    when the batch has them (``own_prompt``), else after the student's."""

    own_prompt = True

    def __init__(self, model: nn.Module, vocab: int, fused: bool = True) -> None:
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.vocab = vocab
        self.fused = fused

    @property
    def device(self) -> torch.device:
        """Where the teacher computes (its batches must be there)."""
        param = next(iter(self.model.parameters()), None)
        return param.device if param is not None else torch.device("cpu")

    @torch.no_grad()
    def score(self, batch: Batch) -> ScoringOutput:
        """The model's scores at the batch's valid completion positions."""
        prompt_ids, prompt_mask = (
            batch.teacher_prompt() if self.own_prompt else (batch.prompt_ids, batch.prompt_mask)
        )
        return score_positions(
            self.model,
            prompt_ids,
            prompt_mask,
            batch.completion_ids,
            batch.completion_mask,
            vocab=self.vocab,
            fused=self.fused,
        )

    def view(self, batch: Batch) -> ScoringOutput:
        """A local teacher's view: its scores."""
        return self.score(batch)


class Reference(Teacher):
    """The initial student of an RL run: frozen, scored like a teacher, but always after the student's prompt."""

    own_prompt = False


class CachedTeacher:
    """The top-k cache in front of a live teacher: fixed (off-policy) batches whose examples the cache covers are
    read from it (no forward pass); the student's own samples, which no cache can hold, go to ``live``."""

    def __init__(self, live: Teacher, cache: TopKCache) -> None:
        self.live, self.cache, self.vocab = live, cache, live.vocab

    @property
    def model(self) -> nn.Module:
        """The live teacher's model."""
        return self.live.model

    @property
    def device(self) -> torch.device:
        return self.live.device

    def view(self, batch: Batch) -> TeacherView:
        if not batch.on_policy and batch.indices is not None:
            return self.cache.lookup(batch.indices, batch.completion_mask)
        return self.live.view(batch)

    def score(self, batch: Batch) -> ScoringOutput:
        """The live teacher's scores (evaluation, diagnostics)."""
        return self.live.score(batch)


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
    sampler: Sampler | None = None,
    backend: str = "auto",
    log: Any = print,
) -> TokenizedDataset:
    """The dataset with every completion replaced by a teacher sample, generated once and cached on disk.

    The samples come from ``sampler`` (:func:`gkd.evaluation.generate_ids`: one generator seeded with ``seed``,
    ``batch_size`` prompts at a time). Without one, ``backend`` (the run's ``rollout_backend``) picks an in-process
    sampler through :func:`gkd.sampling.local_sampler`: ``rollout_backend: vllm`` samples the teacher with the local
    ``auto`` backend, because the run's vLLM engine holds the student, not the teacher. A ``sampler`` given here
    must be able to sample ``teacher`` (its ``sync(teacher)`` is called first).

    The cache key covers the prompts, ``teacher_name``, the sampling settings and the seed, not which local backend
    sampled (caches written before samplers existed stay valid); any other sampler adds its class name to the key.
    The teacher samples after its own prompt where an example has one (the key then covers it).
    """
    in_process_for_vllm = sampler is None and backend == "vllm"
    if sampler is None:
        sampler = local_sampler(backend)
    settings: dict[str, Any] = {
        "teacher": teacher_name,
        "T": temperature,
        "k": top_k,
        "p": top_p,
        "n": max_new_tokens,
        "seed": seed,
    }
    if not isinstance(sampler, LocalSampler):
        settings["sampler"] = type(sampler).__qualname__
    own = any(e.teacher_prompt is not None for e in dataset.examples)
    prompts = [e.prompt if e.teacher_prompt is None else e.teacher_prompt for e in dataset.examples]
    key = fingerprint(prompts, settings)
    if own:  # the teacher writes its targets after its own prompts
        dataset_for_teacher = replace(
            dataset, examples=[Example(p, e.completion, e.record) for p, e in zip(prompts, dataset.examples)]
        )
    else:
        dataset_for_teacher = dataset
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
        if in_process_for_vllm:
            log("SeqKD: the teacher is sampled in-process (the run's vLLM engine serves only the student)")
        ids = generate_ids(
            teacher,
            tokenizer,
            dataset_for_teacher,
            max_new_tokens=max_new_tokens,
            greedy=False,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            batch_size=batch_size,
            seed=seed,
            sampler=sampler,
        )
        completions = [[*t, eos][:max_new_tokens] for t in ids]
        write_jsonl(path, completions)
    examples = [
        Example(e.prompt, c, e.record, e.teacher_prompt) for e, c in zip(dataset.examples, completions)
    ]
    return replace(dataset, examples=examples)


# ---------------------------------------------------------------------------------------------------------------
# offline teacher cache: top-k log-probabilities + a tail bucket, for the fixed dataset
# ---------------------------------------------------------------------------------------------------------------
class TopKCache:
    """The teacher's top-k log-probabilities at every completion position of a fixed dataset, computed once.

    Off-policy batches (λ < 1, SeqKD) then need no teacher forward pass: the divergence is computed on the
    (k + 1)-category distribution of the teacher's top-k tokens plus one bucket for the remaining mass, which every
    divergence supports. Stored with safetensors as ``ids`` / ``logprobs`` ``[positions, k]`` and per-example
    ``offsets``. In memory the tensors live where the loss runs (``device``), so a lookup is a gather there and
    nothing crosses devices per step; on disk they are CPU tensors.
    """

    def __init__(self, ids: torch.Tensor, logprobs: torch.Tensor, offsets: torch.Tensor) -> None:
        self.ids, self.logprobs, self.offsets = ids, logprobs, offsets

    @property
    def device(self) -> torch.device:
        return self.ids.device

    def to(self, device: torch.device | str) -> TopKCache:
        """The cache on ``device``."""
        return TopKCache(self.ids.to(device), self.logprobs.to(device), self.offsets.to(device))

    def lookup(self, indices: list[int], completion_mask: torch.Tensor) -> TeacherTopK:
        """The cached rows for the valid positions of a batch, in the loss's (row-major) order, on the cache's device.

        Example ``i``'s rows are ``offsets[i]`` onwards, one per valid completion position in order, so the row of a
        valid position is its example's offset plus its rank among the row's valid positions.
        """
        device = self.ids.device
        mask = completion_mask.to(device=device, dtype=torch.bool)
        starts = self.offsets[torch.tensor(indices, dtype=torch.long, device=device)]
        rank = mask.long().cumsum(-1) - 1
        sel = (starts[:, None] + rank)[mask]
        return TeacherTopK(self.ids[sel].long(), self.logprobs[sel].float())

    def save(self, path: Path) -> None:
        from safetensors.torch import save

        tensors = {"ids": self.ids, "logprobs": self.logprobs, "offsets": self.offsets}
        atomic_write(path, save({k: v.cpu().contiguous() for k, v in tensors.items()}))

    @classmethod
    def load(cls, path: Path, device: torch.device | str = "cpu") -> TopKCache:
        """The cache saved at ``path``, on ``device``."""
        from safetensors.torch import load_file

        t = load_file(str(path))
        return cls(t["ids"], t["logprobs"], t["offsets"]).to(device)


@torch.no_grad()
def build_topk_cache(
    teacher: Teacher,
    dataset: TokenizedDataset,
    *,
    k: int,
    temperature: float,
    pad_id: int,
    cache_dir: Path,
    teacher_name: str,
    batch_size: int = 64,
    log: Any = print,
) -> TopKCache:
    """Run the teacher once over the dataset's completions and keep its top-k log-probs (cached on disk).

    The cache is returned on the teacher's device (where the loss runs), whether it was built or read from disk.
    It holds the teacher's scores after its own prompts where the examples have them (the key covers them).
    """
    key = fingerprint(
        [
            [e.prompt, e.completion]
            if e.teacher_prompt is None
            else [e.prompt, e.completion, e.teacher_prompt]
            for e in dataset.examples
        ],
        {"teacher": teacher_name, "k": k, "T": temperature},
    )
    path = cache_dir / f"teacher-top{k}-{key}.safetensors"
    device = teacher.device
    if path.exists():
        return TopKCache.load(path, device)
    log(f"teacher cache: top-{k} log-probs for {len(dataset)} examples (once; cached at {path})")
    k = min(k, teacher.vocab)
    ids_parts, lp_parts, lengths = [], [], []
    chunk = default_chunk(teacher.vocab)  # positions per [chunk, vocab] block
    for start in range(0, len(dataset), batch_size):
        batch = collate(dataset.examples[start : start + batch_size], pad_id).to(device)
        out = teacher.score(batch)
        n = (out.hidden if out.hidden is not None else out.logits).shape[0]  # type: ignore[union-attr]
        for rows in range(0, n, chunk):  # never the [positions, vocab] log-probs of a whole batch
            if out.hidden is not None:
                logits = out.head.logits(out.hidden[rows : rows + chunk])  # type: ignore[union-attr]
            else:
                logits = out.logits[rows : rows + chunk]  # type: ignore[index]
            top = log_probs(logits, temperature).topk(k, dim=-1)
            ids_parts.append(top.indices.to(torch.int32))
            lp_parts.append(top.values.to(torch.float32))
        lengths.append(batch.completion_mask.sum(-1))
    counts = torch.cat(lengths)
    offsets = torch.zeros(counts.numel() + 1, dtype=torch.long, device=device)
    offsets[1:] = counts.cumsum(0)
    cache = TopKCache(torch.cat(ids_parts), torch.cat(lp_parts), offsets)
    cache_dir.mkdir(parents=True, exist_ok=True)
    cache.save(path)
    return cache
