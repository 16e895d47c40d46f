"""Several teachers at once (config key ``teachers``), routed per record: the step's teacher and its view.

Each record may name its teacher in a field (``teacher_field``, default ``teacher``). A record that names one is
distilled from that teacher only; a record without the field (or with null) is distilled from every teacher, teacher
``i``'s term weighted by ``w_i / Σ w`` (its ``weight``, normalised). So at every valid completion position ``n`` the
divergence term is ``Σ_i r_i[n] · D(p_Ti ‖ p_S)(n)`` with per-position weights ``r_i`` that sum to 1.

:class:`RoutedTeachers` is a teacher kind (:class:`gkd.teacher.TeacherSource`): the step asks ``view(batch)`` as of
any teacher and hands the answer, a :class:`RoutedView`, to the objective. Each teacher (a local
:class:`gkd.teacher.Teacher` or a served one) scores only the rows routed to it, as a sub-batch (rows with no
weight on a teacher never reach it); a :class:`RoutedPart` carries its view with the rows and the per-position
weights, so the objective (:mod:`gkd.objective`) can select the student's matching positions: a ScoringOutput's
positions are the batch's valid completion positions in row-major order, so a subset of rows is a subset of
positions in the same order.

:func:`check_routes` checks the training records' fields against the teachers' names before any weights load
(:mod:`gkd.preflight`); a record naming an unknown teacher is one :class:`gkd.errors.DataError` line.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from gkd.data import Batch
from gkd.errors import DataError
from gkd.outputs import TeacherView

__all__ = ["RoutedPart", "RoutedTeachers", "RoutedView", "check_routes", "route_of", "sub_batch"]


def route_of(record: Mapping[str, Any], field: str) -> str | None:
    """The teacher a record names in ``field``, or None when it names none (the field absent, null or empty)."""
    value = record.get(field)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return str(value)


def check_routes(
    records: Iterable[Mapping[str, Any]], field: str, names: list[str], source: str = "training"
) -> None:
    """Every record names a known teacher in ``field``, or none: else one DataError naming the record and the known
    names (record numbers count from 1, as in the data's other errors)."""
    known = set(names)
    for i, record in enumerate(records):
        name = route_of(record, field)
        if name is not None and name not in known:
            raise DataError(
                f"{source} record {i + 1} names teacher '{name}' in its '{field}' field, but the config's teachers "
                f"are {', '.join(names)}; fix the record, or add a teacher named '{name}' to teachers"
            )


def sub_batch(batch: Batch, rows: torch.Tensor) -> Batch:
    """The rows ``rows`` (sorted indices) of ``batch``, in order; the batch itself when that is every row."""
    if rows.numel() == batch.size:
        return batch
    picked = rows.tolist()
    idx = rows.to(batch.prompt_ids.device)

    def take(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.index_select(0, idx)

    return Batch(
        take(batch.prompt_ids),  # type: ignore[arg-type]
        take(batch.prompt_mask),  # type: ignore[arg-type]
        take(batch.completion_ids),  # type: ignore[arg-type]
        take(batch.completion_mask),  # type: ignore[arg-type]
        [batch.records[i] for i in picked],
        batch.on_policy,
        None if batch.indices is None else [batch.indices[i] for i in picked],
        take(batch.teacher_prompt_ids),
        take(batch.teacher_prompt_mask),
    )


@dataclass
class RoutedPart:
    """One teacher's share of a batch: its view of the rows routed to it, and where those rows are.

    ``positions`` (``[N]`` bool over the batch's valid completion positions, row-major) marks the positions of its
    rows, in the order of ``view``'s positions; ``weight`` (``[n]``, one per marked position) is ``r_i`` there: 1 for
    a row that names this teacher, ``w_i / Σ w`` for a row that names none."""

    name: str
    positions: torch.Tensor
    weight: torch.Tensor
    view: TeacherView

    @property
    def everything(self) -> bool:
        """Does this part cover every position of the batch with weight 1 (one teacher: today's single path)?"""
        return bool(self.positions.all()) and bool((self.weight == 1.0).all())


@dataclass
class RoutedView:
    """What :meth:`RoutedTeachers.view` hands the objective: one :class:`RoutedPart` per teacher with rows in the
    batch (``names`` lists every teacher of the run, for logs that need the same keys on every rank)."""

    parts: list[RoutedPart]
    names: list[str]


class RoutedTeachers:
    """Several teachers, each loaded once (local, served or ``self``), routed per record (the module docstring).

    ``teachers`` maps each name to its teacher (anything with ``view`` and ``vocab``); ``weights`` are the config's
    weights (normalised here for records that name no teacher); ``field`` is ``teacher_field``."""

    def __init__(self, teachers: dict[str, Any], weights: dict[str, float], field: str = "teacher") -> None:
        self.teachers = dict(teachers)
        self.names = list(self.teachers)
        total = sum(weights[n] for n in self.names)
        if total <= 0:
            raise ValueError("at least one teacher needs a weight > 0")
        self.shares = {
            n: weights[n] / total for n in self.names
        }  # each teacher's share of an unrouted record
        self.field = field
        vocabs = {t.vocab for t in self.teachers.values()}
        self.vocab = min(
            vocabs
        )  # the step's vocabulary is the student's; every teacher was checked against it

    @property
    def device(self) -> torch.device:
        """Where the first local teacher computes (the CPU when all are served)."""
        for t in self.teachers.values():
            if hasattr(t, "device"):
                return t.device
        return torch.device("cpu")

    def row_weights(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Per teacher, each row's weight ``[B]`` (float32, on the batch's device): 1 where the row names it, its
        share where the row names no teacher, else 0. A row naming an unknown teacher is a DataError."""
        routes = [route_of(r, self.field) for r in batch.records]
        unknown = next((n for n in routes if n is not None and n not in self.teachers), None)
        if unknown is not None:  # preflight checks the dataset; this catches records given another way
            raise DataError(
                f"a record names teacher '{unknown}' in its '{self.field}' field, but the config's teachers are "
                f"{', '.join(self.names)}; fix the record or add that teacher"
            )
        out = {}
        for name in self.names:
            values = [1.0 if r == name else self.shares[name] if r is None else 0.0 for r in routes]
            out[name] = torch.tensor(values, dtype=torch.float32, device=batch.completion_mask.device)
        return out

    def view(self, batch: Batch) -> RoutedView:
        """Each teacher's view of the rows it has a weight on (no forward pass over the others), with the positions
        and per-position weights the objective combines them with."""
        valid = batch.completion_mask
        parts = []
        for name, row_w in self.row_weights(batch).items():
            rows = torch.nonzero(row_w > 0).flatten()
            if rows.numel() == 0:
                continue
            per_position = row_w[:, None].expand_as(valid)[valid]
            positions = per_position > 0
            view = self.teachers[name].view(sub_batch(batch, rows))
            parts.append(RoutedPart(name, positions, per_position[positions], view))
        return RoutedView(parts, self.names)
