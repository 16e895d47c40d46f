"""Studies: many short distillation jobs (method × seed) from one shared start, evaluated and compared.

A study is what ``gkd demo`` and every ``gkd experiment NAME`` run:

1. a *workspace* (:func:`build_workspace`): generated train/test data, a teacher and the student's starting point,
   each created once and reused from its folder afterwards;
2. one *job* per (seed, method) (:func:`plan_jobs`): an ordinary ``GKDTrainer`` run from the shared start with the
   method's :class:`Recipe` and the study's budget (:func:`job_config`), then an evaluation on the held-out prompts
   with greedy decoding and with sampling (:func:`evaluate_model`, which is :func:`gkd.evaluation.evaluate`);
3. :func:`run_study` runs the jobs in a pool of worker processes (:func:`run_jobs`; one torch thread each: tiny
   models are bound by per-op overhead, so two single-thread processes do more work than one two-thread process)
   and appends each result to ``results.jsonl`` at once, so a killed study resumes without re-running finished jobs;
4. reports use means, standard errors and **paired** per-seed differences (:func:`mean_se`, :func:`paired`).

A method is a :class:`Recipe`: a packaged preset (``configs/presets/NAME.yaml``, the same files ``gkd distill
--config NAME`` reads), GKDConfig overrides on top of it, and study-only switches (:class:`StudyOptions`: a multiple
of the step budget, training on the teacher's pre-generated targets, a fraction of the data, prompts without labels)
that are not config keys. The named recipes shared by the demo and the families are in
``configs/experiments/recipes.yaml``. In YAML a run is::

    NAME: {preset: PRESET, config: {KEY: VALUE, ...}, study: {SWITCH: VALUE, ...}}
    NAME: {recipe: RECIPE, config: {...}, study: {...}}      # a named recipe, with further overrides
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import multiprocessing as mp
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from gkd.errors import ConfigError
from gkd.experiments.common import ASSET_TEACHER, read_jsonl, write_jsonl
from gkd.io import fingerprint, quiet_libraries

__all__ = [
    "CONFIG_DIR",
    "SELECT_SEED",
    "TINY_MODEL",
    "Job",
    "Recipe",
    "StudyConsole",
    "StudyOptions",
    "StudySettings",
    "Workspace",
    "build_workspace",
    "evaluate_model",
    "excludes_zero",
    "fmt_ci",
    "job_config",
    "job_cost",
    "job_key",
    "mean_se",
    "named_recipes",
    "paired",
    "paired_ci",
    "parse_runs",
    "plan_jobs",
    "run_jobs",
    "run_logged",
    "run_study",
    "select_learning_rates",
    "selection_score",
    "seqkd_targets",
    "sft_config",
    "t_interval",
    "train_job",
    "training_file",
    "validation_file",
]

# the experiment families' YAML files and the named recipes (packaged as gkd/configs/experiments)
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "experiments"
RECIPES_FILE = CONFIG_DIR / "recipes.yaml"

# the model size of every ``--quick`` study (the teacher is twice as wide)
TINY_MODEL: dict[str, Any] = {
    "architecture": "llama",
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "max_position_embeddings": 64,
    "tie_word_embeddings": True,
}


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


def t_interval(values: list[float], level: float = 0.95) -> dict[str, float]:
    """Mean, SE, the t-based ``level`` confidence interval of the mean (n - 1 degrees of freedom, scipy's Student t)
    and the two-sided p-value of "mean = 0". With one value (or zero spread) the interval is the point and p is 1 for a
    zero mean, 0 otherwise."""
    from scipy import stats

    m, se = mean_se(values)
    n = len(values)
    if n < 2 or se == 0 or math.isnan(se):
        return {"mean": m, "se": se, "lo": m, "hi": m, "p": 1.0 if m == 0 else 0.0, "n": n}
    q = float(stats.t.ppf(0.5 + level / 2, n - 1))
    p = float(2 * stats.t.sf(abs(m / se), n - 1))
    return {"mean": m, "se": se, "lo": m - q * se, "hi": m + q * se, "p": p, "n": n}


def paired_ci(a: list[float], b: list[float], level: float = 0.95) -> dict[str, float]:
    """:func:`t_interval` of the per-seed differences a - b (a paired t-test; lists ordered by seed)."""
    if len(a) != len(b):
        raise ValueError(f"paired_ci needs as many values on each side, got {len(a)} and {len(b)}")
    return t_interval([x - y for x, y in zip(a, b)], level)


def excludes_zero(ci: dict[str, float]) -> bool:
    """Whether a :func:`t_interval` lies entirely on one side of 0 (needs at least two values)."""
    return ci["n"] >= 2 and (ci["lo"] > 0 or ci["hi"] < 0)


def fmt_ci(ci: dict[str, float], digits: int = 1) -> str:
    """``+3.2 ± 0.4 [+2.1, +4.3]`` (mean ± SE [95 % t-interval])."""
    f = f"{{:+.{digits}f}}"
    return f"{f.format(ci['mean'])} ± {ci['se']:.{digits}f} [{f.format(ci['lo'])}, {f.format(ci['hi'])}]"


# ---------------------------------------------------------------------------------------------------------------
# settings, console
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class StudySettings:
    """Sizes and budgets of a study (the demo's defaults; experiment configs override them)."""

    task: str = "summarization"
    task_params: dict[str, Any] = field(default_factory=dict)
    # task parameters of the teacher's own training data, over task_params (None: the teacher trains on the
    # students' data); e.g. the instruction family's teacher sees the instructions held out of the students' mixture
    teacher_task_params: dict[str, Any] | None = None
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
    # each method's learning rate chosen from this grid on validation prompts (never the test set): one run per
    # (method, rate) with seed SELECT_SEED, scored on ``n_validation`` prompts of the task's validation split (disjoint
    # from train and test), the rate with the best mean of greedy and T=1 headline score kept. None: method_lr.
    lr_grid: list[float] | None = None
    n_validation: int = 500
    start_seed: int = (
        4321  # the starting student's initialisation and SFT seed (another value: an independent start)
    )

    @classmethod
    def from_mapping(cls, values: Any, where: str, base: StudySettings | None = None) -> StudySettings:
        """``base`` (default: the demo's settings) with a YAML ``settings:`` block; an unknown key is a one-line error."""
        keys = [f.name for f in dataclasses.fields(cls)]
        return replace(base or cls(), **_known_keys(values, keys, f"{where} settings"))


class StudyConsole:
    """Where a study prints: ``say`` for one-line messages; ``console`` (rich) for the progress bar."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console(highlight=False)

    def say(self, msg: str) -> None:
        # soft_wrap: a line is never broken at the console's width (a log file keeps one line per message)
        self.console.print(msg, markup=False, soft_wrap=True)


def _known_keys(values: Any, valid: list[str], where: str) -> dict[str, Any]:
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where} must be a mapping of key: value, got {type(values).__name__}")
    for key in values:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'?" if close else f"valid: {', '.join(valid)}"
            raise ConfigError(f"{where}: unknown key '{key}'; {hint}")
    return dict(values)


# ---------------------------------------------------------------------------------------------------------------
# methods: a packaged preset + config overrides + study-only switches
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StudyOptions:
    """The ``study:`` block of a run: what a study does around the trainer. None of these is a GKDConfig key."""

    steps: int = 1
    """The job trains ``steps`` × the study's ``method_steps`` (``sft_2x``: 2, SFT at the wall time of KD)."""
    teacher_targets: bool = False
    """Train on the teacher's samples (temperature 1) for the first ``method_steps × batch_size`` training prompts,
    generated once per workspace and shared by every seed (SeqKD as the study runs it; :func:`seqkd_targets`)."""
    data_fraction: float | None = None
    """Train on the first ``data_fraction`` of the training records (a file written once per workspace)."""
    labels: bool = True
    """With ``data_fraction``: keep the completions (``False``: prompts only, for on-policy runs)."""

    @classmethod
    def parse(cls, spec: Any, where: str, base: StudyOptions | None = None) -> StudyOptions:
        """``base`` (default: no switches) with the switches of a YAML ``study:`` block."""
        values = {
            **asdict(base or cls()),
            **_known_keys(spec or {}, [f.name for f in dataclasses.fields(cls)], where),
        }
        steps, fraction = values["steps"], values["data_fraction"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ConfigError(
                f"{where}: steps must be a positive whole multiple of the step budget, got {steps!r}"
            )
        for flag in ("teacher_targets", "labels"):
            if not isinstance(values[flag], bool):
                raise ConfigError(f"{where}: {flag} must be true or false, got {values[flag]!r}")
        if fraction is not None:
            if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
                raise ConfigError(f"{where}: data_fraction must be in (0, 1], got {fraction!r}")
            values["data_fraction"] = float(fraction)
        if not values["labels"] and fraction is None:
            raise ConfigError(f"{where}: labels: false needs data_fraction (1.0 for every training prompt)")
        if values["teacher_targets"] and fraction is not None:
            raise ConfigError(f"{where}: teacher_targets and data_fraction exclude each other")
        return cls(**values)


# keys every job gets from the study itself (job_config); a recipe cannot override them
_STUDY_OWNED = ("max_steps", "output_dir", "seed")


@dataclass(frozen=True)
class Recipe:
    """One method of a study: a packaged preset, GKDConfig overrides on top of it, and study-only switches."""

    preset: str
    config: Mapping[str, Any] = field(default_factory=dict)
    study: StudyOptions = field(default_factory=StudyOptions)

    def preset_config(self) -> dict[str, Any]:
        """The preset's keys, read from ``gkd/configs/presets/PRESET.yaml`` (a fresh dict)."""
        from gkd.config import PRESETS_DIR, read_yaml

        return read_yaml(PRESETS_DIR / f"{self.preset}.yaml")

    @classmethod
    def parse(cls, spec: Any, where: str, recipes: Mapping[str, Recipe] | None = None) -> Recipe:
        """A run of a YAML file: ``{preset: NAME | recipe: NAME, config: {...}, study: {...}}``."""
        from gkd.config import GKDConfig, presets

        shape = "{preset: NAME or recipe: NAME, config: {GKDConfig overrides}, study: {study switches}}"
        if not isinstance(spec, Mapping):
            raise ConfigError(f"{where} must be a mapping {shape}, got {spec!r}")
        unknown = [k for k in spec if k not in ("preset", "recipe", "config", "study")]
        if unknown:
            raise ConfigError(f"{where}: unknown key '{unknown[0]}'; a run is {shape}")
        if ("preset" in spec) == ("recipe" in spec):
            raise ConfigError(f"{where}: give exactly one of preset: or recipe:")
        if "recipe" in spec:
            known = recipes or {}
            if spec["recipe"] not in known:
                raise ConfigError(
                    f"{where}: unknown recipe {spec['recipe']!r}; named recipes ({RECIPES_FILE.name}): "
                    f"{', '.join(known) or 'none here'}"
                )
            base = known[spec["recipe"]]
        else:
            if spec["preset"] not in presets():
                raise ConfigError(
                    f"{where}: unknown preset {spec['preset']!r}; presets: {', '.join(presets())}"
                )
            base = cls(spec["preset"])
        fields = [f.name for f in dataclasses.fields(GKDConfig)]
        config = _known_keys(spec.get("config") or {}, fields, f"{where} config")
        for key in _STUDY_OWNED:
            if key in config:
                raise ConfigError(
                    f"{where} config: the study sets {key} for every job (steps: see study.steps)"
                )
        return cls(
            base.preset, {**base.config, **config}, StudyOptions.parse(spec.get("study"), where, base.study)
        )


def named_recipes() -> dict[str, Recipe]:
    """The named recipes of ``configs/experiments/recipes.yaml`` (shared by the demo and the families)."""
    from gkd.config import read_yaml

    return {
        name: Recipe.parse(spec, f"{RECIPES_FILE.name}: recipe '{name}'")
        for name, spec in read_yaml(RECIPES_FILE).items()
    }


def parse_runs(spec: Any, where: str, recipes: Mapping[str, Recipe]) -> dict[str, Recipe]:
    """The ``runs:`` block of an experiment file: name -> :class:`Recipe`, in file order."""
    if not isinstance(spec, Mapping) or not spec:
        raise ConfigError(f"{where}: runs must be a non-empty mapping of name: run")
    return {str(name): Recipe.parse(run, f"{where}: run '{name}'", recipes) for name, run in spec.items()}


# ---------------------------------------------------------------------------------------------------------------
# one job: its config, its training data, train from the start, evaluate
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
    # a metric name or module:function scores the evaluation instead of the task (``gkd study``: the user's own
    # data); its modes are then "greedy" for temperature 0 and "T=<t>" for each other temperature
    metric: str | None = None


def job_config(
    recipe: Recipe, seed: int, out: Path, s: StudySettings, lr: float | None = None
) -> dict[str, Any]:
    """The GKDConfig of one job: the recipe's preset, then the study's budget (the same for every method: a short
    linear warm-up, then a linear decay to 0 over the run, as the paper's method phase does, ``temperature`` 1;
    learning rate ``lr``, default the study's ``method_lr``), then the recipe's own config overrides."""
    steps = s.method_steps * recipe.study.steps
    study = {
        "learning_rate": s.method_lr if lr is None else lr,
        "lr_scheduler_type": "linear",
        "warmup_steps": min(20, steps // 10),
        "max_steps": steps,
        "per_device_train_batch_size": s.batch_size,
        "max_new_tokens": s.max_new_tokens,
        "temperature": 1.0,
        "adam_beta2": 0.98,
        "weight_decay": 0.01,
        "output_dir": str(out),
        "overwrite_output_dir": True,  # a study re-runs an unfinished job from its start
        "logging_steps": max(1, s.method_steps // 5),
        "save_steps": 0,
        "save_total_limit": 1,
        "seed": seed,
        "progress": False,
    }
    return {**recipe.preset_config(), **study, **recipe.config}


# relative cost of a step, for scheduling the longest jobs first
_COST = {"nll": 1.0, "forward_kl": 1.6, "reverse_kl": 1.6, "jsd": 1.6, "tvd": 1.6}


def job_cost(cfg: dict[str, Any]) -> float:
    on = 1.0 + 0.6 * float(cfg.get("lmbda", 0.0))
    return cfg["max_steps"] * _COST.get(cfg.get("divergence", "nll"), 1.6) * on


def job_key(job: Job) -> str:
    """Fingerprint of a job: its settings and the checkpoints it starts from (a finished job with the same key is
    not run again when a killed study is restarted)."""
    d = asdict(job)
    d.pop("cost")
    if d["metric"] is None:  # (a task's job keeps the key it had before jobs could name a metric)
        d.pop("metric")
    for who in ("start", "teacher"):
        if d[who] is not None:
            w = Path(d[who]) / "model.safetensors"
            st = w.stat() if w.exists() else None
            d[who + "_weights"] = [st.st_size, st.st_mtime_ns] if st else None
    return fingerprint(d)


def seqkd_targets(ws: Workspace, s: StudySettings, n: int, say: Callable[[str], None]) -> Path:
    """SeqKD data: the teacher samples targets (T=1) once for the first ``n`` training prompts, shared by all seeds."""
    from gkd.data import tokenize_records
    from gkd.models import load_model
    from gkd.teacher import seqkd_dataset

    path = ws.root / "data" / f"seqkd-{n}.jsonl"
    if path.exists():
        return path
    say(f"seqkd: the teacher writes targets for {n} training prompts (temperature 1, once) ...")
    tok = ws.tokenizer
    records = read_jsonl(ws.train_path)[:n]
    prompts = tokenize_records(records, tok, max_prompt_length=512, max_completion_length=s.max_new_tokens)
    teacher = load_model(str(ws.teacher_dir), what="teacher")
    ds = seqkd_dataset(
        teacher,
        tok,
        prompts,
        cache_dir=ws.root / "runs",
        teacher_name=str(ws.teacher_dir),
        max_new_tokens=s.max_new_tokens,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        seed=0,
        batch_size=512,
        log=lambda m: None,
    )
    rows = []
    for e in ds.examples:
        ids = [t for t in (e.completion or []) if t != tok.eos_token_id]
        rows.append({"prompt": e.record["prompt"], "completion": tok.decode(ids)})
    write_jsonl(path, rows)
    return path


def training_file(ws: Workspace, s: StudySettings, opts: StudyOptions, say: Callable[[str], None]) -> Path:
    """The JSONL a job trains on: the workspace's training data, the teacher's targets, or a subset of the data."""
    if opts.teacher_targets:
        return seqkd_targets(ws, s, min(s.n_train, s.method_steps * s.batch_size), say)
    if opts.data_fraction is None:
        return ws.train_path
    records = read_jsonl(ws.train_path)
    n = max(1, int(len(records) * opts.data_fraction))
    path = ws.root / "data" / f"train-{opts.data_fraction}-{'labelled' if opts.labels else 'prompts'}.jsonl"
    if not path.exists():
        write_jsonl(path, (r if opts.labels else {"prompt": r["prompt"]} for r in records[:n]))
    return path


# Tasks, tokenizers, tokenized datasets and teachers are reused across the jobs of a worker process. Everything
# read from disk is keyed by its files' sizes and modification times too, so a file rewritten in place (new data,
# a retrained teacher) is read again.
_CACHE: dict[Any, Any] = {}


def _stamp(path: str | Path) -> tuple[Any, ...]:
    """(name, size, mtime) of a file, or of each file directly inside a folder."""
    p = Path(path)
    if not p.exists():
        return (str(p), None)
    files = sorted(q for q in p.iterdir() if q.is_file()) if p.is_dir() else [p]
    return (str(p), *((q.name, st.st_size, st.st_mtime_ns) for q in files for st in [q.stat()]))


def _cached(key: Any, make: Callable[[], Any]) -> Any:
    if key not in _CACHE:
        _CACHE[key] = make()
    return _CACHE[key]


def cached_dataset(path: str, tokenizer: Any, max_completion: int) -> Any:
    """The JSONL file at ``path`` tokenized once per process, read again when the file changes."""
    from gkd.data import tokenize_records

    def make() -> Any:
        return tokenize_records(
            read_jsonl(Path(path)),
            tokenizer,
            max_prompt_length=512,
            max_completion_length=max_completion,
            source=path,
        )

    return _cached(("data", _stamp(path), max_completion), make)


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
    """A study's evaluation, :func:`gkd.evaluation.evaluate` with the task's metrics: greedy decoding, and at each
    temperature ``samples`` samples per prompt (seeds ``seed * 1000 + k``), 500 prompts per batch.

    Returns ``{"greedy": {...}, "sample": {...}}`` (``sample`` = temperature 1) plus ``"sample_T"`` entries for other
    temperatures; with ``samples`` > 1 each sampled entry also holds ``self_bleu`` over the samples of each prompt.
    """
    from gkd.evaluation import evaluate

    return evaluate(
        model,
        tokenizer,
        dataset,
        task.score,
        max_new_tokens=max_new_tokens,
        sampled={"sample" if t == 1.0 else f"sample_{t:g}": t for t in temperatures},
        seeds=[seed * 1000 + k for k in range(samples)],
        batch_size=500,
    )


def _evaluate_job(job: Job, model: Any, tok: Any, test: Any, cfg: Any) -> dict[str, dict[str, float]]:
    """A job's evaluation: the task's (:func:`evaluate_model`), or with ``job.metric`` the metric's at each of the
    job's temperatures (0 = greedy), one sample per prompt seeded by the job's seed alone, so every method of a
    seed decodes with the same random numbers (common random numbers)."""
    from gkd.evaluation import evaluate
    from gkd.experiments.metric import metric_scorer, score_modes

    if job.metric is None:
        task = _cached(
            ("task", job.task, json.dumps(job.task_params, sort_keys=True)),
            lambda: _get_task(job.task, job.task_params),
        )
        return evaluate_model(
            model,
            tok,
            task,
            test,
            max_new_tokens=cfg.max_new_tokens,
            seed=job.seed,
            temperatures=job.eval_temperatures,
            samples=job.eval_samples,
        )
    modes = score_modes(job.eval_temperatures)
    return evaluate(
        model,
        tok,
        test,
        metric_scorer(job.metric, cfg.eval_tokenize),
        max_new_tokens=cfg.max_new_tokens,
        greedy="greedy" in modes,
        sampled={m: t for m, t in modes.items() if t > 0},
        seeds=[job.seed * 1000 + k for k in range(job.eval_samples)],
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        batch_size=cfg.eval_batch_size,
    )


def _get_task(name: str, params: dict[str, Any]) -> Any:
    from gkd.tasks import get_task

    return get_task(name, **params)


def train_job(job: Job, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run one job in this process: train from ``job.start`` and evaluate. Returns scores, timings and ``cost``
    (wall times and tokens: :class:`gkd.experiments.cost.MeteredTrainer`)."""
    from gkd.config import GKDConfig
    from gkd.experiments.cost import MeteredTrainer
    from gkd.models import load_model, load_tokenizer

    t0 = time.perf_counter()
    tok = _cached(("tok", _stamp(job.start)), lambda: load_tokenizer(job.start))
    cfg = GKDConfig(**job.config)
    train = cached_dataset(job.train, tok, cfg.effective_max_completion_length)
    test = cached_dataset(job.test, tok, cfg.effective_max_completion_length)
    student = load_model(job.start, what="student")
    teacher = None
    if cfg.needs_teacher and job.teacher is not None:
        teacher = _cached(("teacher", _stamp(job.teacher)), lambda: load_model(job.teacher, what="teacher"))
    trainer = MeteredTrainer(
        cfg, student=student, teacher=teacher, tokenizer=tok, train_dataset=train, log=log or (lambda m: None)
    )
    result = trainer.train()
    t_train = time.perf_counter() - t0
    scores = _evaluate_job(job, trainer.student, tok, test, cfg)
    wall = time.perf_counter() - t0
    return {
        "name": job.name,
        "seed": job.seed,
        "scores": scores,
        "lr": cfg.learning_rate,
        "steps": result.step,
        "train_s": t_train,
        "wall_s": wall,
        "final_loss": result.final_loss,
        "cost": {"wall_s": wall, "train_s": t_train, "eval_s": wall - t_train, **trainer.cost},
    }


def _worker_init(threads: int) -> None:
    """Workers print nothing but their results."""
    torch.set_num_threads(threads)
    quiet_libraries()


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


def _drop_derived(data: Path, patterns: tuple[str, ...]) -> None:
    """Remove training files derived from the data or the teacher (SeqKD targets, subsets) once those change."""
    for pattern in patterns:
        for p in data.glob(pattern):
            p.unlink(missing_ok=True)


def build_workspace(
    root: Path, s: StudySettings, say: Callable[[str], None], retrain_teacher: bool = False
) -> Workspace:
    """Data, teacher and starting student of a study, each created once and reused from ``root`` afterwards."""
    from gkd.models import load_model
    from gkd.tasks import get_task

    task = get_task(s.task, **s.task_params)
    root.mkdir(parents=True, exist_ok=True)
    data = root / "data"
    tok = task.build_tokenizer(str(data / "tokenizer"))
    train_path, test_path = _workspace_data(root, task, s, say)
    train_ds = cached_dataset(str(train_path), tok, s.max_new_tokens)
    test_ds = cached_dataset(str(test_path), tok, s.max_new_tokens)
    teacher_train = root / "data" / "teacher-train.jsonl"
    teacher_ds = (
        cached_dataset(str(teacher_train), tok, s.max_new_tokens) if s.teacher_task_params else train_ds
    )
    teacher_dir = _workspace_teacher(root, task, tok, teacher_ds, s, say, retrain_teacher)
    teacher = load_model(str(teacher_dir), what="teacher")
    start_dir = _workspace_start(root, task, tok, train_ds, s, say)
    start = load_model(str(start_dir), what="student")

    scores_path = root / (
        "reference_scores.json" if s.start_seed == 4321 else f"reference_scores-seed{s.start_seed}.json"
    )
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


def _workspace_data(root: Path, task: Any, s: StudySettings, say: Callable[[str], None]) -> tuple[Path, Path]:
    """The study's train and test JSONL, regenerated (with everything derived from them) when the settings change."""
    data = root / "data"
    train_path, test_path = data / "train.jsonl", data / "test.jsonl"
    stamp = data / "settings.json"
    want = {"task": s.task, "params": s.task_params, "n_train": s.n_train, "n_test": s.n_test}
    if s.teacher_task_params:
        want["teacher_params"] = s.teacher_task_params
    if not stamp.exists() or json.loads(stamp.read_text()) != want:
        say(f"data: generating {s.n_train} training and {s.n_test} test prompts ({s.task}) ...")

        from gkd.tasks import get_task

        def pairs(t: Any) -> Any:
            return (
                {"prompt": r["prompt"], "completion": r["completion"]}
                for r in t.generate("train", s.n_train, 0)
            )

        write_jsonl(train_path, pairs(task))
        if s.teacher_task_params:  # the teacher's own training data (same size, its own task parameters)
            teacher_task = get_task(s.task, **{**s.task_params, **s.teacher_task_params})
            write_jsonl(data / "teacher-train.jsonl", pairs(teacher_task))
        write_jsonl(test_path, task.generate("test", s.n_test, 0))
        stamp.write_text(json.dumps(want))
        for stale in ("teacher", "start", *(p.name for p in root.glob("start-seed*"))):
            shutil.rmtree(root / stale, ignore_errors=True)
        _drop_derived(
            data, ("seqkd-*.jsonl", "train-*-labelled.jsonl", "train-*-prompts.jsonl", "validation-*.jsonl")
        )
        for p in root.glob("reference_scores*.json"):
            p.unlink()
    return train_path, test_path


def _workspace_teacher(
    root: Path,
    task: Any,
    tok: Any,
    train_ds: Any,
    s: StudySettings,
    say: Callable[[str], None],
    retrain: bool,
) -> Path:
    """The teacher's folder: the shipped (or a given) trained teacher when it fits, else trained now with SFT."""
    from gkd.models import build_model, load_model

    teacher_spec = s.teacher or task.teacher_model_config()
    teacher_dir = root / "teacher"
    shipped = Path(s.shipped_teacher) if s.shipped_teacher else None
    recipe = json.loads(
        json.dumps(
            {
                "spec": teacher_spec,
                "steps": s.teacher_steps,
                "lr": s.teacher_lr,
                "batch_size": s.batch_size,
                "shipped": str(shipped) if shipped else None,
            }
        )
    )
    recipe_path = teacher_dir / "gkd_teacher_recipe.json"
    if retrain:
        shutil.rmtree(teacher_dir, ignore_errors=True)
    # a teacher from an older gkd has no recipe file and is kept; one whose recipe changed is trained again
    if recipe_path.exists() and json.loads(recipe_path.read_text()) != recipe:
        say("teacher: the teacher's recipe changed (model, steps, learning rate or batch); training it again")
        shutil.rmtree(teacher_dir)
    if (teacher_dir / "config.json").exists():
        return teacher_dir
    model = None
    if shipped is not None and (shipped / "config.json").exists() and not retrain:
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
    recipe_path.write_text(json.dumps(recipe))
    for p in root.glob("reference_scores*.json"):
        p.unlink()
    _drop_derived(root / "data", ("seqkd-*.jsonl",))  # the teacher's targets are another teacher's now
    return teacher_dir


def _workspace_start(
    root: Path, task: Any, tok: Any, train_ds: Any, s: StudySettings, say: Callable[[str], None]
) -> Path:
    """The starting student shared by every run: SFT once, again only when its recipe changes."""
    from gkd.models import build_model

    start_dir = root / ("start" if s.start_seed == 4321 else f"start-seed{s.start_seed}")
    spec = s.student or task.student_model_config()
    recipe = {"spec": spec, "steps": s.start_steps, "lr": s.start_lr, "batch_size": s.batch_size}
    if s.start_seed != 4321:  # (an older gkd's recipe file has no seed: the default's recipe stays as it was)
        recipe["seed"] = s.start_seed
    recipe = json.loads(json.dumps(recipe))
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
        model = build_model(spec, tok, seed=s.start_seed)
        cfg = sft_config(root / "runs" / "start", s.start_steps, s.start_lr, s, seed=s.start_seed)
        model = _sft_in_process(cfg, model, tok, train_ds)
        model.save_pretrained(start_dir)
        tok.save_pretrained(start_dir)
        recipe_path.write_text(json.dumps(recipe))
        (
            root
            / (
                "reference_scores.json"
                if s.start_seed == 4321
                else f"reference_scores-seed{s.start_seed}.json"
            )
        ).unlink(missing_ok=True)
        say(f"start: trained in {time.perf_counter() - t0:.0f}s")
    return start_dir


# ---------------------------------------------------------------------------------------------------------------
# a study: every method for every seed, resumable
# ---------------------------------------------------------------------------------------------------------------
SELECT_SEED = 1000  # the seed of the learning-rate selection runs (never one of a study's reported seeds)


def validation_file(ws: Workspace, s: StudySettings) -> Path:
    """``n_validation`` prompts of the task's validation split (disjoint from train and test), written once."""
    path = ws.root / "data" / f"validation-{s.n_validation}.jsonl"
    if not path.exists():
        write_jsonl(path, ws.task.generate("validation", s.n_validation, 0))
    return path


def plan_jobs(
    ws: Workspace,
    s: StudySettings,
    recipes: Mapping[str, Recipe],
    *,
    label: str,
    say: Callable[[str], None],
    eval_temperatures: tuple[float, ...] = (1.0,),
    eval_samples: int = 1,
    lrs: Mapping[str, float] | None = None,
) -> list[Job]:
    """The jobs of a study, seed-major (every method for seed 0, then seed 1, ...), each method at its learning rate
    in ``lrs`` (default: the study's ``method_lr``). Writes the training files the recipes need (teacher targets,
    data subsets) and checks every job's config before anything trains."""
    train = {name: str(training_file(ws, s, r.study, say)) for name, r in recipes.items()}
    jobs = []
    for seed in range(s.seeds):
        for name, recipe in recipes.items():
            out = ws.root / "runs" / label / f"seed{seed}" / name
            cfg = _checked(job_config(recipe, seed, out, s, (lrs or {}).get(name)), f"{label}: run '{name}'")
            jobs.append(
                _job(ws, s, name, seed, cfg, train[name], str(ws.test_path), eval_temperatures, eval_samples)
            )
    return jobs


def _checked(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    from gkd.config import config_from_dict

    try:
        config_from_dict(cfg)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from e
    return cfg


def _job(
    ws: Workspace,
    s: StudySettings,
    name: str,
    seed: int,
    cfg: dict[str, Any],
    train: str,
    test: str,
    eval_temperatures: tuple[float, ...] = (1.0,),
    eval_samples: int = 1,
) -> Job:
    return Job(
        name=name,
        seed=seed,
        config=cfg,
        start=str(ws.start_dir),
        teacher=str(ws.teacher_dir),
        train=train,
        test=test,
        task=s.task,
        task_params=s.task_params,
        eval_temperatures=eval_temperatures,
        eval_samples=eval_samples,
        cost=job_cost(cfg),
    )


def selection_score(scores: dict[str, dict[str, float]], metric: str) -> float:
    """What the learning-rate selection maximises: the mean of the greedy and T=1 headline scores."""
    return (scores["greedy"][metric] + scores["sample"][metric]) / 2


def select_learning_rates(
    ws: Workspace,
    s: StudySettings,
    recipes: Mapping[str, Recipe],
    *,
    workers: int,
    say: Callable[[str], None],
    console: Any,
    label: str,
) -> dict[str, dict[str, Any]]:
    """Each method's learning rate from ``s.lr_grid``, chosen on validation prompts (never the test set).

    One run per (method, rate) at seed :data:`SELECT_SEED`, evaluated on :func:`validation_file`; returns
    ``{method: {"lr": best, "scores": {rate: validation score}}}`` (score: :func:`selection_score`). A recipe that
    sets ``learning_rate`` itself keeps it. Resumable like the study (``runs/LABEL/lr_select.jsonl``)."""
    grid = list(s.lr_grid or [])
    val = str(validation_file(ws, s))
    train = {name: str(training_file(ws, s, r.study, say)) for name, r in recipes.items()}
    jobs, fixed = [], {}
    for name, recipe in recipes.items():
        if "learning_rate" in recipe.config:
            fixed[name] = float(recipe.config["learning_rate"])
            continue
        for lr in grid:
            out = ws.root / "runs" / label / "lr_select" / f"{name}-lr{lr:g}"
            cfg = _checked(job_config(recipe, SELECT_SEED, out, s, lr), f"{label}: run '{name}'")
            jobs.append(_job(ws, s, name, SELECT_SEED, cfg, train[name], val))
    if jobs:
        say(
            f"learning rates: {len(jobs)} selection runs ({len(grid)} rates × {len(jobs) // len(grid)} methods) on {s.n_validation} validation prompts ..."
        )
    results = run_logged(
        jobs,
        ws.task.metric,
        label + " lr",
        ws.root / "runs" / label / "lr_select.jsonl",
        workers,
        say,
        console,
    )
    metric = ws.task.metric
    chosen: dict[str, dict[str, Any]] = {name: {"lr": lr, "scores": {}} for name, lr in fixed.items()}
    for job, r in zip(jobs, results):
        chosen.setdefault(job.name, {"lr": None, "scores": {}})["scores"][job.config["learning_rate"]] = (
            selection_score(r["scores"], metric)
        )
    for entry in chosen.values():
        if entry["scores"]:
            entry["lr"] = max(entry["scores"], key=lambda lr: (entry["scores"][lr], -lr))
    say(
        "learning rates chosen on validation: "
        + ", ".join(f"{n} {chosen[n]['lr']:g}" for n in recipes if n in chosen)
    )
    return {n: chosen[n] for n in recipes}


def run_study(
    ws: Workspace,
    s: StudySettings,
    recipes: Mapping[str, Recipe],
    *,
    workers: int,
    say: Callable[[str], None],
    console: Any,
    label: str,
    eval_temperatures: tuple[float, ...] = (1.0,),
    eval_samples: int = 1,
) -> list[dict[str, Any]]:
    """Run every recipe for each seed from the workspace's start; results in job order (:func:`plan_jobs`).

    With ``s.lr_grid`` each method's learning rate is first chosen on validation prompts
    (:func:`select_learning_rates`); every result records its ``lr`` and the method's ``lr_selection``.
    Finished results are appended to ``ROOT/runs/LABEL/results.jsonl`` with their :func:`job_key`; a restarted
    study keeps those whose key (job settings and starting checkpoints) is unchanged and runs only the others.
    """
    selection = (
        select_learning_rates(ws, s, recipes, workers=workers, say=say, console=console, label=label)
        if s.lr_grid
        else {}
    )
    jobs = plan_jobs(
        ws,
        s,
        recipes,
        label=label,
        say=say,
        eval_temperatures=eval_temperatures,
        eval_samples=eval_samples,
        lrs={n: e["lr"] for n, e in selection.items()},
    )
    results = run_logged(
        jobs, ws.task.metric, label, ws.root / "runs" / label / "results.jsonl", workers, say, console
    )
    for job, r in zip(jobs, results):
        r["lr"] = job.config["learning_rate"]
        if job.name in selection:
            r["lr_selection"] = {f"{lr:g}": v for lr, v in selection[job.name]["scores"].items()}
    return results


def run_logged(
    jobs: list[Job],
    metric: str,
    label: str,
    log_path: Path,
    workers: int,
    say: Callable[[str], None],
    console: Any,
    after_result: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run ``jobs`` with a progress bar, appending each result to ``log_path`` at once; a restarted run keeps the
    results whose :func:`job_key` is unchanged and runs only the others. Results in job order.

    ``metric`` is the score each finished run's progress line shows (every evaluation mode's); ``after_result`` is
    called with each result once it is on disk (an exception there stops the study, as a kill would)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    if not jobs:
        return []
    # A restarted study keeps the runs a killed one finished: same job settings and checkpoints -> same key.
    keys = [job_key(j) for j in jobs]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    done: dict[str, dict[str, Any]] = {}
    if log_path.exists():
        for line in log_path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            if r.get("job_key") in keys:
                done[r["job_key"]] = r
    log_path.write_text("".join(json.dumps(done[k]) + "\n" for k in keys if k in done))
    if done:
        say(f"resuming: {len(done)} of {len(jobs)} runs already finished ({log_path})")
    todo = [j for j, k in zip(jobs, keys) if k not in done]
    # a result names its job by (name, seed, learning rate): the selection runs share a name and a seed
    key_of = {(j.name, j.seed, j.config["learning_rate"]): k for j, k in zip(jobs, keys)}
    key_of.update({(j.name, j.seed, None): k for j, k in zip(jobs, keys)})
    progress = Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[last]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=console is None
        or not console.is_terminal,  # a log file gets one line per finished run instead
    )
    with progress:
        bar = progress.add_task("runs", total=len(jobs), completed=len(done), last="")

        def on_result(r: dict[str, Any]) -> None:
            r["job_key"] = key_of[(r["name"], r["seed"], r.get("lr"))]
            with log_path.open("a") as fh:  # every finished run is on disk at once
                fh.write(json.dumps(r) + "\n")
            shown = " / ".join(f"{mode[metric]:.1f}" for mode in r["scores"].values() if metric in mode)
            lr = f" lr {r['lr']:g}" if r.get("lr") is not None else ""
            line = f"{r['name']} seed {r['seed']}{lr}: {shown} ({r['train_s']:.0f}s)"
            progress.update(bar, advance=1, last=line)
            if progress.disable:  # a log file gets one line per finished run
                n = int(progress.tasks[0].completed)
                say(f"{label} {n}/{len(jobs)}: {line} [{progress.tasks[0].elapsed or 0:.0f}s]")

        def on_result_then_hook(r: dict[str, Any]) -> None:
            on_result(r)
            if after_result is not None:
                after_result(r)

        fresh = iter(run_jobs(todo, workers=workers, threads=1, on_result=on_result_then_hook))
    return [done[k] if k in done else next(fresh) for k in keys]
