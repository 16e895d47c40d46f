"""Checkpoints: atomic writes, exact resume, kill -9, Ctrl-C, determinism."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from gkd import checkpoint as ckpt
from gkd.config import GKDConfig
from gkd.errors import CheckpointError
from gkd.trainer import GKDTrainer, TrainingInterrupted


def _cfg(model_dir: Path, out: Path, **kw) -> GKDConfig:
    base = {
        "model_name_or_path": str(model_dir / "student"),
        "teacher_model_name_or_path": str(model_dir / "teacher"),
        "dataset": str(model_dir / "train.jsonl"),
        "output_dir": str(out),
        "lmbda": 0.5,
        "divergence": "jsd",
        "beta": 0.9,
        "per_device_train_batch_size": 4,
        "max_new_tokens": 6,
        "max_steps": 6,
        "learning_rate": 3e-3,
        "warmup_steps": 2,
        "lr_scheduler_type": "cosine",
        "logging_steps": 1,
        "save_steps": 3,
        "save_total_limit": None,
        "progress": False,
        "num_threads": 1,
    }
    base.update(kw)
    return GKDConfig(**base)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _losses(out: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(model_dir, tmp_path):
    full = tmp_path / "full"
    GKDTrainer(_cfg(model_dir, full)).train()
    part = tmp_path / "part"
    interrupted = GKDTrainer(_cfg(model_dir, part, save_steps=0))
    real_step = interrupted.train_step

    def step_then_stop():
        if interrupted.step == 3:
            raise KeyboardInterrupt  # as if Ctrl-C arrived during step 4
        return real_step()

    interrupted.train_step = step_then_stop
    with pytest.raises(TrainingInterrupted):
        interrupted.train()
    assert ckpt.find_latest(part) == part / "checkpoint-3"
    GKDTrainer(_cfg(model_dir, part, resume_from_checkpoint="latest")).train()
    a, b = _weights(full / "checkpoint-6"), _weights(part / "checkpoint-6")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert _losses(full) == _losses(part)


def test_same_seed_same_losses(model_dir, tmp_path):
    GKDTrainer(_cfg(model_dir, tmp_path / "a", save_steps=0)).train()
    GKDTrainer(_cfg(model_dir, tmp_path / "b", save_steps=0)).train()
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")


def test_partial_checkpoints_are_ignored_and_cleaned(model_dir, tmp_path):
    out = tmp_path / "out"
    GKDTrainer(_cfg(model_dir, out, max_steps=3)).train()
    # a write killed half-way: a hidden temp folder and a final-named folder without trainer_state.json
    (out / ".checkpoint-9.tmp-4242").mkdir()
    (out / ".checkpoint-9.tmp-4242" / "model.safetensors").write_bytes(b"partial")
    (out / "checkpoint-9").mkdir()
    assert ckpt.find_latest(out) == out / "checkpoint-3"
    t = GKDTrainer(_cfg(model_dir, out, resume_from_checkpoint="latest", max_steps=4))
    t.train()
    assert not (out / ".checkpoint-9.tmp-4242").exists()
    with pytest.raises(CheckpointError, match="not a complete gkd checkpoint"):
        ckpt.resolve_resume(str(out / "checkpoint-9"), out)


def test_a_failing_write_leaves_the_previous_checkpoint_loadable(model_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    t = GKDTrainer(_cfg(model_dir, out, max_steps=3))
    t.train()
    real_save = torch.save

    def dying_save(obj, path, *a, **k):
        if "trainer_state" in str(path):
            raise OSError("disk died mid-write")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", dying_save)
    t.state.step = 4
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint-4 .*disk died mid-write"):
        t.save()  # one line (a GKDError), not the OSError's traceback
    monkeypatch.undo()
    assert not (out / "checkpoint-4").exists() and not list(out.glob(".checkpoint-*"))
    assert ckpt.find_latest(out) == out / "checkpoint-3"
    ckpt.load_training_state(out / "checkpoint-3")


def test_resume_from_an_incompatible_config_is_refused(model_dir, tmp_path):
    out = tmp_path / "out"
    GKDTrainer(_cfg(model_dir, out, max_steps=3)).train()
    with pytest.raises(CheckpointError, match="per_device_train_batch_size"):
        GKDTrainer(
            _cfg(model_dir, out, per_device_train_batch_size=2, resume_from_checkpoint="latest")
        ).train()


def _write_config(path: Path, cfg: GKDConfig) -> None:
    data = {k: v for k, v in cfg.to_dict().items() if v is not None}
    path.write_text(yaml.safe_dump(data))


def _gkd(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "gkd.cli", *args], env=env, **kw)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, "training exited before the checkpoint appeared"
        assert time.time() - t0 < timeout
        time.sleep(0.05)


@pytest.mark.slow
def test_kill_9_then_resume_matches_an_uninterrupted_run(model_dir, tmp_path):
    steps = 40
    ref = tmp_path / "ref"
    GKDTrainer(_cfg(model_dir, ref, max_steps=steps, save_steps=steps, logging_steps=10)).train()
    out = tmp_path / "killed"
    config = tmp_path / "run.yaml"
    _write_config(config, _cfg(model_dir, out, max_steps=steps, save_steps=2, logging_steps=10))
    proc = _gkd(["distill", "--config", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(out / "checkpoint-4" / ckpt.STATE_JSON, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.find_latest(out) is not None
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "gkd.cli",
            "distill",
            "--config",
            str(config),
            "resume_from_checkpoint=latest",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    a, b = _weights(ref / f"checkpoint-{steps}"), _weights(out / f"checkpoint-{steps}")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_the_run_resumes(model_dir, tmp_path):
    out = tmp_path / "out"
    config = tmp_path / "run.yaml"
    _write_config(config, _cfg(model_dir, out, max_steps=1_000_000, save_steps=10_000_000, logging_steps=1))
    proc = _gkd(
        ["distill", "--config", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    _wait_for(out / "metrics.jsonl", proc)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "checkpoint saved" in err and "Traceback" not in err
    latest = ckpt.find_latest(out)
    assert latest is not None
    step = json.loads((latest / ckpt.STATE_JSON).read_text())["step"]
    assert 0 < step < 1_000_000
    t = GKDTrainer(
        _cfg(model_dir, out, max_steps=step + 2, save_steps=10_000_000, resume_from_checkpoint="latest")
    )
    assert t.train().step == step + 2
