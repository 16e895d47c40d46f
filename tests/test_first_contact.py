"""Every finding of the first-contact report (``first-contact.md`` §A-§D), reproduced as a user meets it.

One test per row, named after it (``test_A3_...``). Each runs the user's command through the CLI in-process on tiny
local models and data files in every format (see ``userland``), and checks what a user expects: a result, or one
``error:`` line that names the problem and the fix, before any model loads where the input can be checked first.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from userland import run_cli

import gkd.loading


def _distill(world, tmp_path: Path, *extra: str, family: str = "llama", fmt: str = "prompt_completion", **kw):
    args = [
        "distill",
        f"model_name_or_path={world.model(family, 'student')}",
        f"teacher_model_name_or_path={world.model(family, 'teacher')}",
        f"dataset={world.data(fmt)}",
        "max_new_tokens=6",
        "per_device_train_batch_size=4",
        "learning_rate=1e-3",
        "max_steps=2",
        "logging_steps=1",
        f"output_dir={kw.pop('output_dir', tmp_path / 'run')}",
        *[f"{k}={v}" for k, v in kw.items()],
        *extra,
    ]
    return run_cli(args)


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail if the trainer loads a model: for inputs that must be refused before any model loads."""

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr(gkd.loading, "load_model", refuse)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------------------
# §A: crashes with a raw traceback, or documented features that did not run
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("metric", ["exact_mtch", "chain_vald", "bogus"])
def test_A1_a_mistyped_eval_metric_is_one_line_before_any_model_loads(
    metric, world, tmp_path, no_model_loads
):
    r = _distill(world, tmp_path, eval_dataset=world.data("prompt_completion", "test"), eval_metric=metric)
    assert r.is_clean_error(), r
    assert "eval_metric" in r.err and metric in r.err
    assert not (tmp_path / "run" / "checkpoint-2").exists()


def test_A1_eval_metric_None_means_the_default(world, tmp_path):
    r = _distill(world, tmp_path, eval_dataset=world.data("prompt_completion", "test"), eval_metric="None")
    assert r.code == 0, r
    assert "eval/greedy/exact_match" in (tmp_path / "run" / "metrics.jsonl").read_text()


def test_A1_gkd_eval_with_a_bad_metric_is_one_line(world, tmp_path):
    r = run_cli(
        [
            "eval",
            "--model",
            world.model("llama", "student"),
            "--dataset",
            world.data("messages", "test"),
            "--metric",
            "bogus",
            "--max-new-tokens",
            "4",
        ]
    )
    assert r.is_clean_error(), r
    assert "did you mean" in r.err or "valid" in r.err


@pytest.mark.parametrize("fmt", ["messages", "conversational", "prompt_only"])
def test_A2_evaluation_works_on_every_format_with_a_reference(fmt, world, tmp_path):
    """messages / conversational: the final assistant turn is the reference; prompt-only: its `references`."""
    r = run_cli(
        [
            "eval",
            "--model",
            world.model("llama", "student"),
            "--dataset",
            world.data(fmt, "test"),
            "--metric",
            "rouge2",
            "--max-new-tokens",
            "4",
            "--greedy-only",
        ]
    )
    assert r.code == 0, r
    assert "greedy/rouge2" in json.loads(r.out)
    r = _distill(
        world, tmp_path, fmt=fmt, lmbda=1, eval_dataset=world.data(fmt, "test"), eval_metric="rouge2"
    )
    assert r.code == 0, r


def test_A2_records_without_any_reference_are_refused_before_training(world, tmp_path, no_model_loads):
    r = _distill(
        world,
        tmp_path,
        lmbda=1,
        eval_dataset=world.data("messages_prompt_only", "test"),
        eval_metric="rouge2",
    )
    assert r.is_clean_error(), r
    assert "reference" in r.err


def test_A3_a_student_with_padding_rows_beyond_its_tokenizer_trains_on_policy(world, tmp_path):
    """Qwen2.5 checkpoints have more head rows than tokens; the rollout must never sample a padding row."""
    r = _distill(world, tmp_path, family="qwen2", lmbda=1, max_steps=3)
    assert r.code == 0, r


def test_A4_prompt_plus_new_tokens_beyond_the_context_is_one_line_before_loading(
    world, tmp_path, no_model_loads
):
    r = _distill(world, tmp_path, family="gpt2", lmbda=1, max_new_tokens=60)  # 18-token prompts, 64 positions
    assert r.is_clean_error(), r
    assert "max_new_tokens" in r.err and "64" in r.err


def test_A5_the_documented_final_answer_reward_runs(world, tmp_path):
    """On data whose targets end in a '#### answer' (arithmetic / GSM8K style)."""
    rows = [json.loads(line) for line in Path(world.data("prompt_completion")).read_text().splitlines()]
    data = tmp_path / "answers.jsonl"
    data.write_text(
        "".join(json.dumps({**r, "completion": r["completion"] + " #### 5"}) + "\n" for r in rows)
    )
    r = _distill(
        world, tmp_path, lmbda=1, alpha=0.5, reward="final_answer", num_generations=2, dataset=str(data)
    )
    assert r.code == 0, r


def test_S4_the_final_answer_reward_on_data_without_answers_is_refused(world, tmp_path, no_model_loads):
    r = _distill(world, tmp_path, lmbda=1, alpha=0.5, reward="final_answer", num_generations=2)
    assert r.is_clean_error(), r
    assert "final_answer" in r.err and "####" in r.err


@pytest.mark.parametrize("reward", ["item_f1", "set_match", "faithfulness"])
def test_A6_built_in_rewards_accept_messages_records(reward, world, tmp_path):
    r = _distill(world, tmp_path, fmt="messages", lmbda=1, alpha=0.5, reward=reward, num_generations=2)
    assert r.code == 0, r


def test_A7_fast_backend_with_t5_is_refused_before_loading(world, tmp_path, no_model_loads):
    r = _distill(world, tmp_path, family="t5", lmbda=1, rollout_backend="fast")
    assert r.is_clean_error(), r
    assert "rollout_backend" in r.err and "auto" in r.err


@pytest.mark.parametrize(
    ("flag", "value"), [("--top-p", "0"), ("--temperature", "-1"), ("--top-k", "-1"), ("--num-samples", "0")]
)
def test_A8_bad_generate_options_are_one_line(flag, value, world, tmp_path):
    r = run_cli(
        [
            "generate",
            "--model",
            world.model("llama", "student"),
            "--dataset",
            world.data("prompt_completion", "test"),
            "--out",
            str(tmp_path / "o.jsonl"),
            flag,
            value,
        ]
    )
    assert r.is_clean_error(), r
    assert flag in r.err


def test_A9_prepare_an_unknown_task_is_one_line(tmp_path):
    r = run_cli(["prepare", "bogus", "--out", str(tmp_path / "x")])
    assert r.is_clean_error(), r
    assert "summarization" in r.err


def test_A10_a_task_metric_on_another_tasks_data_is_one_line(world, tmp_path, no_model_loads):
    r = run_cli(
        [
            "eval",
            "--model",
            world.model("llama", "student"),
            "--dataset",
            world.data("prompt_completion", "test"),
            "--metric",
            "arithmetic",
            "--max-new-tokens",
            "4",
        ]
    )
    assert r.is_clean_error(), r
    assert "arithmetic" in r.err
    r = _distill(
        world, tmp_path, eval_dataset=world.data("prompt_completion", "test"), eval_metric="arithmetic"
    )
    assert r.is_clean_error(), r


# ---------------------------------------------------------------------------------------------------------------
# §B: silently wrong results
# ---------------------------------------------------------------------------------------------------------------
def test_B1_prompt_only_data_with_an_off_policy_warmup_is_refused(world, tmp_path, no_model_loads):
    r = _distill(
        world,
        tmp_path,
        fmt="prompt_only",
        lmbda=1,
        lmbda_schedule="linear",
        lmbda_start=0,
        lmbda_warmup_steps=4,
    )
    assert r.is_clean_error(), r
    assert "lmbda" in r.err


def test_B2_seqkd_targets_are_written_when_the_schedule_makes_off_policy_steps(world, tmp_path):
    r = _distill(
        world,
        tmp_path,
        fmt="prompt_only",
        seq_kd="true",
        lmbda=1,
        lmbda_schedule="linear",
        lmbda_start=0,
        lmbda_warmup_steps=4,
        max_steps=3,
    )
    assert r.code == 0, r
    assert list((tmp_path / "run").glob("seqkd-*.jsonl")), "no SeqKD targets were written"
    records = _metrics(tmp_path / "run")
    off = [m for m in records if "on_policy" in m and not m["on_policy"]]
    assert off and all(m["completion_tokens"] > 0 for m in off)


@pytest.mark.parametrize("fmt", ["messages", "conversational"])
def test_B3_rewards_find_references_in_chat_records(fmt, world, tmp_path):
    r = _distill(
        world,
        tmp_path,
        fmt=fmt,
        lmbda=1,
        alpha=0.5,
        reward="bleu",
        num_generations=2,
        max_new_tokens=8,
        max_steps=3,
        temperature=2,
    )
    assert r.code == 0, r
    assert any(m.get("reward_std", 0) > 0 for m in _metrics(tmp_path / "run"))


def test_B4_generated_files_train_on_the_generations(world, tmp_path):
    out = tmp_path / "gen.jsonl"
    r = run_cli(
        [
            "generate",
            "--model",
            world.model("llama", "student"),
            "--dataset",
            world.data("messages", "test"),
            "--out",
            str(out),
            "--max-new-tokens",
            "4",
            "--greedy",
        ]
    )
    assert r.code == 0, r
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    originals = [json.loads(x) for x in Path(world.data("messages", "test")).read_text().splitlines()]
    for row, orig in zip(rows, originals):
        assert row["messages"][:-1] == orig["messages"][:-1]
        assert row["messages"][-1]["role"] == "assistant"
    from gkd.data import tokenize_records
    from gkd.models import load_tokenizer

    tok = load_tokenizer(world.model("llama", "student"))
    data = tokenize_records(rows, tok, max_prompt_length=512, max_completion_length=64)
    target = tok.decode(data.examples[0].completion, skip_special_tokens=True).strip()
    assert target == rows[0]["messages"][-1]["content"].strip()


def test_B5_a_bf16_student_warns_which_updates_are_lost(world, tmp_path):
    r = _distill(world, tmp_path, student_dtype="bfloat16", learning_rate="1e-5")
    assert r.code == 0, r
    assert "warning: student_dtype: bfloat16" in r.err and "|w| >" in r.err


def test_B6_a_second_run_into_the_same_output_dir_is_refused_then_overwritten_on_request(world, tmp_path):
    assert _distill(world, tmp_path).code == 0
    r = _distill(world, tmp_path)
    assert r.is_clean_error(), r
    assert "resume_from_checkpoint=latest" in r.err and "overwrite_output_dir" in r.err
    r = _distill(world, tmp_path, overwrite_output_dir="true")
    assert r.code == 0, r
    steps = [m["step"] for m in _metrics(tmp_path / "run") if "loss" in m]
    assert steps == [1, 2]


def test_B7_a_linear_schedule_without_warmup_steps_is_refused(world, tmp_path, no_model_loads):
    r = _distill(world, tmp_path, lmbda=1, lmbda_schedule="linear", lmbda_start=0)
    assert r.is_clean_error(), r
    assert "lmbda_warmup_steps" in r.err


def test_B8_the_topk_cache_warns_for_reverse_kl_and_keeps_the_diagnostics(world, tmp_path):
    r = _distill(
        world, tmp_path, lmbda=0, divergence="reverse_kl", teacher_cache="topk", teacher_cache_topk=4
    )
    assert r.code == 0, r
    assert "warning: teacher_cache: topk with divergence reverse_kl" in r.err
    first = _metrics(tmp_path / "run")[0]
    for key in ("forward_kl", "reverse_kl", "top1_agree"):
        assert key in first


def test_B9_progress_false_hides_only_the_bar(world, tmp_path):
    r = _distill(world, tmp_path, progress="false")
    assert r.code == 0, r
    assert "step 1 |" in r.err and "step 2 |" in r.err


# ---------------------------------------------------------------------------------------------------------------
# §C: confusing errors and late checks
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override",
    [
        "learning_rate=1e-5",
        "learning_rate=5e-05",
        "learning_rate=1E-5",
        "adam_epsilon=1e-8",
        "beta=9e-1",
        "max_steps=2.0",
        "max_grad_norm=inf",
        "learning_rate=.001",
    ],
)
def test_C1_numbers_in_every_spelling(override, world, tmp_path):
    r = _distill(world, tmp_path, override)
    assert r.code == 0, r


def test_C1_scientific_notation_inside_a_yaml_file(world, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("learning_rate: 1e-3\nmax_steps: 2\n")
    r = _distill(world, tmp_path, "--config", str(cfg))
    assert r.code == 0, r


def test_C1_nan_learning_rate_is_one_line(world, tmp_path, no_model_loads):
    r = _distill(world, tmp_path, learning_rate="nan")
    assert r.is_clean_error(), r
    assert "learning_rate" in r.err and "finite" in r.err


@pytest.mark.parametrize(
    ("key", "hint"),
    [
        ("lr", "learning_rate"),
        ("lora_alfa", "lora_alpha"),  # TRL's key (accepted), not gkd's RL weight 'alpha'
        ("dataset_nme", "dataset_name"),
        ("per_device_eval_batchsize", "per_device_eval_batch_size"),
        ("lora_dropuot", "lora_dropout"),
        ("deepspeed_config", "deepspeed"),
    ],
)
def test_C2_did_you_mean_points_to_the_right_key(key, hint, world, tmp_path, no_model_loads):
    r = _distill(world, tmp_path, f"{key}=1")
    assert r.is_clean_error(), r
    assert f"did you mean '{hint}'" in r.err


def test_C2_keys_of_other_trainers_get_advice_not_a_wrong_spelling(world, tmp_path, no_model_loads):
    r = _distill(world, tmp_path, "deepspeed=ds.json")
    assert r.is_clean_error(), r
    assert "'seed'" not in r.err and "accelerate" in r.err


@pytest.mark.parametrize("value", ["tensorboard", "none", "[]", "all"])
def test_C3_report_to_takes_a_single_name(value, world, tmp_path):
    r = _distill(world, tmp_path, report_to=value)
    assert r.code == 0, r


def test_C4_a_lora_checkpoint_is_usable_by_eval_generate_and_as_a_teacher(world, tmp_path, monkeypatch):
    run = tmp_path / "lora"
    r = _distill(world, tmp_path, "lora.r=4", "lora.save_merged=true", output_dir=run)
    assert r.code == 0, r
    ckpt = run / "checkpoint-2"
    assert (ckpt / "adapter_config.json").is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the adapter must not depend on the cwd of the training run
    r = run_cli(
        [
            "eval",
            "--model",
            str(ckpt),
            "--dataset",
            world.data("prompt_completion", "test"),
            "--metric",
            "exact_match",
            "--max-new-tokens",
            "4",
            "--greedy-only",
        ]
    )
    assert r.code == 0, r
    r = run_cli(
        [
            "generate",
            "--model",
            str(ckpt),
            "--dataset",
            world.data("prompt_completion", "test"),
            "--out",
            str(tmp_path / "g.jsonl"),
            "--max-new-tokens",
            "4",
        ]
    )
    assert r.code == 0, r
    r = _distill(world, tmp_path, teacher_model_name_or_path=str(ckpt), output_dir=tmp_path / "t")
    assert r.code == 0, r
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(run / "merged"))


def test_C5_trl_conversational_prompt_completion_records_train(world, tmp_path):
    r = _distill(world, tmp_path, fmt="conversational", lmbda=0.5, max_steps=3)
    assert r.code == 0, r


@pytest.mark.parametrize(
    "bad",
    [
        {"reward": "exact_mach", "lmbda": 1, "alpha": 0.5},
        {"dataset": "data/missing.jsonl"},
        {"eval_metric": "rouge3", "eval_dataset": "EVAL"},
        {"eval_dataset": "data/missing.jsonl"},
    ],
)
def test_C6_names_and_paths_are_checked_before_any_model_loads(bad, world, tmp_path, no_model_loads):
    bad = {k: (world.data("prompt_completion", "test") if v == "EVAL" else v) for k, v in bad.items()}
    r = _distill(world, tmp_path, **bad)
    assert r.is_clean_error(), r


def test_C7_presets_resolve_by_name(world, tmp_path):
    r = _distill(world, tmp_path, "--config", "on_policy_gkd")
    assert r.code == 0, r
    r = _distill(world, tmp_path, "--config", "on_polcy_gkd", output_dir=tmp_path / "x")
    assert r.is_clean_error(), r
    assert "did you mean the preset 'on_policy_gkd'" in r.err


def test_C8_a_mistyped_local_path_fails_at_once(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    t0 = time.perf_counter()
    r = run_cli(
        [
            "generate",
            "--model",
            "runs/nope",
            "--dataset",
            world.data("prompt_completion", "test"),
            "--out",
            "o.jsonl",
        ]
    )
    assert r.is_clean_error(), r
    r2 = _distill(world, tmp_path, dataset="runs/nope.jsonl")
    assert r2.is_clean_error(), r2
    assert time.perf_counter() - t0 < 20


@pytest.mark.parametrize("override", ["resume_from_checkpoint=None", "save_total_limit=None", "lora=None"])
def test_C9_python_none_is_null(override, world, tmp_path):
    r = _distill(world, tmp_path, override)
    assert r.code == 0, r


def test_C10_long_prompts_are_truncated_and_only_an_impossible_limit_stops(world, tmp_path):
    rows = [json.loads(x) for x in Path(world.data("prompt_completion")).read_text().splitlines()]
    for row in rows[::2]:
        row["prompt"] = " ".join(row["prompt"].split()[:6])
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = _distill(world, tmp_path, max_prompt_length=10, dataset=str(mixed))
    assert r.code == 0, r
    assert "truncated from the left" in r.err
    r = _distill(world, tmp_path, max_prompt_length=3, dataset=str(mixed), output_dir=tmp_path / "x")
    assert r.is_clean_error(), r
    config_md = (Path(__file__).resolve().parent.parent / "docs" / "config.md").read_text()
    assert "if EVERY prompt is longer the run stops" in config_md


def test_C11_a_folder_without_the_eval_split_names_the_key(world, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    shutil.copy(world.data("prompt_completion"), folder / "train.jsonl")
    shutil.copy(world.data("prompt_completion", "test"), folder / "test.jsonl")
    r = _distill(world, tmp_path, dataset=str(folder), eval_dataset=str(folder))
    assert r.is_clean_error(), r
    assert "eval_split" in r.err


def test_C12_one_vocabulary_for_metrics_rewards_and_tasks(world, tmp_path):
    r = _distill(world, tmp_path, eval_dataset=world.data("prompt_completion", "test"), eval_metric="nope")
    assert r.is_clean_error(), r
    for name in ("summarization", "set_match", "exact_match", "rouge2"):
        assert name in r.err
    for metric in ("set_match", "summarization"):
        r = _distill(
            world,
            tmp_path,
            eval_dataset=world.data("prompt_completion", "test"),
            eval_metric=metric,
            output_dir=tmp_path / metric,
        )
        assert r.code == 0, r


# ---------------------------------------------------------------------------------------------------------------
# §D: cosmetic
# ---------------------------------------------------------------------------------------------------------------
def test_D1_resuming_a_finished_run_says_so_in_strict_json(world, tmp_path):
    assert _distill(world, tmp_path).code == 0
    before = (tmp_path / "run" / "checkpoint-2" / "trainer_state.json").stat().st_mtime_ns
    r = _distill(world, tmp_path, resume_from_checkpoint="latest")
    assert r.code == 0, r
    summary = json.loads(
        r.out.strip().splitlines()[-1], parse_constant=lambda c: pytest.fail(f"non-JSON {c}")
    )
    assert summary["status"] == "already_finished" and summary["final_loss"] is not None
    assert "nothing to do" in r.err
    assert (tmp_path / "run" / "checkpoint-2" / "trainer_state.json").stat().st_mtime_ns == before


def test_D2_logs_are_one_line_per_step_on_stderr_and_stdout_is_json(world, tmp_path):
    r = _distill(world, tmp_path, top_k=5)
    assert r.code == 0, r
    step_lines = [line for line in r.err.splitlines() if line.startswith("step ")]
    assert len(step_lines) == 2 and all("tok/s" in line for line in step_lines)
    assert "warning: top_k/top_p" in r.err
    assert len(r.out.strip().splitlines()) == 1
    json.loads(r.out)


def test_D3_version():
    r = run_cli(["--version"])
    assert r.code == 0 and r.out.startswith("gkd ")


def test_D4_no_third_party_progress_bars_or_warnings(world, tmp_path):
    data = tmp_path / "array.json"
    data.write_text(
        json.dumps([json.loads(x) for x in Path(world.data("prompt_completion")).read_text().splitlines()])
    )
    r = _distill(world, tmp_path, "lora.r=4", dataset=str(data))
    assert r.code == 0, r
    for noise in ("Generating train split", "FutureWarning", "Loading weights", "Writing model shards"):
        assert noise not in r.err and noise not in r.out


def test_D5_empty_or_clobbering_inputs_are_refused(world, tmp_path):
    r = run_cli(["prepare", "summarization", "--out", str(tmp_path / "a"), "--n-train", "0"])
    assert r.is_clean_error(), r
    assert (
        run_cli(
            ["prepare", "arithmetic", "--out", str(tmp_path / "b"), "--n-train", "8", "--n-eval", "4"]
        ).code
        == 0
    )
    r = run_cli(["prepare", "summarization", "--out", str(tmp_path / "b"), "--n-train", "8", "--n-eval", "4"])
    assert r.is_clean_error(), r
    assert "--force" in r.err
    r = run_cli(
        [
            "generate",
            "--model",
            world.model("llama", "student"),
            "--dataset",
            world.data("prompt_completion", "test"),
            "--out",
            str(tmp_path / "o.jsonl"),
            "--max-new-tokens",
            "0",
        ]
    )
    assert r.is_clean_error(), r


def test_D6_sft_says_a_given_teacher_is_ignored(world, tmp_path):
    r = run_cli(
        [
            "sft",
            f"model_name_or_path={world.model('llama', 'student')}",
            f"teacher_model_name_or_path={world.model('llama', 'teacher')}",
            f"dataset={world.data('prompt_completion')}",
            "max_steps=1",
            "max_new_tokens=4",
            f"output_dir={tmp_path / 'sft'}",
        ]
    )
    assert r.code == 0, r
    assert "teacher_model_name_or_path is ignored" in r.err


def test_D7_the_sampled_reverse_kl_surrogate_is_explained(world, tmp_path):
    r = _distill(world, tmp_path, "--config", "on_policy_sampled_rkl")
    assert r.code == 0, r
    assert "surrogate" in r.err


def test_D8_one_skipped_line_is_singular(world, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(Path(world.data("prompt_completion")).read_text() + "{oops\n")
    r = _distill(world, tmp_path, dataset=str(data), skip_bad_lines="true")
    assert r.code == 0, r
    assert "skipped 1 line that was not valid JSON" in r.err


# ---------------------------------------------------------------------------------------------------------------
# §E: the edges report (edges.md): TRL's Python surface, files as people have them, the system's edges
# ---------------------------------------------------------------------------------------------------------------
def _config(*tokens: str, files: list[str] | None = None):
    from gkd.cli import run_config

    return run_config(files, list(tokens))


@pytest.mark.parametrize(
    "tokens",
    [
        ("save_strategy=no", "eval_strategy=no", "logging_strategy=no"),
        ("--save_strategy", "no", "--eval_strategy", "no", "--logging_strategy", "no"),
        ("--save_strategy=no", "--eval_strategy=no", "--logging_strategy=no"),
        ('save_strategy="no"', "eval_strategy='no'", "logging_strategy=no"),
    ],
)
def test_R1_no_is_the_string_no_for_the_strategy_keys(tokens):
    cfg = _config("model_name_or_path=s", *tokens)
    assert (cfg.save_strategy, cfg.eval_strategy, cfg.logging_strategy) == ("no", "no", "no")


def test_R1_yaml_reads_scalars_as_hfargumentparser(tmp_path):
    """A string key takes no/yes/on/off/none as text; a bool key takes them (any case) as bools."""
    cfg_file = tmp_path / "trl.yaml"
    cfg_file.write_text(
        "save_strategy: no\nlogging_strategy: no\neval_strategy: no\nrun_name: on\nhub_model_id: yes\n"
        "teacher_cache: none\nbf16: off\nprogress: No\ngradient_checkpointing: yes\npush_to_hub: OFF\n"
        "use_peft: yes\npacking: no\nmerge_lora: on\nlora_r: 4\n"
    )
    cfg = _config("model_name_or_path=s", files=[str(cfg_file)])
    assert (cfg.save_strategy, cfg.logging_strategy, cfg.eval_strategy) == ("no", "no", "no")
    assert (cfg.run_name, cfg.hub_model_id, cfg.teacher_cache) == ("on", "yes", "none")
    assert (cfg.bf16, cfg.progress, cfg.gradient_checkpointing, cfg.push_to_hub) == (
        False,
        False,
        True,
        False,
    )
    assert cfg.lora is not None and cfg.lora.r == 4 and cfg.merge_lora is True
    assert not any("packing" in n for n in cfg.warnings())  # packing: no is what gkd does: no note


@pytest.mark.parametrize(
    ("tokens", "key", "value"),
    [
        (("--bf16", "yes"), "bf16", True),
        (("--push_to_hub", "no"), "push_to_hub", False),
        (("seq_kd=on",), "seq_kd", True),
        (("--disable_tqdm", "yes"), "progress", False),
        (("--gradient_checkpointing", "True"), "gradient_checkpointing", True),
        (("--run_name", "true"), "run_name", "true"),
        (("--hub_model_id", "no"), "hub_model_id", "no"),
    ],
)
def test_R1_the_command_line_reads_them_the_same_way(tokens, key, value):
    assert getattr(_config("model_name_or_path=s", *tokens), key) == value


def test_R1_a_bool_key_refuses_a_word_that_is_not_yes_or_no(no_model_loads):
    r = run_cli(["distill", "model_name_or_path=s", "bf16=maybe"])
    assert r.is_clean_error(), r
    assert "'bf16'" in r.err and "maybe" in r.err
    r = run_cli(["distill", "model_name_or_path=s", "lmbda=yes"])
    assert r.is_clean_error(), r
    assert "'lmbda'" in r.err


def test_R1_save_strategy_no_with_load_best_is_one_line(no_model_loads):
    r = run_cli(["distill", "model_name_or_path=s", "save_strategy=no", "load_best_model_at_end=true"])
    assert r.is_clean_error(), r
    assert "save_strategy" in r.err and "load_best_model_at_end" in r.err


def test_S1_save_strategy_no_writes_no_checkpoint_but_the_final_model(world, tmp_path):
    """TRL's ``--save_strategy no``: no checkpoint-N folder at all (not even at the end); the model is saved."""
    run = tmp_path / "run"
    r = _distill(world, tmp_path, "--save_strategy", "no", save_steps=1)
    assert r.code == 0, r
    assert not list(run.glob("checkpoint-*")) and not list(run.glob(".checkpoint-*"))
    assert (run / "final_model.json").is_file() and (run / "config.json").is_file()
    from gkd.models import load_model

    load_model(str(run), what="model")


def test_S1_eval_and_logging_strategy_no_run_no_evaluation_and_log_no_steps(world, tmp_path):
    run = tmp_path / "run"
    r = _distill(
        world,
        tmp_path,
        "--eval_strategy",
        "no",
        "--logging_strategy",
        "no",
        eval_dataset=world.data("prompt_completion", "test"),
        eval_steps=1,
    )
    assert r.code == 0, r
    assert "eval:" not in r.err and "step 1" not in r.err
    records = _metrics(run) if (run / "metrics.jsonl").exists() else []
    assert not any("loss" in rec or any(k.startswith("eval/") for k in rec) for rec in records), records


def test_T1_gkdconfig_takes_every_key_the_command_line_takes():
    from gkd import GKDConfig
    from gkd.errors import ConfigError

    cfg = GKDConfig(
        output_dir="o", max_steps=1, max_new_tokens=8, report_to="none", remove_unused_columns=False
    )
    assert cfg.report_to == [] and cfg.max_steps == 1
    cfg = GKDConfig(output_dir="o", per_device_eval_batch_size=4, dataset_text_field="text", packing=False)
    assert cfg.eval_batch_size == 4 and not cfg.warnings()
    cfg = GKDConfig(
        output_dir="o", dataset_name="data/small.jsonl", torch_dtype="float32", use_peft=True, lora_r=8
    )
    assert cfg.dataset == "data/small.jsonl" and cfg.lora is not None and cfg.lora.r == 8
    assert "packing: True" in " ".join(GKDConfig(packing=True).warnings())
    with pytest.raises(ConfigError, match="did you mean 'learning_rate'"):
        GKDConfig(lerning_rate=1e-5)
    with pytest.raises(ConfigError, match="2 unknown config keys"):
        GKDConfig(lerning_rate=1e-5, modle_name_or_path="x")
    with pytest.raises(ConfigError, match="max_length"):
        GKDConfig(max_length=512)


def _trl_script(world, tmp_path, **kw):
    """TRL's Python shape: model objects, args=GKDConfig(...), a datasets.Dataset, peft_config."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from gkd import GKDConfig, GKDTrainer

    rows = [json.loads(line) for line in Path(world.data("prompt_completion")).read_text().splitlines()][:16]
    lines: list[str] = []
    args = dict(
        output_dir=str(tmp_path / "py"), max_steps=2, max_new_tokens=6, per_device_train_batch_size=4,
        logging_steps=1, learning_rate=1e-3, lmbda=1.0, report_to="none",
    )  # fmt: skip
    args.update(kw.pop("args", {}))
    trainer = GKDTrainer(
        model=kw.pop("model", None) or AutoModelForCausalLM.from_pretrained(world.model("llama", "student")),
        teacher_model=AutoModelForCausalLM.from_pretrained(world.model("llama", "teacher")),
        args=GKDConfig(**args),
        train_dataset=Dataset.from_list(rows),
        log=lines.append,
        **kw,
    )
    return trainer, lines


def test_T2_train_returns_trainoutput_and_the_trainer_has_the_hf_surface(world, tmp_path):
    from peft import LoraConfig
    from transformers.trainer_utils import TrainOutput

    rows = [
        json.loads(line) for line in Path(world.data("prompt_completion", "test")).read_text().splitlines()
    ]
    from datasets import Dataset

    trainer, lines = _trl_script(
        world,
        tmp_path,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
        eval_dataset=Dataset.from_list(rows[:4]),
        args={"eval_steps": 1},
    )
    out = trainer.train()
    assert isinstance(out, TrainOutput) and out.global_step == 2 and out.step == 2
    assert (
        out.training_loss == pytest.approx(out.metrics["train_loss"])
        and out.training_loss == out.training_loss
    )
    assert {"train_runtime", "train_samples_per_second", "train_steps_per_second", "epoch"} <= set(
        out.metrics
    )
    assert trainer.state.global_step == 2
    history = trainer.state.log_history
    assert [h["step"] for h in history if "loss" in h] == [1, 2]
    assert all("learning_rate" in h and "epoch" in h for h in history if "loss" in h)
    assert any("eval_exact_match" in h for h in history)
    assert history[-1]["train_loss"] == out.training_loss
    assert trainer.args.output_dir == str(tmp_path / "py") and trainer.processing_class is not None
    assert hasattr(trainer.model, "peft_config")
    assert "rollouts: gkd's fast KV-cache loop" in lines  # a LoRA student keeps the fast loop (T2)


def test_T3_model_objects_without_a_tokenizer_take_it_from_name_or_path(world, tmp_path):
    from transformers import AutoModelForCausalLM

    from gkd.errors import ConfigError

    trainer, _ = _trl_script(world, tmp_path)
    assert trainer.train().global_step == 2
    student = AutoModelForCausalLM.from_pretrained(world.model("llama", "student"))
    student.config._name_or_path = ""
    trainer, _ = _trl_script(world, tmp_path, model=student, args={"output_dir": str(tmp_path / "py2")})
    with pytest.raises(ConfigError, match="processing_class"):
        trainer.train()


def test_S2_a_bf16_model_object_gets_the_lost_updates_warning(world, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(world.model("llama", "student"), dtype=torch.bfloat16)
    trainer, lines = _trl_script(world, tmp_path, model=student)
    trainer.train()
    assert any(
        line.startswith("warning: the student model object is bfloat16") and "|w| >" in line for line in lines
    )


def _lines(world) -> list[str]:
    return Path(world.data("prompt_completion")).read_text().splitlines()


def test_R3_a_utf8_bom_is_not_an_error_and_drops_no_record(world, tmp_path):
    from gkd.data import load_records

    lines = _lines(world)
    data = tmp_path / "bom.jsonl"
    data.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    records, skipped = load_records(str(data))
    assert len(records) == len(lines) and skipped == 0
    assert _distill(world, tmp_path, dataset=str(data)).code == 0


def test_T4_a_latin1_file_is_one_line_with_file_line_and_byte(world, tmp_path, no_model_loads):
    data = tmp_path / "latin1.jsonl"
    lines = _lines(world)
    data.write_bytes(
        ("\n".join(lines[:2]) + "\n").encode()
        + '{"prompt": "caf\xe9", "completion": "x"}\n'.encode("latin-1")
    )
    r = _distill(world, tmp_path, dataset=str(data))
    assert r.is_clean_error(), r
    assert f"{data}:3: not UTF-8 (byte 0xe9)" in r.err and "re-save" in r.err


@pytest.mark.parametrize("name", ["small.JSONL", "small.txt", "noext", "small.Json"])
def test_R8_an_existing_local_file_of_any_suffix_is_read_never_sent_to_the_hub(
    name, world, tmp_path, monkeypatch
):
    import datasets

    from gkd.data import load_records

    def no_hub(*a, **k):
        raise AssertionError("an existing local file was looked up on the hub")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    data = tmp_path / name
    shutil.copy(world.data("prompt_completion"), data)
    records, _ = load_records(str(data))
    assert len(records) == len(_lines(world))


def test_R8_a_local_file_that_is_not_json_lines_is_one_line(world, tmp_path, no_model_loads):
    data = tmp_path / "notes.txt"
    data.write_text("just some text\n")
    r = _distill(world, tmp_path, dataset=str(data))
    assert r.is_clean_error(), r
    assert "notes.txt" in r.err and "JSONL" in r.err


def test_R8_a_folder_whose_files_name_no_train_split_lists_them_all(world, tmp_path, no_model_loads):
    folder = tmp_path / "data"
    folder.mkdir()
    for name in ("test16.jsonl", *(f"part{i}.jsonl" for i in range(24))):
        shutil.copy(world.data("prompt_completion"), folder / name)
    r = _distill(world, tmp_path, dataset=str(folder))
    assert r.is_clean_error(), r
    # the split-named file and the count of the others, not one file of 25
    assert "test16.jsonl" in r.err and "24 file(s) that name no split" in r.err


@pytest.mark.parametrize("broken", ['{"prompt": "p"}', '{"prompt": "p", "completion": null}'])
def test_R2_a_record_missing_its_completion_is_named(broken, world, tmp_path, no_model_loads):
    lines = _lines(world)[:8]
    data = tmp_path / "missing_one.jsonl"
    data.write_text("\n".join([*lines[:4], broken, *lines[4:]]) + "\n")
    r = _distill(world, tmp_path, dataset=str(data))
    assert r.is_clean_error(), r
    assert "record 5 " in r.err and "has no completion; 8 records do" in r.err


def test_T5_a_full_disk_while_checkpointing_is_one_line_and_leaves_no_temp_folder(
    world, tmp_path, monkeypatch
):
    import errno

    import torch

    real_save = torch.save

    def save(obj, f, *a, **k):
        if str(f).endswith("optimizer.pt") and ".checkpoint-2." in str(f):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    run = tmp_path / "run"
    r = _distill(world, tmp_path, save_steps=1, max_steps=3)
    assert r.is_clean_error(), r
    assert "no space left on device writing checkpoint-2" in r.err and str(run) in r.err
    assert not list(run.glob(".checkpoint-*"))  # the half-written folder is gone
    assert (run / "checkpoint-1" / "trainer_state.json").is_file()  # the last good checkpoint is intact


def test_T6_generate_out_pointing_at_a_folder_is_one_line_before_generating(world, tmp_path, no_model_loads):
    r = run_cli(
        ["generate", "--model", world.model("llama", "student"), "--dataset", world.data("prompt_completion", "test"),
         "--out", str(tmp_path), "--max-new-tokens", "4"]
    )  # fmt: skip
    assert r.is_clean_error(), r
    assert "is a folder" in r.err and "generations.jsonl" in r.err


def test_S3_fsdp_in_one_process_says_nothing_is_sharded(world, tmp_path):
    r = _distill(world, tmp_path, fsdp="full_shard")
    assert r.code == 0, r
    assert "note: fsdp with one process: there is nothing to shard" in r.err


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Every connection fails, as on a machine without a network; an empty hub cache."""
    import socket

    import gkd.io

    def refuse(*a, **k):
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(gkd.io, "HUB_PROBES", {})
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))


@pytest.mark.parametrize(
    "override",
    [
        "model_name_or_path=Qwen/Qwen2.5-0.5B-Instruct",
        "teacher_model_name_or_path=Qwen/Qwen2.5-1.5B-Instruct",
        "dataset=org/nonexistent_ds",
        "tokenizer_name_or_path=Qwen/Qwen2.5-0.5B-Instruct",
    ],
)
def test_C8_a_hub_id_without_a_network_fails_in_seconds(override, world, tmp_path, no_network):
    t0 = time.perf_counter()
    r = _distill(world, tmp_path, override)
    assert r.is_clean_error(), r
    assert time.perf_counter() - t0 < 5, r
    assert "cannot be reached" in r.err and override.split("=")[1] in r.err
    assert "Retrying" not in r.err


def test_C8_hf_hub_offline_is_honoured(world, tmp_path, monkeypatch):
    import gkd.io

    monkeypatch.setattr(gkd.io, "HUB_PROBES", {})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    t0 = time.perf_counter()
    r = _distill(world, tmp_path, "model_name_or_path=Qwen/Qwen2.5-0.5B-Instruct")
    assert r.is_clean_error(), r
    assert "HF_HUB_OFFLINE is set" in r.err and time.perf_counter() - t0 < 5


def test_R5_an_fsdp_checkpoint_resumed_by_another_process_count_names_both(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from torch import nn

    from gkd import checkpoint as ckpt
    from gkd import state
    from gkd.errors import CheckpointError

    monkeypatch.setattr(ckpt, "load_training_state", lambda path: ({"world": 2}, {"scheduler": {}}, {}))
    run = SimpleNamespace(dist=SimpleNamespace(rank=0, world=1), student=nn.Linear(2, 2))
    with pytest.raises(
        CheckpointError, match=r"written by 2 processes .* this run has 1; relaunch with torchrun "
    ):
        state.restore(run, tmp_path / "checkpoint-260")


def test_R6_under_torchrun_only_rank_0_prints_the_error(monkeypatch, no_model_loads):
    monkeypatch.setenv("RANK", "1")
    r = run_cli(["distill", "model_name_or_path=s", "fsdp=shard_grad_op"])
    assert r.code == 2 and "error:" not in r.err, r
    monkeypatch.setenv("RANK", "0")
    r = run_cli(["distill", "model_name_or_path=s", "fsdp=shard_grad_op"])
    assert r.is_clean_error() and "shard_grad_op" in r.err, r


def test_R10_push_to_hub_checks_the_repo_before_training(world, tmp_path, monkeypatch):
    import huggingface_hub

    class NoToken:
        def create_repo(self, *a, **k):
            raise OSError("Invalid user token.")

    monkeypatch.setattr(huggingface_hub, "HfApi", NoToken)
    r = _distill(world, tmp_path, push_to_hub="true", hub_model_id="me/tiny")
    assert r.is_clean_error(), r
    assert "me/tiny" in r.err and "Nothing was trained" in r.err and "step 1" not in r.err


def test_R7_a_worker_stops_when_its_launcher_dies(monkeypatch, capsys):
    import os
    import threading

    import gkd.commands

    exited = threading.Event()
    ppid = [os.getppid()]
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(gkd.commands.os, "getppid", lambda: ppid[0])
    monkeypatch.setattr(gkd.commands.os, "_exit", lambda code: exited.set())
    thread = gkd.commands.watch_launcher(interval=0.01)
    assert thread is not None and not exited.wait(0.1)  # the launcher lives: nothing happens
    ppid[0] = 1  # re-parented to init: the launcher was killed
    assert exited.wait(5)
    thread.join(5)
    assert not thread.is_alive() and "the launcher" in capsys.readouterr().err
    monkeypatch.delenv("LOCAL_RANK")
    assert gkd.commands.watch_launcher() is None  # not under a launcher: no watch


def test_R8_a_model_folder_given_as_the_dataset_is_named_as_such(world, tmp_path, no_model_loads):
    r = _distill(world, tmp_path, dataset=world.model("llama", "teacher"))
    assert r.is_clean_error(), r
    assert "is a model folder" in r.err


def test_R9_a_tokenizer_error_is_not_cut_off(tmp_path):
    from gkd.errors import ModelError
    from gkd.models import load_error

    err = OSError(
        "Couldn't instantiate the backend tokenizer from one of:\n(1) a tokenizers file\n(2) a slow one"
    )
    folder = tmp_path / "data"
    folder.mkdir()
    message = str(load_error("tokenizer", str(folder), err))
    assert isinstance(load_error("tokenizer", str(folder), err), ModelError) and "\n" not in message
    assert message.endswith("(1) a tokenizers file (2) a slow one")
