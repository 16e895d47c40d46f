"""``gkd study FILE.yaml`` on a user's own tiny models and data (not a built-in task): it runs, stops part-way and
resumes without re-running finished runs, and its report's paired differences are the hand computation's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from scipy import stats
from userland import run_cli

from gkd.errors import ConfigError
from gkd.experiments.metric import metric_scorer
from gkd.experiments.userstudy import load_study_file, run_study_file

METHODS = {
    "sft": {"preset": "sft"},
    "on_policy": {"preset": "on_policy_gkd", "beta": 0.5},
}


@pytest.fixture(scope="module")
def user_files(tmp_path_factory, tokenizer, records, eval_records):
    """What a user brings: a teacher and a student folder, and their own JSONL data (records renamed from the
    built-in generator's, so nothing here is a built-in task)."""
    from tiny import make_model

    root = tmp_path_factory.mktemp("user")
    for name, kind, seed in (("student", "llama_student", 1), ("teacher", "llama_teacher", 0)):
        make_model(kind, tokenizer, seed=seed).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    for name, recs in (("mine-train.jsonl", records[:64]), ("mine-eval.jsonl", eval_records[:8])):
        with (root / name).open("w") as fh:
            for r in recs:
                fh.write(json.dumps({"prompt": r["prompt"], "completion": r["completion"]}) + "\n")
    return root


def _study(root: Path, **extra) -> Path:
    spec = {
        "teacher": str(root / "teacher"),
        "student": str(root / "student"),
        "train_dataset": str(root / "mine-train.jsonl"),
        "eval_dataset": str(root / "mine-eval.jsonl"),
        "metric": "rougeL",
        "methods": METHODS,
        "baseline": "sft",
        "seeds": 2,
        "eval_temperatures": [0, 1],
        "common": {
            "max_steps": 2,
            "learning_rate": 1e-3,
            "lr_scheduler_type": "constant",
            "per_device_train_batch_size": 4,
            "max_new_tokens": 6,
        },
        **extra,
    }
    path = root / f"study-{len(list(root.glob('study-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


class _Stop(Exception):
    pass


def test_a_study_stops_resumes_and_reports_paired_intervals(user_files, tmp_path):
    path, out = _study(user_files), tmp_path / "out"
    finished: list[tuple[str, int]] = []

    def stop_after_first(result):
        finished.append((result["name"], result["seed"]))
        raise _Stop  # as a kill after the first run's result is on disk

    with pytest.raises(_Stop):
        run_study_file(path, out, workers=1, after_result=stop_after_first)
    assert len(finished) == 1
    first = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    first_weights = out / "runs" / f"seed{first['seed']}" / first["name"] / "model.safetensors"
    stamp = first_weights.stat().st_mtime_ns

    again: list[tuple[str, int]] = []
    summary = run_study_file(
        path, out, workers=1, after_result=lambda r: again.append((r["name"], r["seed"]))
    )
    # only the three unfinished runs trained; the first run's model was not written again
    assert sorted(again) == sorted({(m, s) for m in METHODS for s in (0, 1)} - set(finished))
    assert first_weights.stat().st_mtime_ns == stamp
    assert len((out / "results.jsonl").read_text().splitlines()) == 4

    results = json.loads((out / "results.json").read_text())
    assert results == json.loads(json.dumps(summary))
    assert {(r["method"], r["seed"]) for r in results["runs"]} == {(m, s) for m in METHODS for s in (0, 1)}
    for r in results["runs"]:
        assert set(r["scores"]) == {"greedy", "T=1"}
        cost = r["cost"]
        assert cost["steps"] == 2 and cost["wall_s"] > 0 and cost["student_tokens"] > 0
        if r["method"] == "sft":  # no teacher, no rollouts
            assert cost["teacher_tokens"] == 0 and cost["rollout_tokens"] == 0
        else:  # on-policy: every step samples, and the teacher scores what the student processes
            assert cost["rollout_tokens"] > 0 and cost["teacher_tokens"] == cost["student_tokens"]

    # the paired Δ and its 95 % interval, by hand from results.json's runs
    report = (out / "report.md").read_text()
    checked = 0
    for mode in ("greedy", "T=1"):
        score = {(r["method"], r["seed"]): r["scores"][mode]["rougeL"] for r in results["runs"]}
        diffs = [score[("on_policy", s)] - score[("sft", s)] for s in (0, 1)]
        mean = sum(diffs) / 2
        sd = abs(diffs[0] - diffs[1]) / 2**0.5
        ci = results["methods"]["on_policy"]["vs_baseline"][mode]
        assert ci["mean"] == pytest.approx(mean)
        if sd > 0:
            half = stats.t.ppf(0.975, 1) * sd / 2**0.5
            assert (ci["lo"], ci["hi"]) == pytest.approx((mean - half, mean + half))
            assert ci["p"] == pytest.approx(
                stats.ttest_rel(
                    [score[("on_policy", s)] for s in (0, 1)], [score[("sft", s)] for s in (0, 1)]
                ).pvalue
            )
            assert f"[{mean - half:+.2f}, {mean + half:+.2f}]" in report
            checked += 1
        assert ("excludes 0" in report) or ("includes 0" in report)
    assert checked, "the seeds' differences never varied: nothing to compare an interval with"
    assert "train s" in report and "teacher tokens" in report
    assert (out / "results.png").stat().st_size > 0


def test_the_cli_runs_a_study_file_with_a_learning_rate_grid(user_files, tmp_path):
    path = _study(user_files, lr_grid=[1e-3, 1e-2], seeds=[3], validation_fraction=0.25)
    result = run_cli(["study", str(path), "--out", str(tmp_path / "out"), "--workers", "1"])
    assert result.code == 0, str(result)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    for name in METHODS:
        choice = results["methods"][name]["lr_choice"]
        assert set(choice["scores"]) == {"0.001", "0.01"}
        assert results["methods"][name]["lr"] == choice["lr"] in (1e-3, 1e-2)
    # the choice was made on records held out of training (the last quarter of the user's training file)
    val = Path(results["data_files"]["validation"]).read_text().splitlines()
    train = Path(results["data_files"]["train"]).read_text().splitlines()
    assert len(val) == 16 and len(train) == 48 and not set(val) & set(train)
    assert "chosen on a validation split" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"metrc": "bleu"}, "unknown key 'metrc'; did you mean 'metric'?"),
        ({"baseline": "sfft"}, "baseline 'sfft' is not a method; did you mean 'sft'?"),
        ({"metric": "rouge"}, "metric 'rouge' is neither a gkd metric or task name nor module:function"),
        ({"metric": "no_such_module:score"}, "metric 'no_such_module:score': cannot import module"),
        ({"methods": {"sft": {"preset": "sfd"}}, "baseline": "sft"}, "unknown preset 'sfd'"),
        ({"methods": {"sft": {"preset": "sft", "lmbad": 1}}}, "did you mean 'lmbda'?"),
        ({"teacher": "no/such/folder"}, "teacher 'no/such/folder' does not exist"),
        ({"common": {"learning_rate": 1e-3}}, "common needs max_steps"),
        ({"methods": {"sft": {"preset": "sft", "seed": 3}}}, "the study sets seed"),
    ],
)
def test_a_bad_study_file_is_one_clear_line(user_files, tmp_path, change, message):
    path = _study(user_files, **change)
    with pytest.raises(ConfigError, match=None) as e:
        load_study_file(path)
    assert message in str(e.value) and "\n" not in str(e.value)
    result = run_cli(["study", str(path), "--out", str(tmp_path / "out")])
    assert result.is_clean_error(), str(result)


def test_a_missing_study_file_is_one_clear_line(tmp_path):
    result = run_cli(["study", str(tmp_path / "nope.yaml")])
    assert result.is_clean_error() and "does not exist" in result.err


def test_a_module_function_metric_scores_each_completion(tmp_path, monkeypatch):
    """``metric: module:function`` takes a reward's arguments and is reported as 100 × the mean of its scores."""
    (tmp_path / "study_word_metric.py").write_text(
        "def has_word(prompts, completions, records):\n"
        "    return [float(r['completion'].split()[0] in c.split()) for c, r in zip(completions, records)]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    records = [{"prompt": "a", "completion": "x y"}, {"prompt": "b", "completion": "z"}]
    scores = metric_scorer("study_word_metric:has_word")(records, ["x", "w"])
    assert scores == {"study_word_metric:has_word": 50.0}


@pytest.mark.parametrize("lmbda", [0.0, 1.0], ids=["dataset", "on-policy"])
def test_the_cost_meter_counts_every_token_of_a_step(llama_pair, tokenizer, records, tmp_path, lmbda):
    """One step over the whole (4-record) dataset: the student processes every prompt and completion token (its own
    completions on-policy, which are then also the rollout's), and the teacher scores the same tokens."""
    from conftest import base_config

    from gkd.data import tokenize_records
    from gkd.experiments.cost import MeteredTrainer

    student, teacher = llama_pair
    data = tokenize_records(records[:4], tokenizer, max_prompt_length=64, max_completion_length=8)
    cfg = base_config(
        divergence="forward_kl",
        lmbda=lmbda,
        per_device_train_batch_size=4,
        max_steps=1,
        output_dir=str(tmp_path / "run"),
    )
    trainer = MeteredTrainer(cfg, student=student, teacher=teacher, tokenizer=tokenizer, train_dataset=data)
    trainer.train()
    cost = trainer.cost
    prompts = sum(len(e.prompt) for e in data.examples)
    if lmbda == 0.0:
        completions = sum(len(e.completion) for e in data.examples)
        assert cost["rollout_tokens"] == 0
    else:  # the student's own completions: 1 to max_new_tokens tokens each
        completions = cost["rollout_tokens"]
        assert 4 <= completions <= 4 * 8
    assert cost["student_tokens"] == prompts + completions
    assert cost["teacher_tokens"] == prompts + completions and cost["steps"] == 1
