"""Every device-sensitive path on real CUDA (``pytest -m gpu``; skipped without a GPU). ``benchmarks/gpu_check.py``
runs the same checks (``tests/device_paths.py``) without pytest, plus a Qwen2-0.5B-shaped run."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

NAMES = []
if torch.cuda.is_available():
    import tempfile
    from pathlib import Path

    import device_paths

    CHECKS = device_paths.checks("cuda", Path(tempfile.mkdtemp(prefix="gkd-gpu-")))
    NAMES = list(CHECKS)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", NAMES or ["no GPU"])
def test_path_on_cuda(name):
    torch.cuda.reset_peak_memory_stats()
    CHECKS[name]()  # each check raises on a wrong value or a device mix
    assert torch.cuda.max_memory_allocated() > 0, f"{name} ran without touching the GPU"
