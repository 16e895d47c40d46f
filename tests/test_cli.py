"""The gkd command line on tiny models: prepare, sft, distill from a config file, generate, eval."""

from __future__ import annotations

import json

import yaml

from gkd.cli import main


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
