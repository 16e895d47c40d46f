"""`gkd experiment translation_lambda`: the four candidate causes of the reversed λ order on translation (start
quality, capacity, sampling temperature, step budget), end to end in quick mode, and the real config's design."""

from __future__ import annotations

from gkd.experiments import EXPERIMENTS
from gkd.experiments.families import load_family
from gkd.experiments.translation_lambda import conditions, report


def test_translation_lambda_quick_reports_the_paired_lambda_difference_per_factor(tmp_path):
    from gkd.experiments import families

    out = tmp_path / "translation_lambda"
    summary = families.run("translation_lambda", output_dir=out, quick=True, workers=1)
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


def test_the_real_config_changes_one_factor_per_condition():
    assert "translation_lambda" in EXPERIMENTS
    spec = load_family("translation_lambda")
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
