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


def test_a_killed_study_resumes_without_rerunning_finished_runs(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import gkd.experiments.demo as demo
    from gkd.experiments.common import StudySettings

    for d in ("start", "teacher"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "model.safetensors").write_bytes(b"weights")
    ws = SimpleNamespace(
        root=tmp_path,
        task=SimpleNamespace(metric="m"),
        start_dir=tmp_path / "start",
        teacher_dir=tmp_path / "teacher",
        train_path=tmp_path / "train.jsonl",
        test_path=tmp_path / "test.jsonl",
    )
    s = StudySettings(seeds=2, method_steps=3)
    runs = {"a": {"divergence": "forward_kl", "lmbda": 0.0}, "b": {"divergence": "reverse_kl", "lmbda": 1.0}}
    ran: list[list[tuple[str, int]]] = []

    def fake_run_jobs(jobs, *, workers, threads=1, on_result=None, kill_after=None):
        ran.append([(j.name, j.seed) for j in jobs])
        out = []
        for i, j in enumerate(jobs):
            if kill_after is not None and i == kill_after:
                raise KeyboardInterrupt
            r = {"name": j.name, "seed": j.seed, "scores": {"greedy": {"m": 1.0 + i}, "sample": {"m": 0.0}}}
            r["train_s"] = 0.0
            on_result(r)
            out.append(r)
        return out

    def study():
        return demo.run_study(ws, s, runs, workers=1, say=lambda m: None, console=None, label="x")

    monkeypatch.setattr(demo, "run_jobs", lambda *a, **k: fake_run_jobs(*a, **k, kill_after=3))
    with pytest.raises(KeyboardInterrupt):
        study()
    monkeypatch.setattr(demo, "run_jobs", fake_run_jobs)
    results = study()
    assert len(ran[0]) == 4 and ran[1] == ran[0][3:]  # only the unfinished run is trained again
    assert [(r["name"], r["seed"]) for r in results] == [("a", 0), ("b", 0), ("a", 1), ("b", 1)]
    # changed settings or a retrained starting checkpoint invalidate the finished runs
    (tmp_path / "start" / "model.safetensors").write_bytes(b"other weights")
    study()
    assert len(ran[2]) == 4
