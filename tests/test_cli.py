"""The gkd command line on tiny models: prepare, sft, distill from a config file, generate, eval; TRL's command-line
forms (``--key value``) and ``--help``."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from gkd.cli import cli_overrides, config_from_argv, main


def test_distill_from_a_config_file_writes_checkpoints_and_metrics_and_the_loss_goes_down(
    model_dir, tmp_path, capsys
):
    config = {
        "model_name_or_path": str(model_dir / "student"),
        "teacher_model_name_or_path": str(model_dir / "teacher"),
        "dataset": str(model_dir / "train.jsonl"),
        "eval_dataset": str(model_dir / "test.jsonl"),
        "eval_metric": "summarization",
        "eval_max_samples": 16,
        "output_dir": str(tmp_path / "run"),
        "lmbda": 0.5,
        "divergence": "jsd",
        "beta": 0.9,
        "learning_rate": 1e-2,
        "per_device_train_batch_size": 16,
        "max_new_tokens": 8,
        "max_steps": 40,
        "logging_steps": 5,
        "save_steps": 20,
        "progress": False,
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["distill", "--config", str(path), "seed=3"]) == 0
    out = tmp_path / "run"
    assert (out / "checkpoint-20" / "model.safetensors").exists()
    assert (out / "checkpoint-40" / "trainer_state.json").exists()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) >= 8
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert any("eval/greedy/set_match" in r for r in rows)
    assert '"final_loss"' in capsys.readouterr().out


def test_prepare_sft_generate_eval(tmp_path, capsys):
    task = tmp_path / "task"
    assert main(["prepare", "summarization", "--out", str(task), "--n-train", "300", "--n-eval", "16"]) == 0
    for name in (
        "train.jsonl",
        "test.jsonl",
        "validation.jsonl",
        "tokenizer",
        "teacher-init",
        "student-init",
    ):
        assert (task / name).exists()
    sft = [
        "sft",
        f"model_name_or_path={task / 'student-init'}",
        f"dataset={task / 'train.jsonl'}",
        f"output_dir={tmp_path / 'sft'}",
        "max_steps=3",
        "per_device_train_batch_size=8",
        "max_new_tokens=8",
        "progress=false",
    ]
    assert main(sft) == 0
    model = tmp_path / "sft" / "checkpoint-3"
    out = tmp_path / "gen.jsonl"
    args = ["--model", str(model), "--dataset", str(task / "test.jsonl"), "--max-new-tokens", "8"]
    assert main(["generate", *args, "--out", str(out), "--num-samples", "2"]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 32 and {"prompt", "completion", "sample"} <= set(rows[0])
    capsys.readouterr()
    assert main(["eval", *args, "--metric", "summarization"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert "greedy/set_match" in scores and "sample/item_f1" in scores


def test_sft_refuses_a_teacher_objective(tmp_path, capsys):
    assert main(["sft", "divergence=forward_kl", "model_name_or_path=x", "dataset=y"]) == 2
    assert "gkd sft trains on ground truth" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# TRL's command-line forms (no model is trained here: the command lines are parsed into the config a run would use)
# ----------------------------------------------------------------------------------------------------------------
TRL_GKD_EXAMPLE = [
    "--model_name_or_path", "Qwen/Qwen2-0.5B-Instruct",
    "--teacher_model_name_or_path", "Qwen/Qwen2-1.5B-Instruct",
    "--dataset_name", "trl-lib/chatbot_arena_completions",
    "--learning_rate", "2e-5",
    "--per_device_train_batch_size", "4",
    "--gradient_accumulation_steps", "8",
    "--output_dir", "gkd-model",
    "--num_train_epochs", "1",
    "--push_to_hub",
    "--gradient_checkpointing",
]  # fmt: skip
TRL_GKD_LORA = ["--use_peft", "--lora_r", "64", "--lora_alpha", "16"]


def test_trls_gkd_example_command_line_parses_into_the_same_settings():
    cfg = config_from_argv(["distill", *TRL_GKD_EXAMPLE])
    assert cfg.model_name_or_path == "Qwen/Qwen2-0.5B-Instruct"
    assert cfg.teacher_model_name_or_path == "Qwen/Qwen2-1.5B-Instruct"
    assert cfg.dataset == "trl-lib/chatbot_arena_completions"
    assert cfg.learning_rate == 2e-5 and isinstance(cfg.learning_rate, float)
    assert cfg.per_device_train_batch_size == 4 and cfg.gradient_accumulation_steps == 8
    assert cfg.output_dir == "gkd-model" and cfg.num_train_epochs == 1
    assert cfg.push_to_hub is True and cfg.gradient_checkpointing is True
    assert cfg.lora is None


def test_trls_gkd_lora_example_command_line_trains_a_lora_adapter_with_trls_defaults():
    cfg = config_from_argv(["distill", *TRL_GKD_EXAMPLE, *TRL_GKD_LORA])
    assert cfg.lora is not None
    assert (cfg.lora.r, cfg.lora.alpha) == (64, 16)
    assert cfg.lora.dropout == 0.05 and cfg.lora.target_modules is None  # TRL ModelConfig's defaults
    assert cfg.learning_rate == 2e-5 and cfg.push_to_hub


def test_main_runs_the_trl_command_line_with_the_parsed_config(monkeypatch, capsys):
    """main() end to end with a stub trainer: the config it gets, and the summary line it prints."""
    import gkd.trainer

    seen = {}

    class StubTrainer:
        def __init__(self, cfg):
            seen["cfg"] = cfg

        def train(self):
            class Result:
                step, final_loss, output_dir, already_finished = 3, 0.5, "gkd-model", False

            return Result()

    monkeypatch.setattr(gkd.trainer, "GKDTrainer", StubTrainer)
    assert main(["distill", *TRL_GKD_EXAMPLE, *TRL_GKD_LORA, "lmbda=1.0"]) == 0
    cfg = seen["cfg"]
    assert cfg.lora.r == 64 and cfg.lmbda == 1.0 and cfg.dataset == "trl-lib/chatbot_arena_completions"
    assert json.loads(capsys.readouterr().out)["status"] == "finished"
    assert main(["sft", "--model_name_or_path", "m", "--dataset", "d.jsonl", "--max_steps", "5"]) == 0
    assert (seen["cfg"].divergence, seen["cfg"].lmbda, seen["cfg"].max_steps) == ("nll", 0.0, 5)


def test_flag_forms_values_and_dotted_keys():
    got = cli_overrides(
        [
            "--learning_rate=1e-5",  # --key=value
            "--max_steps", "-1",  # a negative number is a value, not an option
            "--warmup_ratio", ".1",
            "--bf16",  # bare flag followed by another flag
            "--seq_kd", "lmbda=0.25",  # bare flag followed by a key=value override
            "--lora.r", "8", "lora.alpha=4",  # dotted keys, merged into one mapping
            "--per-device-train-batch-size", "2",  # dashes, as HfArgumentParser accepts them
            "--report_to", "wandb", "tensorboard",  # several values: a list
            "--lora_target_modules", "q_proj", "v_proj",
            "--hub_model_id", "null",
            "--run_name=a=b",  # a value with "=" in the --key=value form
            "--lr_scheduler_kwargs", "{num_cycles: 2}",
            "--push_to_hub",  # bare flag at the end of the line
        ]
    )  # fmt: skip
    assert got == {
        "learning_rate": 1e-5,
        "max_steps": -1,
        "warmup_ratio": 0.1,
        "bf16": True,
        "seq_kd": True,
        "lmbda": 0.25,
        "lora": {"r": 8, "alpha": 4},
        "per_device_train_batch_size": 2,
        "report_to": ["wandb", "tensorboard"],
        "lora_target_modules": ["q_proj", "v_proj"],
        "hub_model_id": None,
        "run_name": "a=b",
        "lr_scheduler_kwargs": {"num_cycles": 2},
        "push_to_hub": True,
    }
    assert cli_overrides(["--bf16", "false", "--progress", "False"]) == {"bf16": False, "progress": False}
    assert cli_overrides(["--lmbda", "0.5", "lmbda=0.75", "--lmbda=1"]) == {"lmbda": 1}  # later wins


def test_flags_key_value_and_config_files_mix_later_wins_command_line_over_yaml(tmp_path):
    base = tmp_path / "base.yaml"  # TRL key names in YAML too
    base.write_text(
        "dataset_name: a.jsonl\nuse_peft: true\nlora_r: 8\nlearning_rate: 1.0e-4\nmax_new_tokens: 64\nbeta: 0.2\n"
    )
    top = tmp_path / "top.yaml"
    top.write_text("beta: 0.3\nlmbda: 0.1\n")
    cfg = config_from_argv(
        [
            "distill",
            "--config", str(base),
            "model_name_or_path=m",
            "--dataset", "b.jsonl",  # gkd's name replaces TRL's dataset_name of a lower layer
            "-c", str(top),
            "--lora_r", "32",
            "--lmbda", "0.9",
            "--max_completion_length", "256",  # TRL's name for max_new_tokens, over the YAML's max_new_tokens
            "--config=on_policy_gkd",  # a preset by name: beta 0.9, lmbda 1.0
            "lmbda=0.7",
        ]
    )  # fmt: skip
    assert cfg.dataset == "b.jsonl" and cfg.model_name_or_path == "m"
    assert cfg.lora.r == 32  # command line over YAML
    assert cfg.learning_rate == 1e-4  # from the first file, not overridden
    assert cfg.beta == 0.9  # the last config file wins over the earlier ones
    assert cfg.lmbda == 0.7  # the command line wins over every file; its last key wins
    assert cfg.max_new_tokens == 256


def test_help_lists_every_config_key_and_every_trl_key(capsys):
    from gkd.config import GKDConfig, LoraConfig, trl_keys

    for command in ("distill", "sft"):
        with pytest.raises(SystemExit) as exc:
            main([command, "--help"])
        assert exc.value.code == 0
        out = capsys.readouterr().out
        keys = {line.split()[0] for line in out.splitlines() if line.startswith("  ") and line.split()}
        missing = {f.name for f in dataclasses.fields(GKDConfig)} - keys
        missing |= {f"lora.{f.name}" for f in dataclasses.fields(LoraConfig)} - keys
        missing |= set(trl_keys()) - keys
        assert not missing, f"gkd {command} --help does not list {sorted(missing)}"
        assert "--config" in out and "--push_to_hub" in out  # the forms are explained
        assert "  learning_rate = 5e-05" in out  # defaults come from the code
        assert "Student data fraction" in out  # and the help from the attribute docstrings
        assert max(len(line) for line in out.splitlines()) <= 100
    assert "  lmbda = 0.0" in out and "  divergence = nll" in out  # gkd sft's own defaults


def test_bad_keys_stop_with_one_line_and_exit_code_2(capsys):
    code = main(["distill", "--modle_name_or_path", "x", "--lerning_rate", "1e-5", "--bf16"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "2 unknown config keys" in err and "'model_name_or_path'" in err and "'learning_rate'" in err
    for argv, fragment in (
        (["distill", "stray"], "'stray' is not a config key"),
        (["distill", "--learning_rate", "fast", "model_name_or_path=m"], "config key 'learning_rate'"),
        (["distill"], "needs --config FILE"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and fragment in err and len(err.strip().splitlines()) == 1


def test_other_commands_still_reject_unknown_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["prepare", "summarization", "--out", "x", "--bogus"])
    assert exc.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_the_migration_page_covers_every_trl_key():
    """docs/from-trl.md is static: it must still name every key gkd.config translates, ignores or refuses."""
    from pathlib import Path

    from gkd.config import trl_keys

    page = (Path(__file__).resolve().parent.parent / "docs" / "from-trl.md").read_text()
    missing = [key for key in trl_keys() if f"`{key}`" not in page]
    assert not missing, f"docs/from-trl.md does not list {missing}"
