"""Batching: left-padded prompts and right-padded completions (:class:`Batch`), and the run's batch streams.

:class:`BatchStream` draws seeded, resumable batches from an indexed dataset (each process its slice, or its
shard); :class:`PromptStream` draws prompts from a :class:`gkd.data.StreamingDataset`; :func:`make_stream` picks
the one a dataset needs. :func:`token_groups` and :func:`select_rows` regroup a step's sequences into micro-batches
by token count (``max_tokens_per_batch``).
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

__all__ = [
    "Batch",
    "BatchStream",
    "PromptStream",
    "collate",
    "make_stream",
    "pad_left",
    "pad_right",
    "select_rows",
    "token_groups",
]


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


def _span(mask: torch.Tensor) -> tuple[int, int]:
    """The first and one-past-last valid column of a row's mask (0, 0 when none is valid)."""
    cols = mask.nonzero()
    return (int(cols[0]), int(cols[-1]) + 1) if cols.numel() else (0, 0)


def token_groups(batches: list[Batch], max_tokens: int, *, packed: bool) -> list[list[tuple[int, int]]]:
    """The rows of ``batches`` (``(batch, row)`` pairs) regrouped into micro-batches of at most ``max_tokens``
    forward tokens, longest sequences first so that rows of like length share a micro-batch.

    A micro-batch's tokens are what its forward runs on: with ``packed`` forwards its real tokens (prompt +
    completion of each row), else rows x (longest prompt + longest completion). A row longer than the budget gets
    a micro-batch of its own (a sequence is never split). Every row lands in exactly one micro-batch."""
    rows = []
    for b, batch in enumerate(batches):
        p_len, c_end = batch.prompt_mask.sum(1).tolist(), [_span(m)[1] for m in batch.completion_mask]
        rows += [(p_len[r] + c_end[r], p_len[r], c_end[r], (b, r)) for r in range(batch.size)]
    rows.sort(key=lambda row: -row[0])  # stable: equal lengths keep the draw order
    groups: list[list[tuple[int, int]]] = []
    total = widest_p = widest_c = 0
    for length, p, c, pick in rows:
        cost = (
            total + length
            if packed
            else (len(groups[-1]) + 1 if groups else 1) * (max(widest_p, p) + max(widest_c, c))
        )
        if not groups or cost > max_tokens:
            groups.append([])
            total = widest_p = widest_c = 0
        groups[-1].append(pick)
        total, widest_p, widest_c = total + length, max(widest_p, p), max(widest_c, c)
    return groups


def select_rows(batches: list[Batch], picks: list[tuple[int, int]], pad_id: int) -> Batch:
    """The rows ``picks`` (``(batch, row)`` pairs) of ``batches`` as one batch, padded to their own widths (prompts
    on the left, completions on the right, as :func:`collate` pads them)."""
    first = batches[picks[0][0]]
    device = first.prompt_ids.device

    def stack(
        pairs: list[tuple[torch.Tensor, torch.Tensor]], left: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        spans = [_span(m) for _, m in pairs]
        width = max([1 if not left else 0] + [end - start for start, end in spans])
        ids = torch.full((len(pairs), width), pad_id, dtype=first.prompt_ids.dtype, device=device)
        mask = torch.zeros((len(pairs), width), dtype=torch.bool, device=device)
        for k, ((row_ids, row_mask), (start, end)) in enumerate(zip(pairs, spans)):
            at = slice(width - (end - start), width) if left else slice(0, end - start)
            ids[k, at], mask[k, at] = row_ids[start:end], row_mask[start:end]
        return ids, mask

    rows = [(batches[b], r) for b, r in picks]
    p_ids, p_mask = stack([(b.prompt_ids[r], b.prompt_mask[r]) for b, r in rows], left=True)
    c_ids, c_mask = stack([(b.completion_ids[r], b.completion_mask[r]) for b, r in rows], left=False)
    t_ids = t_mask = None
    if any(b.teacher_prompt_ids is not None for b, _ in rows):
        t_ids, t_mask = stack(
            [(b.teacher_prompt()[0][r], b.teacher_prompt()[1][r]) for b, r in rows], left=True
        )
    indices = None if any(b.indices is None for b, _ in rows) else [b.indices[r] for b, r in rows]
    records = [b.records[r] for b, r in rows]
    return Batch(p_ids, p_mask, c_ids, c_mask, records, first.on_policy, indices, t_ids, t_mask)


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
