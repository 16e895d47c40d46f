"""Run by tests/test_distributed.py and tests/test_fsdp.py under torchrun (2 CPU processes, gloo).

dist_worker.py MODEL_DIR OUT                      DDP, 8 steps by hand: dump what each rank saw
dist_worker.py MODEL_DIR OUT train [KEY=VALUE...] trainer.train() with config overrides (fsdp=1, max_steps=6,
                                                  resume_from_checkpoint=latest, kill_at=N: SIGKILL rank 0 in
                                                  step N); rank 0 writes the final full weights to OUT/weights.pt
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch

from gkd.config import GKDConfig
from gkd.trainer import GKDTrainer

model_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
mode = sys.argv[3] if len(sys.argv) > 3 else "lockstep"
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
    "max_steps": 8,
    "learning_rate": 3e-3,
    "logging_steps": 1,
    "save_steps": 0,
    "progress": False,
    "num_threads": 1,
}

if mode == "lockstep":
    cfg = GKDConfig(**base)
    trainer = GKDTrainer(cfg)
    trainer.setup()
    import copy

    first = copy.deepcopy(trainer.stream).next_indices()  # dataset rows of this rank's first batch (a peek)
    flags, losses = [], []
    for _ in range(cfg.max_steps):
        record = trainer.train_step()
        flags.append(record["on_policy"])
        losses.append(record["loss"])
    weights = {n: p.detach().double().sum().item() for n, p in trainer.student.named_parameters()}
    rank = trainer.run.dist.rank
    (out / f"rank{rank}.json").write_text(
        json.dumps(
            {
                "rank": rank,
                "world": trainer.run.dist.world,
                "flags": flags,
                "losses": losses,
                "first": first,
                "weights": weights,
                "batch0": trainer.stream.next_indices(),
            }
        )
    )
    torch.distributed.barrier()
    sys.exit(0)

# --- train: the whole loop (checkpoints, final model), optionally killed with SIGKILL in one step -------------------
overrides = dict(arg.split("=", 1) for arg in sys.argv[4:])
kill_at = int(overrides.pop("kill_at", 0))
for key, value in overrides.items():
    try:
        base[key] = int(value)
    except ValueError:
        try:
            base[key] = float(value)
        except ValueError:
            base[key] = value
base["fsdp"] = bool(base.get("fsdp", 0))
cfg = GKDConfig(**base)
trainer = GKDTrainer(cfg)
run = trainer.setup()
rank = run.dist.rank

import gkd.trainer as trainer_module  # noqa: E402

real_step = trainer_module.gkd_step
flags: list[bool] = []
norms: list[float] = []


def step(run_, i, **kw):
    if kill_at and i + 1 == kill_at and rank == 0:
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9 in the middle of a run
    record = real_step(run_, i, **kw)
    flags.append(bool(record["on_policy"]))
    norms.append(float(record["grad_norm"]))
    return record


trainer_module.gkd_step = step
trainer.train()
from gkd.fsdp import is_sharded  # noqa: E402
from gkd.models import unwrap  # noqa: E402

student = run.student
info = {"rank": rank, "world": run.dist.world, "flags": flags, "norms": norms, "sharded": is_sharded(student)}
if is_sharded(
    student
):  # this rank's shard of every weight is a part of it; the full copy is the gathered shards
    info["shard_numel"] = sum(p.to_local().numel() for p in student.parameters())
    full = dict(unwrap(student).named_parameters())
    info["copy_matches_shards"] = all(
        torch.equal(p.full_tensor(), full[n]) for n, p in student.sharded.named_parameters()
    )
info["full_numel"] = sum(p.numel() for p in unwrap(student).parameters())
(out / f"train-rank{rank}.json").write_text(json.dumps(info))
if rank == 0:
    torch.save({n: p.detach().clone() for n, p in unwrap(student).named_parameters()}, out / "weights.pt")
torch.distributed.barrier()
