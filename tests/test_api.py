"""The TRL-shaped Python API of GKDTrainer: model / teacher_model / args / processing_class / peft_config /
reward_funcs and datasets.Dataset data, beside gkd's own names, with one-line errors for wrong types and clashes."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from conftest import base_config, make_model

from gkd.config import GKDConfig, LoraConfig
from gkd.errors import ConfigError
from gkd.trainer import GKDTrainer
from gkd.trl_trainer import trainer_arguments


@pytest.fixture
def pair(tokenizer):
    return make_model("llama_student", tokenizer, seed=1), make_model("llama_teacher", tokenizer, seed=0)


def _args(tmp_path, **overrides) -> GKDConfig:
    return base_config(output_dir=str(tmp_path / "out"), max_steps=2, **overrides)


def test_trl_style_call_trains_on_a_datasets_dataset(tokenizer, records, eval_records, pair, tmp_path):
    from datasets import Dataset

    student, teacher = pair
    args = _args(tmp_path, eval_metric="summarization", eval_max_samples=4, eval_batch_size=4)
    train, evaluation = Dataset.from_list(records[:32]), Dataset.from_list(eval_records[:4])
    t = GKDTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
    )
    assert t.cfg is args  # nothing to change in the config: the caller's object, as before
    assert t.given["train_records"] == records[:32] and t.given["eval_records"] == eval_records[:4]
    result = t.train()
    assert result.step == 2 and torch.isfinite(torch.tensor(result.final_loss))
    assert t.student is student
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/greedy/set_match" in r for r in rows)


def test_trl_style_call_trains_on_a_list_of_records(tokenizer, records, pair, tmp_path):
    student, teacher = pair
    t = GKDTrainer(
        args=_args(tmp_path),
        model=student,
        teacher_model=teacher,
        train_dataset=records[:32],
        processing_class=tokenizer,
    )
    assert t.train().step == 2


def test_gkd_style_call_still_works(tokenizer, records, pair, tmp_path):
    student, teacher = pair
    config = _args(tmp_path)
    t = GKDTrainer(config, student=student, teacher=teacher, tokenizer=tokenizer, train_records=records[:32])
    assert t.cfg is config and t.train().step == 2


@pytest.mark.parametrize("target_modules", [["q_proj", "v_proj"], None])
def test_peft_config_trains_a_lora_adapter(tokenizer, records, pair, tmp_path, target_modules):
    from peft import LoraConfig as PeftLoraConfig

    student, teacher = pair
    args = _args(tmp_path, learning_rate=1e-2)
    peft_config = PeftLoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=target_modules, task_type="CAUSAL_LM"
    )
    t = GKDTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=records[:32],
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    assert args.lora is None  # the caller's config is not changed
    assert t.cfg.lora == LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=target_modules)
    assert t.train().step == 2
    lora = {n: p for n, p in t.student.named_parameters() if "lora_" in n}
    assert lora and all(p.requires_grad for p in lora.values())
    assert all("lora_" in n for n, p in t.student.named_parameters() if p.requires_grad)
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora}
    assert adapted == {"q_proj", "v_proj"}  # None: peft's default modules for Llama are q_proj and v_proj
    assert any(p.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)  # the adapters were trained
    assert (tmp_path / "out" / "checkpoint-2" / "adapter_config.json").exists()


def test_models_given_as_path_strings(tokenizer, records, tmp_path):
    for name, kind, seed in (("student", "llama_student", 1), ("teacher", "llama_teacher", 0)):
        make_model(kind, tokenizer, seed=seed).save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    args = _args(tmp_path)
    t = GKDTrainer(
        model=str(tmp_path / "student"),
        teacher_model=tmp_path / "teacher",  # a PathLike works too
        args=args,
        train_dataset=records[:32],
    )
    assert args.model_name_or_path is None and args.teacher_model_name_or_path is None  # caller's object kept
    assert t.cfg.model_name_or_path == str(tmp_path / "student")
    assert t.cfg.teacher_model_name_or_path == str(tmp_path / "teacher")
    assert t.cfg == dataclasses.replace(
        args,
        model_name_or_path=str(tmp_path / "student"),
        teacher_model_name_or_path=str(tmp_path / "teacher"),
    )
    assert t.train().step == 2
    assert t.student.config.hidden_size == 16 and t.teacher.model.config.hidden_size == 32


def test_config_as_a_dict_and_processing_class_as_a_path(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tok")
    t = GKDTrainer({"max_steps": 3, "per_device_train_batch_size": 4}, processing_class=str(tmp_path / "tok"))
    assert t.cfg.max_steps == 3 and t.cfg.tokenizer_name_or_path == str(tmp_path / "tok")
    assert GKDTrainer().cfg == GKDConfig()  # TRL: args may be left out


def test_datasets_rows_become_the_records_they_were():
    from datasets import Dataset

    # a prompt-only row in a prompt/completion dataset: Arrow stores None in its missing columns, dropped again
    columns = {"prompt": ["a b", "e f"], "completion": ["c", None], "references": [["c", "d"], None]}
    _, given = trainer_arguments(train_dataset=Dataset.from_dict(columns))
    records, tokenized = given["train_records"], given["train_dataset"]
    assert tokenized is None and records == [
        {"prompt": "a b", "completion": "c", "references": ["c", "d"]},
        {"prompt": "e f"},
    ]
    chat = [{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}]
    _, given = trainer_arguments(eval_dataset=Dataset.from_list(chat))
    assert (given["eval_records"], given["eval_dataset"]) == (chat, None)
    _, given = trainer_arguments(train_dataset=Dataset.from_dict(columns).to_iterable_dataset())
    assert given["train_records"] == records


def test_reward_funcs_trl_style_function_gets_the_dataset_columns(tokenizer, records, pair, tmp_path):
    seen = {}

    def length_reward(completions, **kwargs):  # TRL's reward signature
        seen.update(kwargs, completions=completions)
        return [float(len(c.split())) for c in completions]

    student, teacher = pair
    args = _args(tmp_path, lmbda=1.0)  # alpha 1: the reward is computed and logged, not optimised
    t = GKDTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=records[:32],
        processing_class=tokenizer,
        reward_funcs=[length_reward],
    )
    assert args.reward is None and t.cfg.reward.endswith(
        ":test_reward_funcs_trl_style_function_gets_the_dataset_columns.<locals>.length_reward"
    )
    row = t.train_step()
    assert "reward_mean" in row
    assert len(seen["completions"]) == len(seen["prompts"]) == len(seen["references"]) == 8
    assert all(isinstance(c, str) for c in seen["completions"])
    # a gkd-style function (prompts, completions, records) is used as it is; a name sets the config key
    gkd_style = lambda prompts, completions, recs: [0.0] * len(completions)  # noqa: E731
    t = GKDTrainer(args=args, model=student, train_dataset=records[:8], reward_funcs=gkd_style)
    assert t.given["reward_fn"] is gkd_style
    t = GKDTrainer(args=args, model=student, train_dataset=records[:8], reward_funcs="item_f1")
    assert t.cfg.reward == "item_f1" and t.given["reward_fn"] is None
    # alpha < 1 needs the config key 'reward' when the config is built: a name for the function given here is kept
    rl = _args(tmp_path, lmbda=1.0, alpha=0.5, reward="mine:length")
    t = GKDTrainer(args=rl, model=student, train_dataset=records[:8], reward_funcs=length_reward)
    assert t.cfg is rl and t.given["reward_fn"] is not None


def test_gkd_imports_and_takes_records_without_datasets_installed(tmp_path):
    code = (
        "import sys; sys.modules['datasets'] = None\n"  # `import datasets` now fails, as if not installed
        "from gkd import GKDConfig, GKDTrainer\n"
        "t = GKDTrainer(args=GKDConfig(max_steps=1), train_dataset=[{'prompt': 'a', 'completion': 'b'}])\n"
        "assert t.given['train_records'] == [{'prompt': 'a', 'completion': 'b'}]\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def _peft(**kwargs):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(**kwargs)


def _dataset_dict():
    from datasets import Dataset, DatasetDict

    one = Dataset.from_list([{"prompt": "a", "completion": "b"}])
    return DatasetDict({"train": one, "test": one})


def _prefix_tuning():
    from peft import PrefixTuningConfig

    return PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")


def _reward(prompts, completions, records):
    return [0.0] * len(completions)


ERRORS = [
    ("both configs", lambda m: {"config": GKDConfig(), "args": GKDConfig()}, r"config once.*not both"),
    (
        "model as first positional",
        lambda m: {"config": "Qwen/Qwen3-0.6B"},
        r"first positional argument is the GKDConfig.*model=",
    ),
    ("model object positional", lambda m: {"config": m}, r"first positional argument is the GKDConfig"),
    ("args type", lambda m: {"args": 42}, r"argument 'args' must be a gkd.GKDConfig .*got int"),
    ("model type", lambda m: {"model": 42}, r"argument 'model' must be a transformers model or a model path"),
    ("teacher type", lambda m: {"teacher_model": ["x"]}, r"argument 'teacher_model' must be .*got list"),
    (
        "model and student",
        lambda m: {"model": m, "student": m},
        r"give 'model' \(TRL's name\) or 'student', not both",
    ),
    (
        "teacher twice",
        lambda m: {"teacher_model": "t", "teacher": m},
        r"'teacher_model' .* or 'teacher', not both",
    ),
    (
        "tokenizer type",
        lambda m: {"processing_class": 3.5},
        r"argument 'processing_class' must be a tokenizer",
    ),
    (
        "tokenizer twice",
        lambda m: {"processing_class": "a", "tokenizer": "b"},
        r"'processing_class' .* or 'tokenizer'",
    ),
    (
        "dataset dict",
        lambda m: {"train_dataset": _dataset_dict()},
        r"'train_dataset' is a datasets.DatasetDict with splits train, test; pass one split, e.g. train_dataset=dataset\['train'\]",
    ),
    (
        "eval dataset dict",
        lambda m: {"eval_dataset": _dataset_dict()},
        r"'eval_dataset' is a datasets.DatasetDict",
    ),
    (
        "list of strings",
        lambda m: {"train_dataset": ["a b"]},
        r"'train_dataset' must hold records .*item 0 is a str",
    ),
    (
        "a plain dict",
        lambda m: {"train_dataset": {"prompt": ["a"]}},
        r"'train_dataset' must be a datasets.Dataset, a list of records",
    ),
    (
        "dataset twice",
        lambda m: {"train_dataset": [], "train_records": []},
        r"'train_dataset' .* or 'train_records', not both",
    ),
    (
        "eval records type",
        lambda m: {"eval_records": "x.jsonl"},
        r"argument 'eval_records' must be a datasets.Dataset",
    ),
    (
        "dora",
        lambda m: {"peft_config": _peft(use_dora=True)},
        r"peft_config sets use_dora=True, which gkd cannot honour",
    ),
    (
        "modules_to_save",
        lambda m: {"peft_config": _peft(modules_to_save=["lm_head"])},
        r"modules_to_save=\['lm_head'\]",
    ),
    (
        "two unsupported",
        lambda m: {"peft_config": _peft(bias="all", use_rslora=True)},
        r"sets bias='all', use_rslora=True",
    ),
    (
        "task type",
        lambda m: {"peft_config": _peft(task_type="SEQ_CLS")},
        r"task_type SEQ_CLS is not a language-model task",
    ),
    ("not lora", lambda m: {"peft_config": _prefix_tuning()}, r"PrefixTuningConfig .*LoRA adapters only"),
    (
        "peft type",
        lambda m: {"peft_config": 16},
        r"argument 'peft_config' must be a peft.LoraConfig, got int",
    ),
    (
        "lora twice",
        lambda m: {"args": GKDConfig(lora={"r": 4}), "peft_config": _peft()},
        r"LoRA settings once",
    ),
    (
        "two rewards",
        lambda m: {"reward_funcs": [_reward, _reward]},
        r"'reward_funcs' holds 2 rewards; gkd takes one",
    ),
    ("reward type", lambda m: {"reward_funcs": 1.0}, r"argument 'reward_funcs' must be a reward function"),
    (
        "reward twice",
        lambda m: {"reward_funcs": _reward, "reward_fn": _reward},
        r"'reward_funcs' .* or 'reward_fn'",
    ),
]


@pytest.mark.parametrize(("what", "kwargs", "message"), ERRORS, ids=[e[0] for e in ERRORS])
def test_bad_arguments_are_one_line_config_errors(tokenizer, what, kwargs, message):
    student = make_model("llama_student", tokenizer, seed=1)
    with pytest.raises(ConfigError, match=message) as info:
        GKDTrainer(**kwargs(student))
    assert "\n" not in str(info.value), what


def test_a_reward_needs_on_policy_steps_as_the_config_says(tokenizer):
    # reward_funcs sets the config key 'reward', so the config's own rule applies (RL + GKD needs lmbda: 1)
    with pytest.raises(ConfigError, match="set lmbda: 1"):
        GKDTrainer(args=GKDConfig(lmbda=0.5), reward_funcs=_reward)
