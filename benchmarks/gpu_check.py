"""The GPU check: gkd on real CUDA, run as it is on a machine where nothing can be downloaded or installed.

    python benchmarks/gpu_check.py             # on a CUDA machine: device-path checks, then the Qwen2-0.5B-shaped run
    python benchmarks/gpu_check.py --dry-run   # the same script at toy size on the CPU (CI runs this)

It needs torch, transformers, accelerate, peft and rich (no ``datasets``, ``rouge_score`` or ``matplotlib``: gkd
imports them only for the features that use them) and gkd itself installed with ``pip install --no-deps -e .``.
Models are random, built from transformers config classes; nothing is downloaded. Budget: about 8 minutes on one
GPU. It prints, and ends with machine-readable ``key=value`` lines:

1. **device paths** (``tests/device_paths.py``, also run by the test suite on a pretend device): every path the code
   audit found device bugs in — fused loss with statistics, the fast sampler and ``model.generate``, evaluation
   sampling, SeqKD, the top-k cache build and reload, RL rewards and the EOS mask, discounted reverse KL, KL to the
   initial student, LoRA, T5 — on CUDA, in float32, bf16 and fp16 mixed precision, with gradient checkpointing;
   the fast sampler's greedy decoding is compared token for token with ``model.generate`` on the GPU.
2. **one on-policy ``gkd distill``** of a Qwen2-0.5B-shaped random student (24 layers, hidden 896, vocab 151,936, a
   padded head over a 151,665-entry tokenizer) from a Qwen2-1.5B-shaped random teacher, bf16, batch 8 × 256 new
   tokens, 20 steps: s/step, tokens/s, peak GPU memory and the share of time in rollout / teacher / student.

This file has NOT run on a GPU yet unless the project's notes say otherwise.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(HERE))

from tiny import TINY  # noqa: E402

# Qwen2-0.5B / Qwen2-1.5B shapes (their config.json files), random weights
QWEN_VOCAB, QWEN_TOKENIZER = 151_936, 151_665
STUDENT = dict(
    hidden_size=896,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    intermediate_size=4864,
    tie_word_embeddings=True,
)
TEACHER = dict(
    hidden_size=1536,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    intermediate_size=8960,
    tie_word_embeddings=True,
)
# --dry-run: the student has the sizes of the tests' tiny Qwen2 teacher (tests/tiny.py); the teacher twice its width
TOY = {k: v for k, v in TINY["qwen2_teacher"].items() if k not in ("architecture", "max_position_embeddings")}


def _say(msg: str) -> None:
    print(msg, flush=True)


def environment(device: str) -> dict[str, str]:
    import torch
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "device": device}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["bf16_supported"] = str(torch.cuda.is_bf16_supported())
    for name in ("datasets", "rouge_score", "matplotlib", "vllm"):
        try:
            __import__(name)
            info[name] = "installed"
        except ImportError:
            info[name] = "absent"
    return info


def device_paths(device: str) -> dict[str, str]:
    """Every check of ``tests/device_paths.py`` on ``device``: name -> "ok" or the error's first line."""
    import device_paths as paths  # tests/device_paths.py

    results = {}
    work = Path(tempfile.mkdtemp(prefix="gkd-gpu-paths-"))
    for name, check in paths.checks(device, work).items():
        t0 = time.perf_counter()
        try:
            check()
            results[name] = "ok"
        except Exception as e:  # report every path, do not stop at the first
            first = str(e).splitlines()[0] if str(e) else ""
            results[name] = f"FAILED: {type(e).__name__}: {first}"
            traceback.print_exc()
        _say(f"  {name:<45} {results[name]} ({time.perf_counter() - t0:.1f}s)")
    return results


def distill_run(device: str, dry_run: bool, steps: int) -> dict[str, float]:
    """One on-policy run of the Qwen2-shaped pair (toy-sized with ``dry_run``); timings of the steps after warm-up."""
    import torch
    from bench_vs_trl import build_tokenizer

    from gkd import GKDConfig, GKDTrainer
    from gkd.models import build_model

    vocab_rows = 64 + 8 if dry_run else QWEN_VOCAB
    tok_size = 64 if dry_run else QWEN_TOKENIZER
    new_tokens = 8 if dry_run else 256
    work = Path(tempfile.mkdtemp(prefix="gkd-gpu-check-"))
    tok = build_tokenizer(tok_size, work)
    shape_s, shape_t = (TOY, {**TOY, "hidden_size": 64}) if dry_run else (STUDENT, TEACHER)
    common = {"architecture": "qwen2", "vocab_size": vocab_rows, "max_position_embeddings": 4096}
    student = build_model({**common, **shape_s}, tok, seed=1)
    teacher = build_model({**common, **shape_t}, tok, seed=0)
    rng = random.Random(0)
    words = [tok.convert_ids_to_tokens(i) for i in range(8, tok_size)]
    records = [{"prompt": " ".join(rng.choice(words) for _ in range(32))} for _ in range(64)]
    cfg = GKDConfig(
        lmbda=1.0,
        divergence="jsd",
        beta=0.5,
        bf16=device == "cuda",
        max_new_tokens=new_tokens,
        per_device_train_batch_size=8,
        learning_rate=1e-5,
        max_steps=steps,
        logging_steps=10**9,  # no per-position statistics: time the training step itself
        save_steps=0,
        output_dir=str(work / "run"),
        progress=False,
    )
    records_seen: list[dict] = []
    trainer = GKDTrainer(
        cfg,
        student=student,
        teacher=teacher,
        tokenizer=tok,
        train_records=records,
        log=lambda m: _say("  " + m),
    )
    trainer.setup()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        records_seen.append(trainer.train_step())
    measured = records_seen[2:] or records_seen
    step_s = statistics.median(r["step_s"] for r in measured)
    tokens = statistics.median(r["completion_tokens"] for r in measured)
    share = {
        k: statistics.median(r.get(f"time_{k}", 0.0) for r in measured) / step_s
        for k in ("rollout", "teacher", "student_forward", "loss", "backward", "optimizer")
    }
    out = {
        "gpu_check_s_per_step": step_s,
        "gpu_check_tokens_per_s": tokens / step_s,
        "gpu_check_peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0,
        **{f"gpu_check_share_{k}": v for k, v in share.items()},
        "gpu_check_final_loss": records_seen[-1]["loss"],
    }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU (what CI runs)")
    parser.add_argument("--steps", type=int, default=None, help="distill steps (default 20, dry run 4)")
    parser.add_argument("--skip-paths", action="store_true")
    args = parser.parse_args(argv)

    import torch

    if not args.dry_run and not torch.cuda.is_available():
        _say("no CUDA device: run with --dry-run on the CPU")
        return 2
    device = "cpu" if args.dry_run else "cuda"
    t_begin = time.perf_counter()
    _say("== environment ==")
    for k, v in environment(device).items():
        _say(f"  {k}: {v}")
    failed = 0
    if not args.skip_paths:
        _say(f"== device paths on {device} ==")
        results = device_paths(device)
        failed = sum(not v.startswith("ok") for v in results.values())
    _say("== on-policy distill, Qwen2-0.5B-shaped student from a Qwen2-1.5B-shaped teacher ==")
    metrics = distill_run(device, args.dry_run, args.steps or (4 if args.dry_run else 20))
    _say(f"== done in {time.perf_counter() - t_begin:.0f}s ==")
    for k, v in metrics.items():
        print(f"{k}={v:.4g}")
    print(f"gpu_check_device_paths_failed={failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
