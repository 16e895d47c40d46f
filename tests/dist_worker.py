"""Run by tests/test_distributed.py under torchrun (2 CPU processes, gloo): train and dump what each rank saw."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from gkd.config import GKDConfig
from gkd.trainer import GKDTrainer

model_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
cfg = GKDConfig(
    model_name_or_path=str(model_dir / "student"),
    teacher_model_name_or_path=str(model_dir / "teacher"),
    dataset=str(model_dir / "train.jsonl"),
    output_dir=str(out),
    lmbda=0.5,
    divergence="jsd",
    beta=0.9,
    per_device_train_batch_size=4,
    max_new_tokens=6,
    max_steps=8,
    learning_rate=3e-3,
    logging_steps=1,
    save_steps=0,
    progress=False,
    num_threads=1,
)
trainer = GKDTrainer(cfg)
trainer.setup()
flags, indices = [], []
for _ in range(cfg.max_steps):
    indices.append(trainer.stream._order[trainer.stream.position : trainer.stream.position + 1])
    flags.append(trainer.train_step()["on_policy"])
weights = {n: p.detach().double().sum().item() for n, p in trainer.student.named_parameters()}
rank = trainer.run.dist.rank
(out / f"rank{rank}.json").write_text(
    json.dumps(
        {
            "rank": rank,
            "world": trainer.run.dist.world,
            "flags": flags,
            "weights": weights,
            "batch0": trainer.stream.next_indices(),
        }
    )
)
torch.distributed.barrier()
