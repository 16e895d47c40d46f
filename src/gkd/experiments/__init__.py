"""The demo and the paper's experiment families at toy scale (``gkd demo``, ``gkd experiment NAME``).

* :mod:`~gkd.experiments.study`: the machinery both run on (recipes from the packaged presets, workspace, jobs,
  worker pool, resuming, evaluation, statistics);
* :mod:`~gkd.experiments.demo` and :mod:`~gkd.experiments.families`: their settings, reports and plots;
* :mod:`~gkd.experiments.common`: task data on disk (``gkd prepare``) and the teacher gkd ships;
* :mod:`~gkd.experiments.cost`: each run's cost (wall time, tokens generated and processed), in every study's report;
* :mod:`~gkd.experiments.userstudy` (``gkd study FILE.yaml``): the same machinery on the user's own models and data,
  with :mod:`~gkd.experiments.metric` (its metric) and :mod:`~gkd.experiments.userreport` (its outputs).

A family whose packaged YAML is a study file (``methods:`` and a built-in ``task:``) runs through ``gkd study``'s
code (:func:`gkd.experiments.families.run_study_family`); its figure-specific tables are scripts in the repository's
top-level ``experiments/`` folder that read its results.json. One-off investigations (``INVESTIGATIONS``) are such
scripts entirely.
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
    "summarization_lambda",
    "on_policy",
    "self_distillation",
    "translation_methods",
)

# one-off investigations: scripts in the repository's top-level experiments/ folder (beside RESULTS.md), not in the
# package; `gkd experiment NAME` runs one from a source checkout and otherwise says how to run it
INVESTIGATIONS = ("translation_lambda",)
# where those scripts are in a source checkout (src/gkd/experiments/ -> the repository root's experiments/)
SCRIPTS_DIR = Path(__file__).resolve().parents[3] / "experiments"

__all__ = ["EXPERIMENTS", "INVESTIGATIONS", "SCRIPTS_DIR", "run_experiment"]


def run_experiment(
    name: str, output_dir: Path | None = None, quick: bool = False, workers: int | None = None
) -> dict[str, Any]:
    """Run one experiment family; its settings live in ``configs/experiments/NAME.yaml``. An investigation
    (``INVESTIGATIONS``) runs its script from ``SCRIPTS_DIR`` when gkd runs from a source checkout."""
    if name in INVESTIGATIONS:
        return _run_script(name, output_dir, quick, workers)
    if name not in EXPERIMENTS:
        valid = ", ".join(EXPERIMENTS + INVESTIGATIONS)
        raise ConfigError(f"unknown experiment {name!r}; valid: {valid}")
    from gkd.experiments import families

    out = output_dir or Path("runs") / f"experiment-{name}"
    if families.is_study_file(name):  # a study file: gkd study's code on the built-in task
        return families.run_study_family(name, output_dir=out, quick=quick, workers=workers)
    return families.run(name, output_dir=out, quick=quick, workers=workers)


def _run_script(name: str, output_dir: Path | None, quick: bool, workers: int | None) -> dict[str, Any]:
    """Investigation ``name``: its script's ``run`` (the script is loaded from ``SCRIPTS_DIR``, not imported from
    the package, which holds no investigation-specific code)."""
    import importlib.util

    script = SCRIPTS_DIR / f"{name}.py"
    if not script.is_file():
        raise ConfigError(
            f"'{name}' is an investigation outside the package: from a gkd source checkout run "
            f"`python experiments/{name}.py` (it is not in installed copies of gkd)"
        )
    loaded = importlib.util.spec_from_file_location(f"gkd_investigation_{name}", script)
    module = importlib.util.module_from_spec(loaded)  # type: ignore[arg-type]
    loaded.loader.exec_module(module)  # type: ignore[union-attr]
    return module.run(output_dir=output_dir, quick=quick, workers=workers)
