"""A teacher served over HTTP (``gkd serve-teacher`` + ``teacher_url``) against the same teacher in-process.

Two measurements, both against a ``gkd serve-teacher`` subprocess on 127.0.0.1 (the same machine and cores):

1. **Speed** (the TRL-benchmark models: Llama teacher 25.2M / student 7.6M, vocab 8,192, batch 8 x (48 + 64)
   tokens, fp32, JSD): median on-policy step time with the local teacher and with the served one (``teacher_topk``
   20, the default), alternating; ``served_teacher_step_ratio`` = served / local.
2. **Error** (a *trained* teacher: the demo's shipped one on the ``summarization`` task, vocab 56, and a student
   after 40 SFT steps; 256 prompts, the student's own samples, drawn once): for each divergence and K, the relative error of the
   served loss (the actual token + top-K + tail bucket; with ``teacher_student_topk = K`` the student's top-K tokens
   as well) against the exact local-teacher loss on the same samples. K = 64 >= vocab is the whole vocabulary
   (a check that the served path is exact, up to rounding).

    python benchmarks/bench_served_teacher.py [--threads 2] [--steps 5]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))  # the TRL benchmark's models, tokenizer and records

from bench_vs_trl import STUDENT, TEACHER, build_model, build_records, build_tokenizer  # noqa: E402

from gkd.config import GKDConfig  # noqa: E402
from gkd.objective import Objective  # noqa: E402
from gkd.step import student_samples  # noqa: E402
from gkd.teacher_client import ServedTeacher  # noqa: E402
from gkd.trainer import GKDTrainer  # noqa: E402

DIVERGENCES = {"forward_kl": {}, "reverse_kl": {}, "jsd": {"beta": 0.5}, "tvd": {}}
KS = (1, 8, 64)
SFT_STEPS = 40


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: Path, threads: int) -> tuple[subprocess.Popen, str]:
    """``gkd serve-teacher FOLDER`` on a free loopback port; returns once /health answers."""
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS=str(threads))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gkd.cli",
            "serve-teacher",
            str(folder),
            "--port",
            str(port),
            "--device",
            "cpu",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            with urllib.request.urlopen(url + "/health", timeout=1):
                return proc, url
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"gkd serve-teacher {folder} exited with {proc.returncode}") from None
            time.sleep(0.1)
    proc.terminate()
    raise RuntimeError("gkd serve-teacher did not start")


def speed_setup(tmp: Path) -> tuple[Path, object, list[dict]]:
    vocab = 8192
    tok = build_tokenizer(vocab, tmp)
    folder = tmp / "teacher8192"
    build_model(TEACHER, vocab, tok, seed=1).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, tok, build_records(64)


def speed(folder: Path, tok, records, url: str, threads: int, steps: int) -> float:
    torch.set_num_threads(threads)
    tmp = Path(tempfile.mkdtemp())
    trainers = {}
    for mode in ("local", "served"):
        cfg = GKDConfig(
            lmbda=1.0,
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
            **({"teacher_url": url} if mode == "served" else {"teacher_model_name_or_path": str(folder)}),
        )
        tr = GKDTrainer(
            cfg,
            student=build_model(STUDENT, 8192, tok, seed=2),
            tokenizer=tok,
            train_records=records,
            log=lambda m: None,
        )
        tr.train_step()  # warm-up
        trainers[mode] = tr
    times: dict[str, list[float]] = {"local": [], "served": []}
    for _ in range(steps):
        for mode in ("local", "served"):
            times[mode].append(trainers[mode].train_step()["step_s"])
    local, served = statistics.median(times["local"]), statistics.median(times["served"])
    print(
        f"  on-policy step, JSD(0.5), vocab 8,192, batch 8 x (48 + 64): local teacher {local:.3f} s, "
        f"served (top-20) {served:.3f} s, ratio {served / local:.2f}"
    )
    return served / local


def error_setup(tmp: Path) -> Path:
    from gkd.experiments.common import ASSET_TEACHER
    from gkd.models import load_model
    from gkd.tasks import get_task

    folder = tmp / "demo_teacher"
    load_model(str(ASSET_TEACHER), what="teacher").save_pretrained(folder)
    get_task("summarization").build_tokenizer().save_pretrained(folder)
    return folder


def _inputs(b) -> tuple:
    return b.prompt_ids, b.prompt_mask, b.completion_ids, b.completion_mask


def _total(objective: Objective, run, batches, teacher) -> float:
    """The summed per-batch token-mean loss of ``batches`` against ``teacher`` (no gradient)."""
    with torch.no_grad():
        return sum(
            float(objective.loss(b, run.student_forward(*_inputs(b)), teacher.view(b), float(b.num_tokens())))
            for b in batches
        )


def error(folder: Path, url: str) -> dict[tuple[str, int, bool], float]:
    from gkd.models import build_model as build_task_model
    from gkd.tasks import get_task

    task = get_task("summarization")
    tok = task.build_tokenizer()
    student = build_task_model(task.student_model_config(), tok, seed=0)
    records = task.generate("validation", 256, seed=0)
    tmp = Path(tempfile.mkdtemp())
    # a student that has learnt something (a few SFT steps): its top-k tokens then mean something
    sft = GKDConfig(
        divergence="nll", lmbda=0.0, max_steps=SFT_STEPS, per_device_train_batch_size=32, learning_rate=3e-3,
        max_new_tokens=8, progress=False, save_steps=0, logging_steps=10**6, output_dir=str(tmp / "sft"),
    )  # fmt: skip
    GKDTrainer(
        sft,
        student=student,
        tokenizer=tok,
        train_records=task.generate("train", 1024, seed=1),
        log=lambda m: None,
    ).train()
    base = dict(lmbda=1.0, per_device_train_batch_size=64, max_new_tokens=8, progress=False, save_steps=0)
    cfg = GKDConfig(**base, output_dir=str(tmp / "local"), teacher_model_name_or_path=str(folder))
    tr = GKDTrainer(cfg, student=student, tokenizer=tok, train_records=records, log=lambda m: None)
    run = tr.setup()
    with torch.no_grad():  # the student's own samples, drawn once
        batches = [student_samples(run, run.stream.next()) for _ in range(4)]
    local = run.teacher
    served = {
        (k, s): ServedTeacher(
            url, vocab=run.vocab, topk=k, student_topk=k if s else 0, student=run.student
        ).connect(tok)
        for k in KS
        for s in (False, True)
    }
    out: dict[tuple[str, int, bool], float] = {}
    for name, params in DIVERGENCES.items():
        objective = Objective.from_config(
            GKDConfig(**base, divergence=name, **params, output_dir=str(tmp / "x"))
        )

        exact = _total(objective, run, batches, local)
        for (k, s), teacher in served.items():
            out[(name, k, s)] = abs(_total(objective, run, batches, teacher) - exact) / abs(exact)
    print(
        "  relative error of the served loss vs the exact local-teacher loss (trained teacher, SFT-ed student, vocab "
        "56, 256 on-policy samples; '+s': with teacher_student_topk = K; K=64 >= vocab is the whole vocabulary):"
    )
    cols = [(k, s) for k in KS for s in (False, True)]
    print("  divergence   " + "".join(f"{f'K={k}' + ('+s' if s else ''):<11}" for k, s in cols))
    for name in DIVERGENCES:
        print(f"  {name:<13}" + "".join(f"{out[(name, k, s)]:<11.2e}" for k, s in cols))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp())
    speed_folder, tok, records = speed_setup(tmp)
    error_folder = error_setup(tmp)
    procs = []
    try:
        p1, url1 = start_server(speed_folder, args.threads)
        procs.append(p1)
        p2, url2 = start_server(error_folder, args.threads)
        procs.append(p2)
        print("== speed (TRL-benchmark models, gkd serve-teacher on 127.0.0.1) ==")
        ratio = speed(speed_folder, tok, records, url1, args.threads, args.steps)
        print("== error (trained teacher) ==")
        errs = error(error_folder, url2)
    finally:
        for p in procs:
            p.terminate()  # SIGTERM: uvicorn shuts down gracefully
            p.wait(timeout=30)
    print(f"served_teacher_step_ratio={ratio:.2f}")
    for name in DIVERGENCES:
        for k in KS:
            print(f"served_{name}_rel_error_k{k}={errs[(name, k, False)]:.2e}")
            print(f"served_{name}_rel_error_k{k}_student={errs[(name, k, True)]:.2e}")
    print(f"served_rkl_rel_error_k8={errs[('reverse_kl', 8, False)]:.2e}")
    print(f"served_rkl_rel_error_k8_student={errs[('reverse_kl', 8, True)]:.2e}")


if __name__ == "__main__":
    main()
