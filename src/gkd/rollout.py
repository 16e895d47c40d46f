"""Moved to the :mod:`gkd.sampling` package; this module keeps the old import path working.

``SamplingParams`` and ``Rollout`` are in :mod:`gkd.sampling.params`, ``sample_completions`` and ``sample_with`` in
:mod:`gkd.sampling.local` (the in-process sampler and the ``model.generate`` path), the fast KV-cache loop and the
``*_reason`` checks in :mod:`gkd.sampling.fast`. New code imports from there (or from ``gkd.sampling``).
"""

from __future__ import annotations

from gkd.sampling.fast import FAST_VALIDATED_DEVICES as FAST_VALIDATED_DEVICES
from gkd.sampling.fast import GPT2_FAMILY as GPT2_FAMILY
from gkd.sampling.fast import LLAMA_FAMILY as LLAMA_FAMILY
from gkd.sampling.fast import (
    auto_fast_reason,
    fast_backend_config_reason,
    fast_path_unsupported_reason,
)
from gkd.sampling.local import sample_completions, sample_with
from gkd.sampling.params import Rollout, SamplingParams

__all__ = [
    "Rollout",
    "SamplingParams",
    "auto_fast_reason",
    "fast_backend_config_reason",
    "fast_path_unsupported_reason",
    "sample_completions",
    "sample_with",
]
