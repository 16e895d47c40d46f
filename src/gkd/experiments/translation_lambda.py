"""``gkd experiment translation_lambda``: why the λ order is reversed on translation (being written)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def report(summary: dict[str, Any]) -> str:
    raise NotImplementedError


def plot(summary: dict[str, Any], path: Path) -> None:
    raise NotImplementedError
