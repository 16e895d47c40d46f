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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "Job",
    "StudySettings",
    "Workspace",
    "build_workspace",
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
    force: bool = False,
) -> dict[str, Path]:
    """Write a built-in task's train/validation/test JSONL, its tokenizer and randomly initialised tiny models.

    The result is everything ``gkd sft`` / ``gkd distill`` need, e.g.
    ``gkd sft model_name_or_path=OUT/teacher-init dataset=OUT/train.jsonl output_dir=OUT/teacher``.
    ``OUT/task.json`` records which task the folder holds; another task's folder is refused unless ``force``.
    """
    from gkd.errors import ConfigError
    from gkd.models import build_model
    from gkd.tasks import TASKS, get_task

    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(TASKS))}")
    marker = out / "task.json"
    if not force and out.is_dir() and any(out.iterdir()):
        held = json.loads(marker.read_text()).get("task") if marker.is_file() else None
        if held != name:
            what = f"task '{held}'" if held else "other files"
            raise ConfigError(
                f"'{out}' already holds {what}; choose another --out folder or pass --force to overwrite it"
            )
    task = get_task(name, **(params or {}))
    out.mkdir(parents=True, exist_ok=True)
    tok = task.build_tokenizer(str(out / "tokenizer"))
    paths: dict[str, Path] = {"tokenizer": out / "tokenizer"}
    for split, n in (("train", n_train), ("validation", n_eval), ("test", n_eval)):
        paths[split] = out / f"{split}.jsonl"
        write_jsonl(paths[split], task.generate(split, n, seed))
    for role, spec in (
        ("teacher-init", task.teacher_model_config()),
        ("student-init", task.student_model_config()),
    ):
        model = build_model(spec, tok, seed=seed)
        model.save_pretrained(out / role)
        tok.save_pretrained(out / role)
        paths[role] = out / role
    marker.write_text(json.dumps({"task": name, "params": params or {}, "seed": seed}) + "\n")
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


def job_key(job: Job) -> str:
    """Fingerprint of a job: its settings and the checkpoints it starts from (a finished job with the same key is
    not run again when a killed study is restarted)."""
    import hashlib

    d = asdict(job)
    d.pop("cost")
    for who in ("start", "teacher"):
        if d[who] is not None:
            w = Path(d[who]) / "model.safetensors"
            st = w.stat() if w.exists() else None
            d[who + "_weights"] = [st.st_size, st.st_mtime_ns] if st else None
    return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


_CACHE: dict[Any, Any] = {}

# the demo's teacher, trained by `gkd demo --train-teacher` and shipped with the package
ASSET_TEACHER = Path(__file__).resolve().parent.parent / "assets" / "demo_teacher"


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
    preds = generate_texts(
        model, tokenizer, dataset, max_new_tokens=max_new_tokens, greedy=True, batch_size=500
    )
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
    task = _cached(
        ("task", job.task, json.dumps(job.task_params, sort_keys=True)),
        lambda: get_task(job.task, **job.task_params),
    )
    tok = _cached(("tok", job.start), lambda: load_tokenizer(job.start))
    cfg = GKDConfig(**job.config)
    train = _dataset(job.train, tok, cfg.effective_max_completion_length)
    test = _dataset(job.test, tok, cfg.effective_max_completion_length)
    student = load_model(job.start, what="student")
    teacher = None
    if cfg.needs_teacher and job.teacher is not None:
        teacher = _cached(("teacher", job.teacher), lambda: load_model(job.teacher, what="teacher"))
    trainer = GKDTrainer(
        cfg, student=student, teacher=teacher, tokenizer=tok, train_dataset=train, log=log or (lambda m: None)
    )
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
    try:  # workers print nothing but their results: no per-load progress bars from transformers
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


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
    # Workers' libraries register semaphores that the resource tracker reports as "leaked" at exit; it is noise.
    os.environ.setdefault("PYTHONWARNINGS", "ignore:resource_tracker:UserWarning")
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


# ---------------------------------------------------------------------------------------------------------------
# a study's workspace: data, teacher, and the student's starting point
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class StudySettings:
    """Sizes and budgets of a study (the demo's defaults; experiment configs override them)."""

    task: str = "summarization"
    task_params: dict[str, Any] = field(default_factory=dict)
    seeds: int = 5
    n_train: int = 100_000
    n_test: int = 1000
    teacher_steps: int = 6000
    teacher_lr: float = 2e-3
    start_steps: int = 3000
    start_lr: float = 3e-3
    method_steps: int = 500
    method_lr: float = 1e-3
    batch_size: int = 64
    max_new_tokens: int = 8
    student: dict[str, Any] | None = None  # model spec; default: the task's student_model_config()
    teacher: dict[str, Any] | None = None  # model spec; default: the task's teacher_model_config()
    shipped_teacher: str | None = None  # a folder with a teacher trained by these settings, used when present


@dataclass
class Workspace:
    root: Path
    task: Any
    tokenizer: Any
    train_path: Path
    test_path: Path
    teacher_dir: Path
    start_dir: Path
    teacher_scores: dict[str, dict[str, float]]
    start_scores: dict[str, dict[str, float]]


def sft_config(out: Path, steps: int, lr: float, s: StudySettings, seed: int) -> dict[str, Any]:
    """The SFT recipe for teachers and starting students: AdamW, warmup, cosine to 0.1 x lr."""
    return {
        "divergence": "nll",
        "lmbda": 0.0,
        "learning_rate": lr,
        "lr_scheduler_type": "cosine",
        "min_lr_ratio": 0.1,
        "warmup_steps": min(100, max(1, steps // 20)),
        "max_steps": steps,
        "per_device_train_batch_size": s.batch_size,
        "max_new_tokens": s.max_new_tokens,
        "weight_decay": 0.01,
        "adam_beta2": 0.98,
        "output_dir": str(out),
        "overwrite_output_dir": True,  # a study re-runs an unfinished job from its start
        "logging_steps": max(1, steps // 10),
        "save_steps": 0,
        "save_total_limit": 1,
        "seed": seed,
        "progress": False,
    }


def _sft_in_process(cfg: dict[str, Any], model: Any, tok: Any, dataset: Any) -> Any:
    from gkd.config import GKDConfig
    from gkd.trainer import GKDTrainer

    trainer = GKDTrainer(
        GKDConfig(**cfg), student=model, tokenizer=tok, train_dataset=dataset, log=lambda m: None
    )
    trainer.train()
    return trainer.student


def _spec_equal(model: Any, spec: dict[str, Any], vocab: int) -> bool:
    cfg = model.config
    keys = [k for k in spec if k not in ("architecture", "vocab_size")]
    return cfg.vocab_size == vocab and all(getattr(cfg, k, None) == spec[k] for k in keys)


def build_workspace(
    root: Path, s: StudySettings, say: Callable[[str], None], retrain_teacher: bool = False
) -> Workspace:
    """Data, teacher and starting student of a study, each created once and reused from ``root`` afterwards."""
    import shutil

    from gkd.models import build_model, load_model
    from gkd.tasks import get_task

    task = get_task(s.task, **s.task_params)
    root.mkdir(parents=True, exist_ok=True)
    data = root / "data"
    tok = task.build_tokenizer(str(data / "tokenizer"))
    train_path, test_path = data / "train.jsonl", data / "test.jsonl"
    stamp = data / "settings.json"
    want = {"task": s.task, "params": s.task_params, "n_train": s.n_train, "n_test": s.n_test}
    if not stamp.exists() or json.loads(stamp.read_text()) != want:
        say(f"data: generating {s.n_train} training and {s.n_test} test prompts ({s.task}) ...")
        write_jsonl(
            train_path,
            (
                {"prompt": r["prompt"], "completion": r["completion"]}
                for r in task.generate("train", s.n_train, 0)
            ),
        )
        write_jsonl(test_path, task.generate("test", s.n_test, 0))
        stamp.write_text(json.dumps(want))
        for stale in ("teacher", "start"):
            shutil.rmtree(root / stale, ignore_errors=True)
        (root / "reference_scores.json").unlink(missing_ok=True)
    train_ds = _dataset(str(train_path), tok, s.max_new_tokens)
    test_ds = _dataset(str(test_path), tok, s.max_new_tokens)

    teacher_spec = s.teacher or task.teacher_model_config()
    teacher_dir = root / "teacher"
    shipped = Path(s.shipped_teacher) if s.shipped_teacher else None
    if retrain_teacher:
        shutil.rmtree(teacher_dir, ignore_errors=True)
    if not (teacher_dir / "config.json").exists():
        model = None
        if shipped is not None and (shipped / "config.json").exists() and not retrain_teacher:
            model = load_model(str(shipped), what="teacher")
            if _spec_equal(model, teacher_spec, len(tok)):
                say(
                    f"teacher: using the checkpoint gkd ships ({shipped}; trained with `gkd demo --train-teacher`)"
                    if shipped.resolve() == ASSET_TEACHER
                    else f"teacher: reusing the trained teacher at {shipped}"
                )
            else:
                model = None
        if model is None:
            say(
                f"teacher: SFT of a {teacher_spec.get('num_hidden_layers')}-layer d{teacher_spec.get('hidden_size')} model for {s.teacher_steps} steps ..."
            )
            t0 = time.perf_counter()
            model = build_model(teacher_spec, tok, seed=1234)
            cfg = sft_config(root / "runs" / "teacher", s.teacher_steps, s.teacher_lr, s, seed=1234)
            model = _sft_in_process(cfg, model, tok, train_ds)
            say(f"teacher: trained in {time.perf_counter() - t0:.0f}s")
        model.save_pretrained(teacher_dir)
        tok.save_pretrained(teacher_dir)
        (root / "reference_scores.json").unlink(missing_ok=True)
    teacher = load_model(str(teacher_dir), what="teacher")

    start_dir = root / "start"
    spec = s.student or task.student_model_config()
    recipe = json.loads(
        json.dumps({"spec": spec, "steps": s.start_steps, "lr": s.start_lr, "batch_size": s.batch_size})
    )
    recipe_path = start_dir / "gkd_start_recipe.json"
    if (start_dir / "config.json").exists() and (
        not recipe_path.exists() or json.loads(recipe_path.read_text()) != recipe
    ):
        say("start: the starting student's recipe changed; training it again")
        shutil.rmtree(start_dir)
    if not (start_dir / "config.json").exists():
        say(
            f"start: SFT of the student ({spec.get('num_hidden_layers')}-layer d{spec.get('hidden_size')}) for {s.start_steps} steps ..."
        )
        t0 = time.perf_counter()
        model = build_model(spec, tok, seed=4321)
        cfg = sft_config(root / "runs" / "start", s.start_steps, s.start_lr, s, seed=4321)
        model = _sft_in_process(cfg, model, tok, train_ds)
        model.save_pretrained(start_dir)
        tok.save_pretrained(start_dir)
        recipe_path.write_text(json.dumps(recipe))
        (root / "reference_scores.json").unlink(missing_ok=True)
        say(f"start: trained in {time.perf_counter() - t0:.0f}s")
    start = load_model(str(start_dir), what="student")

    scores_path = root / "reference_scores.json"
    if scores_path.exists():
        ref = json.loads(scores_path.read_text())
    else:
        ref = {
            name: evaluate_model(m, tok, task, test_ds, max_new_tokens=s.max_new_tokens, seed=0)
            for name, m in (("teacher", teacher), ("start", start))
        }
        scores_path.write_text(json.dumps(ref, indent=2))
    return Workspace(
        root, task, tok, train_path, test_path, teacher_dir, start_dir, ref["teacher"], ref["start"]
    )
