"""The paper's Fig. A.15 from ``gkd experiment translation_methods``: GKD's BLEU gain over the initial student against
ImitKD's and f-distill's (paper: 53 % above ImitKD's, 162 % above f-distill's). RESULTS.md section 14.

    gkd experiment translation_methods                     # the study: runs/experiment-translation_methods
    python experiments/translation_methods.py [DIR]        # this figure's table from DIR/results.json

The study is a packaged study file (``gkd study``'s generic report: means, paired Δ against gkd_jsd_0.9 with 95 %
intervals, cost); what is specific to this figure is here: each method's gain over the workspace's starting student
(its scores are in results.json's ``workspace`` section, by the task's own evaluation at the same two temperatures)
and GKD's greedy gain relative to ImitKD's and f-distill's. Written to ``DIR/fig_a15.md`` and printed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["gains", "main", "report"]

GKD = "gkd_jsd_0.9"
# the study's evaluation modes and the task evaluation's names for the same temperatures (the start's scores)
_MODES = (("greedy", "greedy"), ("T=1", "sample"))


def gains(summary: dict[str, Any]) -> dict[str, dict[str, float]]:
    """method -> study mode -> mean score minus the starting student's."""
    metric, start = summary["headline"], summary["workspace"]["start"]
    return {
        name: {mode: m["scores"][mode]["mean"] - start[task_mode][metric] for mode, task_mode in _MODES}
        for name, m in summary["methods"].items()
    }


def report(summary: dict[str, Any]) -> str:
    """The figure's table (score, gain over the start, Δ against GKD paired per seed) and GKD's relative gains."""
    metric, methods, start = summary["headline"], summary["methods"], summary["workspace"]["start"]
    g = gains(summary)
    lines = [
        f"# translation_methods: Fig. A.15 ({metric}; gain = score − the start's; Δ = run − {GKD} paired per seed, "
        "mean ± SE [95 % t-interval], * = the interval excludes 0)",
        "",
        f"start: greedy {start['greedy'][metric]:.1f}, T=1 {start['sample'][metric]:.1f}",
        "",
        "| run | greedy | gain (greedy) | T=1 | gain (T=1) | Δ vs GKD (greedy) | Δ vs GKD (T=1) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in methods.items():
        cells = []
        for mode, _ in _MODES:
            s = m["scores"][mode]
            cells += [f"{s['mean']:.1f} ± {s['se']:.1f}", f"{g[name][mode]:+.2f}"]
        for mode, _ in _MODES:
            d = m.get("vs_baseline", {}).get(mode)
            cells.append(
                "-"
                if d is None
                else f"{d['mean']:+.1f} ± {d['se']:.1f} [{d['lo']:+.1f}, {d['hi']:+.1f}]"
                + ("*" if d["excludes_zero"] else "")
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if GKD in g:
        for base in ("imitkd", "f_distill"):
            if base in g:
                b = g[base]["greedy"]
                ratio = (
                    f"{100 * (g[GKD]['greedy'] / b - 1):+.0f} %" if b > 0 else "n/a (no gain to compare with)"
                )
                lines.append(
                    f"\nGKD's greedy gain relative to {base}'s: {ratio} (paper: ImitKD +53 %, f-distill +162 %)"
                )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0] if args else "runs/experiment-translation_methods")
    results = out / "results.json"
    if not results.is_file():
        print(
            f"error: {results} does not exist; run `gkd experiment translation_methods` first",
            file=sys.stderr,
        )
        return 2
    text = report(json.loads(results.read_text()))
    (out / "fig_a15.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
