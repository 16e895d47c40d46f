"""The demo and the experiment families: end to end (`gkd demo --quick`, every `gkd experiment NAME --quick`), and
the study machinery they share (recipes from the packaged presets, the job plan, resuming, caching)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from gkd.cli import main
from gkd.errors import ConfigError, GKDError
from gkd.experiments import EXPERIMENTS, study
from gkd.experiments.common import write_jsonl
from gkd.experiments.demo import DEMO_METHODS, demo_settings
from gkd.experiments.families import is_study_file, load_family
from gkd.experiments.study import Recipe, StudyOptions, StudySettings, job_config, named_recipes, parse_runs


def test_demo_quick_writes_results_in_the_schema(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output-dir", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "summarization" and results["metric"] == "set_match"
    assert results["task_params"] == {"target_order": "prompt"}
    assert isinstance(results["teacher"], float) and isinstance(results["start"], float)
    assert isinstance(results["wall_s"], float)
    assert list(results["methods"]) == list(DEMO_METHODS)
    for entry in results["methods"].values():
        for mode in ("greedy", "sample"):
            assert set(entry[mode]) >= {"mean", "se", "seeds"}
            assert len(entry[mode]["seeds"]) == 2
        assert isinstance(entry["steps"], int) and isinstance(entry["wall_s"], float)
        # each method's recipe beside its scores: the knobs, and the learning rate chosen on validation prompts
        recipe = entry["recipe"]
        assert set(recipe) >= {"divergence", "beta", "lmbda", "learning_rate", "lr_selection"}
        assert recipe["learning_rate"] in (1e-3, 3e-3) and set(recipe["lr_selection"]) == {"0.001", "0.003"}
    lam = {n: e["recipe"]["lmbda"] for n, e in results["methods"].items()}
    assert lam["gkd_reverse_kl"] == 1.0 and lam["offpolicy_reverse_kl"] == 0.0
    head = results["comparisons"][0]
    assert (head["knob"], head["method"], head["control"]) == ("λ", "gkd_reverse_kl", "offpolicy_reverse_kl")
    for c in results["comparisons"]:
        a, b = results["methods"][c["method"]], results["methods"][c["control"]]
        diffs = [x - y for x, y in zip(a["sample"]["seeds"], b["sample"]["seeds"])]
        assert c["sample"]["mean"] == pytest.approx(sum(diffs) / 2)
        assert c["sample"]["lo"] <= c["sample"]["mean"] <= c["sample"]["hi"]
    # a smoke run draws no conclusion
    assert results["finding"]["smoke_run"] and not results["finding"]["holds"]
    assert (out / "results.png").stat().st_size > 1000
    report = (out / "REPORT.md").read_text()
    assert "gkd demo report" in report and "95 %" in report and "no conclusion" in report
    assert "tokens/run: rollout, student, teacher" in report
    printed = capsys.readouterr().out
    assert "knob: λ" in printed and "smoke run (--quick): no conclusion" in printed
    assert "learning rates chosen on validation" in printed
    assert set(results["mechanism"]) == {"start", *DEMO_METHODS}
    assert all(0.0 <= e["error_mass_dataset"] <= 1.0 + 1e-5 for e in results["mechanism"].values())
    assert "error mass" in report and "matched sampling temperatures" in report
    assert set(results["comparisons"][0]["by_temperature"]) == {"0.3", "0.5", "0.7", "1"}


@pytest.mark.parametrize(
    "name",
    [
        "methods",
        "divergences",
        "temperature",
        "data_efficiency",
        "rl",
        "on_policy",
    ],
)
def test_experiment_quick_runs_and_writes_outputs(name, tmp_path):
    out = tmp_path / name
    assert main(["experiment", name, "--quick", "--output-dir", str(out)]) == 0
    summary = json.loads((out / "results.json").read_text())
    assert summary["experiment"] == name and summary["runs"]
    assert (out / "report.md").read_text().startswith("> smoke run (--quick)")
    assert "## Cost per run" in (out / "report.md").read_text()  # each run's time and tokens beside the gains
    assert all(r["_cost"]["steps"] > 0 for r in summary["runs"].values())
    assert (out / "results.png").exists()


def test_arithmetic_family_quick_runs_the_gsm8k_comparison(tmp_path):
    # the paper's GSM8K comparison on the `arithmetic` task, scored by the checked final answer (plus chain_valid)
    from gkd.experiments import families

    out = tmp_path / "arithmetic"
    summary = families.run("arithmetic", output_dir=out, quick=True, workers=1)
    assert summary["task"] == "arithmetic" and summary["metric"] == "final_answer"
    assert list(summary["runs"]) == [
        "sft",
        "supervised_kd",
        "seqkd",
        "imitkd",
        "gkd_forward_kl",
        "gkd_reverse_kl",
        "offpolicy_reverse_kl",
        "gkd_jsd_0.9",
    ]
    for r in summary["runs"].values():
        assert (
            set(r["greedy"]) >= {"final_answer", "chain_valid"}
            and len(r["sample"]["final_answer"]["seeds"]) == 2
        )
    assert "Δ vs supervised_kd" in (out / "report.md").read_text()
    assert (out / "results.png").exists()


def test_scaling_quick_reports_the_paired_gain_per_student_size(tmp_path):
    from gkd.experiments import families

    summary = families.run("scaling", output_dir=tmp_path / "scaling", quick=True, workers=1)
    sizes = [summary, *summary["variants"].values()]
    runs = {"supervised_kd", "gkd_reverse_kl", "offpolicy_reverse_kl"}
    assert len(sizes) == 3 and all(set(v["runs"]) == runs for v in sizes)
    assert all(len(v["runs"]["gkd_reverse_kl"]["sample"]["set_match"]["seeds"]) == 2 for v in sizes)
    report = (tmp_path / "scaling" / "report.md").read_text()
    assert (
        report.startswith("> smoke run (--quick)")
        and "\n# scaling" in report
        and report.count("| gkd_reverse_kl |") == 3
    )
    assert (tmp_path / "scaling" / "results.png").stat().st_size > 1000
    # the full config names three distinct student sizes and the teacher gkd ships
    spec = load_family("scaling")
    widths = [spec["settings"]["student"]["hidden_size"]]
    widths += [v["settings"]["student"]["hidden_size"] for v in spec["variants"].values()]
    assert sorted(widths) == [16, 24, 48] and spec["settings"]["shipped_teacher"] == "demo_teacher"


def test_arithmetic_lambda_quick_reports_the_grid_and_shares_the_arithmetic_workspace(tmp_path):
    from gkd.experiments import families

    out = tmp_path / "al"
    summary = families.run("arithmetic_lambda", output_dir=out, quick=True, workers=1)
    divs = {n.rpartition("_lambda_")[0] for n in summary["runs"]}
    assert divs == {"forward_kl", "reverse_kl"} and len(summary["runs"]) == 7
    report = (out / "report.md").read_text()
    assert (
        report.startswith("> smoke run (--quick)")
        and "\n# arithmetic_lambda" in report
        and report.count("| forward_kl | ") == 4
    )
    assert "Δ vs λ=0" in report and (out / "results.png").stat().st_size > 1000
    # same workspace and settings as `gkd experiment arithmetic`, so the two share teacher and start
    a, b = load_family("arithmetic"), load_family("arithmetic_lambda")
    assert a["workspace"] == b["workspace"] and a["settings"] == b["settings"]


def test_instruction_quick_scores_held_in_and_held_out_instructions(tmp_path):
    from gkd.experiments import families
    from gkd.tasks.instructions import INSTRUCTIONS, instruction_of

    out = tmp_path / "instruction"
    summary = families.run("instruction", output_dir=out, quick=True, workers=1)
    assert (
        summary["task"] == "instructions" and "sft" in summary["runs"] and "gkd_reverse_kl" in summary["runs"]
    )
    for r in summary["runs"].values():
        assert set(r["sample"]) >= {"held_in", "held_out", "held_out_f1"}
    # the students train on the mixture, the teacher on every instruction, and the test set holds both
    data = out / "workspace" / "data"
    student = {instruction_of(r) for r in study.read_jsonl(data / "train.jsonl")}
    teacher = {instruction_of(r) for r in study.read_jsonl(data / "teacher-train.jsonl")}
    test = {instruction_of(r) for r in study.read_jsonl(data / "test.jsonl")}
    assert not student & {"upper late", "lower early"} and teacher == test == set(INSTRUCTIONS)
    report = (out / "report.md").read_text()
    assert (
        report.startswith("> smoke run (--quick)")
        and "\n# instruction" in report
        and "Δ held out vs supervised_kd" in report
    )
    assert (out / "results.png").stat().st_size > 1000


def test_summarization_lambda_quick_splits_the_failures(tmp_path):
    from gkd.experiments import families

    out = tmp_path / "sl"
    summary = families.run("summarization_lambda", output_dir=out, quick=True, workers=1)
    assert [n for n in summary["runs"] if n.startswith("forward_kl")] == [
        f"forward_kl_lambda_{x}" for x in ("0", "0.25", "0.5", "0.75", "1")
    ]
    report = (out / "report.md").read_text()
    assert (
        report.count("| forward_kl | ") == 5 + 2 and "Δ dup_rate" in report
    )  # 5 λ rows, greedy + T=1 change
    r = summary["runs"]["forward_kl_lambda_1"]["sample"]
    other = 100 - r["set_match"]["mean"] - r["dup_rate"]["mean"]
    assert f"{other:.1f} ±" in report.split("| forward_kl | 1 |")[1].split("\n")[0]
    assert (out / "results.png").stat().st_size > 1000


def test_a_study_file_family_runs_through_gkd_study(tmp_path):
    """`gkd experiment translation_methods` is a packaged study file on the built-in translation task: gkd study's
    jobs and generic report; the figure's own table (gains over the start) is the repository's script's."""
    from gkd.experiments.families import family_path
    from gkd.experiments.userstudy import load_study_file

    assert is_study_file("translation_methods") and not is_study_file("divergences")
    sf = load_study_file(family_path("translation_methods"))
    assert sf.task == "translation" and sf.metric == "bleu" and sf.baseline == "gkd_jsd_0.9"
    # the same workspace and settings as the divergences family (its teacher and start are reused)
    div = load_family("divergences")
    assert sf.workspace == div["workspace"]
    assert {k: getattr(sf.task_settings, k) for k in div["settings"]} == div["settings"]

    out = tmp_path / "tm"
    assert main(["experiment", "translation_methods", "--quick", "--output-dir", str(out)]) == 0
    summary = json.loads((out / "results.json").read_text())
    assert list(summary["methods"]) == list(sf.methods) and summary["seeds"] == [0, 1]
    assert summary["workspace"]["task"] == "translation" and "bleu" in summary["workspace"]["start"]["greedy"]
    assert set(summary["methods"]["imitkd"]["vs_baseline"]) == {"greedy", "T=1"}
    text = (out / "report.md").read_text()
    assert text.startswith("> smoke run (--quick)") and "## Paired differences against gkd_jsd_0.9" in text
    assert (out / "results.png").exists() and load_study_file(
        out / "translation_methods.yaml"
    ).task == "translation"

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
    import translation_methods  # the figure's script, outside the package

    assert translation_methods.main([str(out)]) == 0
    fig = (out / "fig_a15.md").read_text()
    assert all(f"| {name} |" in fig for name in sf.methods) and "relative to imitkd's" in fig
    start = summary["workspace"]["start"]["greedy"]["bleu"]
    gain = translation_methods.gains(summary)["sft"]["greedy"]
    assert gain == summary["methods"]["sft"]["scores"]["greedy"]["mean"] - start


# the runs of the families that became study files, as their family files (runs: recipes) had them
_FAMILY_FILES = {
    "translation_methods": (
        "settings: {task: translation, max_new_tokens: 17}",
        {
            "sft": "{recipe: sft}",
            "supervised_kd": "{recipe: supervised_kd}",
            "imitkd": "{recipe: imitkd}",
            "f_distill": "{recipe: f_distill}",
            "gkd_jsd_0.9": "{recipe: gkd_jsd_0.9}",
            "offpolicy_jsd_0.9": "{recipe: gkd_jsd_0.9, config: {lmbda: 0.0}}",
        },
    ),
    "self_distillation": (
        "settings: {task: summarization}",
        {
            "sft": "{recipe: sft}",
            "supervised_kd": "{recipe: supervised_kd}",
            "offpolicy_reverse_kl": "{recipe: offpolicy_reverse_kl}",
            "gkd_reverse_kl": "{recipe: gkd_reverse_kl}",
        },
    ),
}


@pytest.mark.parametrize("name", list(_FAMILY_FILES))
def test_a_study_file_family_scores_as_its_family_file_did(name, tmp_path):
    """A family that became a study file trains and evaluates exactly as its family file did: the same per-seed
    scores, greedy and at T=1 (quick sizes), so RESULTS.md's numbers stand for the moved command."""
    from gkd.experiments import families

    settings, runs = _FAMILY_FILES[name]
    family = tmp_path / "family.yaml"
    family.write_text(f"{settings}\nruns:\n" + "".join(f"  {n}: {r}\n" for n, r in runs.items()))
    old = families.run(
        name,
        output_dir=tmp_path / "old",
        quick=True,
        workers=1,
        family_file=family,
        report=lambda summary: "",
        plot=lambda summary, path: None,
    )
    new = families.run_study_family(name, output_dir=tmp_path / "new", quick=True, workers=1)
    assert new["workspace"]["start"] == old["start"] and new["workspace"]["teacher"] == old["teacher"]
    metric = new["headline"]
    assert list(new["methods"]) == list(runs)
    for run in runs:
        for mode, old_mode in (("greedy", "greedy"), ("T=1", "sample")):
            seeds = [r["scores"][mode][metric] for r in new["runs"] if r["method"] == run]
            assert seeds == old["runs"][run][old_mode][metric]["seeds"], (run, mode)
    if name == "self_distillation":  # its figure's script: each method against the teacher, from results.json
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
        import self_distillation

        assert self_distillation.main([str(tmp_path / "new")]) == 0
        fig = (tmp_path / "new" / "fig_a11.md").read_text()
        assert "| teacher |" in fig and all(f"| {run} |" in fig for run in runs)
        teacher = new["workspace"]["teacher"]["greedy"][metric]
        delta = self_distillation.vs_teacher(new)["sft"]["greedy"]["mean"]
        assert delta == pytest.approx(new["methods"]["sft"]["scores"]["greedy"]["mean"] - teacher)


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            "teacher: models/t\n",
            "task 'translation' makes the teacher, the student and the data; remove teacher",
        ),
        ("task_settings: {n_trian: 5}\n", "unknown key 'n_trian'"),
    ],
)
def test_a_study_files_task_is_checked_in_one_line(tmp_path, extra, message):
    from gkd.experiments.userstudy import load_study_file

    body = "methods: {a: {preset: sft}}\nbaseline: a\ncommon: {max_steps: 2}\n"
    (tmp_path / "s.yaml").write_text("task: translation\n" + extra + body)
    with pytest.raises(ConfigError, match=message):
        load_study_file(tmp_path / "s.yaml")
    (tmp_path / "s.yaml").write_text("task: translaton\n" + body)
    with pytest.raises(ConfigError, match="unknown task 'translaton'; did you mean 'translation'"):
        load_study_file(tmp_path / "s.yaml")
    (tmp_path / "s.yaml").write_text("teacher: t\nworkspace: w\n" + body)
    with pytest.raises(ConfigError, match="task_settings and workspace need task:"):
        load_study_file(tmp_path / "s.yaml")


def test_unknown_experiment_is_a_clear_error(capsys):
    assert main(["experiment", "nope"]) == 2
    assert "unknown experiment 'nope'" in capsys.readouterr().err


def _fake_workspace(tmp_path):
    for d in ("start", "teacher"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "model.safetensors").write_bytes(b"weights")
    return SimpleNamespace(
        root=tmp_path,
        task=SimpleNamespace(metric="m"),
        start_dir=tmp_path / "start",
        teacher_dir=tmp_path / "teacher",
        train_path=tmp_path / "train.jsonl",
        test_path=tmp_path / "test.jsonl",
    )


def test_a_killed_study_resumes_without_rerunning_finished_runs(tmp_path, monkeypatch):
    ws = _fake_workspace(tmp_path)
    s = StudySettings(seeds=2, method_steps=3)
    runs = {"a": Recipe("supervised_kd"), "b": Recipe("on_policy_reverse_kl")}
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

    def run():
        return study.run_study(ws, s, runs, workers=1, say=lambda m: None, console=None, label="x")

    monkeypatch.setattr(study, "run_jobs", lambda *a, **k: fake_run_jobs(*a, **k, kill_after=3))
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(study, "run_jobs", fake_run_jobs)
    results = run()
    assert len(ran[0]) == 4 and ran[1] == ran[0][3:]  # only the unfinished run is trained again
    assert [(r["name"], r["seed"]) for r in results] == [("a", 0), ("b", 0), ("a", 1), ("b", 1)]
    # changed settings or a retrained starting checkpoint invalidate the finished runs
    (tmp_path / "start" / "model.safetensors").write_bytes(b"other weights")
    run()
    assert len(ran[2]) == 4


# --------------------------------------------------------------------------------------------------- recipes


def test_every_recipe_and_family_run_is_a_preset_plus_overrides():
    recipes = named_recipes()
    assert set(DEMO_METHODS) <= set(recipes)
    for name in EXPERIMENTS:
        if is_study_file(name):  # its methods are checked by gkd study's parser (test below)
            continue
        spec = load_family(name)
        runs = parse_runs(spec["runs"], name, recipes)
        for vspec in (spec.get("variants") or {}).values():
            runs.update(parse_runs(vspec["runs"], name, recipes))
        for run in runs.values():
            cfg = job_config(run, 0, Path("out"), StudySettings())
            assert not {"seqkd", "steps", "data_fraction", "labels"} & set(cfg)  # study switches stay out


def test_the_published_job_configs_are_unchanged():
    """The demo's configs as published in README.md (full settings, seed 3, at the chosen learning rate): a change
    here changes the numbers."""
    recipes = named_recipes()
    s = demo_settings()
    assert s.lr_grid == [3e-4, 1e-3, 3e-3] and s.task_params == {"target_order": "prompt"}
    common = {
        "learning_rate": 3e-3,
        "lr_scheduler_type": "linear",  # linear warm-up, then linear decay to 0 (transformers' schedule)
        "warmup_steps": 20,
        "max_steps": 500,
        "per_device_train_batch_size": 64,
        "max_new_tokens": 8,
        "temperature": 1.0,
        "adam_beta2": 0.98,
        "weight_decay": 0.01,
        "output_dir": "out",
        "overwrite_output_dir": True,
        "logging_steps": 100,
        "save_steps": 0,
        "save_total_limit": 1,
        "seed": 3,
        "progress": False,
    }
    expected = {
        "sft": {"divergence": "nll", "lmbda": 0.0},
        "supervised_kd": {"divergence": "forward_kl", "lmbda": 0.0},
        "gkd_forward_kl": {"divergence": "forward_kl", "lmbda": 1.0},
        "offpolicy_reverse_kl": {"divergence": "reverse_kl", "lmbda": 0.0},
        "gkd_reverse_kl": {"divergence": "reverse_kl", "lmbda": 1.0},
    }
    for name in DEMO_METHODS:
        assert job_config(recipes[name], 3, Path("out"), s, 3e-3) == {**common, **expected[name]}, name
    # without a chosen rate a job runs at the study's method_lr
    assert job_config(recipes["sft"], 3, Path("out"), s)["learning_rate"] == s.method_lr


def test_recipes_read_their_preset_and_leave_the_loaded_yaml_alone():
    spec = {
        "recipe": "gkd_reverse_kl",
        "config": {"lmbda": 0.5},
        "study": {"data_fraction": 0.05, "labels": False},
    }
    before = json.dumps(spec, sort_keys=True)
    recipes = named_recipes()
    run = Recipe.parse(spec, "x", recipes)
    assert json.dumps(spec, sort_keys=True) == before
    assert run.preset == "on_policy_reverse_kl" and dict(run.config) == {"lmbda": 0.5}
    assert run.study == StudyOptions(data_fraction=0.05, labels=False)
    assert recipes["gkd_reverse_kl"] == named_recipes()["gkd_reverse_kl"]  # the named recipe is not modified
    assert run.preset_config() == {"divergence": "reverse_kl", "lmbda": 1.0, "temperature": 1.0}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"divergence": "nll", "lmbda": 0.0}, "unknown key 'divergence'; a run is"),
        ({"preset": "sft", "config": {"seqkd": True}}, "unknown key 'seqkd'"),
        ({"preset": "sft", "config": {"max_steps": 10}}, "the study sets max_steps"),
        ({"preset": "sft", "study": {"step": 2}}, "did you mean 'steps'"),
        ({"preset": "sft", "study": {"labels": False}}, "labels: false needs data_fraction"),
        ({"preset": "sft", "study": {"data_fraction": 2}}, "data_fraction must be in (0, 1]"),
        ({"preset": "nope"}, "unknown preset 'nope'"),
        ({"recipe": "nope"}, "unknown recipe 'nope'"),
        ({"preset": "sft", "recipe": "sft"}, "exactly one of preset: or recipe:"),
    ],
)
def test_a_bad_run_is_a_one_line_error(spec, message):
    with pytest.raises(ConfigError, match=r"^runs\.yaml: run 'r'") as e:
        parse_runs({"r": spec}, "runs.yaml", named_recipes())
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_job_config_the_trainer_would_reject_fails_before_anything_trains(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "run_jobs", lambda *a, **k: pytest.fail("nothing may train"))
    runs = {"bad": Recipe("on_policy_gkd", {"beta": 7.0})}
    with pytest.raises(ConfigError, match="run 'bad'"):
        study.run_study(
            _fake_workspace(tmp_path),
            StudySettings(seeds=1),
            runs,
            workers=1,
            say=print,
            console=None,
            label="x",
        )


# --------------------------------------------------------------------------------------------------- machinery


def test_the_study_evaluation_is_gkd_evaluate_with_the_study_conventions(monkeypatch):
    import gkd.evaluation

    seen = {}
    monkeypatch.setattr(gkd.evaluation, "evaluate", lambda *a, **k: seen.update(args=a, kw=k) or {})
    task = SimpleNamespace(score=lambda records, preds: {})
    study.evaluate_model(
        "m", "tok", task, "data", max_new_tokens=5, seed=2, temperatures=(0.5, 1.0), samples=3
    )
    assert seen["args"] == ("m", "tok", "data", task.score)
    assert seen["kw"] == {
        "max_new_tokens": 5,
        "sampled": {"sample_0.5": 0.5, "sample": 1.0},
        "seeds": [2000, 2001, 2002],
        "batch_size": 500,
    }


def test_cached_datasets_are_read_again_when_their_file_changes(tmp_path):
    from gkd.tasks import get_task

    task = get_task("summarization")
    tok = task.build_tokenizer(str(tmp_path / "tok"))
    path = tmp_path / "data.jsonl"
    records = task.generate("train", 3, 0)
    write_jsonl(path, records[:2])
    first = study.cached_dataset(str(path), tok, 8)
    assert study.cached_dataset(str(path), tok, 8) is first  # cached while the file is unchanged
    write_jsonl(path, records)
    assert len(study.cached_dataset(str(path), tok, 8)) == 3


def test_train_teacher_refuses_when_the_package_folder_is_not_writable(tmp_path, monkeypatch, capsys):
    import gkd.experiments.demo as demo

    (tmp_path / "a_file").write_text("")
    monkeypatch.setattr(demo, "ASSET_TEACHER", tmp_path / "a_file" / "demo_teacher")
    monkeypatch.setattr(demo, "build_workspace", lambda *a, **k: pytest.fail("refuse before training"))
    with pytest.raises(GKDError, match="not writable; it is for maintainers in a source checkout"):
        demo.train_demo_teacher(tmp_path / "ws")
    assert main(["demo", "--train-teacher"]) == 2
    err = capsys.readouterr().err
    assert "not writable" in err and "Traceback" not in err


def test_a_workspace_retrains_its_teacher_and_start_when_their_recipes_change(tmp_path):
    from dataclasses import replace

    from gkd.experiments.study import TINY_MODEL, build_workspace

    s = StudySettings(
        n_train=64,
        n_test=8,
        teacher_steps=2,
        start_steps=2,
        batch_size=8,
        teacher={**TINY_MODEL, "hidden_size": 32},
        student=dict(TINY_MODEL),
    )
    said: list[str] = []
    ws = build_workspace(tmp_path, s, said.append)
    weights = {who: (tmp_path / who / "model.safetensors").stat().st_mtime_ns for who in ("teacher", "start")}
    assert sum("SFT of" in m for m in said) == 2
    said.clear()
    build_workspace(tmp_path, s, said.append)  # same settings: both reused
    assert not any("SFT of" in m for m in said)
    said.clear()
    ws = build_workspace(tmp_path, replace(s, teacher_steps=3), said.append)
    assert any("teacher's recipe changed" in m for m in said) and sum("SFT of" in m for m in said) == 1
    assert (ws.teacher_dir / "model.safetensors").stat().st_mtime_ns != weights["teacher"]
    assert (ws.start_dir / "model.safetensors").stat().st_mtime_ns == weights["start"]
    said.clear()
    build_workspace(tmp_path, replace(s, teacher_steps=3, start_steps=3), said.append)
    assert any("starting student's recipe changed" in m for m in said)


def test_workspace_of_takes_another_familys_workspace_and_settings(tmp_path, monkeypatch):
    from gkd.experiments import families

    (tmp_path / "a.yaml").write_text("workspace: runs/a\nsettings: {seeds: 2}\nruns: {x: {recipe: sft}}\n")
    (tmp_path / "b.yaml").write_text("workspace_of: a\nruns: {y: {recipe: sft}}\n")
    (tmp_path / "c.yaml").write_text("workspace_of: a\nsettings: {seeds: 3}\nruns: {y: {recipe: sft}}\n")
    monkeypatch.setattr(families, "CONFIG_DIR", tmp_path)
    b = load_family("b")
    assert b["workspace"] == "runs/a" and b["settings"] == {"seeds": 2} and list(b["runs"]) == ["y"]
    with pytest.raises(ConfigError, match="'workspace_of' replaces 'settings' and 'workspace'"):
        load_family("c")
