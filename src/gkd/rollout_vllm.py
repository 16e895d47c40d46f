"""Moved to :mod:`gkd.sampling.vllm`; this module keeps the old import path working."""

from __future__ import annotations

from gkd.sampling.vllm import VLLMSampler

__all__ = ["VLLMSampler"]
