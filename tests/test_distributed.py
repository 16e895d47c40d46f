"""Two CPU processes (gloo) through accelerate: same λ decisions, different data, identical final weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from launch import two_processes


@pytest.mark.slow
def test_two_processes_take_the_same_lambda_decisions_and_end_identical(model_dir, tmp_path):
    out = tmp_path / "dist"
    out.mkdir()
    proc = two_processes(Path(__file__).with_name("dist_worker.py"), model_dir, out, port=29533)
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
    # the logged loss is the step's loss over both ranks' tokens: the first step (off-policy) equals one process's
    # loss on the same 8 records in one batch, on every rank
    assert r0["losses"] == pytest.approx(r1["losses"], rel=1e-6)
    assert r0["flags"][0] is False
    from gkd.config import GKDConfig
    from gkd.trainer import GKDTrainer

    rows = (model_dir / "train.jsonl").read_text().splitlines()
    both = [json.loads(rows[i]) for i in r0["first"] + r1["first"]]
    single = GKDTrainer(
        GKDConfig(**{**_worker_base(model_dir, tmp_path / "one"), "per_device_train_batch_size": 8}),
        train_records=both,
        log=lambda _m: None,
    ).train_step()
    assert single["on_policy"] is False
    assert r0["losses"][0] == pytest.approx(single["loss"], rel=1e-5)


def _worker_base(model_dir: Path, out: Path) -> dict:
    """dist_worker.py's config (lockstep mode)."""
    return {
        "model_name_or_path": str(model_dir / "student"),
        "teacher_model_name_or_path": str(model_dir / "teacher"),
        "dataset": str(model_dir / "train.jsonl"),
        "output_dir": str(out),
        "lmbda": 0.5,
        "divergence": "jsd",
        "beta": 0.9,
        "max_new_tokens": 6,
        "max_steps": 8,
        "learning_rate": 3e-3,
        "logging_steps": 1,
        "save_steps": 0,
        "progress": False,
        "num_threads": 1,
    }
