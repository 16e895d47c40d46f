"""Two CPU processes (gloo) through accelerate: same λ decisions, different data, identical final weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_two_processes_take_the_same_lambda_decisions_and_end_identical(model_dir, tmp_path):
    out = tmp_path / "dist"
    out.mkdir()
    script = Path(__file__).with_name("dist_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29533",
            str(script),
            str(model_dir),
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = json.loads((out / "rank0.json").read_text())
    r1 = json.loads((out / "rank1.json").read_text())
    assert r0["world"] == r1["world"] == 2
    assert r0["flags"] == r1["flags"]
    assert 0 < sum(r0["flags"]) < len(r0["flags"])  # λ = 0.5 actually mixes
    assert r0["batch0"] != r1["batch0"]  # each rank takes its own slice of the global batch
    assert r0["weights"].keys() == r1["weights"].keys()
    for k in r0["weights"]:
        assert r0["weights"][k] == pytest.approx(r1["weights"][k], rel=1e-6, abs=1e-7), k
