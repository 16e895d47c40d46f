"""The offline top-k teacher cache (``teacher_cache: topk``): speed-up of off-policy steps and error of the loss.

Two measurements, both printed as tables and machine-readable lines:

1. **Speed** (the TRL-benchmark models: Llama teacher 25.2M / student 7.6M, vocab 8,192, batch 8 x (48 + 64)
   tokens, fp32): median off-policy (λ = 0) step time with the live teacher versus with the cache, alternating.
   The cache is built once before timing (its build time is printed too: it is one teacher pass over the data).
2. **Error** (a *trained* teacher, because random-init distributions are nearly uniform and say nothing about
   top-k truncation): the demo's shipped teacher and a student on the ``summarization`` task. For each divergence
   and k, the relative error of the cached (top-k + tail bucket) loss against the exact full-vocabulary loss, on the
   same batches.

    python benchmarks/bench_teacher_cache.py [--threads 2] [--steps 6]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))  # the TRL benchmark's models, tokenizer and records

from bench_vs_trl import STUDENT, TEACHER, build_model, build_records, build_tokenizer  # noqa: E402

from gkd.config import GKDConfig  # noqa: E402
from gkd.data import collate, tokenize_records  # noqa: E402
from gkd.trainer import GKDTrainer  # noqa: E402


def batch_loss(run, batch):
    """One micro-batch's loss through the run's components, as ``gkd_step`` computes it."""
    p_t = run.teacher.view(batch)  # the cached top-k (fixed batches), or the live teacher's scores
    p_s = run.student_forward(
        batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask
    )
    return run.objective.loss(batch, p_s, p_t, float(batch.num_tokens()))


def speed(threads: int, steps: int) -> float:
    torch.set_num_threads(threads)
    vocab = 8192
    tmp = Path(tempfile.mkdtemp())
    tok = build_tokenizer(vocab, tmp)
    records = build_records(64)
    teacher = build_model(TEACHER, vocab, tok, seed=1).eval()
    times: dict[str, list[float]] = {"live": [], "cached": []}
    trainers = {}
    for mode in ("live", "cached"):
        cfg = GKDConfig(
            lmbda=0.0,
            divergence="jsd",
            beta=0.5,
            per_device_train_batch_size=8,
            max_new_tokens=64,
            max_steps=10**6,
            learning_rate=1e-4,
            output_dir=str(tmp / mode),
            logging_steps=10**6,
            save_steps=0,
            progress=False,
            teacher_cache="topk" if mode == "cached" else "none",
            teacher_cache_topk=64,
        )
        t0 = time.perf_counter()
        tr = GKDTrainer(
            cfg,
            student=build_model(STUDENT, vocab, tok, seed=2),
            teacher=teacher,
            tokenizer=tok,
            train_records=records,
            log=lambda m: None,
        )
        tr.setup()
        if mode == "cached":
            print(
                f"  cache built in {time.perf_counter() - t0:.1f} s for {len(records)} examples (one teacher pass)"
            )
        tr.train_step()
        trainers[mode] = tr
    for _ in range(steps):
        for mode in ("live", "cached"):
            times[mode].append(trainers[mode].train_step()["step_s"])
    live, cached = statistics.median(times["live"]), statistics.median(times["cached"])
    print(
        f"  off-policy step, JSD(0.5), vocab 8,192: live teacher {live:.3f} s, top-64 cache {cached:.3f} s, "
        f"speed-up {live / cached:.2f}x"
    )
    return live / cached


def error() -> dict[str, dict[int, float]]:
    from gkd.experiments.common import ASSET_TEACHER
    from gkd.models import build_model, load_model
    from gkd.tasks import get_task

    task = get_task("summarization")
    tok = task.build_tokenizer()
    teacher = load_model(str(ASSET_TEACHER), what="teacher")
    student = build_model(task.student_model_config(), tok, seed=0)
    records = task.generate("validation", 256, seed=0)
    data = tokenize_records(records, tok, max_prompt_length=64, max_completion_length=8)
    batches = [
        collate(data.examples[i : i + 64], tok.pad_token_id, list(range(i, min(i + 64, len(data)))))
        for i in range(0, len(data), 64)
    ]
    out: dict[str, dict[int, float]] = {}
    tmp = Path(tempfile.mkdtemp())
    divergences = {"forward_kl": {}, "reverse_kl": {}, "jsd": {"beta": 0.5}, "tvd": {}, "skew_forward_kl": {}}
    for name, params in divergences.items():
        out[name] = {}
        exact = None
        for k in (0, 2, 4, 8, 16):
            cfg = GKDConfig(
                lmbda=0.0,
                divergence=name,
                **params,
                per_device_train_batch_size=64,
                max_new_tokens=8,
                output_dir=str(tmp / f"{name}-{k}"),
                progress=False,
                save_steps=0,
                teacher_cache="topk" if k else "none",
                teacher_cache_topk=max(k, 1),
            )
            tr = GKDTrainer(
                cfg, student=student, teacher=teacher, tokenizer=tok, train_dataset=data, log=lambda m: None
            )
            tr.setup()
            with torch.no_grad():
                total = sum(float(batch_loss(tr.run, b)) for b in batches)
            if k == 0:
                exact = total
            else:
                out[name][k] = abs(total - exact) / abs(exact)
    print(
        "  relative error of the top-k + tail loss vs the exact loss (trained teacher, vocab 56, 256 prompts):"
    )
    print("  divergence        " + "".join(f"k={k:<8}" for k in (2, 4, 8, 16)))
    for name, errs in out.items():
        print(f"  {name:<18}" + "".join(f"{errs[k]:<10.2e}" for k in (2, 4, 8, 16)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    print("== speed (TRL-benchmark models) ==")
    ratio = speed(args.threads, args.steps)
    print("== error (trained teacher) ==")
    errs = error()
    print(f"teacher_cache_speedup_offpolicy={ratio:.2f}")
    for name, e in errs.items():
        print(f"teacher_cache_rel_error_{name}_k8={e[8]:.2e}")


if __name__ == "__main__":
    main()
