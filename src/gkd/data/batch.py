"""Batching: left-padded prompts and right-padded completions (:class:`Batch`), and the run's batch streams.

:class:`BatchStream` draws seeded, resumable batches from an indexed dataset (each process its slice, or its
shard); :class:`PromptStream` draws prompts from a :class:`gkd.data.StreamingDataset`; :func:`make_stream` picks
the one a dataset needs.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from gkd.data.arrow import StreamingDataset, _stream_examples
from gkd.data.tokenize import Example, TokenizedDataset
from gkd.errors import DataError

__all__ = ["Batch", "BatchStream", "PromptStream", "collate", "make_stream", "pad_left", "pad_right"]


@dataclass
class Batch:
    """Left-padded prompts and right-padded completions. Valid completion tokens include the EOS.

    ``teacher_prompt_ids`` / ``teacher_prompt_mask`` (left-padded, their own width): the teacher's own prompts
    (:class:`gkd.data.TeacherPrompt`), each row the student's prompt where that example has none; None when no
    example of the batch has one. Only the teacher reads them; the student and its rollouts read ``prompt_ids``."""

    prompt_ids: torch.Tensor  # [B, P]
    prompt_mask: torch.Tensor  # [B, P] bool
    completion_ids: torch.Tensor  # [B, C]
    completion_mask: torch.Tensor  # [B, C] bool
    records: list[dict]
    on_policy: bool = False
    indices: list[int] | None = None  # positions of the examples in their dataset (for per-example caches)
    teacher_prompt_ids: torch.Tensor | None = None  # [B, P'] the teacher's own prompts, or None
    teacher_prompt_mask: torch.Tensor | None = None  # [B, P'] bool

    def teacher_prompt(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompts the teacher scores the completions after: its own, else the student's."""
        if self.teacher_prompt_ids is None:
            return self.prompt_ids, self.prompt_mask
        assert self.teacher_prompt_mask is not None
        return self.teacher_prompt_ids, self.teacher_prompt_mask

    @property
    def size(self) -> int:
        return self.prompt_ids.shape[0]

    def num_tokens(self) -> int:
        return int(self.completion_mask.sum())

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            self.prompt_ids.to(device),
            self.prompt_mask.to(device),
            self.completion_ids.to(device),
            self.completion_mask.to(device),
            self.records,
            self.on_policy,
            self.indices,
            None if self.teacher_prompt_ids is None else self.teacher_prompt_ids.to(device),
            None if self.teacher_prompt_mask is None else self.teacher_prompt_mask.to(device),
        )

    def repeat(self, n: int) -> Batch:
        """Each row repeated ``n`` times in place (for several samples per prompt)."""
        if n == 1:
            return self
        return Batch(
            self.prompt_ids.repeat_interleave(n, 0),
            self.prompt_mask.repeat_interleave(n, 0),
            self.completion_ids.repeat_interleave(n, 0),
            self.completion_mask.repeat_interleave(n, 0),
            [r for r in self.records for _ in range(n)],
            self.on_policy,
            None if self.indices is None else [i for i in self.indices for _ in range(n)],
            None if self.teacher_prompt_ids is None else self.teacher_prompt_ids.repeat_interleave(n, 0),
            None if self.teacher_prompt_mask is None else self.teacher_prompt_mask.repeat_interleave(n, 0),
        )


def pad_left(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s) :] = True
    return ids, mask


def pad_right(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, s in enumerate(seqs):
        if s:
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = True
    return ids, mask


def collate(examples: list[Example], pad_id: int, indices: list[int] | None = None) -> Batch:
    p_ids, p_mask = pad_left([e.prompt for e in examples], pad_id)
    c_ids, c_mask = pad_right([e.completion or [] for e in examples], pad_id)
    t_ids = t_mask = None
    if any(e.teacher_prompt is not None for e in examples):
        t_ids, t_mask = pad_left(
            [e.prompt if e.teacher_prompt is None else e.teacher_prompt for e in examples], pad_id
        )
    return Batch(p_ids, p_mask, c_ids, c_mask, [e.record for e in examples], False, indices, t_ids, t_mask)


class _StreamBase:
    """What both batch streams hold: the data, the batch size, the seed, the pad id and this process's place."""

    def __init__(self, dataset: Any, batch_size: int, seed: int, pad_id: int, rank: int, world: int) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.pad_id = pad_id
        self.rank = rank
        self.world = world
        self.epoch = 0
        self.position = 0


class BatchStream(_StreamBase):
    """An endless, seeded, resumable stream of batches: a fresh permutation of the data every epoch.

    With several processes each rank takes its own slice of every global batch, so ranks see different data. A
    dataset that holds only this process's shard (:class:`ArrowTokenizedDataset` with ``shard``) is drawn on its
    own instead: each epoch a permutation of the shard (seeded as the whole dataset's), ``batch_size`` rows a batch,
    so rank ``r`` trains on rows ``r, r + world, ...`` only. With one process both are the same stream.
    """

    def __init__(
        self,
        dataset: TokenizedDataset,
        batch_size: int,
        seed: int,
        pad_id: int,
        rank: int = 0,
        world: int = 1,
    ):
        super().__init__(dataset, batch_size, seed, pad_id, rank, world)
        self.local = world > 1 and getattr(dataset, "shard", None) is not None
        self.drawn = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.dataset.examples)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def _take(self, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            if self.position >= len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._permutation(self.epoch)
            k = min(n - len(out), len(self._order) - self.position)
            out += self._order[self.position : self.position + k]
            self.position += k
        self.drawn += n
        return out

    def next_indices(self) -> list[int]:
        """The dataset positions of the next batch (for a shard, of the whole dataset: row ``rank + world * i``)."""
        if self.local:
            return [self.rank + self.world * i for i in self._take(self.batch_size)]
        global_idx = self._take(self.batch_size * self.world)
        return global_idx[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def next(self) -> Batch:
        idx = self.next_indices()
        held = [(i - self.rank) // self.world for i in idx] if self.local else idx
        return collate([self.dataset.examples[i] for i in held], self.pad_id, idx)

    def state_dict(self) -> dict[str, int]:
        if self.local:  # shards can differ in length by one: each rank resumes from the count drawn
            return {"epoch": self.epoch, "position": self.position, "drawn": self.drawn}
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if self.local and "drawn" in state:
            self.drawn = int(state["drawn"])
            self.epoch, self.position = divmod(self.drawn, len(self.dataset.examples))
        else:
            self.epoch = int(state["epoch"])
            self.position = int(state["position"])
        self._order = self._permutation(self.epoch)


class PromptStream(_StreamBase):
    """Batches of prompts read in order from a :class:`StreamingDataset` (``dataset_streaming: true``): each epoch
    the stream again, shuffled through a seeded buffer, this process's part of it (``split_dataset_by_node``).

    Resuming is exact: the state is (epoch, prompts drawn in it), and a resumed stream skips the prompts already
    drawn (read again, not tokenised) before it draws the next."""

    def __init__(
        self,
        dataset: StreamingDataset,
        batch_size: int,
        seed: int,
        pad_id: int,
        rank: int = 0,
        world: int = 1,
    ):
        super().__init__(dataset, batch_size, seed, pad_id, rank, world)
        self._it: Iterator[Example] | None = None

    def next(self) -> Batch:
        examples: list[Example] = []
        while len(examples) < self.batch_size:
            if self._it is None:
                self._it = _stream_examples(
                    self.dataset, self.seed, self.epoch, self.position, self.rank, self.world
                )
            try:
                example = next(self._it)
            except StopIteration:
                if self.position == 0:
                    raise DataError("the streamed dataset is empty; it needs at least one record") from None
                self.epoch += 1
                self.position = 0
                self._it = None
                continue
            examples.append(example)
            self.position += 1
        return collate(examples, self.pad_id)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._it = None


def make_stream(
    dataset: TokenizedDataset, batch_size: int, seed: int, pad_id: int, rank: int = 0, world: int = 1
) -> BatchStream | PromptStream:
    """The run's batch stream: a :class:`PromptStream` over a streamed dataset, else a :class:`BatchStream`."""
    if isinstance(dataset, StreamingDataset):
        return PromptStream(dataset, batch_size, seed, pad_id, rank, world)
    return BatchStream(dataset, batch_size, seed, pad_id, rank, world)
