"""A combination fuzzer: random configs drawn from the documented keys and values, run through the CLI.

Each example draws a model family, a data format and a handful of documented keys with documented values (valid
and out-of-range ones), runs ``gkd distill`` for two steps in-process and requires exactly one of two outcomes:

* a finished run: exit 0, one strict-JSON line on stdout with a finite loss, and a checkpoint that loads back;
* a clean refusal: exit 2 and a single ``error:`` line on stderr.

Never a traceback, never a hang. ``GKD_FUZZ_EXAMPLES`` sets the number of examples (default 100, fixed seed);
``GKD_FUZZ_SEED`` another seed; ``pytest --hypothesis-show-statistics`` tallies finished runs and refusals.
"""

from __future__ import annotations

import json
import os
import uuid

import pytest
from hypothesis import HealthCheck, event, given, seed, settings
from hypothesis import strategies as st
from userland import DATA_FORMATS, run_cli

EXAMPLES = int(os.environ.get("GKD_FUZZ_EXAMPLES", "100"))
SEED = int(os.environ.get("GKD_FUZZ_SEED", "20261130"))

# documented keys -> values a user might write (strings exactly as typed on the command line)
CHOICES: dict[str, list[str]] = {
    "divergence": [
        "forward_kl",
        "reverse_kl",
        "jsd",
        "tvd",
        "skew_forward_kl",
        "skew_reverse_kl",
        "nll",
        "kl",
    ],
    "beta": ["0", "0.1", "0.5", "0.9", "1.0", "1.5"],
    "jsd_normalize": ["true", "false", "yes", "off"],
    "skew_alpha": ["0", "0.1", "0.5"],
    "lmbda": ["0", "0.5", "1", "1.0"],
    "lmbda_schedule": ["constant", "linear"],
    "lmbda_start": ["0", "0.5"],
    "lmbda_warmup_steps": ["0", "1", "4"],
    "seq_kd": ["true", "false", "on", "no", "False"],
    "loss_temperature": ["1.0", "2", "0.5"],
    "reduction": ["token", "sequence"],
    "temperature": ["1.0", "0.7", "2e-1"],
    "top_p": ["1.0", "0.9"],
    "top_k": ["0", "5"],
    "max_new_tokens": ["4", "8", "80"],
    "max_prompt_length": ["512", "8", "3"],
    "max_completion_length": ["null", "3"],
    "rollout_backend": ["auto", "fast", "generate", "vllm"],
    "alpha": ["1.0", "0.5", "0"],
    "reward": [
        "null",
        "exact_match",
        "rouge2",
        "bleu",
        "set_match",
        "item_f1",
        "faithfulness",
        "final_answer",
        "summarization",
        "exact_mtch",
    ],
    "num_generations": ["1", "2"],
    "advantage": ["group", "rloo"],
    "kl_to_initial": ["0", "0.1"],
    "teacher_kl_estimator": ["full", "sampled"],
    "rkl_discount": ["0", "0.9"],
    "teacher_cache": ["none", "topk"],
    "teacher_cache_topk": ["4", "64"],
    "learning_rate": ["1e-3", "2E-4", "5e-05", "nan", "0"],
    "gradient_accumulation_steps": ["1", "2"],
    "warmup_steps": ["0", "1"],
    "lr_scheduler_type": ["constant", "linear", "cosine"],
    "max_grad_norm": ["1.0", "0", "inf"],
    "student_dtype": ["float32", "bfloat16"],
    "teacher_dtype": ["float32", "bfloat16"],
    "lora": ["null", "{r: 4}", "{r: 4, target_modules: [q_proj, v_proj]}"],
    "eval_metric": [
        "null",
        "exact_match",
        "rouge2",
        "summarization",
        "set_match",
        "arithmetic",
        "exact_mtch",
    ],
    "report_to": ["none", "[]", "tensorboard"],
    "disable_dropout": ["true", "false", "No", "y"],
    "save_total_limit": ["None", "1"],
    # YAML 1.1's booleans as HfArgumentParser reads them: text for a text key, bools for a bool key
    "save_strategy": ["no", '"no"', "steps", "epoch", "null"],
    "eval_strategy": ["no", "steps", "epoch", "null"],
    "logging_strategy": ["no", "steps", "epoch"],
    "progress": ["yes", "no", "off", "on"],
    "bf16": ["no", "off", "false"],
    "packing": ["no", "false", "yes"],
}
FAMILIES = ["llama", "llama", "qwen2", "gpt2", "t5"]


@st.composite
def configs(draw):
    family = draw(st.sampled_from(FAMILIES))
    fmt = draw(st.sampled_from(DATA_FORMATS))
    keys = draw(st.lists(st.sampled_from(sorted(CHOICES)), min_size=1, max_size=7, unique=True))
    overrides = {"lmbda": draw(st.sampled_from(CHOICES["lmbda"]))}  # every run is some point of Algorithm 1
    overrides.update({k: draw(st.sampled_from(CHOICES[k])) for k in keys})
    with_eval = draw(st.booleans())
    return family, fmt, overrides, with_eval


def fuzz_args(world, case, out) -> list[str]:
    """The ``gkd distill`` command line of one drawn case (two steps, small batches, results in ``out``)."""
    family, fmt, overrides, with_eval = case
    args = [
        "distill",
        f"model_name_or_path={world.model(family, 'student')}",
        f"teacher_model_name_or_path={world.model(family, 'teacher')}",
        f"dataset={world.data(fmt)}",
        "max_steps=2",
        "max_new_tokens=6",
        "per_device_train_batch_size=4",
        "logging_steps=1",
        "save_steps=0",
        "eval_max_samples=8",
        f"output_dir={out}",
    ]
    if with_eval:
        args.append(f"eval_dataset={world.data(fmt, 'test')}")
    return args + [f"{k}={v}" for k, v in overrides.items()]


def _strict_json(line: str) -> dict:
    def refuse(name: str):
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(line, parse_constant=refuse)


@pytest.mark.slow
@seed(SEED)
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=False,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=configs())
def test_any_documented_combination_finishes_or_is_one_clean_error(case, world, tmp_path):
    family, fmt, overrides, with_eval = case
    out = tmp_path / uuid.uuid4().hex[:8]
    result = run_cli(fuzz_args(world, case, out))
    note = f"{family} / {fmt} / {overrides} / eval={with_eval}\n{result}"
    assert "Traceback" not in result.err, note
    first_error = (result.error_lines or ["(no error line)"])[0]
    event("finished" if result.code == 0 else "refused: " + " ".join(first_error.split()[1:6]))
    if result.code == 0:
        summary = _strict_json(result.out.strip().splitlines()[-1])
        assert summary["step"] == 2 and summary["final_loss"] is not None, note
        from gkd.models import load_model

        if overrides.get("save_strategy") in ("no", '"no"'):  # TRL's meaning: no checkpoint-N folder at all
            assert not list(out.glob("checkpoint-*")), note
            load_model(str(out), what="model")
            return
        ckpt = out / "checkpoint-2"
        assert (ckpt / "trainer_state.json").is_file(), note
        load_model(str(ckpt), what="checkpoint")
    else:
        assert result.is_clean_error(), note
