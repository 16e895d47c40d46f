"""TRL's keys (GKDConfig, DistillationConfig, SFTConfig, TrainingArguments, ModelConfig, ScriptArguments) are read
with TRL's meaning: each test checks what a key does, not only that it parses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gkd.build import init_kwargs, lr_scheduler
from gkd.config import LR_SCHEDULERS, config_from_dict, training_plan
from gkd.errors import ConfigError
from gkd.objective import Objective


def cfg_of(**data):
    return config_from_dict(data)


# --- ScriptArguments / data ---------------------------------------------------------------------------------------
def test_script_arguments_name_the_dataset_and_its_splits():
    cfg = cfg_of(
        dataset_name="d.jsonl", dataset_config="main", dataset_train_split="tr", dataset_test_split="te"
    )
    assert (cfg.dataset, cfg.dataset_config_name, cfg.dataset_split, cfg.eval_split) == (
        "d.jsonl",
        "main",
        "tr",
        "te",
    )
    assert cfg.eval_dataset is None  # TRL's script evaluates only when eval_strategy is not "no"


def test_eval_strategy_evaluates_on_the_datasets_test_split_as_trls_script():
    cfg = cfg_of(dataset_name="d", eval_strategy="steps", eval_steps=5)
    assert (cfg.eval_dataset, cfg.eval_split) == ("d", "test")
    cfg = cfg_of(dataset_name="d", dataset_test_split="validation", eval_strategy="epoch")
    assert (cfg.eval_dataset, cfg.eval_split) == ("d", "validation")


def test_eval_strategy_on_a_single_file_dataset_is_refused_not_evaluated_on_the_training_data(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    with pytest.raises(ConfigError, match="single file with one split; set eval_dataset"):
        cfg_of(dataset_name=str(data), eval_strategy="steps")
    assert cfg_of(dataset_name=str(data), eval_strategy="steps", eval_dataset=str(data)).eval_dataset == str(
        data
    )


def test_per_device_eval_batch_size_is_the_eval_batch_size():
    assert cfg_of(per_device_eval_batch_size=3).eval_batch_size == 3


# --- epochs, ratios, strategies -----------------------------------------------------------------------------------
def test_max_steps_minus_one_trains_num_train_epochs():
    cfg = cfg_of(
        max_steps=-1, num_train_epochs=2, per_device_train_batch_size=4, gradient_accumulation_steps=2
    )
    plan = training_plan(cfg, train_examples=20)
    assert plan.steps_per_epoch == 3  # ceil(20 / (4 x 2))
    assert plan.max_steps == 6
    assert training_plan(cfg, train_examples=20, world_size=2).max_steps == 4  # ceil(20 / 16) x 2
    half = cfg_of(max_steps=-1, num_train_epochs=0.5, per_device_train_batch_size=4)
    assert training_plan(half, train_examples=40).max_steps == 5
    assert training_plan(cfg_of(max_steps=7), 20).max_steps == 7  # max_steps > 0 wins, as in transformers


def test_epochs_count_prompts_when_num_generations_samples_several_completions():
    cfg = cfg_of(
        max_steps=-1, num_train_epochs=1, per_device_train_batch_size=8, num_generations=4, lmbda=1.0
    )
    assert training_plan(cfg, train_examples=10).max_steps == 5  # 2 prompts a step


def test_fractional_steps_and_warmup_ratio_are_fractions_of_the_run():
    cfg = cfg_of(max_steps=200, logging_steps=0.1, save_steps=0.25, eval_steps=0.5, warmup_ratio=0.05)
    plan = training_plan(cfg, 1000, has_eval_data=True)
    assert (plan.logging_steps, plan.save_steps, plan.eval_steps, plan.warmup_steps) == (20, 50, 100, 10)
    assert training_plan(cfg_of(max_steps=200, warmup_steps=0.1), 1000).warmup_steps == 20
    # warmup_steps wins over warmup_ratio, as in transformers
    assert training_plan(cfg_of(max_steps=200, warmup_steps=3, warmup_ratio=0.5), 1000).warmup_steps == 3
    with pytest.raises(ConfigError, match="logging_steps"):
        cfg_of(logging_steps=2.5)


def test_strategies_set_the_cadence():
    epoch = cfg_of(max_steps=-1, num_train_epochs=3, per_device_train_batch_size=5, eval_strategy="epoch")
    plan = training_plan(epoch, 20, has_eval_data=True)
    assert (plan.max_steps, plan.eval_steps, plan.evaluate) == (12, 4, True)
    steps = training_plan(cfg_of(eval_strategy="steps", logging_steps=7), 100, has_eval_data=True)
    assert steps.eval_steps == 7  # eval_steps defaults to logging_steps
    assert training_plan(cfg_of(eval_strategy="no", eval_steps=5), 100, has_eval_data=True).evaluate is False
    assert training_plan(cfg_of(save_strategy="no", save_steps=5), 100).save_steps == 0
    assert training_plan(cfg_of(save_strategy="epoch", per_device_train_batch_size=4), 20).save_steps == 5
    assert training_plan(cfg_of(logging_strategy="no"), 100).logging_steps == 0
    assert (
        training_plan(cfg_of(logging_strategy="epoch", per_device_train_batch_size=4), 20).logging_steps == 5
    )
    assert training_plan(cfg_of(save_strategy="best", eval_dataset="e"), 100).save_best is True


# --- the learning-rate schedule is transformers' -------------------------------------------------------------------
def test_every_transformers_schedule_is_accepted():
    from transformers import SchedulerType

    assert set(LR_SCHEDULERS) >= {s.value for s in SchedulerType}


def _lrs(scheduler, optimizer, steps):
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("linear", {}),
        ("cosine", {}),
        ("cosine_with_restarts", {"num_cycles": 2}),
        ("polynomial", {"power": 2.0}),
        ("constant", {}),
        ("constant_with_warmup", {}),
        ("inverse_sqrt", {}),
        ("cosine_with_min_lr", {"min_lr_rate": 0.1}),
        ("warmup_stable_decay", {"num_decay_steps": 4}),
    ],
)
def test_lr_scheduler_type_and_kwargs_follow_transformers(name, kwargs):
    from transformers import get_scheduler

    cfg = cfg_of(lr_scheduler_type=name, lr_scheduler_kwargs=kwargs, max_steps=20, warmup_ratio=0.2)
    plan = training_plan(cfg, 100)
    ours_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    ref_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    ours = _lrs(lr_scheduler(ours_opt, cfg, plan), ours_opt, 20)
    ref = get_scheduler(
        name, ref_opt, num_warmup_steps=4, num_training_steps=20, scheduler_specific_kwargs=kwargs or None
    )
    assert ours == _lrs(ref, ref_opt, 20)
    if name == "constant":
        assert ours[0] == 0.1  # constant ignores warm-up, as in transformers
    elif name != "inverse_sqrt":
        assert ours[0] == 0.0  # transformers' warm-up starts at 0


def test_min_lr_ratio_is_cosine_with_min_lr():
    from transformers import get_scheduler

    cfg = cfg_of(lr_scheduler_type="cosine", min_lr_ratio=0.2, max_steps=10)
    a = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    b = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    ref = get_scheduler(
        "cosine_with_min_lr",
        b,
        num_warmup_steps=0,
        num_training_steps=10,
        scheduler_specific_kwargs={"min_lr_rate": 0.2},
    )
    assert _lrs(lr_scheduler(a, cfg, training_plan(cfg, 10)), a, 10) == _lrs(ref, b, 10)
    with pytest.raises(ConfigError, match="min_lr_ratio"):
        cfg_of(lr_scheduler_type="linear", min_lr_ratio=0.1)


def test_bad_schedule_names_and_kwargs_are_one_line():
    with pytest.raises(ConfigError, match="did you mean 'cosine'"):
        cfg_of(lr_scheduler_type="cosin")
    cfg = cfg_of(lr_scheduler_type="linear", lr_scheduler_kwargs={"bogus": 1})
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ConfigError, match="lr_scheduler_kwargs"):
        lr_scheduler(opt, cfg, training_plan(cfg, 10))


# --- models -------------------------------------------------------------------------------------------------------
def test_dtype_names_are_the_students_dtype():
    assert cfg_of(dtype="bfloat16").student_dtype == "bfloat16"
    assert cfg_of(torch_dtype="auto").student_dtype == "auto"
    cfg = cfg_of(teacher_model_init_kwargs={"torch_dtype": "bfloat16", "attn_implementation": "eager"})
    assert cfg.teacher_dtype == "bfloat16" and cfg.teacher_model_init_kwargs == {
        "attn_implementation": "eager"
    }
    with pytest.raises(ConfigError, match="same thing"):
        cfg_of(dtype="bfloat16", student_dtype="float32")


def test_revision_trust_remote_code_and_init_kwargs_reach_from_pretrained(model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    from gkd.models import load_model

    cfg = cfg_of(
        trust_remote_code=True,
        model_revision="main",
        teacher_model_revision="v2",
        model_init_kwargs={"low_cpu_mem_usage": True},
        attn_implementation="eager",
    )
    assert init_kwargs(cfg, teacher=False) == {
        "low_cpu_mem_usage": True,
        "trust_remote_code": True,
        "revision": "main",
    }
    assert init_kwargs(cfg, teacher=True) == {"trust_remote_code": True, "revision": "v2"}
    seen = {}
    original = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, path, *args, **kwargs):
        seen.update(kwargs)
        return original(cls, path, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    load_model(
        str(model_dir / "student"),
        what="student",
        attn_implementation=cfg.attn_implementation,
        init_kwargs=init_kwargs(cfg, teacher=False),
    )
    assert seen["revision"] == "main" and seen["trust_remote_code"] is True
    assert seen["attn_implementation"] == "eager" and seen["low_cpu_mem_usage"] is True


def test_revision_and_trust_remote_code_reach_the_tokenizer(model_dir, monkeypatch):
    from transformers import AutoTokenizer

    from gkd.build import tokenizer_kwargs
    from gkd.models import load_tokenizer

    cfg = cfg_of(trust_remote_code=True, model_revision="main")
    seen = {}
    original = AutoTokenizer.from_pretrained.__func__

    def spy(cls, path, *args, **kwargs):
        seen.update(kwargs)
        return original(cls, path, *args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", classmethod(spy))
    load_tokenizer(str(model_dir / "student"), init_kwargs=tokenizer_kwargs(cfg))
    assert seen == {"trust_remote_code": True, "revision": "main"}


def test_use_peft_and_lora_keys_are_trls_model_config():
    cfg = cfg_of(use_peft=True, lora_r=64, lora_alpha=16)
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules) == (64, 16, 0.05, None)
    cfg = cfg_of(use_peft=True, lora_target_modules=["q_proj", "v_proj"], lora_dropout=0.1)
    assert (cfg.lora.r, cfg.lora.target_modules, cfg.lora.dropout) == (16, ["q_proj", "v_proj"], 0.1)
    off = cfg_of(lora_r=8)  # TRL ignores lora_* without use_peft; gkd says so
    assert off.lora is None
    assert any("lora_r" in w and "use_peft" in w for w in off.warnings())
    assert cfg_of(use_peft=False).lora is None


# --- the objective ------------------------------------------------------------------------------------------------
def _trl_generalized_jsd(student_logits, teacher_logits, beta):
    """TRL's GKDTrainer.generalized_jsd_loss (summed over the vocabulary), written from its definition."""
    s, t = F.log_softmax(student_logits, -1), F.log_softmax(teacher_logits, -1)
    if beta == 0:
        return F.kl_div(s, t, reduction="none", log_target=True).sum(-1)
    if beta == 1:
        return F.kl_div(t, s, reduction="none", log_target=True).sum(-1)
    m = torch.logsumexp(torch.stack([s + math.log(1 - beta), t + math.log(beta)]), 0)
    kl_t = F.kl_div(m, t, reduction="none", log_target=True).sum(-1)
    kl_s = F.kl_div(m, s, reduction="none", log_target=True).sum(-1)
    return beta * kl_t + (1 - beta) * kl_s


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_beta_over_the_closed_interval_is_trls_generalized_jsd(beta):
    cfg = cfg_of(beta=beta)  # divergence: jsd (the default)
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6, 11, generator=gen), torch.randn(6, 11, generator=gen)
    ours = Objective.from_config(cfg).divergence(student.double(), teacher.double())
    torch.testing.assert_close(ours, _trl_generalized_jsd(student.double(), teacher.double(), beta))
    if beta in (0.0, 1.0):
        assert cfg.divergence == ("forward_kl" if beta == 0 else "reverse_kl")


def test_max_completion_length_is_the_generation_length():
    cfg = cfg_of(max_completion_length=300)
    assert cfg.max_new_tokens == 300 and cfg.effective_max_completion_length == 300
    assert cfg_of(max_completion_length=64, max_new_tokens=64).max_new_tokens == 64
    with pytest.raises(ConfigError, match="give one of them"):
        cfg_of(max_completion_length=64, max_new_tokens=32)


def test_num_generations_counts_completions_inside_the_batch(world, tmp_path):
    import gkd
    from gkd.step import student_samples

    cfg = gkd.GKDConfig(
        model_name_or_path=world.model("llama", "student"),
        teacher_model_name_or_path=world.model("llama", "teacher"),
        dataset=world.data("prompt_completion"),
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=6,
        num_generations=3,
        lmbda=1.0,
        max_new_tokens=4,
        max_steps=1,
        progress=False,
    )
    run = gkd.GKDTrainer(cfg, log=lambda _m: None).setup()
    batch = run.stream.next()
    assert len(batch.prompt_ids) == 2  # 6 sequences = 2 prompts x 3 completions, as in TRL
    rolled = student_samples(run, batch.to(run.device))
    assert rolled.completion_ids.shape[0] == 6
    assert torch.equal(rolled.prompt_ids[0], rolled.prompt_ids[2]) and torch.equal(
        rolled.prompt_ids[3], rolled.prompt_ids[5]
    )
    with pytest.raises(ConfigError, match="multiple of num_generations"):
        cfg_of(per_device_train_batch_size=4, num_generations=3, lmbda=1.0)


# --- output, trackers, resume -------------------------------------------------------------------------------------
def test_report_to_takes_trls_values():
    assert cfg_of(report_to="wandb").report_to == ["wandb"]
    assert cfg_of(report_to=["mlflow", "tensorboard"]).report_to == ["mlflow", "tensorboard"]
    assert cfg_of(report_to="none").report_to == []
    assert cfg_of(report_to="all").report_to == ["all"]
    assert cfg_of(run_name="exp-1").run_name == "exp-1"


def test_resume_from_checkpoint_true_is_the_newest_checkpoint():
    assert cfg_of(resume_from_checkpoint=True).resume_from_checkpoint == "latest"
    assert cfg_of(resume_from_checkpoint=False).resume_from_checkpoint is None


def test_disable_tqdm_turns_the_progress_bar_off():
    assert cfg_of(disable_tqdm=True).progress is False


# --- keys gkd cannot honour, and keys it ignores ------------------------------------------------------------------
def test_deepspeed_is_a_one_line_error_and_fsdp_full_shard_turns_fsdp2_on():
    with pytest.raises(ConfigError, match=r"deepspeed.*does not support it yet"):
        cfg_of(deepspeed="ds_config.json")
    assert cfg_of(fsdp="full_shard auto_wrap").fsdp is True
    assert cfg_of(fsdp=["full_shard"], fsdp_config={"fsdp_version": 2}).fsdp is True
    with pytest.raises(ConfigError, match=r"fsdp: shard_grad_op.*not supported"):
        cfg_of(fsdp="shard_grad_op")
    assert cfg_of(fsdp="", deepspeed=None).fsdp is False  # TRL's empty defaults are fine


@pytest.mark.parametrize("env", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_an_accelerate_launch_for_fsdp_or_deepspeed_is_refused(env, monkeypatch):
    from gkd.build import make_accelerator

    monkeypatch.setenv(env, "true")
    with pytest.raises(ConfigError, match="does not support yet"):
        make_accelerator(cfg_of())


def test_ignored_keys_are_named_in_a_warning_unless_gkd_already_does_that():
    cfg = cfg_of(logging_first_step=True, packing=False, save_safetensors=True, use_liger_kernel=True)
    warnings = " ".join(cfg.warnings())
    assert "logging_first_step" in warnings and "use_liger_kernel" in warnings
    assert "packing" not in warnings and "save_safetensors" not in warnings


def test_optim_other_than_adamw_is_refused():
    assert cfg_of(optim="adamw_torch_fused").optim == "adamw_torch_fused"
    with pytest.raises(ConfigError, match="AdamW"):
        cfg_of(optim="adafactor")


def test_every_unknown_key_is_reported_at_once_with_a_right_suggestion():
    with pytest.raises(ConfigError) as err:
        cfg_of(lora_alpah=16, num_train_epoch=1, dataset_nam="x")
    msg = str(err.value)
    assert msg.startswith("3 unknown config keys")
    for hint in ("'lora_alpha'", "'num_train_epochs'", "'dataset_name'"):
        assert hint in msg


def test_a_served_and_a_local_teacher_together_are_refused():
    with pytest.raises(ConfigError, match="give one"):
        cfg_of(teacher_url="http://127.0.0.1:8000", teacher_model_name_or_path="teacher/")


def test_every_key_help_lists_acts_or_says_why_not():
    """``gkd distill --help`` lists gkd's keys and TRL's. Each gkd key is read by the code that runs (not only
    declared); each TRL key given a value gkd does not already follow changes the config, is named in a warning,
    or stops the run with one line: nothing listed is silently ignored."""
    import dataclasses
    import re
    from pathlib import Path

    from gkd.cli import config_keys_help
    from gkd.config import GKDConfig, config_from_dict, trl_keys
    from gkd.errors import ConfigError
    from gkd.trl_compat import IGNORED_KEYS

    listed = config_keys_help(100)
    src = Path(__file__).resolve().parent.parent / "src" / "gkd"
    # the config's own modules declare, check and translate keys: reading a key there does not count
    config_modules = ("config.py", "config_checks.py", "config_files.py", "trl_compat.py")
    code = "\n".join(p.read_text() for p in src.rglob("*.py") if p.name not in config_modules)
    plan = (src / "config.py").read_text().split("def training_plan", 1)[1].split("\n\n\n", 1)[0]
    for f in dataclasses.fields(GKDConfig):
        assert re.search(rf"^  {f.name}\b", listed, re.M), f"--help does not list {f.name}"
        read = re.search(rf"(\.{f.name}\b|[\"']{f.name}[\"'])", code) or re.search(rf"cfg\.{f.name}\b", plan)
        assert read, f"config key '{f.name}' is listed but nothing reads it"
    base = config_from_dict({})
    candidates = [True, False, 7, 0.5, "x", ["q_proj"], {"a": 1}, "server", None]
    for key in trl_keys():
        assert re.search(rf"^  {key}\b", listed, re.M), f"--help does not list {key}"
        acted = []
        for value in candidates:
            if key in IGNORED_KEYS and value in IGNORED_KEYS[key][0]:
                continue  # what gkd does anyway: nothing to say
            try:
                cfg = config_from_dict({key: value})
            except ConfigError:
                acted.append(value)  # refused in one line
                continue
            changed = cfg.to_dict() != base.to_dict()
            named = any(key in note for note in cfg.warnings())
            if changed or named:
                acted.append(value)
            elif key in IGNORED_KEYS:  # an ignored key must say so for every value gkd does not follow anyway
                assert value is None, f"{key}: {value!r} is silently ignored"
        assert acted, f"{key}: no value changes anything or is named"


def test_vllm_keys_are_honoured_or_refused():
    from gkd.config import config_from_dict
    from gkd.errors import ConfigError

    assert config_from_dict({"vllm_gpu_memory_utilization": 0.7}).vllm_gpu_memory_utilization == 0.7
    assert config_from_dict({"vllm_mode": "colocate"}).rollout_backend == "auto"
    with pytest.raises(ConfigError, match="vllm_mode: server"):
        config_from_dict({"vllm_mode": "server"})
    with pytest.raises(ConfigError, match="vllm_gpu_memory_utilization"):
        config_from_dict({"vllm_gpu_memory_utilization": 1.5})
