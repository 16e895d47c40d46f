"""Why is the λ order reversed on translation? One investigation, RESULTS.md section 12, run by this script.

    python experiments/translation_lambda.py [--quick] [--workers N] [--output-dir DIR]
    python experiments/translation_lambda.py --report-only --output-dir DIR   # report.md again from results.json
    gkd experiment translation_lambda [--quick]                               # the same, from a source checkout

RESULTS.md section 6 found λ=0 > 0.5 > 1 on ``translation`` where the paper (Fig. 6) has λ=1 > 0.5 > 0. The family
(``translation_lambda.yaml`` beside this script) runs JSD(0.1) at λ=0 and λ=1 under four candidate causes, each
changed alone against a baseline: the start's quality, the student's capacity, the temperature of the student's
on-policy samples and the step budget. Run names are ``lambda_X`` or ``lambda_X_TAG``; one *condition* is a
(workspace, tag) pair, and a condition without its own λ=0 run (λ=0 never samples, so the sampling temperature does
not change it) borrows its workspace's untagged ``lambda_0``. The report gives, per condition, the gain of each λ over
that workspace's start and the per-seed paired difference λ=1 − λ=0, greedy and at T=1; the plot shows that
difference per condition.

The runs go through gkd's experiment machinery (:func:`gkd.experiments.families.run`: workspace, jobs, resuming,
results.json and the cost section); this script holds what is specific to the investigation: its family file, its
report and its plot.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "src") not in sys.path:  # run as a script from a source checkout without installing gkd
    sys.path.insert(0, str(ROOT / "src"))

from gkd.experiments.study import mean_se, paired  # noqa: E402

__all__ = ["FAMILY", "conditions", "main", "plot", "report", "run"]

NAME = "translation_lambda"
FAMILY = Path(__file__).resolve().with_suffix(".yaml")  # the family: settings, workspaces, runs, variants
COMMAND = "python experiments/translation_lambda.py"
_NAME = re.compile(r"^lambda_(\d+(?:\.\d+)?)(?:_(.+))?$")
_TEMPERATURE = re.compile(r"^T(\d+(?:\.\d+)?)$")
_STEPS = re.compile(r"^steps(\d+)x$")
# the factor each variant of the YAML changes, by name: a quick run gives every variant the main settings, so they
# cannot be told apart by settings there (a variant not named here is classified by its settings)
_VARIANT_FACTORS = {"weak_start": "start quality", "wide_student": "capacity"}
_FACTOR_ORDER = ("baseline", "start quality", "capacity", "sampling temperature", "step budget")
_MODES = (("greedy", "greedy"), ("sample", "T=1"))


def _lam(x: float) -> str:
    return f"λ={x:g}"


def _student_width(settings: dict[str, Any]) -> str:
    spec = settings.get("student")
    if not spec:
        try:
            from gkd.tasks import get_task

            spec = get_task(settings["task"], **(settings.get("task_params") or {})).student_model_config()
        except Exception:  # a report must not fail on a task it cannot build
            return "default"
    return f"{spec.get('num_hidden_layers', '?')}-layer d{spec.get('hidden_size', '?')}"


def _variant_factor(name: str, settings: dict[str, Any], main: dict[str, Any]) -> str:
    if name in _VARIANT_FACTORS:
        return _VARIANT_FACTORS[name]
    if settings.get("student") != main.get("student"):
        return "capacity"
    if settings.get("start_steps") != main.get("start_steps"):
        return "start quality"
    if settings.get("method_steps") != main.get("method_steps"):
        return "step budget"
    return name


def conditions(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per (workspace, tag), the baseline first, then by factor (file order within one): factor, its description, the start, and the runs by λ.

    Each entry: ``factor``, ``workspace`` (``main`` or the variant's name), ``tag``, ``temperature``, ``steps``,
    ``student``, ``start_steps``, ``start`` / ``teacher`` (scores), ``runs`` ({λ: aggregated run}) and ``shared``
    (the λ values borrowed from the workspace's untagged runs).
    """
    main_settings = summary["settings"]
    spaces = [("main", summary, "baseline")]
    for vname, v in summary.get("variants", {}).items():
        spaces.append((vname, v, _variant_factor(vname, v.get("settings", {}), main_settings)))
    out: list[dict[str, Any]] = []
    for wname, ws, factor in spaces:
        settings = ws.get("settings", main_settings)
        groups: dict[str | None, dict[float, dict[str, Any]]] = {}
        for name, r in ws["runs"].items():
            m = _NAME.match(name)
            if m is None:
                continue
            groups.setdefault(m.group(2), {})[float(m.group(1))] = r
        untagged = groups.get(None, {})
        for tag, runs in groups.items():
            cond_factor, temperature = factor, 1.0
            if tag is not None:
                t = _TEMPERATURE.match(tag)
                if t:
                    cond_factor, temperature = "sampling temperature", float(t.group(1))
                elif _STEPS.match(tag):
                    cond_factor = "step budget"
                else:
                    cond_factor = tag
            shared = [x for x in (0.0,) if x not in runs and x in untagged]
            runs = {**{x: untagged[x] for x in shared}, **runs}
            steps = max((r.get("_steps") or 0) for r in runs.values())
            out.append(
                {
                    "factor": cond_factor,
                    "workspace": wname,
                    "tag": tag,
                    "temperature": temperature,
                    "steps": steps,
                    "student": _student_width(settings),
                    "start_steps": settings.get("start_steps"),
                    "start": ws["start"],
                    "teacher": ws["teacher"],
                    "runs": dict(sorted(runs.items())),
                    "shared": shared,
                }
            )
    rank = {f: i for i, f in enumerate(_FACTOR_ORDER)}
    return sorted(out, key=lambda c: rank.get(c["factor"], len(rank)))


def _label(c: dict[str, Any]) -> str:
    where = "" if c["workspace"] == "main" else f"{c['workspace']}: "
    return f"{where}{c['student']}, start {c['start_steps']} steps, samples T={c['temperature']:g}, {c['steps']} steps"


def _short(c: dict[str, Any]) -> str:
    """A two-line tick label."""
    if c["factor"] == "baseline":
        return "baseline"
    if c["factor"] == "start quality":
        return f"start\n{c['start_steps']} steps"
    if c["factor"] == "capacity":
        return f"capacity\n{c['student'].split()[-1]}"
    if c["factor"] == "sampling temperature":
        return f"samples\nT={c['temperature']:g}"
    if c["factor"] == "step budget":
        return f"budget\n{c['steps']} steps"
    return str(c["tag"] or c["workspace"])


def _diff(c: dict[str, Any], metric: str, mode: str) -> tuple[float, float] | None:
    r0, r1 = c["runs"].get(0.0), c["runs"].get(1.0)
    if r0 is None or r1 is None:
        return None
    return paired(r1[mode][metric]["seeds"], r0[mode][metric]["seeds"])


def _order(d: tuple[float, float] | None) -> str:
    if d is None:
        return "-"
    m, se = d
    if m > se:
        return "**λ=1 > λ=0** (paper)"
    if m < -se:
        return "λ=0 > λ=1 (reversed)"
    return "tie (within 1 SE)"


def _gain(r: dict[str, Any] | None, start: float, metric: str, mode: str) -> str:
    if r is None:
        return "-"
    m, se = mean_se([v - start for v in r[mode][metric]["seeds"]])
    return f"{m:+.2f} ± {se:.2f}"


def report(summary: dict[str, Any]) -> str:
    metric = summary["metric"]
    conds = conditions(summary)
    lams = sorted({x for c in conds for x in c["runs"]})
    seeds = summary["settings"]["seeds"]
    lines = [
        f"# translation_lambda ({summary['task']}, JSD(0.1); {metric} gain over each workspace's start, mean ± SE "
        f"over {seeds} seeds; λ=1 − λ=0 paired per seed)",
        "",
        "Which cause flips the reversed λ order of RESULTS.md section 6 (paper, Fig. 6: λ=1 > 0.5 > 0)? Each row "
        "changes one factor against the baseline; 'λ order' calls λ=1 − λ=0 a difference when it exceeds 1 SE.",
        "",
        "| workspace | student | start steps | teacher (greedy / T=1) | start (greedy / T=1) |",
        "|---|---|---|---|---|",
    ]
    seen = set()
    for c in conds:
        if c["workspace"] in seen:
            continue
        seen.add(c["workspace"])
        t, s = c["teacher"], c["start"]
        lines.append(
            f"| {c['workspace']} | {c['student']} | {c['start_steps']} | {t['greedy'][metric]:.1f} / "
            f"{t['sample'][metric]:.1f} | {s['greedy'][metric]:.1f} / {s['sample'][metric]:.1f} |"
        )
    verdicts: dict[str, list[str]] = {}
    for mode, tag in _MODES:
        lines += [
            "",
            f"## {tag} {metric}",
            "",
            "| factor | condition | start | "
            + " | ".join(_lam(x) for x in lams)
            + " | λ=1 − λ=0 | λ order |",
            "|---" * (len(lams) + 5) + "|",
        ]
        for c in conds:
            start = c["start"][mode][metric]
            cells = []
            for x in lams:
                cell = _gain(c["runs"].get(x), start, metric, mode)
                cells.append(cell + (" (baseline's)" if x in c["shared"] else ""))
            d = _diff(c, metric, mode)
            diff = "-" if d is None else f"{d[0]:+.2f} ± {d[1]:.2f}"
            lines.append(
                f"| {c['factor']} | {_label(c)} | {start:.1f} | "
                + " | ".join(cells)
                + f" | {diff} | {_order(d)} |"
            )
            if d is not None and d[0] > d[1] and c["factor"] != "baseline":
                key = f"{c['factor']} ({' '.join(_short(c).split())})"
                verdicts.setdefault(key, []).append(f"{tag} {d[0]:+.2f} ± {d[1]:.2f}")
    base = next((c for c in conds if c["factor"] == "baseline"), None)
    lines += [""]
    if base is not None:
        parts = [f"{tag} {_order(_diff(base, metric, mode))}" for mode, tag in _MODES]
        lines.append(f"Baseline λ order: {'; '.join(parts)}.")
    if verdicts:
        lines.append(
            "λ=1 ahead of λ=0 by more than 1 SE: "
            + "; ".join(f"{k}: {', '.join(v)}" for k, v in verdicts.items())
            + "."
        )
    else:
        lines.append("No condition puts λ=1 ahead of λ=0 by more than 1 SE (greedy or T=1).")
    lines += ["", f"wall time {summary['wall_s']:.0f} s; command `{summary['command']}`", ""]
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = summary["metric"]
    conds = conditions(summary)
    names = [_short(c) for c in conds]
    xs = list(range(len(conds)))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(10, 2.2 * len(conds)), 4.5))
    for k, (mode, tag) in enumerate(_MODES):
        ds = [_diff(c, metric, mode) or (float("nan"), 0.0) for c in conds]
        ax1.errorbar(
            [x + (k - 0.5) * 0.2 for x in xs],
            [d[0] for d in ds],
            yerr=[d[1] for d in ds],
            fmt="o",
            capsize=4,
            label=tag,
        )
    ax1.axhline(0, color="k", lw=0.8)
    ax1.set_ylabel(f"{metric}: λ=1 − λ=0 (paired per seed)")
    ax1.set_title("> 0: the paper's order (on-policy ahead)")
    lams = sorted({x for c in conds for x in c["runs"]})
    width = 0.8 / max(1, len(lams))
    for k, x in enumerate(lams):
        vals, errs = [], []
        for c in conds:
            r = c["runs"].get(x)
            if r is None:
                vals.append(float("nan"))
                errs.append(0.0)
                continue
            m, se = mean_se([v - c["start"]["greedy"][metric] for v in r["greedy"][metric]["seeds"]])
            vals.append(m)
            errs.append(se)
        ax2.bar(
            [i + (k - (len(lams) - 1) / 2) * width for i in xs],
            vals,
            width,
            yerr=errs,
            capsize=3,
            label=_lam(x),
        )
    ax2.axhline(0, color="k", lw=0.8)
    ax2.set_ylabel(f"greedy {metric} gain over the start")
    ax2.set_title("gain by λ (greedy)")
    for ax in (ax1, ax2):
        ax.set_xticks(xs)
        ax.set_xticklabels(names, fontsize=7)
        ax.legend(fontsize=8)
    fig.suptitle(f"translation_lambda: JSD(0.1) on {summary['task']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(output_dir: Path | None = None, quick: bool = False, workers: int | None = None) -> dict[str, Any]:
    """Run the family (resuming finished runs) into ``output_dir``: results.json, report.md, results.png."""
    from gkd.experiments.families import run as run_family

    out = Path(output_dir) if output_dir else Path("runs") / f"experiment-{NAME}"
    return run_family(
        NAME,
        output_dir=out,
        quick=quick,
        workers=workers,
        family_file=FAMILY,
        report=report,
        plot=plot,
        command=COMMAND,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default=None, help=f"default: runs/experiment-{NAME}")
    parser.add_argument("--quick", action="store_true", help="tiny models, a few steps: a smoke run")
    parser.add_argument("--workers", type=int, default=None, help="parallel worker processes (default: 2)")
    parser.add_argument("--report-only", action="store_true", help="write report.md again from results.json")
    args = parser.parse_args(argv)
    if args.report_only:
        out = Path(args.output_dir or Path("runs") / f"experiment-{NAME}")
        from gkd.experiments.families import cost_section

        summary = json.loads((out / "results.json").read_text())
        text = report(summary) + cost_section(summary)
        (out / "report.md").write_text(text)
        print(text)
        return 0
    run(output_dir=args.output_dir, quick=args.quick, workers=args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
