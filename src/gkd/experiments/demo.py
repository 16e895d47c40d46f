"""``gkd demo``: on-policy data against the same divergence on a fixed dataset, end to end, in minutes on 2 CPU cores.

The question is the GKD paper's central one: does training on the student's **own** samples (λ = 1) beat training on
a fixed dataset (λ = 0) *at the same divergence*? A gain is credited to on-policy data only when the divergence is
held fixed; the demo also reports the divergence's own effect at fixed λ, so the two knobs are never mixed up.

The task is the built-in ``summarization`` task (list the salient items of the input, in any order), in the regime
where the paper's argument says on-policy data matters: **the fixed dataset comes from another policy than the one
the student will follow.** Its completions list the items in the order of the input (``target_order: prompt``, as a
person copying them out writes them), while the teacher (the one gkd ships, trained on every order) spreads its
probability over every item not listed yet. Distilled on the dataset's prefixes (λ = 0), the student matches the
teacher only where the items listed so far follow the input's order, and there "the items not listed yet" are simply
"the salient items to the right of the last one listed": a shortcut, easier than the real rule, that the data never
contradicts. Sampling its own outputs, the distilled student soon lists an item out of order, a prefix the dataset
never shows, and the shortcut then forgets the items to its left. On its own samples (λ = 1) the student meets exactly
those prefixes, with the teacher's answer there. ``gkd diagnose`` measures the shift (RESULTS.md section 0).

On the same task with randomly ordered data (the fixed data then come from the teacher's own policy), λ does not
matter and the divergence carries the whole gain: RESULTS.md sections 3 and 10 are that counter-example.

Pipeline (everything from the same seeds is reproducible):
1. data: 100,000 training, 500 validation and 1,000 test prompts from the task generator (disjoint splits);
   training completions in the input's order;
2. teacher: the 2-layer d64 Llama that gkd ships (trained on randomly ordered completions by
   ``gkd demo --train-teacher``), or trained now with ``--retrain-teacher``;
3. the student's start: a 1-layer d24 Llama, SFT on the dataset (cosine), clearly below the teacher;
4. per method, its learning rate chosen from a grid on the validation prompts (one run per rate, seed 1000; never the
   test set); then per seed, from that same start with equal step budgets and a linear decay to 0: continued SFT,
   forward KL and reverse KL each at λ = 0 (the fixed dataset) and λ = 1 (the student's own samples);
5. evaluation on the held-out prompts, greedy and one sample at temperature 1; paired per-seed differences with
   t-based 95 % intervals for each one-knob comparison.
Runs are spread over worker processes with one torch thread each (tiny models are bound by per-op overhead).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from gkd.errors import GKDError
from gkd.experiments.common import ASSET_TEACHER
from gkd.experiments.study import (
    TINY_MODEL,
    StudyConsole,
    StudySettings,
    build_workspace,
    excludes_zero,
    fmt_ci,
    mean_se,
    named_recipes,
    paired_ci,
    run_study,
)

__all__ = ["COMPARISONS", "DEMO_METHODS", "demo_settings", "run_demo", "train_demo_teacher"]

# The demo's methods, in report order: named recipes of configs/experiments/recipes.yaml (a preset plus overrides).
DEMO_METHODS: tuple[str, ...] = (
    "sft",
    "supervised_kd",  # forward KL, λ = 0
    "gkd_forward_kl",  # forward KL, λ = 1
    "offpolicy_reverse_kl",  # reverse KL, λ = 0
    "gkd_reverse_kl",  # reverse KL, λ = 1
)

# Every comparison changes one knob: (name, knob, method, control). The first is the headline.
COMPARISONS: tuple[tuple[str, str, str, str], ...] = (
    ("on-policy vs fixed data, reverse KL", "λ", "gkd_reverse_kl", "offpolicy_reverse_kl"),
    ("on-policy vs fixed data, forward KL", "λ", "gkd_forward_kl", "supervised_kd"),
    ("reverse vs forward KL, fixed data", "divergence", "offpolicy_reverse_kl", "supervised_kd"),
    ("reverse vs forward KL, on-policy", "divergence", "gkd_reverse_kl", "gkd_forward_kl"),
    ("on-policy reverse KL vs continued SFT", "method", "gkd_reverse_kl", "sft"),
)


# sampled evaluations besides greedy: a mode-seeking student sampled at T=1 behaves like a softer one at lower T, so
# every comparison is also made at matched temperatures
TEMPERATURES: tuple[float, ...] = (0.3, 0.5, 0.7, 1.0)


def _mode(t: float) -> str:
    return "sample" if t == 1.0 else f"sample_{t:g}"


def demo_settings(quick: bool = False) -> StudySettings:
    """The demo's sizes (see the module docstring); ``quick`` is a seconds-long run for tests (no conclusion)."""
    common = {
        "task": "summarization",
        "task_params": {"target_order": "prompt"},  # the fixed dataset: items in the input's order
        "teacher_task_params": {"target_order": "random"},  # the teacher's own data: every order
    }
    if not quick:
        return StudySettings(**common, shipped_teacher=str(ASSET_TEACHER), lr_grid=[3e-4, 1e-3, 3e-3])
    return StudySettings(
        **common,
        seeds=2,
        n_train=1000,
        n_test=48,
        n_validation=24,
        teacher_steps=20,
        start_steps=10,
        method_steps=3,
        batch_size=8,
        teacher={**TINY_MODEL, "hidden_size": 32},
        student=dict(TINY_MODEL),
        lr_grid=[1e-3, 3e-3],
    )


def run_demo(
    output_dir: Path = Path("runs/demo"),
    *,
    quick: bool = False,
    seeds: int | None = None,
    workers: int | None = None,
    settings: StudySettings | None = None,
    retrain_teacher: bool = False,
) -> dict[str, Any]:
    """Run the demo and write ``results.json``, ``results.png`` and ``REPORT.md`` to ``output_dir``."""
    s = settings or demo_settings(quick)
    if seeds is not None:
        s = replace(s, seeds=seeds)
    workers = workers or (1 if quick else min(2, os.cpu_count() or 1))
    out = Path(output_dir)
    con = StudyConsole()
    say = con.say
    t_begin = time.perf_counter()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    ws = build_workspace(out, s, say, retrain_teacher=retrain_teacher)
    metric = ws.task.metric
    for who, sc in (("teacher", ws.teacher_scores), ("start", ws.start_scores)):
        say(f"{who}: {metric} greedy {sc['greedy'][metric]:.1f}, T=1 sample {sc['sample'][metric]:.1f}")

    recipes = named_recipes()
    n_runs = len(DEMO_METHODS) * s.seeds
    say(
        f"methods: {len(DEMO_METHODS)} methods × {s.seeds} seeds = {n_runs} runs of {s.method_steps} steps, all from "
        f"the same start, on {workers} worker process(es)"
    )
    results = run_study(
        ws,
        s,
        {name: recipes[name] for name in DEMO_METHODS},
        workers=workers,
        say=say,
        console=con.console,
        label="demo",
        eval_temperatures=TEMPERATURES,
    )
    say("mechanism: gkd diagnose on the start and on each method's seed-0 student ...")
    mechanism = measure_mechanism(ws, s, quick)
    summary = summarize(
        ws.task, s, results, ws.teacher_scores, ws.start_scores, time.perf_counter() - t_begin, quick=quick
    )
    summary["mechanism"] = mechanism
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    plot_results(summary, out / "results.png")
    (out / "REPORT.md").write_text(report_markdown(summary))
    print()
    print(table_text(summary))
    print(
        f"\nwrote {out / 'results.json'}, {out / 'results.png'}, {out / 'REPORT.md'} ({summary['wall_s']:.0f}s in all)"
    )
    return summary


def measure_mechanism(ws: Any, s: StudySettings, quick: bool = False) -> dict[str, Any]:
    """What on-policy data changes, measured with :func:`gkd.diagnose.diagnose` on the start and on each method's
    seed-0 student (300 test prompts, T=1 samples): the student's error mass (its probability of tokens the
    teacher gives < 5 %) on the dataset's prefixes, on its own prefixes up to its first off-track token, and on the
    teacher's samples, and the diagnose reading."""
    from gkd.diagnose import diagnose
    from gkd.experiments.common import read_jsonl
    from gkd.models import load_model

    teacher = load_model(str(ws.teacher_dir), what="teacher")
    records = read_jsonl(ws.test_path)[: 24 if quick else 300]
    out: dict[str, Any] = {}
    for name in ("start", *DEMO_METHODS):
        path = ws.start_dir if name == "start" else ws.root / "runs" / "demo" / "seed0" / name
        student = load_model(str(path), what="student")
        r = diagnose(
            teacher,
            student,
            ws.tokenizer,
            records,
            num_prompts=len(records),
            max_new_tokens=s.max_new_tokens,
            batch_size=100,
        )
        div = r["divergence"]
        out[name] = {
            "error_mass_dataset": div["dataset"]["error_mass"],
            "error_mass_own_on_track": div["student"]["error_mass_on_track"],
            "error_mass_teacher_prefixes": div["teacher"]["error_mass"],
            "off_track_rate": r["off_track"]["sequence_rate"],
            "reading": r["reading"]["verdict"],
        }
    return out


def train_demo_teacher(output_dir: Path = Path("runs/demo-teacher")) -> Path:
    """Train the demo's teacher from scratch with the demo's settings and write it to the shipped-asset folder.

    For maintainers working in a source checkout (``gkd demo --train-teacher``): it rewrites the teacher gkd ships,
    ``gkd/assets/demo_teacher`` inside the package, and refuses before training when that folder is not writable.
    Users retrain the teacher of their own demo folder with ``gkd demo --retrain-teacher``.
    """
    _check_writable(ASSET_TEACHER)
    s = replace(demo_settings(False), shipped_teacher=None)
    con = StudyConsole()
    ws = build_workspace(output_dir, s, con.say, retrain_teacher=True)
    from gkd.models import load_model

    teacher = load_model(str(ws.teacher_dir), what="teacher")
    ASSET_TEACHER.mkdir(parents=True, exist_ok=True)
    teacher.save_pretrained(ASSET_TEACHER)
    (ASSET_TEACHER / "TRAINING.md").write_text(
        "# The demo's teacher\n\nTrained by `gkd demo --train-teacher` (gkd's own SFT): "
        f"{s.teacher_steps} steps, lr {s.teacher_lr} cosine, batch {s.batch_size}, seed 1234, on "
        f"{s.n_train} generated `{s.task}` training records with task parameters "
        f"{json.dumps({**s.task_params, **(s.teacher_task_params or {})})} (data seed 0).\n"
        f"Held-out scores: {json.dumps(ws.teacher_scores)}\n"
    )
    con.say(f"teacher written to {ASSET_TEACHER}")
    return ASSET_TEACHER


def _check_writable(folder: Path) -> None:
    """Refuse (one line) when ``folder``, or the folder it would be created in, cannot be written."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    files = [p for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []
    if (
        not existing.is_dir()
        or not os.access(existing, os.W_OK | os.X_OK)
        or not all(os.access(p, os.W_OK) for p in files)
    ):
        raise GKDError(
            f"--train-teacher rewrites the teacher gkd ships, but '{folder}' is not writable; it is for maintainers "
            "in a source checkout (use --retrain-teacher to retrain the teacher of your own demo folder)"
        )


# ---------------------------------------------------------------------------------------------------------------
# summarising
# ---------------------------------------------------------------------------------------------------------------
_RECIPE_KEYS = ("divergence", "beta", "lmbda", "temperature", "reduction")


def summarize(
    task: Any,
    s: StudySettings,
    results: list[dict[str, Any]],
    teacher: dict,
    start: dict,
    wall: float,
    *,
    quick: bool = False,
) -> dict[str, Any]:
    """The demo's ``results.json``: per method its recipe (divergence, β, λ, learning rate and how it was chosen)
    beside its per-seed scores, then every one-knob comparison as a paired t-interval, then the verdict."""
    from gkd.config import config_from_dict

    metric = task.metric
    recipes = named_recipes()
    methods: dict[str, Any] = {}
    for name in DEMO_METHODS:
        rows = sorted((r for r in results if r["name"] == name), key=lambda r: r["seed"])
        cfg = config_from_dict({**recipes[name].preset_config(), **recipes[name].config})
        entry: dict[str, Any] = {
            "recipe": {
                "preset": recipes[name].preset,
                **{k: getattr(cfg, k) for k in _RECIPE_KEYS},
                "learning_rate": rows[0]["lr"],
                "lr_selection": rows[0].get("lr_selection"),
                "schedule": "linear warm-up, then linear decay to 0",
            },
            "steps": rows[0]["steps"],
            "wall_s": sum(r["train_s"] for r in rows) / len(rows),
            # tokens per run, mean over seeds (gkd.experiments.cost); None for results logged before runs recorded it
            "cost": {k: sum(r["cost"][k] for r in rows) / len(rows) for k in rows[0]["cost"]}
            if all(r.get("cost") for r in rows)
            else None,
        }
        for mode in ("greedy", "sample"):
            vals = [r["scores"][mode][metric] for r in rows]
            m, se = mean_se(vals)
            entry[mode] = {"mean": m, "se": se, "seeds": vals}
        entry["by_temperature"] = {
            f"{t:g}": mean_se([r["scores"][_mode(t)][metric] for r in rows]) for t in TEMPERATURES
        }
        entry["temperature_seeds"] = {
            f"{t:g}": [r["scores"][_mode(t)][metric] for r in rows] for t in TEMPERATURES
        }
        entry["secondary"] = {
            mode: {k: mean_se([r["scores"][mode][k] for r in rows])[0] for k in rows[0]["scores"][mode]}
            for mode in ("greedy", "sample")
        }
        methods[name] = entry
    comparisons = []
    for label, knob, a, b in COMPARISONS:
        comp: dict[str, Any] = {"name": label, "knob": knob, "method": a, "control": b}
        for mode in ("greedy", "sample"):
            comp[mode] = paired_ci(methods[a][mode]["seeds"], methods[b][mode]["seeds"])
        comp["by_temperature"] = {
            t: paired_ci(methods[a]["temperature_seeds"][t], methods[b]["temperature_seeds"][t])
            for t in methods[a]["temperature_seeds"]
        }
        comparisons.append(comp)
    head = comparisons[0]
    holds = excludes_zero(head["sample"]) and head["sample"]["mean"] > 0 and head["greedy"]["hi"] >= 0
    return {
        "task": s.task,
        "task_params": s.task_params,
        "metric": metric,
        "teacher": teacher["greedy"][metric],
        "start": start["greedy"][metric],
        "teacher_sample": teacher["sample"][metric],
        "start_sample": start["sample"][metric],
        "teacher_scores": teacher,
        "start_scores": start,
        "methods": methods,
        "comparisons": comparisons,
        "finding": {
            "claim": f"{head['method']} beats {head['control']} (the same divergence on the fixed dataset) on T=1 "
            "samples with a 95 % interval above 0, and is not worse greedily",
            "holds": bool(holds) and not quick,
            "smoke_run": quick,
        },
        "seeds": list(range(s.seeds)),
        "settings": asdict(s),
        "wall_s": wall,
    }


def _verdict(summary: dict[str, Any]) -> str:
    f = summary["finding"]
    if f["smoke_run"]:
        return "smoke run (--quick): no conclusion"
    return "HOLDS" if f["holds"] else "DOES NOT HOLD"


def _knob_lines(summary: dict[str, Any]) -> list[str]:
    """One line per comparison: which knob changed, the paired Δ with its 95 % interval, and what it supports."""
    lines = []
    for c in summary["comparisons"]:
        parts = []
        for mode, label in (("sample", "T=1"), ("greedy", "greedy")):
            ci = c[mode]
            sig = "interval excludes 0" if excludes_zero(ci) else "interval includes 0"
            parts.append(f"{label} {fmt_ci(ci)} ({sig}, p={ci['p']:.3g})")
        lines.append(f"{c['name']} [knob: {c['knob']}]: " + "; ".join(parts))
    return lines


def table_text(summary: dict[str, Any]) -> str:
    m = summary["metric"]
    n = len(summary["seeds"])
    lines = [
        f"{summary['task']} (fixed data in the input's order): {m} (%) on held-out prompts, mean ± SE over {n} seeds",
        f"teacher: greedy {summary['teacher']:.1f}, T=1 {summary['teacher_sample']:.1f}   "
        f"start: greedy {summary['start']:.1f}, T=1 {summary['start_sample']:.1f}",
        "",
        f"{'method':<22} {'divergence':<11} {'λ':>4} {'lr':>7} {'steps':>5} {'greedy':>12} {'T=1 sample':>12} {'s/run':>6}",
    ]
    for name, e in summary["methods"].items():
        r = e["recipe"]
        lines.append(
            f"{name:<22} {r['divergence']:<11} {r['lmbda']:>4g} {r['learning_rate']:>7.0e} {e['steps']:>5} "
            f"{e['greedy']['mean']:>6.1f} ± {e['greedy']['se']:<3.1f} {e['sample']['mean']:>6.1f} ± "
            f"{e['sample']['se']:<3.1f} {e['wall_s']:>6.1f}"
        )
    lines += [
        "",
        f"paired Δ (method − control), mean ± SE [95 % t-interval, {n - 1} dof]:",
        *_knob_lines(summary),
    ]
    lines += ["", f"finding ({summary['finding']['claim']}): {_verdict(summary)}"]
    return "\n".join(lines)


def report_markdown(summary: dict[str, Any]) -> str:
    """REPORT.md: the setting, the methods, the paired comparisons, the finding, matched temperatures, the mechanism."""
    s = summary["settings"]
    m = summary["metric"]
    n = len(summary["seeds"])
    rows = _method_table(summary)
    comp = _comparison_table(summary)
    per_t, matched = _temperature_tables(summary)
    verdict = _verdict(summary)
    mech = _mechanism_table(summary)
    return "\n".join(
        [
            "# gkd demo report",
            "",
            f"Task `{summary['task']}` with parameters {json.dumps(summary['task_params'])} (headline metric `{m}`, in "
            f"%), {n} seeds, {s['n_test']} held-out prompts, greedy decoding and one sample per prompt at temperature 1.",
            f"Teacher: greedy {summary['teacher']:.1f}, T=1 {summary['teacher_sample']:.1f}. "
            f"Starting student (shared by every run): greedy {summary['start']:.1f}, T=1 {summary['start_sample']:.1f}.",
            f"Every method starts from the same student and trains {s['method_steps']} steps at batch {s['batch_size']}, "
            "linear warm-up then linear decay to 0, at the learning rate chosen for it on "
            f"{s['n_validation']} validation prompts (grid {s['lr_grid']}; the mean of greedy and T=1 `{m}`; one run "
            "per rate, seed 1000; never the test set).",
            "Values are mean ± standard error over seeds.",
            "",
            *rows,
            "",
            f"Paired per-seed differences (method − control), mean ± SE and the t-based 95 % interval ({n - 1} degrees "
            "of freedom); each comparison changes one knob.",
            "",
            *comp,
            "",
            f"Finding — {summary['finding']['claim']}: **{verdict}**.",
            "",
            "At matched sampling temperatures (a mode-seeking student sampled at T=1 behaves like a softer one at "
            "lower T, so each comparison is also made at every temperature; the same sample seeds at each):",
            "",
            *per_t,
            "",
            *matched,
            "",
            "The mechanism (`gkd diagnose` on the start and each method's seed-0 student, 300 test prompts): the "
            "student's *error mass* is its probability of tokens the teacher gives less than 5 %, i.e. its chance to "
            "go off-track at a prefix. On the dataset's prefixes (items in the input's order) against its own prefixes "
            "up to its first mistake and the teacher's samples (other orders):",
            "",
            *mech,
            "",
            f"Total wall time: {summary['wall_s']:.0f} s. Re-run: `gkd demo` (or `make demo`).",
            "",
        ]
    )


def _method_table(summary: dict[str, Any]) -> list[str]:
    """One row per method: its recipe, the learning rate chosen on validation, its scores and time."""
    rows = [
        "| method | divergence | λ | lr (chosen on validation) | greedy | T=1 sample | item F1 (T=1) | s/run "
        "| tokens/run: rollout, student, teacher |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in summary["methods"].items():
        r = e["recipe"]
        sel = r.get("lr_selection") or {}
        grid = ", ".join(f"{k}: {v:.1f}" for k, v in sel.items())
        f1 = e["secondary"]["sample"].get("item_f1", float("nan"))
        c = e.get("cost")
        tokens = (
            f"{c['rollout_tokens'] / 1e3:.0f}k, {c['student_tokens'] / 1e3:.0f}k, {c['teacher_tokens'] / 1e3:.0f}k"
            if c
            else "-"
        )
        rows.append(
            f"| {name} | {r['divergence']} | {r['lmbda']:g} | {r['learning_rate']:g}{f' ({grid})' if grid else ''} | "
            f"{e['greedy']['mean']:.1f} ± {e['greedy']['se']:.1f} | {e['sample']['mean']:.1f} ± {e['sample']['se']:.1f} | "
            f"{f1:.1f} | {e['wall_s']:.1f} | {tokens} |"
        )
    return rows


def _comparison_table(summary: dict[str, Any]) -> list[str]:
    """One row per comparison: the paired difference, its 95 % interval and p, at T=1 and greedily."""
    comp = [
        "| comparison | knob | Δ T=1 sample [95 % CI] | p | Δ greedy [95 % CI] | p |",
        "|---|---|---|---|---|---|",
    ]
    for c in summary["comparisons"]:
        comp.append(
            f"| {c['name']} (`{c['method']}` − `{c['control']}`) | {c['knob']} | {fmt_ci(c['sample'])} | "
            f"{c['sample']['p']:.3g} | {fmt_ci(c['greedy'])} | {c['greedy']['p']:.3g} |"
        )
    return comp


def _temperature_tables(summary: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Each method's score at every sampling temperature, and each comparison's difference at matched temperatures."""
    temps = list(next(iter(summary["methods"].values()))["by_temperature"])
    matched = [
        "| comparison | " + " | ".join(f"Δ at T={t} [95 % CI]" for t in temps) + " |",
        "|---|" + "---|" * len(temps),
    ]
    for c in summary["comparisons"]:
        matched.append(f"| {c['name']} | " + " | ".join(fmt_ci(c["by_temperature"][t]) for t in temps) + " |")
    per_t = [
        "| method | " + " | ".join(f"T={t}" for t in temps) + " | best T |",
        "|---|" + "---|" * (len(temps) + 1),
    ]
    for name, e in summary["methods"].items():
        bt = e["by_temperature"]
        best = max(bt, key=lambda t: bt[t][0])
        per_t.append(
            f"| {name} | " + " | ".join(f"{bt[t][0]:.1f} ± {bt[t][1]:.1f}" for t in temps) + f" | {best} |"
        )
    return per_t, matched


def _mechanism_table(summary: dict[str, Any]) -> list[str]:
    """One row per diagnosed student: its error mass on each kind of prefix, its off-track rate, the reading."""
    mech = [
        "| student | error mass: dataset prefixes | its own on-track prefixes | the teacher's samples | samples off-track | diagnose reading |",
        "|---|---|---|---|---|---|",
    ]
    for name, e in (summary.get("mechanism") or {}).items():
        mech.append(
            f"| {name} | {100 * e['error_mass_dataset']:.1f} % | {100 * e['error_mass_own_on_track']:.1f} % | "
            f"{100 * e['error_mass_teacher_prefixes']:.1f} % | {e['off_track_rate']:.1f} % | {e['reading']} |"
        )
    return mech


def plot_results(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["methods"])
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.4
    for k, (mode, label) in enumerate((("greedy", "greedy"), ("sample", "T=1 sample"))):
        means = [summary["methods"][n][mode]["mean"] for n in names]
        ses = [summary["methods"][n][mode]["se"] for n in names]
        ax.bar([i + (k - 0.5) * width for i in x], means, width, yerr=ses, capsize=3, label=label)
    ax.axhline(summary["teacher_sample"], color="k", ls="--", lw=1, label="teacher (T=1)")
    ax.axhline(summary["start_sample"], color="gray", ls=":", lw=1, label="start (T=1)")
    ax.set_xticks(list(x))
    ax.set_xticklabels(
        [
            f"{n}\n{e['recipe']['divergence']}, λ={e['recipe']['lmbda']:g}"
            for n, e in summary["methods"].items()
        ],
        fontsize=8,
    )
    ax.set_ylabel(f"{summary['metric']} (%)")
    ax.set_title(
        f"gkd demo: {summary['task']}, fixed data in the input's order, mean ± SE over {len(summary['seeds'])} seeds"
    )
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
