"""The runs that take every device-sensitive path of gkd, as plain functions of nothing but the installed packages.

The test suite runs them on a pretend accelerator (``tests/test_devices.py``); ``benchmarks/gpu_check.py`` runs
them on real CUDA (in float32, bf16 and fp16 mixed precision, with gradient checkpointing), on a machine without
pytest. Each scenario is a small config; :func:`run_scenario` builds the run with tiny Llama models (the run's
Accelerator decides the device) and trains a step, evaluating and reloading caches where the path needs it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tiny import base_config, make_model

LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}

# name -> config of a run whose steps take one of the code audit's §0 paths (feature-audit.md)
SCENARIOS: dict[str, dict[str, Any]] = {
    "on_policy_fast_sampler": {"lmbda": 1.0},
    "fused_loss_off_policy": {"lmbda": 0.0},
    "seqkd": {"lmbda": 0.0, "seq_kd": True, "divergence": "nll"},
    "topk_cache": {"lmbda": 0.0, "teacher_cache": "topk", "teacher_cache_topk": 8},
    "rl_rewards": {"lmbda": 1.0, "alpha": 0.5, "reward": "exact_match", "num_generations": 2},
    "discounted_rkl": {
        "lmbda": 1.0,
        "divergence": "reverse_kl",
        "teacher_kl_estimator": "sampled",
        "rkl_discount": 0.9,
    },
    "kl_to_initial": {"lmbda": 1.0, "alpha": 0.5, "reward": "exact_match", "kl_to_initial": 0.1},
    "lora_generate_sampler": {"lmbda": 1.0, "divergence": "reverse_kl", "lora": LORA},
}


def task_data() -> tuple[Any, list[dict], list[dict]]:
    """The summarization task's tokenizer, training and evaluation records (generated, never downloaded)."""
    from gkd.tasks import get_task

    task = get_task("summarization")
    return task.build_tokenizer(), task.generate("train", 64, seed=0), task.generate("test", 8, seed=0)


def scenario_trainer(
    tokenizer: Any,
    records: list[dict],
    eval_records: list[dict],
    out: Path,
    log: list[str] | None = None,
    kind: str = "llama",
    **cfg: Any,
) -> Any:
    """A set-up trainer of tiny models (``kind``: llama or t5) for one scenario's config."""
    from gkd.trainer import GKDTrainer

    # rollout_backend fast: `auto` takes the fast loop only on devices it is validated on (the CPU so far), and the
    # point here is to run the fast loop on a device
    cfg.setdefault("rollout_backend", "generate" if cfg.get("lora") or kind == "t5" else "fast")
    config = base_config(
        output_dir=str(out), per_device_train_batch_size=4, max_new_tokens=6, eval_batch_size=4, **cfg
    )
    student, teacher = ("llama_student", "llama_teacher") if kind == "llama" else ("t5", "t5")
    trainer = GKDTrainer(
        config,
        student=make_model(student, tokenizer, seed=1),
        teacher=make_model(teacher, tokenizer, seed=0),
        tokenizer=tokenizer,
        train_records=records[:16],
        eval_records=eval_records[:4],
        log=(log.append if log is not None else lambda _msg: None),
    )
    trainer.setup()
    return trainer


def run_scenario(
    name: str,
    tokenizer: Any,
    records: list[dict],
    eval_records: list[dict],
    out: Path,
    check: Callable[[Any], None] | None = None,
    **extra: Any,
) -> list[dict]:
    """Build the scenario's run and train one step (two for the top-k cache: a rerun reloads the cache from disk);
    the on-policy run also evaluates (greedy and sampled). ``check(trainer)`` inspects each built run; ``extra``
    adds config keys (``bf16``, ``gradient_checkpointing``, ...)."""
    cfg = {**SCENARIOS[name], **extra}
    trainer = scenario_trainer(tokenizer, records, eval_records, out, **cfg)
    if check is not None:
        check(trainer)
    steps = [trainer.train_step()]
    if name == "on_policy_fast_sampler":
        scores = trainer.evaluate()
        assert {"eval/greedy/exact_match", "eval/sample/exact_match"} <= set(scores), scores
    if name == "topk_cache":
        log: list[str] = []
        again = scenario_trainer(tokenizer, records, eval_records, out, log=log, **cfg)
        assert not any(line.startswith("teacher cache:") for line in log), "the cache was rebuilt"
        if check is not None:
            check(again)
        steps.append(again.train_step())
    for record in steps:
        assert record["completion_tokens"] > 0 and record["loss"] == record["loss"], record
    return steps


def fast_equals_generate(tokenizer: Any, records: list[dict], device: str) -> None:
    """Greedy decoding: gkd's fast loop gives the same tokens as ``model.generate`` on ``device``."""
    import torch

    from gkd.data import collate, tokenize_records
    from gkd.sampling.local import sample_completions

    model = make_model("llama_student", tokenizer, seed=3).to(device).eval()
    data = tokenize_records(records[:8], tokenizer, max_prompt_length=64, max_completion_length=16)
    batch = collate(data.examples, tokenizer.pad_token_id)
    kw = dict(
        max_new_tokens=10,
        greedy=True,
        eos_token_ids=[tokenizer.eos_token_id],
        pad_token_id=tokenizer.pad_token_id,
        vocab_size=len(tokenizer),
    )
    with torch.no_grad():
        fast = sample_completions(model, batch.prompt_ids, batch.prompt_mask, backend="fast", **kw)
        slow = sample_completions(model, batch.prompt_ids, batch.prompt_mask, backend="generate", **kw)
    assert torch.equal(fast.completion_ids.cpu(), slow.completion_ids.cpu()), "fast loop != generate (greedy)"


def checks(device: str, workdir: Path) -> dict[str, Callable[[], Any]]:
    """Name -> a no-argument check, for running every path on a real ``device`` (benchmarks/gpu_check.py)."""
    tokenizer, records, eval_records = task_data()
    out: dict[str, Callable[[], Any]] = {}
    for name in SCENARIOS:
        out[name] = lambda n=name: run_scenario(n, tokenizer, records, eval_records, workdir / n)
    precisions = ["bf16"] + (["fp16"] if device == "cuda" else [])
    for prec in precisions:
        for name in ("on_policy_fast_sampler", "fused_loss_off_policy", "lora_generate_sampler"):
            out[f"{name} ({prec})"] = lambda n=name, p=prec: run_scenario(
                n, tokenizer, records, eval_records, workdir / f"{n}-{p}", **{p: True}
            )
    out["gradient_checkpointing"] = lambda: run_scenario(
        "on_policy_fast_sampler",
        tokenizer,
        records,
        eval_records,
        workdir / "gc",
        gradient_checkpointing=True,
    )
    out["t5_on_and_off_policy"] = lambda: [
        scenario_trainer(
            tokenizer, records, eval_records, workdir / f"t5-{lm}", kind="t5", lmbda=lm
        ).train_step()
        for lm in (0.0, 1.0)
    ]
    out["fast_equals_generate_greedy"] = lambda: fast_equals_generate(tokenizer, records, device)
    return out
