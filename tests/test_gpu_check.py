"""``benchmarks/gpu_check.py --dry-run``: the GPU check's script runs end to end at toy size on the CPU, so it is
known to work before a GPU machine runs it."""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def test_gpu_check_dry_run(capsys):
    sys.path.insert(0, str(BENCH))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(BENCH))
    assert gpu_check.main(["--dry-run", "--steps", "3"]) == 0
    out = capsys.readouterr().out
    lines = dict(line.split("=", 1) for line in out.splitlines() if "=" in line and " " not in line)
    assert lines["gpu_check_device_paths_failed"] == "0"
    assert float(lines["gpu_check_s_per_step"]) > 0 and float(lines["gpu_check_tokens_per_s"]) > 0
    assert "fast_equals_generate_greedy" in out and "gradient_checkpointing" in out
