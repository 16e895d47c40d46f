"""The paper's experiment families at toy scale: ``gkd experiment NAME`` (``gkd.experiments.EXPERIMENTS``).

Each family is a YAML file in ``configs/experiments/`` (packaged as ``gkd/configs/experiments``):

    settings:   StudySettings overrides (task, sizes, budgets, seeds)
    workspace:  folder of the data / teacher / starting student to use or create (shared with the demo when equal)
    runs:       name -> {preset: NAME | recipe: NAME, config: {...}, study: {...}} (see gkd.experiments.study)
    variants:   optional extra workspaces (e.g. a larger student) with their own settings and runs
    eval:       {temperatures: [...], samples: N}

Every family writes ``results.json``, ``results.png`` and ``report.md`` to its output folder. The numbers in the
repository's RESULTS.md come from these files. This module holds the families' settings, reports and plots; running
them is :func:`gkd.experiments.study.run_study`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from gkd.errors import ConfigError
from gkd.experiments.common import ASSET_TEACHER
from gkd.experiments.study import (
    CONFIG_DIR,
    TINY_MODEL,
    Recipe,
    StudyConsole,
    StudySettings,
    build_workspace,
    excludes_zero,
    fmt_ci,
    mean_se,
    named_recipes,
    paired,
    paired_ci,
    parse_runs,
    run_study,
)

__all__ = ["cost_section", "family_path", "is_study_file", "load_family", "run", "run_study_family"]

_SECTIONS = ("settings", "workspace", "runs", "variants", "eval", "workspace_of")


def family_path(name: str | Path) -> Path:
    """A packaged family's YAML (``configs/experiments/NAME.yaml``), or ``name`` itself when it is a ``.yaml`` path
    (an investigation's own family file, e.g. the repository's ``experiments/translation_lambda.yaml``)."""
    if str(name).endswith((".yaml", ".yml")):
        return Path(name)
    return CONFIG_DIR / f"{name}.yaml"


def is_study_file(name: str | Path) -> bool:
    """Whether family ``name`` is a study file (``gkd study``'s format: ``methods:``, a built-in ``task:``), which
    :func:`run_study_family` runs through the same code as ``gkd study``, rather than a family file (``runs:``)."""
    from gkd.config import read_yaml

    path = family_path(name)
    return path.exists() and "methods" in read_yaml(path)


def run_study_family(
    name: str, *, output_dir: Path, quick: bool = False, workers: int | None = None
) -> dict[str, Any]:
    """``gkd experiment NAME`` for a family that is a study file: ``gkd study`` on the packaged file (its built-in
    task's workspace, jobs, resume and the generic report). ``quick`` runs it with tiny models and a few steps in
    ``output_dir``. The file that runs is a copy in ``output_dir`` (``NAME.yaml``, with ``--quick``'s settings)."""
    from gkd.config import read_yaml
    from gkd.experiments.userstudy import run_study_file

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = family_path(name)
    spec = read_yaml(path)
    if quick:
        spec = _quick_study(spec, out)
    spec["output_dir"] = str(out)
    target = out / f"{name}.yaml"
    target.write_text(json.dumps(spec, indent=2) + "\n")  # JSON is YAML: the file as it runs
    summary = run_study_file(target, out, workers=workers or (1 if quick else None))
    if quick:  # tiny models and a few steps: the numbers exercise the code, they support no finding
        report = out / "report.md"
        report.write_text(
            "> smoke run (--quick): tiny models, a few steps; no conclusion\n\n" + report.read_text()
        )
    return summary


def _quick_study(spec: dict[str, Any], out: Path) -> dict[str, Any]:
    """A study file's smoke-run form: the families' tiny ``--quick`` settings, a workspace of its own in ``out``."""
    tiny = _settings({**spec.get("task_settings", {}), "task": spec["task"]}, True, "quick")
    keep = (
        "n_train",
        "n_test",
        "teacher_steps",
        "start_steps",
        "batch_size",
        "teacher",
        "student",
        "n_validation",
    )
    settings = {
        **spec.get("task_settings", {}),
        **{k: getattr(tiny, k) for k in keep},
        "shipped_teacher": None,
    }
    common = {
        **spec["common"],
        "max_steps": tiny.method_steps,
        "per_device_train_batch_size": tiny.batch_size,
    }
    common["warmup_steps"] = 0
    quick = {
        **spec,
        "task_settings": settings,
        "workspace": str(out / "workspace"),
        "seeds": 2,
        "common": common,
    }
    if spec.get("lr_grid"):
        quick["lr_grid"] = tiny.lr_grid
    return quick


def load_family(name: str | Path) -> dict[str, Any]:
    """The family's YAML file as read (its runs are parsed by :func:`run`): a packaged family by name, or a family
    file by path. ``workspace_of: OTHER`` takes the workspace and settings of packaged family OTHER, so the two
    share its data, teacher and starting student."""
    from gkd.config import read_yaml

    path = family_path(name)
    if not path.exists():
        fix = "reinstall gkd" if path.parent == CONFIG_DIR else "check the path"
        raise ConfigError(f"experiment config '{path}' is missing; {fix}")
    spec = read_yaml(path)
    for key in spec:
        if key not in _SECTIONS:
            raise ConfigError(f"{path.name}: unknown section '{key}'; sections: {', '.join(_SECTIONS)}")
    other = spec.pop("workspace_of", None)
    if other is not None:
        if "settings" in spec or "workspace" in spec:
            raise ConfigError(
                f"{path.name}: 'workspace_of' replaces 'settings' and 'workspace'; remove those"
            )
        base = load_family(other)
        spec = {**spec, "workspace": base["workspace"], "settings": base["settings"]}
    return spec


def _settings(base: dict[str, Any], quick: bool, where: str) -> StudySettings:
    s = StudySettings.from_mapping(base, where)
    if s.shipped_teacher == "demo_teacher":  # the checkpoint gkd ships (variants inherit the resolved path)
        s = replace(s, shipped_teacher=str(ASSET_TEACHER))

    if quick:
        s = replace(
            s,
            seeds=2,
            n_train=800,
            n_test=32,
            teacher_steps=10,
            start_steps=5,
            method_steps=3,
            batch_size=8,
            teacher={**TINY_MODEL, "hidden_size": 32},
            student=dict(TINY_MODEL),
            shipped_teacher=None,
            n_validation=16,
            lr_grid=[1e-3, 3e-3] if s.lr_grid else None,
        )
    return s


def _aggregate(results: list[dict[str, Any]], names: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """name -> eval mode -> metric -> {mean, se, seeds}."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name in names:
        rows = sorted((r for r in results if r["name"] == name), key=lambda r: r["seed"])
        out[name] = {}
        for mode in rows[0]["scores"]:
            out[name][mode] = {}
            for metric in rows[0]["scores"][mode]:
                vals = [r["scores"][mode][metric] for r in rows]
                m, se = mean_se(vals)
                out[name][mode][metric] = {"mean": m, "se": se, "seeds": vals}
        out[name]["_steps"] = rows[0]["steps"]  # type: ignore[assignment]
        out[name]["_lr"] = rows[0].get("lr")  # type: ignore[assignment]
        out[name]["_lr_selection"] = rows[0].get("lr_selection")  # type: ignore[assignment]
        out[name]["_wall_s"] = sum(r["train_s"] for r in rows) / len(rows)  # type: ignore[assignment]
        # each run's cost (gkd.experiments.cost), mean over seeds; None for results logged before runs recorded it
        costs = [r.get("cost") for r in rows]
        out[name]["_cost"] = (  # type: ignore[assignment]
            {k: sum(c[k] for c in costs) / len(costs) for k in costs[0]} if all(costs) else None
        )
    return out


def cost_section(summary: dict[str, Any]) -> str:
    """The report's last section: each run's cost (mean over seeds) beside the gains above it."""
    groups = [("", summary["runs"])] + [
        (f"{vname}: ", v["runs"]) for vname, v in summary.get("variants", {}).items()
    ]
    rows = [
        f"| `{prefix}{name}` | {c['train_s']:.1f} | {c['rollout_tokens']:.0f} | {c['student_tokens']:.0f} | "
        f"{c['teacher_tokens']:.0f} |"
        for prefix, runs in groups
        for name, r in runs.items()
        if (c := r.get("_cost"))
    ]
    if not rows:
        return ""
    return "\n".join(
        [
            "",
            "## Cost per run (mean over seeds)",
            "",
            "Training time, tokens the student generated (rollouts) and tokens the student's and the teacher's forward "
            "passes processed (prompt + completion).",
            "",
            "| run | train s | rollout tokens | student tokens | teacher tokens |",
            "|---|---|---|---|---|",
            *rows,
            "",
        ]
    )


def _fmt(d: dict[str, Any]) -> str:
    return f"{d['mean']:.1f} ± {d['se']:.1f}"


def _pfmt(a: list[float], b: list[float]) -> str:
    """A paired Δ as ``mean ± SE [95 % t-interval]`` (``*`` when the interval excludes 0)."""
    ci = paired_ci(a, b)
    return fmt_ci(ci) + ("*" if excludes_zero(ci) else "")


Report = Callable[[dict[str, Any]], str]
Plot = Callable[[dict[str, Any], Path], None]


def run(
    name: str,
    *,
    output_dir: Path,
    quick: bool = False,
    workers: int | None = None,
    family_file: Path | None = None,
    report: Report | None = None,
    plot: Plot | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Run family ``name`` (and its variants) into ``output_dir``: results.json, report.md, results.png.

    A packaged family uses its packaged YAML, report and plot. An investigation outside the package (a script in
    the repository's ``experiments/``) passes its own ``family_file``, ``report``, ``plot`` and ``command`` (the
    command line its report names); the cost section is appended to every report.
    """
    spec = load_family(family_file or name)
    where = (family_file or family_path(name)).name
    recipes = named_recipes()
    runs: dict[str, Recipe] = parse_runs(spec.get("runs"), where, recipes)
    variants: dict[str, tuple[dict[str, Any], dict[str, Recipe]]] = {}
    for vname, vspec in (spec.get("variants") or {}).items():
        variants[vname] = (vspec, parse_runs(vspec.get("runs"), f"{where} variant '{vname}'", recipes))
    con = StudyConsole()
    say = con.say
    workers = workers or (1 if quick else min(2, os.cpu_count() or 1))
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    s = _settings(spec.get("settings", {}), quick, where)
    # The teacher and the start train in this process: one thread, as each worker's job does. With torch's default
    # (one per core) a family oversubscribes a shared machine: a 2,000-step teacher took 100 s with one thread and
    # more than 9 min with two while other jobs ran on the 2 cores.
    import torch

    torch.set_num_threads(1)
    root = Path(spec.get("workspace", out / "workspace")) if not quick else out / "workspace"
    ws = build_workspace(root, s, say)
    evaluation = spec.get("eval", {})
    temps = tuple(evaluation.get("temperatures", [1.0]))
    samples = int(evaluation.get("samples", 1))
    # every study of the family (and of its variants) runs with the same workers, console and evaluation
    study = partial(
        run_study,
        workers=workers,
        say=say,
        console=con.console,
        eval_temperatures=temps,
        eval_samples=samples,
    )
    results = study(ws, s, runs, label=name)
    summary: dict[str, Any] = {
        "experiment": name,
        "task": s.task,
        "metric": ws.task.metric,
        "settings": {k: v for k, v in s.__dict__.items()},
        "teacher": ws.teacher_scores,
        "start": ws.start_scores,
        "runs": _aggregate(results, list(runs)),
        "variants": {},
    }
    for vname, (vspec, vruns) in variants.items():
        summary["variants"][vname] = _run_variant(name, vname, vspec, vruns, s, quick, out, study, say)
    summary["wall_s"] = time.perf_counter() - t0
    summary["command"] = (command or f"gkd experiment {name}") + (" --quick" if quick else "")
    _write_outputs(summary, out, quick, say, report or REPORTS[name], plot or PLOTS[name])
    return summary


def _run_variant(
    name: str,
    vname: str,
    vspec: dict[str, Any],
    vruns: dict[str, Recipe],
    s: StudySettings,
    quick: bool,
    out: Path,
    study: Callable[..., list[dict[str, Any]]],
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Variant ``vname`` of family ``name``: its settings over the family's, its own workspace, its runs studied."""
    vwhere = f"{name}.yaml variant '{vname}'"
    vs = StudySettings.from_mapping(vspec.get("settings") or {}, vwhere, base=s)
    if quick:  # a quick run keeps the family's tiny settings (and another start's seed)
        vs = replace(s, start_seed=vs.start_seed)
    vroot = (
        Path(vspec.get("workspace", out / f"workspace-{vname}")) if not quick else out / f"workspace-{vname}"
    )
    vws = build_workspace(vroot, vs, say)
    vres = study(vws, vs, vruns, label=f"{name}/{vname}")
    return {
        "settings": dict(vs.__dict__),
        "teacher": vws.teacher_scores,
        "start": vws.start_scores,
        "runs": _aggregate(vres, list(vruns)),
    }


def _write_outputs(
    summary: dict[str, Any],
    out: Path,
    quick: bool,
    say: Callable[[str], None],
    write_report: Report,
    plot: Plot,
) -> None:
    """A family's results.json, report.md (printed too) and results.png."""
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    report = write_report(summary) + cost_section(summary)
    if quick:  # tiny models and a few steps: the numbers exercise the code, they support no finding
        report = "> smoke run (--quick): tiny models, a few steps; no conclusion\n\n" + report
    (out / "report.md").write_text(report)
    try:
        plot(summary, out / "results.png")
    except Exception as e:  # a plot must never lose the results
        say(f"warning: plot failed ({e})")
    print(report)
    say(
        f"wrote {out / 'results.json'}, {out / 'report.md'}, {out / 'results.png'} ({summary['wall_s']:.0f}s)"
    )


# ---------------------------------------------------------------------------------------------------------------
# reports
# ---------------------------------------------------------------------------------------------------------------
def _ref_line(summary: dict[str, Any], metric: str, mode: str = "greedy") -> str:
    t, s = summary["teacher"], summary["start"]
    return f"teacher {t[mode][metric]:.1f}, starting student {s[mode][metric]:.1f} ({mode})"


def _report_methods(summary: dict[str, Any]) -> str:
    m = summary["metric"]
    runs = summary["runs"]
    lines = [
        f"# methods ({summary['task']}, {m} %, mean ± SE over {summary['settings']['seeds']} seeds)",
        "",
        f"{_ref_line(summary, m)}; T=1: {_ref_line(summary, m, 'sample')}",
        "",
        "| run | greedy | T=1 sample | Δ vs sft (greedy) | Δ vs sft (T=1) |",
        "|---|---|---|---|---|",
    ]
    base = runs.get("sft")
    for name, r in runs.items():
        d_g = _pfmt(r["greedy"][m]["seeds"], base["greedy"][m]["seeds"]) if base else "-"
        d_s = _pfmt(r["sample"][m]["seeds"], base["sample"][m]["seeds"]) if base else "-"
        lines.append(f"| {name} | {_fmt(r['greedy'][m])} | {_fmt(r['sample'][m])} | {d_g} | {d_s} |")
    fkl = {"supervised_kd": 0.0, "imitkd": 0.5, "gkd_forward_kl": 1.0}
    sweeps = {
        "JSD(0.9)": [(float(n.split("_")[1]), runs[n]) for n in runs if n.startswith("lambda_")],
        "forward KL, as the paper's Fig. 7": [(x, runs[n]) for n, x in fkl.items() if n in runs]
        + [(float(n.split("_")[-1]), runs[n]) for n in runs if n.startswith("fkl_lambda_")],
    }
    for label, lam in sweeps.items():
        if len(lam) > 1:
            lines += [
                "",
                f"λ sweep ({label}): "
                + ", ".join(
                    f"λ={x:g}: {r['sample'][m]['mean']:.1f} (T=1) / {r['greedy'][m]['mean']:.1f} (greedy)"
                    for x, r in sorted(lam, key=lambda t: t[0])
                ),
            ]
    lines += ["", f"wall time {summary['wall_s']:.0f} s; command `{summary['command']}`", ""]
    return "\n".join(lines)


def _report_divergences(summary: dict[str, Any]) -> str:
    m = summary["metric"]
    start = summary["start"]["greedy"][m]
    lines = [
        f"# divergences ({summary['task']}, {m}, gain over the starting student, greedy decoding, mean ± SE over "
        f"{summary['settings']['seeds']} seeds)",
        "",
        _ref_line(summary, m),
        "",
    ]

    def table(runs: dict[str, Any], start_value: float) -> list[str]:
        divs = sorted({n.rsplit("_lambda_", 1)[0] for n in runs})
        lams = sorted({float(n.rsplit("_lambda_", 1)[1]) for n in runs})
        rows = [
            "| divergence | " + " | ".join(f"λ={x:g}" for x in lams) + " |",
            "|---" * (len(lams) + 1) + "|",
        ]
        for d in divs:
            cells = []
            for x in lams:
                r = runs.get(f"{d}_lambda_{x:g}")
                cells.append(
                    "-"
                    if r is None
                    else f"{r['greedy'][m]['mean'] - start_value:+.2f} ± {r['greedy'][m]['se']:.2f}"
                )
            rows.append(f"| {d} | " + " | ".join(cells) + " |")
        return rows

    lines += table(summary["runs"], start)
    for vname, v in summary["variants"].items():
        vs = v["start"]["greedy"][m]
        lines += ["", f"variant `{vname}`: teacher {v['teacher']['greedy'][m]:.1f}, start {vs:.1f}", ""]
        lines += table(v["runs"], vs)
    lines += ["", f"wall time {summary['wall_s']:.0f} s; command `{summary['command']}`", ""]
    return "\n".join(lines)


def _report_temperature(summary: dict[str, Any]) -> str:
    runs = summary["runs"]
    first = next(iter(runs.values()))
    modes = [k for k in first if not k.startswith("_")]
    lines = [
        f"# temperature ({summary['task']}, on-policy λ=1; ROUGE-2 / Self-BLEU per evaluation decoding; mean ± SE "
        f"over {summary['settings']['seeds']} seeds)",
        "",
        "| divergence | " + " | ".join(modes) + " |",
        "|---" * (len(modes) + 1) + "|",
    ]
    for name, r in runs.items():
        cells = []
        for mode in modes:
            sb = r[mode].get("self_bleu")
            cells.append(_fmt(r[mode]["rouge2"]) + (f" / {_fmt(sb)}" if sb else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    names = list(runs)
    if len(names) > 1:  # each divergence against the first, paired per seed, at every decoding
        base = names[0]
        lines += [
            "",
            f"ROUGE-2 Δ vs `{base}`, paired per seed, mean ± SE [95 % t-interval] (* = the interval excludes 0):",
            "",
            "| divergence | " + " | ".join(modes) + " |",
            "|---" * (len(modes) + 1) + "|",
        ]
        for name in names[1:]:
            cells = [_pfmt(runs[name][m]["rouge2"]["seeds"], runs[base][m]["rouge2"]["seeds"]) for m in modes]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    t = summary["teacher"]
    lines += [
        "",
        f"teacher ROUGE-2: greedy {t['greedy']['rouge2']:.1f}, T=1 {t['sample']['rouge2']:.1f}; start: greedy "
        f"{summary['start']['greedy']['rouge2']:.1f}, T=1 {summary['start']['sample']['rouge2']:.1f}",
        "",
        f"wall time {summary['wall_s']:.0f} s; command `{summary['command']}`",
        "",
    ]
    return "\n".join(lines)


def _report_data_efficiency(summary: dict[str, Any]) -> str:
    m = summary["metric"]
    runs = summary["runs"]
    lines = [
        f"# data efficiency ({summary['task']}, {m} %, mean ± SE over {summary['settings']['seeds']} seeds, same steps)",
        "",
        f"{_ref_line(summary, m)}; T=1: {_ref_line(summary, m, 'sample')}",
        "",
        "| run | greedy | T=1 sample | Δ vs supervised_kd (greedy) | Δ vs supervised_kd (T=1) |",
        "|---|---|---|---|---|",
    ]
    base = runs.get("supervised_kd_100pct")
    for name, r in runs.items():
        dg = _pfmt(r["greedy"][m]["seeds"], base["greedy"][m]["seeds"]) if base else "-"
        ds = _pfmt(r["sample"][m]["seeds"], base["sample"][m]["seeds"]) if base else "-"
        lines.append(f"| {name} | {_fmt(r['greedy'][m])} | {_fmt(r['sample'][m])} | {dg} | {ds} |")
    lines += ["", f"wall time {summary['wall_s']:.0f} s; command `{summary['command']}`", ""]
    return "\n".join(lines)


def _report_rl(summary: dict[str, Any]) -> str:
    runs = summary["runs"]
    start, teacher = summary["start"], summary["teacher"]
    lines = [
        f"# RL + GKD ({summary['task']}, reward = faithfulness; gains over the starting student, T=1 samples, mean ± SE "
        f"over {summary['settings']['seeds']} seeds)",
        "",
        f"teacher: ROUGE-2 {teacher['sample']['rouge2']:.1f}, faithfulness {teacher['sample']['faithfulness']:.1f}; "
        f"start: ROUGE-2 {start['sample']['rouge2']:.1f}, faithfulness {start['sample']['faithfulness']:.1f}",
        "",
        "| run | ROUGE-2 | Δ ROUGE-2 | faithfulness | Δ faithfulness | set match | Δ ROUGE-2 vs RLEF* (paired) "
        "| Δ faithfulness vs RLEF* (paired) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ref = runs.get("rlef_star")
    for name, r in runs.items():
        s = r["sample"]
        vs = (
            [_pfmt(s[k]["seeds"], ref["sample"][k]["seeds"]) for k in ("rouge2", "faithfulness")]
            if ref is not None and name != "rlef_star"
            else ["-", "-"]
        )
        lines.append(
            f"| {name} | {_fmt(s['rouge2'])} | {s['rouge2']['mean'] - start['sample']['rouge2']:+.2f} | "
            f"{_fmt(s['faithfulness'])} | {s['faithfulness']['mean'] - start['sample']['faithfulness']:+.2f} | "
            f"{_fmt(s['set_match'])} | {vs[0]} | {vs[1]} |"
        )
    lines += ["", f"wall time {summary['wall_s']:.0f} s; command `{summary['command']}`", ""]
    return "\n".join(lines)


def _report_arithmetic(summary: dict[str, Any]) -> str:
    m = summary["metric"]
    runs = summary["runs"]
    lines = [
        f"# arithmetic (the paper's GSM8K comparison; {m} %, mean ± SE over {summary['settings']['seeds']} seeds, "
        "Δ paired per seed)",
        "",
        f"{_ref_line(summary, m)}; T=1: {_ref_line(summary, m, 'sample')}",
        "",
        "| run | greedy | T=1 sample | Δ vs sft (greedy) | Δ vs sft (T=1) | Δ vs supervised_kd (greedy) "
        "| Δ vs supervised_kd (T=1) | chain_valid (T=1) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in runs.items():
        cells = [_fmt(r["greedy"][m]), _fmt(r["sample"][m])]
        for base_name in ("sft", "supervised_kd"):
            base = runs.get(base_name)
            for mode in ("greedy", "sample"):
                cells.append(_pfmt(r[mode][m]["seeds"], base[mode][m]["seeds"]) if base else "-")
        cv = r["sample"].get("chain_valid")
        cells.append(_fmt(cv) if cv else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"wall time {summary['wall_s']:.0f} s; command `{summary['command']}`", ""]
    return "\n".join(lines)


REPORTS = {
    "methods": _report_methods,
    "divergences": _report_divergences,
    "temperature": _report_temperature,
    "data_efficiency": _report_data_efficiency,
    "rl": _report_rl,
    "arithmetic": _report_arithmetic,
}


# ---------------------------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bars(summary: dict[str, Any], path: Path, metric: str) -> None:
    plt = _plt()
    runs = summary["runs"]
    names = list(runs)
    fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.8), 4))
    for k, mode in enumerate(("greedy", "sample")):
        xs = [i + (k - 0.5) * 0.4 for i in range(len(names))]
        ax.bar(
            xs,
            [runs[n][mode][metric]["mean"] for n in names],
            0.4,
            yerr=[runs[n][mode][metric]["se"] for n in names],
            capsize=3,
            label=mode,
        )
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_ylabel(metric)
    ax.legend()
    ax.set_title(f"{summary['experiment']}: {summary['task']}")
    _save(fig, path)


def _plot_temperature(summary: dict[str, Any], path: Path) -> None:
    plt = _plt()
    runs = summary["runs"]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    modes = [m for m in next(iter(runs.values())) if m.startswith("sample")]
    for mode in modes:
        xs = [runs[n][mode]["self_bleu"]["mean"] for n in runs if "self_bleu" in runs[n][mode]]
        ys = [runs[n][mode]["rouge2"]["mean"] for n in runs if "self_bleu" in runs[n][mode]]
        label = "T=1" if mode == "sample" else "T=" + mode.split("_", 1)[1]
        ax.plot(xs, ys, "o-", label=label)
        for n, x, y in zip(runs, xs, ys):
            ax.annotate(n.replace("gkd_", ""), (x, y), fontsize=6)
    ax.set_xlabel("Self-BLEU (100 = identical samples)")
    ax.set_ylabel("ROUGE-2")
    ax.legend()
    ax.set_title("quality vs diversity by divergence")
    _save(fig, path)


def _plot_rl(summary: dict[str, Any], path: Path) -> None:
    plt = _plt()
    runs = summary["runs"]
    start = summary["start"]["sample"]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for n, r in runs.items():
        x = r["sample"]["faithfulness"]["mean"] - start["faithfulness"]
        y = r["sample"]["rouge2"]["mean"] - start["rouge2"]
        ax.errorbar(x, y, xerr=r["sample"]["faithfulness"]["se"], yerr=r["sample"]["rouge2"]["se"], fmt="o")
        ax.annotate(n, (x, y), fontsize=7)
    t = summary["teacher"]["sample"]
    ax.axvline(
        t["faithfulness"] - start["faithfulness"], color="k", ls="--", lw=1, label="teacher faithfulness"
    )
    ax.set_xlabel("faithfulness gain over the start (T=1)")
    ax.set_ylabel("ROUGE-2 gain over the start (T=1)")
    ax.legend(fontsize=8)
    _save(fig, path)


PLOTS = {
    "methods": lambda s, p: _bars(s, p, s["metric"]),
    "divergences": lambda s, p: _bars(s, p, s["metric"]),
    "temperature": _plot_temperature,
    "data_efficiency": lambda s, p: _bars(s, p, s["metric"]),
    "rl": _plot_rl,
    "arithmetic": lambda s, p: _bars(s, p, s["metric"]),
}


# ---------------------------------------------------------------------------------------------------------------
# scaling: on-policy GKD minus supervised KD per student size (the main workspace and each variant is one size)
# ---------------------------------------------------------------------------------------------------------------
def _scaling_sizes(summary: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, {settings, teacher, start, runs}) per student size, smallest first."""
    sizes = [("main", summary), *summary["variants"].items()]
    rows = []
    for name, v in sizes:
        spec = v.get("settings", {}).get("student") or {}
        label = f"d{spec['hidden_size']}" if "hidden_size" in spec else name
        rows.append((label, v, spec.get("hidden_size", 0)))
    return [(label, v) for label, v, _ in sorted(rows, key=lambda r: r[2])]


def _report_scaling(summary: dict[str, Any]) -> str:
    m = summary["metric"]
    lines = [
        f"# scaling ({summary['task']}, {m} %, mean ± SE over {summary['settings']['seeds']} seeds; Δ = on-policy − "
        "supervised_kd, paired per seed)",
        "",
        f"teacher: greedy {summary['teacher']['greedy'][m]:.1f}, T=1 {summary['teacher']['sample'][m]:.1f}",
        "",
        "| student | run | start (greedy / T=1) | supervised_kd (greedy / T=1) | run (greedy / T=1) "
        "| Δ greedy | Δ T=1 | Δ vs reverse KL at λ = 0 (greedy / T=1) | s/run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, v in _scaling_sizes(summary):
        runs, st = v["runs"], v["start"]
        base, ctrl = runs["supervised_kd"], runs.get("offpolicy_reverse_kl")
        for name, r in runs.items():
            if name == "supervised_kd":
                continue
            same = (
                " / ".join(_pfmt(r[mo][m]["seeds"], ctrl[mo][m]["seeds"]) for mo in ("greedy", "sample"))
                if ctrl is not None and name == "gkd_reverse_kl"
                else "-"
            )
            lines.append(
                f"| {label} | {name} | {st['greedy'][m]:.1f} / {st['sample'][m]:.1f} | "
                f"{_fmt(base['greedy'][m])} / {_fmt(base['sample'][m])} | "
                f"{_fmt(r['greedy'][m])} / {_fmt(r['sample'][m])} | "
                f"{_pfmt(r['greedy'][m]['seeds'], base['greedy'][m]['seeds'])} | "
                f"{_pfmt(r['sample'][m]['seeds'], base['sample'][m]['seeds'])} | {same} | {r['_wall_s']:.0f} |"
            )
    lines += ["", f"wall time {summary['wall_s']:.0f} s; command `{summary['command']}`", ""]
    return "\n".join(lines)


def _plot_scaling(summary: dict[str, Any], path: Path) -> None:
    plt = _plt()
    m = summary["metric"]
    sizes = _scaling_sizes(summary)
    labels = [label for label, _ in sizes]
    xs = list(range(len(sizes)))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name in [n for n in sizes[0][1]["runs"] if n != "supervised_kd"]:
        for mode, tag in (("greedy", "greedy"), ("sample", "T=1")):
            d = [
                paired(v["runs"][name][mode][m]["seeds"], v["runs"]["supervised_kd"][mode][m]["seeds"])
                for _, v in sizes
            ]
            ax1.errorbar(
                xs, [a for a, _ in d], yerr=[b for _, b in d], fmt="o-", capsize=3, label=f"{name}, {tag}"
            )
    ax1.axhline(0, color="k", lw=0.8)
    ax1.set_ylabel(f"Δ {m} vs supervised_kd")
    ax1.set_title("on-policy gain over supervised KD")
    for name in sizes[0][1]["runs"]:
        ax2.errorbar(
            xs,
            [v["runs"][name]["sample"][m]["mean"] for _, v in sizes],
            yerr=[v["runs"][name]["sample"][m]["se"] for _, v in sizes],
            fmt="o-",
            capsize=3,
            label=name,
        )
    ax2.plot(xs, [v["start"]["sample"][m] for _, v in sizes], "k:", marker="x", label="start")
    ax2.axhline(summary["teacher"]["sample"][m], color="k", ls="--", lw=1, label="teacher")
    ax2.set_ylabel(f"{m} (T=1 samples)")
    ax2.set_title("scores by student size")
    for ax in (ax1, ax2):
        ax.set_xticks(xs)
        ax.set_xticklabels(labels)
        ax.set_xlabel("student (1-layer Llama, hidden size)")
        ax.legend(fontsize=7)
    _save(fig, path)


REPORTS["scaling"] = _report_scaling
PLOTS["scaling"] = _plot_scaling


# ---------------------------------------------------------------------------------------------------------------
# instruction: distilled on a mixture of instructions, scored on the held-out ones
# ---------------------------------------------------------------------------------------------------------------
def _report_instruction(summary: dict[str, Any]) -> str:
    runs, t, st = summary["runs"], summary["teacher"], summary["start"]
    base = runs.get("supervised_kd")
    lines = [
        "# instruction (task-agnostic distillation; set_match % on the mixture's instructions (held in) and on the "
        "held-out ones, item F1 % on the held-out ones (partial credit); mean ± SE over "
        f"{summary['settings']['seeds']} seeds; Δ paired per seed)",
        "",
        "| model | held in (greedy / T=1) | held out (greedy / T=1) | held-out item F1 (greedy / T=1) |",
        "|---|---|---|---|",
    ]
    for who, sc in (("teacher", t), ("starting student", st)):
        cells = [
            f"{sc['greedy'][m]:.1f} / {sc['sample'][m]:.1f}" for m in ("held_in", "held_out", "held_out_f1")
        ]
        lines.append(f"| {who} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| run | held in (greedy / T=1) | held out (greedy / T=1) | held-out F1 (greedy / T=1) "
        "| Δ held in vs supervised_kd (greedy / T=1) | Δ held out vs supervised_kd (greedy / T=1) "
        "| Δ held-out F1 vs supervised_kd (greedy / T=1) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in runs.items():
        cells = [
            " / ".join(_fmt(r[mode][m]) for mode in ("greedy", "sample"))
            for m in ("held_in", "held_out", "held_out_f1")
        ]
        for m in ("held_in", "held_out", "held_out_f1"):
            cells.append(
                " / ".join(
                    _pfmt(r[mode][m]["seeds"], base[mode][m]["seeds"]) for mode in ("greedy", "sample")
                )
                if base
                else "-"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"wall time {summary['wall_s']:.0f} s; command `{summary['command']}`", ""]
    return "\n".join(lines)


def _plot_instruction(summary: dict[str, Any], path: Path) -> None:
    plt = _plt()
    runs = summary["runs"]
    names = list(runs)
    xs = list(range(len(names)))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = (
        (axes[0], "held_in", "held-in instructions, set_match"),
        (axes[1], "held_out", "held out, set_match"),
        (axes[2], "held_out_f1", "held out, item F1"),
    )
    for ax, metric, title in panels:
        for k, (mode, tag) in enumerate((("greedy", "greedy"), ("sample", "T=1"))):
            ax.bar(
                [x + (k - 0.5) * 0.38 for x in xs],
                [runs[n][mode][metric]["mean"] for n in names],
                0.38,
                yerr=[runs[n][mode][metric]["se"] for n in names],
                capsize=2,
                label=tag,
            )
            ax.axhline(summary["start"][mode][metric], color=f"C{k}", ls=":", lw=1)
        ax.set_title(f"{title} (dotted: start)", fontsize=9)
        ax.set_ylabel("%")
        ax.set_xticks(xs)
        ax.set_xticklabels(names, rotation=35, ha="right", fontsize=7)
        ax.legend(fontsize=7)
    _save(fig, path)


REPORTS["instruction"] = _report_instruction
PLOTS["instruction"] = _plot_instruction


# ---------------------------------------------------------------------------------------------------------------
# summarization_lambda: does forward KL's repetition explain why set_match falls with λ?
# ---------------------------------------------------------------------------------------------------------------
def _lambda_rows(runs: dict[str, Any]) -> list[tuple[str, float, dict[str, Any]]]:
    """(divergence, λ, run) for runs named DIVERGENCE_lambda_X, by divergence then λ."""
    rows = []
    for name, r in runs.items():
        div, _, lam = name.rpartition("_lambda_")
        rows.append((div, float(lam), r))
    return sorted(rows, key=lambda x: (x[0], x[1]))


def _other_errors(r: dict[str, Any], mode: str) -> list[float]:
    """Per seed: % of outputs that are wrong without repeating an item (100 − set_match − dup_rate)."""
    return [100.0 - a - b for a, b in zip(r[mode]["set_match"]["seeds"], r[mode]["dup_rate"]["seeds"])]


def _report_summarization_lambda(summary: dict[str, Any]) -> str:
    lines = [
        "# summarization_lambda (set_match, dup_rate = % of outputs repeating an item, other = % wrong without a "
        f"repeat = 100 − set_match − dup_rate; mean ± SE over {summary['settings']['seeds']} seeds)",
        "",
        f"{_ref_line(summary, 'set_match')}; T=1: {_ref_line(summary, 'set_match', 'sample')}; "
        f"start dup_rate {summary['start']['greedy']['dup_rate']:.1f} greedy / "
        f"{summary['start']['sample']['dup_rate']:.1f} T=1",
        "",
        "| divergence | λ | set_match greedy | dup_rate greedy | other greedy | set_match T=1 | dup_rate T=1 "
        "| other T=1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = _lambda_rows(summary["runs"])
    for div, lam, r in rows:
        cells = []
        for mode in ("greedy", "sample"):
            m, se = mean_se(_other_errors(r, mode))
            cells += [_fmt(r[mode]["set_match"]), _fmt(r[mode]["dup_rate"]), f"{m:.1f} ± {se:.1f}"]
        lines.append(f"| {div} | {lam:g} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Change from λ = 0 to λ = 1 (paired per seed): if repetition explains the fall, Δ set_match ≈ −Δ dup_rate "
        "and Δ other ≈ 0.",
        "",
        "| divergence | mode | Δ set_match | Δ dup_rate | Δ other |",
        "|---|---|---|---|---|",
    ]
    for div in sorted({d for d, _, _ in rows}):
        ends = {lam: r for d, lam, r in rows if d == div}
        if 0.0 not in ends or 1.0 not in ends:
            continue
        lo, hi = ends[0.0], ends[1.0]
        for mode, tag in (("greedy", "greedy"), ("sample", "T=1")):
            d_sm = _pfmt(hi[mode]["set_match"]["seeds"], lo[mode]["set_match"]["seeds"])
            d_dup = _pfmt(hi[mode]["dup_rate"]["seeds"], lo[mode]["dup_rate"]["seeds"])
            d_other = _pfmt(_other_errors(hi, mode), _other_errors(lo, mode))
            lines.append(f"| {div} | {tag} | {d_sm} | {d_dup} | {d_other} |")
    lines += ["", f"wall time {summary['wall_s']:.0f} s; command `{summary['command']}`", ""]
    return "\n".join(lines)


def _lambda_curves(ax: Any, rows: list[tuple[str, float, dict[str, Any]]], values: Any) -> None:
    """One line per divergence over λ: ``values(run)`` gives the per-seed numbers of a point (mean ± SE drawn)."""
    for k, div in enumerate(sorted({d for d, _, _ in rows})):
        pts = [(lam, mean_se(values(r))) for d, lam, r in rows if d == div]
        ax.errorbar(
            [lam for lam, _ in pts],
            [m for _, (m, _) in pts],
            yerr=[se for _, (_, se) in pts],
            fmt="o-",
            capsize=3,
            color=f"C{k}",
            label=div,
        )
    ax.set_xlabel("λ (share of on-policy batches)")


def _save(fig: Any, path: Path) -> None:
    plt = _plt()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_summarization_lambda(summary: dict[str, Any], path: Path) -> None:
    plt = _plt()
    rows = _lambda_rows(summary["runs"])
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    panels = (
        ("set_match", lambda r: r["sample"]["set_match"]["seeds"]),
        ("dup_rate", lambda r: r["sample"]["dup_rate"]["seeds"]),
        ("other errors", lambda r: _other_errors(r, "sample")),
    )
    for ax, (title, values) in zip(axes, panels):
        _lambda_curves(ax, rows, values)
        ax.set_ylabel(f"{title} % (T=1)")
        ax.set_title(title)
        ax.legend(fontsize=7)
    _save(fig, path)


REPORTS["summarization_lambda"] = _report_summarization_lambda
PLOTS["summarization_lambda"] = _plot_summarization_lambda


# ---------------------------------------------------------------------------------------------------------------
# arithmetic_lambda: divergence × λ on the GSM8K stand-in (paper Fig. 7/8)
# ---------------------------------------------------------------------------------------------------------------
def _report_arithmetic_lambda(summary: dict[str, Any]) -> str:
    m = summary["metric"]
    st = summary["start"]
    lines = [
        f"# arithmetic_lambda (divergence × λ; {m} %, mean ± SE over {summary['settings']['seeds']} seeds; gain over "
        "the starting student; Δ vs λ=0 paired per seed)",
        "",
        f"{_ref_line(summary, m)}; T=1: {_ref_line(summary, m, 'sample')}",
        "",
        "| divergence | λ | greedy | T=1 | gain over start (greedy / T=1) | Δ vs λ=0 (greedy / T=1) "
        "| chain_valid (T=1) |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = _lambda_rows(summary["runs"])
    zero = {div: r for div, lam, r in rows if lam == 0.0}
    for div, lam, r in rows:
        gain = " / ".join(f"{r[mode][m]['mean'] - st[mode][m]:+.1f}" for mode in ("greedy", "sample"))
        base = zero.get(div)
        delta = (
            " / ".join(_pfmt(r[mode][m]["seeds"], base[mode][m]["seeds"]) for mode in ("greedy", "sample"))
            if base
            else "-"
        )
        cv = r["sample"].get("chain_valid")
        lines.append(
            f"| {div} | {lam:g} | {_fmt(r['greedy'][m])} | {_fmt(r['sample'][m])} | {gain} | {delta} | "
            f"{_fmt(cv) if cv else '-'} |"
        )
    lines += ["", f"wall time {summary['wall_s']:.0f} s; command `{summary['command']}`", ""]
    return "\n".join(lines)


def _plot_lambda_grid(summary: dict[str, Any], path: Path) -> None:
    plt = _plt()
    m = summary["metric"]
    rows = _lambda_rows(summary["runs"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (mode, tag) in zip(axes, (("greedy", "greedy"), ("sample", "T=1"))):
        _lambda_curves(ax, rows, lambda r, mode=mode: r[mode][m]["seeds"])
        ax.axhline(summary["start"][mode][m], color="k", ls=":", lw=1, label="start")
        ax.axhline(summary["teacher"][mode][m], color="k", ls="--", lw=1, label="teacher")
        ax.set_ylabel(f"{m} % ({tag})")
        ax.set_title(tag)
        ax.legend(fontsize=7)
    _save(fig, path)


REPORTS["arithmetic_lambda"] = _report_arithmetic_lambda
PLOTS["arithmetic_lambda"] = _plot_lambda_grid


# ---------------------------------------------------------------------------------------------------------------
# on_policy: λ at fixed divergence where the fixed data come from another policy (the paper's central claim)
# ---------------------------------------------------------------------------------------------------------------
def _lambda_deltas(runs: dict[str, Any], m: str) -> list[str]:
    """Table rows: per divergence and λ > 0, the paired Δ against the same divergence's λ = 0 run (95 % t-interval)."""
    rows = _lambda_rows(runs)
    zero = {div: r for div, lam, r in rows if lam == 0.0}
    out = []
    for div, lam, r in rows:
        base = zero.get(div)
        if lam == 0.0 or base is None:
            continue
        cells = []
        for mode in ("greedy", "sample"):
            ci = paired_ci(r[mode][m]["seeds"], base[mode][m]["seeds"])
            cells += [fmt_ci(ci), f"{ci['p']:.3g}"]
        out.append(f"| {div} | {lam:g} − 0 | " + " | ".join(cells) + " |")
    return out


def _lr_cell(r: dict[str, Any]) -> str:
    return f"{r['_lr']:g}" if r.get("_lr") is not None else "-"


def _report_on_policy(summary: dict[str, Any]) -> str:
    m = summary["metric"]
    n = summary["settings"]["seeds"]
    lines = [
        f"# on_policy ({summary['task']}, fixed data {summary['settings']['task_params']}; {m} %, mean ± SE over {n} seeds; Δ = λ > 0 − λ = 0 "
        "at the same divergence, paired per seed, mean ± SE [95 % t-interval], p of a paired t-test)",
        "",
        f"{_ref_line(summary, m)}; T=1: {_ref_line(summary, m, 'sample')}",
        "",
        "| divergence | λ | lr (chosen on validation) | greedy | T=1 | dup_rate T=1 |",
        "|---|---|---|---|---|---|",
    ]
    for div, lam, r in _lambda_rows(summary["runs"]):
        dup = r["sample"].get("dup_rate")
        lines.append(
            f"| {div} | {lam:g} | {_lr_cell(r)} | {_fmt(r['greedy'][m])} | {_fmt(r['sample'][m])} | "
            f"{_fmt(dup) if dup else '-'} |"
        )
    lines += ["", "| divergence | λ | Δ greedy | p | Δ T=1 | p |", "|---|---|---|---|---|---|"]
    lines += _lambda_deltas(summary["runs"], m)
    for vname, v in summary.get("variants", {}).items():
        st = v["start"]
        lines += [
            "",
            f"Variant `{vname}` (task parameters {v['settings']['task_params']}, start_seed "
            f"{v['settings']['start_seed']}, {v['settings']['seeds']} seeds): start "
            f"{st['greedy'][m]:.1f} greedy / {st['sample'][m]:.1f} T=1",
            "",
            "| divergence | λ | Δ greedy | p | Δ T=1 | p |",
            "|---|---|---|---|---|---|",
            *_lambda_deltas(v["runs"], m),
        ]
    lines += ["", f"wall time {summary['wall_s']:.0f} s; command `{summary['command']}`", ""]
    return "\n".join(lines)


REPORTS["on_policy"] = _report_on_policy
PLOTS["on_policy"] = _plot_lambda_grid
