"""The translation_lambda investigation (the repository's experiments/translation_lambda.py, outside the package):
the four candidate causes of the reversed λ order on translation (start quality, capacity, sampling temperature, step
budget), end to end in quick mode through `gkd experiment translation_lambda`, and the real config's design."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import gkd.experiments
from gkd.cli import main
from gkd.experiments import EXPERIMENTS, INVESTIGATIONS, SCRIPTS_DIR
from gkd.experiments.families import load_family

REPO_EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
sys.path.insert(0, str(REPO_EXPERIMENTS))

import translation_lambda  # noqa: E402  (the script, from the repository's experiments/ folder)
from translation_lambda import FAMILY, conditions, report  # noqa: E402


def test_the_investigation_lives_outside_the_package():
    assert "translation_lambda" in INVESTIGATIONS and "translation_lambda" not in EXPERIMENTS
    assert SCRIPTS_DIR == REPO_EXPERIMENTS  # gkd runs it from this source checkout
    package = Path(gkd.experiments.__file__).parent
    assert not (package / "translation_lambda.py").exists()
    assert not (package.parent / "configs" / "experiments" / "translation_lambda.yaml").exists()


def test_outside_a_source_checkout_the_command_says_how_to_run_the_script(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gkd.experiments, "SCRIPTS_DIR", tmp_path)  # an installed gkd: no experiments/ folder
    assert main(["experiment", "translation_lambda", "--quick", "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "python experiments/translation_lambda.py" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_translation_lambda_quick_reports_the_paired_lambda_difference_per_factor(tmp_path):
    out = tmp_path / "translation_lambda"
    assert (
        main(["experiment", "translation_lambda", "--quick", "--output-dir", str(out), "--workers", "1"]) == 0
    )
    summary = json.loads((out / "results.json").read_text())
    assert summary["command"] == "python experiments/translation_lambda.py --quick"
    assert summary["task"] == "translation" and summary["metric"] == "bleu"
    assert set(summary["runs"]) == {
        "lambda_0",
        "lambda_1",
        "lambda_1_T0.5",
        "lambda_0_steps2x",
        "lambda_1_steps2x",
    }
    assert set(summary["variants"]) == {"weak_start", "wide_student"}
    for v in summary["variants"].values():
        assert set(v["runs"]) == {"lambda_0", "lambda_1"}
        assert len(v["runs"]["lambda_1"]["greedy"]["bleu"]["seeds"]) == 2
    # the 2x budget trains 2x the steps from the same start
    assert summary["runs"]["lambda_1_steps2x"]["_steps"] == 2 * summary["runs"]["lambda_1"]["_steps"]

    conds = conditions(summary)
    factors = [c["factor"] for c in conds]
    assert factors.count("baseline") == 1 and factors.count("start quality") == 1
    assert {"capacity", "sampling temperature", "step budget"} <= set(factors)
    temp = next(c for c in conds if c["factor"] == "sampling temperature")
    assert temp["shared"] == [0.0] and temp["runs"][0.0] is summary["runs"]["lambda_0"]  # λ=0 does not sample

    text = (out / "report.md").read_text()
    smoke = "> smoke run (--quick): tiny models, a few steps; no conclusion\n\n"
    assert text.startswith(smoke + "# translation_lambda") and text.startswith(smoke + report(summary))
    assert "## Cost per run" in text  # every family's report ends with its runs' cost
    assert "λ=1 − λ=0" in text and "## greedy bleu" in text and "## T=1 bleu" in text
    for factor in (
        "| baseline |",
        "| start quality |",
        "| capacity |",
        "| sampling temperature |",
        "| step budget |",
    ):
        assert text.count(factor) == 2, factor  # greedy and T=1 tables
    assert "(baseline's)" in text
    assert (out / "results.png").stat().st_size > 1000

    # the report again from results.json alone (the script's --report-only), cost section included
    (out / "report.md").unlink()
    assert translation_lambda.main(["--report-only", "--output-dir", str(out)]) == 0
    again = (out / "report.md").read_text()
    assert again.startswith(report(summary)) and "## Cost per run" in again


def test_the_real_config_changes_one_factor_per_condition():
    spec = load_family(FAMILY)
    s = spec["settings"]
    assert s["task"] == "translation" and s["seeds"] >= 3
    runs = spec["runs"]
    # the baseline: JSD(0.1) at λ = 0 and 1
    for name, lam in (("lambda_0", 0.0), ("lambda_1", 1.0)):
        assert runs[name] == {"preset": "on_policy_gkd", "config": {"beta": 0.1, "lmbda": lam}}
    # sampling temperature: the student's samples at T=0.5, nothing else changed
    assert runs["lambda_1_T0.5"]["config"] == {"beta": 0.1, "lmbda": 1.0, "temperature": 0.5}
    # step budget: 2x the steps from the baseline's start
    assert runs["lambda_0_steps2x"]["study"] == runs["lambda_1_steps2x"]["study"] == {"steps": 2}
    variants = spec["variants"]
    teacher = f"{spec['workspace']}/teacher"
    for v in variants.values():
        assert v["settings"]["shipped_teacher"] == teacher  # every variant distils from the same teacher
        assert set(v["runs"]) == {"lambda_0", "lambda_1"}
        assert v["workspace"] != spec["workspace"] and v["workspace"].startswith(
            "runs/experiments/translation-lambda"
        )
    # start quality: a weaker start, same student
    weak = variants["weak_start"]["settings"]
    assert weak["start_steps"] < s["start_steps"] and "student" not in weak
    # capacity: a 2x wider student
    wide = variants["wide_student"]["settings"]["student"]
    assert wide["hidden_size"] == 96 and wide["num_hidden_layers"] == 1
