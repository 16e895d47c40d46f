"""A TRL user switches by changing one word: TRL's documented GKD command lines run as ``gkd distill``.

The two commands of TRL's ``examples/scripts/gkd.py`` docstring (full fine-tuning and LoRA), unchanged except for
paths (local tiny models and a local conversational dataset folder laid out like ``trl-lib/chatbot_arena_completions``)
and sizes (a 64-record dataset, so one epoch is two steps of 4 x 8 sequences), as flags and as a YAML, for one epoch.
The hub upload of ``--push_to_hub`` is mocked. The final model must load from ``output_dir`` as TRL users load it.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import pytest
import yaml
from userland import run_cli

# TRL's examples/scripts/gkd.py docstring (huggingface/trl), with the hub ids replaced by local paths
FULL = """
    --model_name_or_path {student}
    --teacher_model_name_or_path {teacher}
    --dataset_name {dataset}
    --learning_rate 2e-5
    --per_device_train_batch_size 4
    --gradient_accumulation_steps 8
    --output_dir {out}
    --logging_steps 10
    --num_train_epochs 1
    --push_to_hub
    --gradient_checkpointing
"""
LORA = """
    --model_name_or_path {student}
    --teacher_model_name_or_path {teacher}
    --dataset_name {dataset}
    --learning_rate 2e-4
    --per_device_train_batch_size 4
    --gradient_accumulation_steps 8
    --output_dir {out}
    --logging_steps 10
    --num_train_epochs 1
    --push_to_hub
    --gradient_checkpointing
    --use_peft
    --lora_r 64
    --lora_alpha 16
"""


class _Hub:
    calls: ClassVar[list[tuple[str, dict]]] = []

    def create_repo(self, repo_id, **kw):
        _Hub.calls.append(("create_repo", {"repo_id": repo_id, **kw}))
        return SimpleNamespace(repo_id=repo_id if "/" in repo_id else f"me/{repo_id}")

    def upload_folder(self, **kw):
        _Hub.calls.append(("upload_folder", kw))


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub

    _Hub.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", _Hub)
    return _Hub


@pytest.fixture(scope="module")
def arena(tmp_path_factory) -> Path:
    """A local dataset folder in chatbot_arena_completions' layout: conversational prompt and completion."""
    root = tmp_path_factory.mktemp("chatbot_arena_completions")
    for split, n in (("train", 64), ("test", 8)):
        with (root / f"{split}.jsonl").open("w") as fh:
            for i in range(n):
                a, b = i % 7, (3 * i) % 5
                record = {
                    "prompt": [{"role": "user", "content": f"add {a} and {b}"}],
                    "completion": [{"role": "assistant", "content": f"{a} + {b} = {a + b}"}],
                }
                fh.write(json.dumps(record) + "\n")
    return root


def _paths(world, arena: Path, out: Path) -> dict[str, str]:
    return {
        "student": world.model("qwen2", "student"),  # a chat model with a template and padded head rows
        "teacher": world.model("qwen2", "teacher"),
        "dataset": str(arena),
        "out": str(out),
    }


def _as_yaml(flags: str, path: Path) -> Path:
    """The same command line as a TRL-style YAML (TrlParser's --config)."""
    words = shlex.split(flags)
    data, i = {}, 0
    while i < len(words):
        key = words[i][2:]
        if i + 1 < len(words) and not words[i + 1].startswith("--"):
            data[key], i = yaml.safe_load(words[i + 1]), i + 2
        else:
            data[key], i = True, i + 1
    path.write_text(yaml.safe_dump(data))
    return path


def _check_final_model(out: Path, lora: bool, hub) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template
    if lora:
        from peft import PeftModel

        assert (out / "adapter_config.json").exists()
        config = json.loads((out / "adapter_config.json").read_text())
        assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (64, 16, 0.05)
        base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
        model = PeftModel.from_pretrained(base, out)
    else:
        model = AutoModelForCausalLM.from_pretrained(out)
    ids = tok("add 1 and 2", return_tensors="pt").input_ids
    assert model(ids).logits.shape[-1] >= len(tok)
    # one epoch = 64 prompts / (4 x 8) per step = 2 steps; the final checkpoint is step 2
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    (create, _), (upload, kw) = hub.calls
    assert create == "create_repo" and upload == "upload_folder"
    assert Path(kw["folder_path"]) == out and kw["repo_id"].endswith(out.name)


@pytest.mark.parametrize("variant", ["full", "lora"])
@pytest.mark.parametrize("form", ["flags", "yaml"])
def test_trls_documented_gkd_command_runs_as_gkd_distill(variant, form, world, arena, tmp_path, hub):
    out = tmp_path / "gkd-model"
    flags = (FULL if variant == "full" else LORA).format(**_paths(world, arena, out))
    if form == "flags":
        argv = ["distill", *shlex.split(flags)]
    else:
        argv = ["distill", "--config", str(_as_yaml(flags, tmp_path / "gkd.yaml"))]
    result = run_cli(argv, cwd=tmp_path)
    assert result.code == 0, result
    assert "Traceback" not in result.err
    assert "2 steps (1 epoch of 2)" in result.err, result.err
    _check_final_model(out, variant == "lora", hub)
