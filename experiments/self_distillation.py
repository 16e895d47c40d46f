"""The paper's Fig. A.11 from ``gkd experiment self_distillation``: does a student distilled from a teacher of its own
size surpass it? RESULTS.md section 13.

    gkd experiment self_distillation                     # the study: runs/experiment-self_distillation
    python experiments/self_distillation.py [DIR]        # this figure's table from DIR/results.json

The study is a packaged study file (``gkd study``'s generic report: means, Δ against offpolicy_reverse_kl paired per
seed, cost); what is specific to this figure is here: each method against the teacher, a single model, so the
interval is the t-interval of the seeds' scores minus the teacher's (results.json's ``workspace`` section holds the
teacher's and the start's scores by the task's own evaluation). Written to ``DIR/fig_a11.md`` and printed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "src") not in sys.path:  # run as a script from a source checkout without installing gkd
    sys.path.insert(0, str(ROOT / "src"))

from gkd.experiments.study import excludes_zero, fmt_ci, t_interval  # noqa: E402

__all__ = ["main", "report", "vs_teacher"]

# the study's evaluation modes and the task evaluation's names for the same temperatures (the teacher's scores)
_MODES = (("greedy", "greedy"), ("T=1", "sample"))


def vs_teacher(summary: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """method -> study mode -> t-interval of (seed's score − the teacher's)."""
    metric, teacher = summary["headline"], summary["workspace"]["teacher"]
    return {
        name: {
            mode: t_interval(
                [
                    r["scores"][mode][metric] - teacher[task_mode][metric]
                    for r in summary["runs"]
                    if r["method"] == name
                ]
            )
            for mode, task_mode in _MODES
        }
        for name in summary["methods"]
    }


def report(summary: dict[str, Any]) -> str:
    """The figure's table: teacher, start, and each method's score and Δ against the teacher."""
    metric, ws = summary["headline"], summary["workspace"]
    deltas = vs_teacher(summary)
    lines = [
        f"# self_distillation: Fig. A.11 ({metric}; Δ vs teacher = the seeds' scores minus the teacher's, mean ± SE "
        "[95 % t-interval]; * = the interval excludes 0)",
        "",
        "| run | greedy | T=1 | Δ vs teacher (greedy) | Δ vs teacher (T=1) |",
        "|---|---|---|---|---|",
    ]
    for who in ("teacher", "start"):
        lines.append(f"| {who} | {ws[who]['greedy'][metric]:.1f} | {ws[who]['sample'][metric]:.1f} | | |")
    for name, m in summary["methods"].items():
        scores = [f"{m['scores'][mode]['mean']:.1f} ± {m['scores'][mode]['se']:.1f}" for mode, _ in _MODES]
        cells = [fmt_ci(d) + ("*" if excludes_zero(d) else "") for d in deltas[name].values()]
        lines.append(f"| {name} | " + " | ".join(scores + cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0] if args else "runs/experiment-self_distillation")
    results = out / "results.json"
    if not results.is_file():
        print(
            f"error: {results} does not exist; run `gkd experiment self_distillation` first", file=sys.stderr
        )
        return 2
    text = report(json.loads(results.read_text()))
    (out / "fig_a11.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
