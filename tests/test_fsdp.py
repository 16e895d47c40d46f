"""Sharded training (config key ``fsdp``, FSDP2) on 2 CPU processes with gloo, and checkpoints that cannot run code.

* FSDP2 training (on- and off-policy steps, checkpoints, the final model) ends where a 2-process DDP run with the
  same global batch ends, within float tolerance (the reductions sum in another order).
* A sharded run killed with SIGKILL mid-run and resumed ends exactly where the uninterrupted one ends.
* A checkpoint whose optimizer / trainer state file holds a pickled object is refused with one line, and the object's
  code never runs.
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from launch import two_processes

from gkd.errors import CheckpointError

WORKER = Path(__file__).with_name("dist_worker.py")
# gradient accumulation: FSDP2's no_sync; max_grad_norm small enough that clipping acts
STEPS = [
    "max_steps=6",
    "save_steps=2",
    "gradient_accumulation_steps=2",
    "max_grad_norm=0.002",
]  # no_sync: FSDP2 without reduce-scatter


def _torchrun(
    model_dir: Path, out: Path, *args: str, port: int, check: bool = True
) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    proc = two_processes(WORKER, model_dir, out, "train", *args, port=port)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _ranks(out: Path) -> list[dict]:
    return [json.loads((out / f"train-rank{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def fsdp_run(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp") / "run"
    _torchrun(model_dir, out, "fsdp=1", *STEPS, port=29541)
    return out


@pytest.fixture(scope="module")
def ddp_run(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    _torchrun(model_dir, out, *STEPS, port=29542)
    return out


@pytest.mark.slow
def test_fsdp_trains_like_ddp_and_saves_sharded_checkpoints(fsdp_run, ddp_run):
    ddp = ddp_run
    r0, r1 = _ranks(fsdp_run)
    assert r0["sharded"] and r1["sharded"] and r0["world"] == 2
    assert r0["flags"] == r1["flags"] == _ranks(ddp)[0]["flags"]
    # the gradient norm is the global one (over both ranks' shards), the same as DDP's, and clipping acted
    assert r0["norms"] == r1["norms"] and r0["norms"] == pytest.approx(_ranks(ddp)[0]["norms"], rel=1e-4)
    assert max(r0["norms"]) > 0.002
    assert 0 < sum(r0["flags"]) < len(r0["flags"])  # on-policy and off-policy steps both ran
    assert r0["shard_numel"] < r0["full_numel"] and r0["shard_numel"] + r1["shard_numel"] == r0["full_numel"]
    assert r0["copy_matches_shards"] and r1["copy_matches_shards"]  # rollouts sample the current weights

    sharded, plain = torch.load(fsdp_run / "weights.pt"), torch.load(ddp / "weights.pt")
    assert sharded.keys() == plain.keys()
    for name in plain:
        torch.testing.assert_close(sharded[name], plain[name], rtol=1e-4, atol=1e-5, msg=name)

    # checkpoints: each rank's shards and RNG state, full weights for from_pretrained; all plain data
    ckpt = fsdp_run / "checkpoint-4"
    names = {p.name for p in ckpt.iterdir()}
    assert {"shard-rank0.pt", "shard-rank1.pt", "rng_state-rank0.pt", "rng_state-rank1.pt"} <= names
    assert (
        "model.safetensors" in names and json.loads((ckpt / "trainer_state.json").read_text())["world"] == 2
    )
    rng = [torch.load(ckpt / f"rng_state-rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert not torch.equal(rng[0]["rollout_gen"], rng[1]["rollout_gen"])  # each rank keeps its own generator
    for f in ckpt.glob("*.pt"):
        torch.load(f, weights_only=True)
    # the final model: gathered full weights, loadable anywhere
    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(fsdp_run)
    for name, p in final.named_parameters():
        torch.testing.assert_close(p.detach(), sharded[name], rtol=0, atol=0, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fsdp", "ddp"])
def test_a_run_killed_mid_run_resumes_exactly(kind, model_dir, request, tmp_path):
    """Each rank resumes its own data position and random generators (and with FSDP its own shards): killed in step
    3, resumed from checkpoint-2, the on-policy steps after it sample what the uninterrupted run sampled."""
    straight = request.getfixturevalue(f"{kind}_run")
    args = ["fsdp=1"] if kind == "fsdp" else []
    out = tmp_path / "killed"
    port = 29543 if kind == "fsdp" else 29545
    proc = _torchrun(model_dir, out, *args, *STEPS, "kill_at=3", port=port, check=False)
    assert proc.returncode != 0
    assert (out / "checkpoint-2").is_dir() and not (out / "checkpoint-4").exists()
    _torchrun(model_dir, out, *args, *STEPS, "resume_from_checkpoint=latest", port=port + 1)
    resumed, expected = torch.load(out / "weights.pt"), torch.load(straight / "weights.pt")
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=0, atol=1e-7, msg=name)
    flags = _ranks(straight)[0]["flags"]
    assert _ranks(out)[0]["flags"] == flags[2:] and any(
        flags[2:]
    )  # on-policy steps after the resume: rollouts
    assert _ranks(out)[1]["norms"] == _ranks(straight)[1]["norms"][2:]


# --- checkpoints never run code -----------------------------------------------------------------------------------
class _Payload:
    """Unpickling it would create a marker file (what an attacker's checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("victim", ["optimizer.pt", "trainer_state.pt"])
def test_a_checkpoint_holding_a_pickled_object_is_refused_without_running_it(model_dir, tmp_path, victim):
    from gkd.config import GKDConfig
    from gkd.trainer import GKDTrainer

    def cfg(out: Path, **kw) -> GKDConfig:
        kw = {"max_steps": 1, **kw}
        return GKDConfig(
            model_name_or_path=str(model_dir / "student"),
            teacher_model_name_or_path=str(model_dir / "teacher"),
            dataset=str(model_dir / "train.jsonl"),
            output_dir=str(out),
            per_device_train_batch_size=2,
            max_new_tokens=4,
            save_steps=1,
            progress=False,
            num_threads=1,
            **kw,
        )

    out = tmp_path / "run"
    GKDTrainer(cfg(out)).train()
    checkpoint = out / "checkpoint-1"
    for f in checkpoint.glob("*.pt"):  # what gkd writes loads as plain data
        torch.load(f, weights_only=True)
    marker = tmp_path / "pwned"
    good = torch.load(checkpoint / victim, weights_only=True)
    bad = {**good, "extra": _Payload(marker)}
    with (checkpoint / victim).open("wb") as fh:
        pickle.dump(bad, fh, protocol=2)
    copy = tmp_path / "resume"
    shutil.copytree(out, copy)
    with pytest.raises(CheckpointError) as e:
        GKDTrainer(cfg(copy, max_steps=2, resume_from_checkpoint="latest")).train()
    assert "\n" not in str(e.value) and victim in str(e.value) and "refuses" in str(e.value)
    assert not marker.exists()
