"""``gkd study FILE.yaml``: paired multi-seed comparisons of distillation methods on the user's own models and data.

The file names the teacher, the shared starting student, the training and evaluation data (any format gkd reads), a
metric, the methods (a packaged preset plus config keys each) and the seeds; every method trains from the same
start for the same number of steps with each seed, and each seed's evaluation samples with the same random numbers
for every method (common random numbers), so methods are compared **paired** by seed. It is the study machinery of
``gkd experiment`` (:mod:`gkd.experiments.study`: jobs, worker pool, resume, statistics) without the built-in task's
workspace. A file::

    teacher: models/teacher            # folders with config.json (the student's tokenizer is used)
    student: models/student            # the starting checkpoint every run begins from
    train_dataset: data/train.jsonl
    eval_dataset: data/eval.jsonl
    metric: rougeL                     # any gkd metric / task name, or module:function
    methods:
      sft: {preset: sft}
      on_policy: {preset: on_policy_gkd, beta: 0.5}
    baseline: sft                      # each method's Δ is taken against it, seed by seed
    seeds: 3                           # a count (0, 1, 2) or a list of seeds
    eval_temperatures: [0, 1]          # 0 = greedy
    common: {max_steps: 200, learning_rate: 1e-4, lr_scheduler_type: linear}
    lr_grid: [3e-5, 1e-4, 3e-4]        # optional: each method's rate chosen on a validation split of the train data
    output_dir: runs/my-study          # or --out

Instead of ``teacher``, ``student``, ``train_dataset`` and ``eval_dataset`` a file may name a built-in ``task``
(``gkd prepare``'s): its data, a teacher and a starting student are then made (or reused) in ``workspace`` with the
sizes and budgets of ``task_settings`` (:class:`~gkd.experiments.study.StudySettings`), and ``metric`` defaults to the
task. The paper's families that ``gkd experiment NAME`` runs as study files are such files.

The output folder holds ``results.json`` (every method × seed × temperature and each run's cost), ``report.md`` and
``results.png`` (:mod:`gkd.experiments.userreport`), ``results.jsonl`` (one line per finished run: what a restarted
study keeps) and the runs' folders. Relative paths in the file are relative to the working folder.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gkd.errors import ConfigError, DataError
from gkd.experiments.study import (
    SELECT_SEED,
    Job,
    Recipe,
    StudyConsole,
    StudySettings,
    _checked,
    _known_keys,
    job_cost,
    run_logged,
)

__all__ = ["STUDY_KEYS", "StudyFile", "headline_metric", "load_study_file", "run_study_file", "study_jobs"]

# every key of a study file, with what it is (the did-you-mean of an unknown key draws from these)
STUDY_KEYS = {
    "teacher": "the teacher's model folder (required)",
    "student": "the starting student's model folder, shared by every run (required)",
    "train_dataset": "the training data, any format gkd reads (required)",
    "eval_dataset": "the evaluation data, any format gkd reads (required)",
    "metric": "a gkd metric or task name, or module:function (required)",
    "methods": "name -> {preset: NAME, KEY: VALUE, ...} (required)",
    "baseline": "the method each paired Δ is taken against (required)",
    "seeds": "a number of seeds (0, 1, ...) or a list of seeds (default 3)",
    "eval_temperatures": "evaluation temperatures, 0 = greedy (default [0, 1])",
    "common": "config keys for every run, e.g. max_steps (required), learning_rate",
    "lr_grid": "learning rates to choose each method's from, on a validation split of the training data",
    "validation_fraction": "the share of the training records held out for lr_grid's choice (default 0.1)",
    "train_split": "the split of train_dataset for a folder or hub dataset (default train)",
    "eval_split": "the split of eval_dataset for a folder or hub dataset (default test)",
    "eval_max_samples": "evaluate on the first N records of eval_dataset (default: all)",
    "output_dir": "the output folder (default runs/study-<file name>; --out wins)",
    "task": "a built-in task whose data, teacher and start the study makes, instead of teacher/student/datasets",
    "task_settings": "with task: its workspace's sizes and budgets (n_train, teacher_steps, start_steps, ...)",
    "workspace": "with task: the folder of its data, teacher and start (default OUT/workspace; reused when equal)",
}
# the model and data keys a built-in task's workspace provides instead
_MODEL_KEYS = ("teacher", "student", "train_dataset", "eval_dataset")
_REQUIRED = (*_MODEL_KEYS, "metric", "methods", "baseline", "common")
# keys a study sets for each run itself
_OWNED = ("seed", "output_dir", "model_name_or_path", "teacher_model_name_or_path", "dataset", "eval_dataset")


@dataclass
class StudyFile:
    """A checked study file (:func:`load_study_file`); ``methods`` are :class:`~gkd.experiments.study.Recipe`."""

    path: Path
    teacher: str
    student: str
    train_dataset: str
    eval_dataset: str
    metric: str
    methods: dict[str, Recipe]
    baseline: str
    common: dict[str, Any]
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    eval_temperatures: list[float] = field(default_factory=lambda: [0.0, 1.0])
    lr_grid: list[float] | None = None
    validation_fraction: float = 0.1
    train_split: str = "train"
    eval_split: str = "test"
    eval_max_samples: int | None = None
    output_dir: str | None = None
    # a built-in task instead of the model and data keys (filled from its workspace when the study runs)
    task: str | None = None
    task_settings: StudySettings | None = None
    workspace: str | None = None


def _did_you_mean(value: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(value, valid, n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else f"valid: {', '.join(valid)}"


def _model_folder(value: Any, key: str, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: {key} must be a model folder (a path), got {value!r}")
    if not (Path(value) / "config.json").is_file():
        what = "does not exist" if not Path(value).exists() else "has no config.json"
        raise ConfigError(f"{where}: {key} '{value}' {what}; give a saved model's folder (save_pretrained)")
    return value


def _numbers(value: Any, key: str, where: str, *, positive: bool) -> list[float]:
    ok = isinstance(value, list) and value
    ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    ok = ok and all((v > 0) if positive else (v >= 0) for v in value)
    if not ok:
        what = "positive numbers" if positive else "numbers >= 0"
        raise ConfigError(f"{where}: {key} must be a non-empty list of {what}, got {value!r}")
    return [float(v) for v in value]


def _seeds(value: Any, where: str) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return list(range(value))
    if (
        isinstance(value, list)
        and value
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
        and len(set(value)) == len(value)
        and SELECT_SEED not in value
    ):
        return list(value)
    raise ConfigError(
        f"{where}: seeds must be a count (e.g. 3) or a list of distinct seeds >= 0 other than {SELECT_SEED} "
        f"(the learning-rate choice's), got {value!r}"
    )


def _metric(value: Any, where: str) -> str:
    from gkd.scoring import load_reward, names

    if isinstance(value, str) and ":" in value:
        try:  # imported now: a wrong module fails before anything trains
            load_reward(value, key="metric")
        except ConfigError as e:
            raise ConfigError(
                f"{where}: " + str(e).replace(f"reward '{value}'", f"metric '{value}'", 1)
            ) from None
        return value
    if not isinstance(value, str) or value not in names():
        hint = _did_you_mean(str(value), names()).replace("valid: ", "names: ")
        raise ConfigError(
            f"{where}: metric {value!r} is neither a gkd metric or task name nor module:function; {hint}"
        )
    return value


def _methods(value: Any, where: str) -> dict[str, Recipe]:
    if not isinstance(value, Mapping) or not value:
        raise ConfigError(
            f"{where}: methods must be a non-empty mapping of name: {{preset: NAME, KEY: VALUE}}"
        )
    out = {}
    for name, spec in value.items():
        if not isinstance(spec, Mapping) or "preset" not in spec:
            raise ConfigError(
                f"{where}: method '{name}' must be {{preset: NAME, KEY: VALUE, ...}}, got {spec!r}"
            )
        config = {k: v for k, v in spec.items() if k != "preset"}
        for key in _OWNED:
            if key in config:
                raise ConfigError(f"{where}: method '{name}': the study sets {key} for every run; remove it")
        out[str(name)] = Recipe.parse(
            {"preset": spec["preset"], "config": config}, f"{where}: method '{name}'"
        )
    return out


def _common(value: Any, where: str) -> dict[str, Any]:
    from gkd.config import GKDConfig

    common = _known_keys(value or {}, [f.name for f in dataclasses.fields(GKDConfig)], f"{where}: common")
    for key in _OWNED:
        if key in common:
            raise ConfigError(f"{where}: common: the study sets {key} for every run; remove it")
    steps = common.get("max_steps")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(
            f"{where}: common needs max_steps (a positive whole number): every method trains for the same steps"
        )
    return common


def _task(raw: Mapping[str, Any], where: str) -> StudySettings:
    """A file's ``task:`` and ``task_settings:`` as the workspace's settings; the model and data keys it replaces
    are refused."""
    from gkd.tasks import TASKS

    name = raw["task"]
    if not isinstance(name, str) or name not in TASKS:
        raise ConfigError(f"{where}: unknown task {name!r}; {_did_you_mean(str(name), sorted(TASKS))}")
    given = [k for k in _MODEL_KEYS if k in raw]
    if given:
        raise ConfigError(
            f"{where}: task '{name}' makes the teacher, the student and the data; remove {', '.join(given)}"
        )
    settings = raw.get("task_settings") or {}
    if not isinstance(settings, Mapping) or "task" in settings:
        raise ConfigError(f"{where}: task_settings must be a mapping of workspace settings (without task)")
    return StudySettings.from_mapping({**settings, "task": name}, where)


def load_study_file(path: str | Path) -> StudyFile:
    """Read and check a study file: unknown keys (with a did-you-mean), missing keys and model folders, unknown
    presets, config keys and metrics, a baseline that is not a method: each a one-line :class:`ConfigError`."""
    from gkd.config_files import read_yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"study file '{p}' does not exist; pass a YAML file (docs/studies.md shows one)")
    where = f"study file '{p}'"
    raw = read_yaml(p)
    for key in raw:
        if key not in STUDY_KEYS:
            raise ConfigError(f"{where}: unknown key '{key}'; {_did_you_mean(str(key), list(STUDY_KEYS))}")
    task = _task(raw, where) if "task" in raw else None
    if task is not None:  # the workspace provides the models and data; the metric defaults to the task's
        raw = {**raw, **dict.fromkeys(_MODEL_KEYS, ""), "metric": raw.get("metric", task.task)}
    elif "task_settings" in raw or "workspace" in raw:
        raise ConfigError(f"{where}: task_settings and workspace need task: (a built-in task); remove them")
    for key in _REQUIRED:
        if key not in raw:
            raise ConfigError(f"{where}: missing key '{key}' ({STUDY_KEYS[key]})")
    for key in ("train_dataset", "eval_dataset"):
        if task is None and (not isinstance(raw[key], str) or not raw[key]):
            raise ConfigError(f"{where}: {key} must be a dataset path or name, got {raw[key]!r}")
    methods = _methods(raw["methods"], where)
    if raw["baseline"] not in methods:
        raise ConfigError(
            f"{where}: baseline '{raw['baseline']}' is not a method; {_did_you_mean(str(raw['baseline']), list(methods))}"
        )
    fraction = raw.get("validation_fraction", 0.1)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ConfigError(f"{where}: validation_fraction must be in (0, 1), got {fraction!r}")
    cap = raw.get("eval_max_samples")
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise ConfigError(f"{where}: eval_max_samples must be a positive whole number, got {cap!r}")
    return StudyFile(
        path=p,
        teacher=_model_folder(raw["teacher"], "teacher", where) if task is None else "",
        student=_model_folder(raw["student"], "student", where) if task is None else "",
        train_dataset=raw["train_dataset"],
        eval_dataset=raw["eval_dataset"],
        metric=_metric(raw["metric"], where),
        methods=methods,
        baseline=str(raw["baseline"]),
        common=_common(raw["common"], where),
        seeds=_seeds(raw.get("seeds", 3), where),
        eval_temperatures=_numbers(
            raw.get("eval_temperatures", [0, 1]), "eval_temperatures", where, positive=False
        ),
        lr_grid=_numbers(raw["lr_grid"], "lr_grid", where, positive=True) if raw.get("lr_grid") else None,
        validation_fraction=float(fraction),
        train_split=str(raw.get("train_split", "train")),
        eval_split=str(raw.get("eval_split", "test")),
        eval_max_samples=cap,
        output_dir=raw.get("output_dir"),
        task=task.task if task is not None else None,
        task_settings=task,
        workspace=raw.get("workspace"),
    )


def _task_workspace(sf: StudyFile, out: Path, say: Callable[[str], None]) -> tuple[StudyFile, dict[str, Any]]:
    """The study file with its task's workspace (made or reused) as teacher, student and data, and what results.json
    records of it: the folder and the teacher's and start's scores (the task's own evaluation)."""
    from gkd.experiments.study import build_workspace

    root = Path(sf.workspace) if sf.workspace else out / "workspace"
    ws = build_workspace(root, sf.task_settings, say)
    filled = dataclasses.replace(
        sf,
        teacher=str(ws.teacher_dir),
        student=str(ws.start_dir),
        train_dataset=str(ws.train_path),
        eval_dataset=str(ws.test_path),
    )
    info = {"task": sf.task, "root": str(root), "teacher": ws.teacher_scores, "start": ws.start_scores}
    return filled, info


def headline_metric(metric: str) -> str:
    """The score a study compares: the metric itself, or a task name's headline metric."""
    from gkd.scoring import names

    if metric in names("task"):
        from gkd.tasks import get_task

        return get_task(metric).metric
    return metric


# ---------------------------------------------------------------------------------------------------------------
# data: the user's records as JSONL files named by their content (new data -> new runs)
# ---------------------------------------------------------------------------------------------------------------
def _write_records(folder: Path, stem: str, records: list[dict]) -> Path:
    from gkd.io import write_jsonl

    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
    path = folder / f"{stem}-{hashlib.sha256(text.encode()).hexdigest()[:12]}.jsonl"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        write_jsonl(path, records)
    return path


def _data_files(sf: StudyFile, out: Path) -> dict[str, Path]:
    """``train``, ``eval`` (and with ``lr_grid``, ``validation``: the last ``validation_fraction`` of the training
    records, which the reported runs then never train on) as JSONL under ``OUT/data``."""
    from gkd.data import load_records
    from gkd.scoring import check_records, names

    train, _ = load_records(sf.train_dataset, sf.train_split, split_key="train_split")
    evals, _ = load_records(sf.eval_dataset, sf.eval_split, split_key="eval_split")
    evals = evals[: sf.eval_max_samples] if sf.eval_max_samples else evals
    if not train or not evals:
        which = "train_dataset" if not train else "eval_dataset"
        raise DataError(f"{which} '{getattr(sf, which)}' has no records")
    if sf.metric in names():
        try:
            check_records(sf.metric, evals, key="metric")
        except DataError as e:
            raise DataError(f"eval_dataset '{sf.eval_dataset}': {e}") from None
    files = {"eval": _write_records(out / "data", "eval", evals)}
    if sf.lr_grid:
        n_val = max(1, int(len(train) * sf.validation_fraction))
        if n_val >= len(train):
            raise DataError(f"train_dataset has {len(train)} records: too few to hold out a validation split")
        files["validation"] = _write_records(out / "data", "validation", train[-n_val:])
        train = train[:-n_val]
    files["train"] = _write_records(out / "data", "train", train)
    return files


# ---------------------------------------------------------------------------------------------------------------
# jobs, the learning-rate choice, the study
# ---------------------------------------------------------------------------------------------------------------
def _run_config(sf: StudyFile, recipe: Recipe, seed: int, out: Path, lr: float | None) -> dict[str, Any]:
    """A run's config: the preset, the study's defaults, ``common``, the method's keys; then seed and folder."""
    steps = sf.common["max_steps"]
    defaults = {
        "overwrite_output_dir": True,  # an unfinished run starts again from the shared start
        "save_steps": 0,
        "save_total_limit": 1,
        "logging_steps": max(1, steps // 5),
        "progress": False,
    }
    from gkd.config import GKDConfig

    cfg = {**recipe.preset_config(), **defaults, **sf.common, **recipe.config}
    if lr is not None and "learning_rate" not in recipe.config:
        cfg["learning_rate"] = lr
    # always explicit, as a number: a result names its run by (method, seed, learning rate)
    cfg["learning_rate"] = float(cfg.get("learning_rate", GKDConfig.learning_rate))
    return {**cfg, "seed": seed, "output_dir": str(out)}


def study_jobs(
    sf: StudyFile,
    out: Path,
    files: Mapping[str, Path],
    seeds: list[int],
    lrs: Mapping[str, float] | None = None,
    *,
    test: str = "eval",
    folder: str = "runs",
) -> list[Job]:
    """One :class:`Job` per (seed, method), seed-major, every config checked before anything trains."""
    jobs = []
    for seed in seeds:
        for name, recipe in sf.methods.items():
            lr = (lrs or {}).get(name)
            sub = f"{name}-lr{lr:g}" if folder != "runs" and lr is not None else name
            run_dir = out / folder / f"seed{seed}" / sub
            cfg = _checked(
                _run_config(sf, recipe, seed, run_dir, lr), f"study file '{sf.path}': method '{name}'"
            )
            jobs.append(
                Job(
                    name=name,
                    seed=seed,
                    config=cfg,
                    start=sf.student,
                    teacher=sf.teacher,
                    train=str(files["train"]),
                    test=str(files[test]),
                    eval_temperatures=tuple(sf.eval_temperatures),
                    metric=sf.metric,
                    cost=job_cost(cfg),
                )
            )
    return jobs


def _choose_learning_rates(
    sf: StudyFile, out: Path, files: Mapping[str, Path], run: Callable[..., list[dict[str, Any]]], say: Any
) -> dict[str, dict[str, Any]]:
    """Each method's learning rate from ``lr_grid``: one run per (method, rate) at seed ``SELECT_SEED`` scored on
    the validation split (mean of the headline over the evaluation temperatures); the best rate, ties to the lower.
    A method whose own keys set ``learning_rate`` keeps it."""
    grid = sf.lr_grid or []
    jobs = [
        job
        for lr in grid
        for job in study_jobs(
            sf, out, files, [SELECT_SEED], {n: lr for n in sf.methods}, test="validation", folder="lr_select"
        )
        if "learning_rate" not in sf.methods[job.name].config
    ]
    say(f"learning rates: {len(jobs)} runs on {files['validation'].name} (held out of the training data) ...")
    results = run(jobs, "lr choice", out / "lr_select.jsonl")
    metric = headline_metric(sf.metric)
    chosen: dict[str, dict[str, Any]] = {}
    for job, r in zip(jobs, results):
        score = sum(mode[metric] for mode in r["scores"].values()) / len(r["scores"])
        chosen.setdefault(job.name, {"lr": None, "scores": {}})["scores"][
            f"{job.config['learning_rate']:g}"
        ] = score
    for entry in chosen.values():
        entry["lr"] = float(max(entry["scores"], key=lambda lr: (entry["scores"][lr], -float(lr))))
    for name, recipe in sf.methods.items():
        if "learning_rate" in recipe.config:
            chosen[name] = {"lr": float(recipe.config["learning_rate"]), "scores": {}, "fixed": True}
    say("learning rates chosen on validation: " + ", ".join(f"{n} {chosen[n]['lr']:g}" for n in sf.methods))
    return chosen


def run_study_file(
    path: str | Path,
    output_dir: str | Path | None = None,
    *,
    workers: int | None = None,
    after_result: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run the study file at ``path`` (``gkd study``): every method × seed, resumable, then results.json, report.md
    and results.png in the output folder. Returns the summary written to results.json.

    ``after_result`` is called with each finished run's result once it is on disk (what a test uses to stop a study
    part-way, as a kill would). A restarted study keeps the finished runs whose settings, data and checkpoints are
    unchanged (``results.jsonl``) and runs only the others."""
    import torch

    from gkd.experiments.userreport import summarize, write_outputs

    sf = load_study_file(path)
    out = Path(output_dir or sf.output_dir or Path("runs") / f"study-{sf.path.stem}")
    out.mkdir(parents=True, exist_ok=True)
    con = StudyConsole()
    say = con.say
    workers = workers or min(2, os.cpu_count() or 1)
    if workers < 1:
        raise ConfigError(f"--workers must be a positive number, got {workers}")
    torch.set_num_threads(1)  # (runs train in worker processes, or here with one thread as a worker would)
    t0 = time.perf_counter()
    workspace = None
    if sf.task is not None:
        sf, workspace = _task_workspace(sf, out, say)
    files = _data_files(sf, out)
    metric = headline_metric(sf.metric)

    def run(jobs: list[Job], label: str, log: Path) -> list[dict[str, Any]]:
        return run_logged(jobs, metric, label, log, workers, say, con.console, after_result)

    lr_choice = _choose_learning_rates(sf, out, files, run, say) if sf.lr_grid else {}
    jobs = study_jobs(sf, out, files, sf.seeds, {n: e["lr"] for n, e in lr_choice.items()})
    say(
        f"study: {len(sf.methods)} methods × {len(sf.seeds)} seeds = {len(jobs)} runs of "
        f"{sf.common['max_steps']} steps from {sf.student}, {workers} worker(s); output in {out}"
    )
    results = run(jobs, "study", out / "results.jsonl")
    summary = summarize(sf, results, lr_choice, files)
    if workspace is not None:
        summary["workspace"] = workspace
    summary["wall_s"] = time.perf_counter() - t0
    write_outputs(summary, out)
    say(f"wrote {out / 'results.json'}, {out / 'report.md'} and {out / 'results.png'}")
    return summary
