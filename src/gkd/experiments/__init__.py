"""The demo and the paper's experiment families at toy scale (``gkd demo``, ``gkd experiment NAME``).

* :mod:`~gkd.experiments.study`: the machinery both run on (recipes from the packaged presets, workspace, jobs,
  worker pool, resuming, evaluation, statistics);
* :mod:`~gkd.experiments.demo` and :mod:`~gkd.experiments.families`: their settings, reports and plots;
* :mod:`~gkd.experiments.common`: task data on disk (``gkd prepare``) and the teacher gkd ships;
* :mod:`~gkd.experiments.cost`: each run's cost (wall time, tokens generated and processed), in every study's report;
* :mod:`~gkd.experiments.userstudy` (``gkd study FILE.yaml``): the same machinery on the user's own models and data,
  with :mod:`~gkd.experiments.metric` (its metric) and :mod:`~gkd.experiments.userreport` (its outputs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gkd.errors import ConfigError

EXPERIMENTS = (
    "methods",
    "divergences",
    "temperature",
    "data_efficiency",
    "rl",
    "scaling",
    "arithmetic",
    "arithmetic_lambda",
    "instruction",
    "translation_lambda",
    "summarization_lambda",
    "on_policy",
    "self_distillation",
    "translation_methods",
)

__all__ = ["EXPERIMENTS", "run_experiment"]


def run_experiment(
    name: str, output_dir: Path | None = None, quick: bool = False, workers: int | None = None
) -> dict[str, Any]:
    """Run one experiment family; its settings live in ``configs/experiments/NAME.yaml``."""
    if name not in EXPERIMENTS:
        raise ConfigError(f"unknown experiment {name!r}; valid: {', '.join(EXPERIMENTS)}")
    from gkd.experiments import families

    out = output_dir or Path("runs") / f"experiment-{name}"
    return families.run(name, output_dir=out, quick=quick, workers=workers)
