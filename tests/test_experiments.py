"""End to end: `gkd demo --quick` and every `gkd experiment NAME --quick` run and write their outputs."""

from __future__ import annotations

import json

import pytest

from gkd.cli import main
from gkd.experiments.demo import DEMO_METHODS


def test_demo_quick_writes_results_in_the_schema(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output-dir", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "summarization" and results["metric"] == "set_match"
    assert isinstance(results["teacher"], float) and isinstance(results["start"], float)
    assert isinstance(results["wall_s"], float)
    assert list(results["methods"]) == list(DEMO_METHODS)
    for entry in results["methods"].values():
        for mode in ("greedy", "sample"):
            assert set(entry[mode]) >= {"mean", "se", "seeds"}
            assert len(entry[mode]["seeds"]) == 2
        assert isinstance(entry["steps"], int) and isinstance(entry["wall_s"], float)
    assert results["methods"]["sft_2x"]["steps"] == 2 * results["methods"]["sft"]["steps"]
    assert (out / "results.png").stat().st_size > 1000
    assert "gkd demo report" in (out / "REPORT.md").read_text()
    assert "paper's finding" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["methods", "divergences", "temperature", "data_efficiency", "rl"])
def test_experiment_quick_runs_and_writes_outputs(name, tmp_path):
    out = tmp_path / name
    assert main(["experiment", name, "--quick", "--output-dir", str(out)]) == 0
    summary = json.loads((out / "results.json").read_text())
    assert summary["experiment"] == name and summary["runs"]
    assert (out / "report.md").read_text().startswith("#")
    assert (out / "results.png").exists()


def test_unknown_experiment_is_a_clear_error(capsys):
    assert main(["experiment", "nope"]) == 2
    assert "unknown experiment 'nope'" in capsys.readouterr().err
