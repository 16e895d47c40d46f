"""User-facing errors.

Anything that is the user's to fix (a typo in a config, a missing file, a broken record, incompatible models) raises a
``GKDError`` subclass with a one-line message that names the problem and the fix. The CLI prints it without a
traceback and exits with code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations


class GKDError(Exception):
    """Base class of errors whose message is meant for the user."""

    exit_code = 2


class ConfigError(GKDError, ValueError):
    """A config key, type or value is invalid."""


class DataError(GKDError, ValueError):
    """A dataset cannot be read or has unusable records."""


class ModelError(GKDError, ValueError):
    """A model or tokenizer cannot be loaded, or teacher and student are incompatible."""


class CheckpointError(GKDError):
    """A checkpoint is missing, partial or from an incompatible run."""


class RewardError(GKDError):
    """A reward function failed or returned something unusable."""


class TrainingError(GKDError):
    """Training cannot continue (e.g. too many consecutive non-finite steps)."""


class TrainingInterrupted(GKDError):
    """Ctrl-C or SIGTERM: the current step finished and a checkpoint was saved."""

    exit_code = 130
