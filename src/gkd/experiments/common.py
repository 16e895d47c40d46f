"""Shared machinery of the demo and the experiment families.

A *study* runs many short distillation jobs (method × seed) from one shared starting student, evaluates each on
held-out prompts with greedy decoding and with sampling, and reports means, standard errors and **paired**
per-seed differences. Every job is an ordinary ``GKDTrainer`` run; jobs run in a pool of worker processes (one
torch thread each: tiny models are bound by per-op overhead, so two single-thread processes do more work than one
two-thread process).
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "Job",
    "evaluate_model",
    "mean_se",
    "paired",
    "prepare_task",
    "run_jobs",
    "train_job",
    "write_jsonl",
]


# ---------------------------------------------------------------------------------------------------------------
# data on disk
# ---------------------------------------------------------------------------------------------------------------
def write_jsonl(path: Path, records: Iterable[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp-{os.getpid()}")
    with tmp.open("w") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict]:
    with path.open() as fh:
        return [json.loads(line) for line in fh if line.strip()]


def prepare_task(
    name: str,
    out: Path,
    *,
    n_train: int = 20000,
    n_eval: int = 500,
    seed: int = 0,
    params: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Write a built-in task's train/validation/test JSONL, its tokenizer and randomly initialised tiny models.

    The result is everything ``gkd sft`` / ``gkd distill`` need, e.g.
    ``gkd sft model_name_or_path=OUT/teacher-init dataset=OUT/train.jsonl output_dir=OUT/teacher``.
    """
    from gkd.models import build_model
    from gkd.tasks import get_task

    task = get_task(name, **(params or {}))
    out.mkdir(parents=True, exist_ok=True)
    tok = task.build_tokenizer(str(out / "tokenizer"))
    paths: dict[str, Path] = {"tokenizer": out / "tokenizer"}
    for split, n in (("train", n_train), ("validation", n_eval), ("test", n_eval)):
        paths[split] = out / f"{split}.jsonl"
        write_jsonl(paths[split], task.generate(split, n, seed))
    for role, spec in (("teacher-init", task.teacher_model_config()), ("student-init", task.student_model_config())):
        model = build_model(spec, tok, seed=seed)
        model.save_pretrained(out / role)
        tok.save_pretrained(out / role)
        paths[role] = out / role
    return paths


# ---------------------------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------------------------
def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error (sample SD / sqrt(n)); SE is 0 for a single value."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    m = sum(values) / n
    if n == 1:
        return m, 0.0
    var = sum((v - m) ** 2 for v in values) / (n - 1)
    return m, math.sqrt(var / n)


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean and SE of the per-seed differences a - b (lists ordered by seed)."""
    return mean_se([x - y for x, y in zip(a, b)])


# ---------------------------------------------------------------------------------------------------------------
# one job: train from a start, evaluate
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Job:
    """One training run of a study."""

    name: str  # method name
    seed: int
    config: dict[str, Any]  # GKDConfig fields
    start: str  # folder of the starting student
    teacher: str | None  # folder of the teacher
    train: str  # JSONL of training records
    test: str  # JSONL of evaluation records
    task: str = "summarization"
    task_params: dict[str, Any] = field(default_factory=dict)
    eval_temperatures: tuple[float, ...] = (1.0,)
    eval_samples: int = 1  # samples per prompt at each temperature (>1 adds Self-BLEU)
    cost: float = 1.0  # relative run time, for scheduling


_CACHE: dict[Any, Any] = {}


def _cached(key: Any, make: Callable[[], Any]) -> Any:
    if key not in _CACHE:
        _CACHE[key] = make()
    return _CACHE[key]


def _dataset(path: str, tokenizer: Any, max_completion: int) -> Any:
    from gkd.data import tokenize_records

    def make() -> Any:
        return tokenize_records(
            read_jsonl(Path(path)),
            tokenizer,
            max_prompt_length=512,
            max_completion_length=max_completion,
            source=path,
        )

    return _cached(("data", path, max_completion), make)


def evaluate_model(
    model: Any,
    tokenizer: Any,
    task: Any,
    dataset: Any,
    *,
    max_new_tokens: int,
    seed: int,
    temperatures: tuple[float, ...] = (1.0,),
    samples: int = 1,
) -> dict[str, dict[str, float]]:
    """Task metrics with greedy decoding and with sampling at each temperature.

    Returns ``{"greedy": {...}, "sample": {...}}`` (``sample`` = temperature 1) plus ``"sample_T"`` entries for other
    temperatures; with ``samples`` > 1 each sampled entry also holds ``self_bleu`` over the samples of each prompt.
    """
    from gkd.evaluation import generate_texts
    from gkd.metrics import self_bleu

    records = [e.record for e in dataset.examples]
    out: dict[str, dict[str, float]] = {}
    preds = generate_texts(model, tokenizer, dataset, max_new_tokens=max_new_tokens, greedy=True, batch_size=500)
    out["greedy"] = task.score(records, preds)
    for t in temperatures:
        runs = [
            generate_texts(
                model,
                tokenizer,
                dataset,
                max_new_tokens=max_new_tokens,
                greedy=False,
                temperature=t,
                batch_size=500,
                seed=seed * 1000 + k,
            )
            for k in range(samples)
        ]
        scores: dict[str, float] = {}
        for run in runs:
            for key, v in task.score(records, run).items():
                scores[key] = scores.get(key, 0.0) + v / len(runs)
        if samples > 1:
            scores["self_bleu"] = self_bleu([list(s) for s in zip(*runs)])
        out["sample" if t == 1.0 else f"sample_{t:g}"] = scores
    return out


def train_job(job: Job, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run one job in this process: train from ``job.start`` and evaluate. Returns scores and timings."""
    from gkd.config import GKDConfig
    from gkd.models import load_model, load_tokenizer
    from gkd.tasks import get_task
    from gkd.trainer import GKDTrainer

    t0 = time.perf_counter()
    task = _cached(("task", job.task, json.dumps(job.task_params, sort_keys=True)), lambda: get_task(job.task, **job.task_params))
    tok = _cached(("tok", job.start), lambda: load_tokenizer(job.start))
    cfg = GKDConfig(**job.config)
    train = _dataset(job.train, tok, cfg.effective_max_completion_length)
    test = _dataset(job.test, tok, cfg.effective_max_completion_length)
    student = load_model(job.start, what="student")
    teacher = None
    if cfg.needs_teacher and job.teacher is not None:
        teacher = _cached(("teacher", job.teacher), lambda: load_model(job.teacher, what="teacher"))
    trainer = GKDTrainer(cfg, student=student, teacher=teacher, tokenizer=tok, train_dataset=train, log=log or (lambda m: None))
    result = trainer.train()
    t_train = time.perf_counter() - t0
    scores = evaluate_model(
        trainer.student,
        tok,
        task,
        test,
        max_new_tokens=cfg.max_new_tokens,
        seed=job.seed,
        temperatures=job.eval_temperatures,
        samples=job.eval_samples,
    )
    return {
        "name": job.name,
        "seed": job.seed,
        "scores": scores,
        "steps": result.step,
        "train_s": t_train,
        "wall_s": time.perf_counter() - t0,
        "final_loss": result.final_loss,
    }


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_jobs(
    jobs: list[Job],
    *,
    workers: int,
    threads: int = 1,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run ``jobs`` (longest first) in ``workers`` processes; results come back in job order."""
    order = sorted(range(len(jobs)), key=lambda i: -jobs[i].cost)
    results: list[dict[str, Any] | None] = [None] * len(jobs)
    if workers <= 1:
        _worker_init(threads)
        for i in order:
            results[i] = train_job(jobs[i])
            if on_result:
                on_result(results[i])  # type: ignore[arg-type]
        return results  # type: ignore[return-value]
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=_worker_init, initargs=(threads,), maxtasksperchild=None) as pool:
        pending = {i: pool.apply_async(train_job, (jobs[i],)) for i in order}
        remaining = set(pending)
        while remaining:
            for i in list(remaining):
                res = pending[i]
                if res.ready():
                    results[i] = res.get()
                    remaining.discard(i)
                    if on_result:
                        on_result(results[i])  # type: ignore[arg-type]
            time.sleep(0.05)
    return results  # type: ignore[return-value]
