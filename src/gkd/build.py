"""Everything a run needs, built once from the config: :func:`build_run` returns a :class:`Run`.

The order matters and is the contract of this module: first everything that can be checked without model weights
(keys, output folder, tokenizer, ``config.json`` files, the data and what the λ schedule, metric and reward need
from it: :mod:`gkd.preflight`, :mod:`gkd.inputs`), then the models (:mod:`gkd.loading`), then what the teacher
writes (SeqKD targets, the top-k cache), then the optimizer. A run that is going to fail on its input fails before
a 7B teacher spends minutes loading.

Objects given from Python (models, tokenizer, records, a tokenized dataset, a reward function, a sampler) replace
the corresponding paths of the config.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gkd import checkpoint as ckpt
from gkd import preflight
from gkd.config import GKDConfig, Plan, bf16_weights_warning, training_plan
from gkd.data import TokenizedDataset, make_stream
from gkd.errors import ConfigError
from gkd.forward import StudentForward, fused_head_unsupported_reason, set_packed_forward, unwrap
from gkd.inputs import (  # noqa: F401  (re-exported: gkd.build's names before gkd.inputs existed)
    Inputs,
    load_dataset,
    model_configs,
    read_inputs,
    tokenizer_kwargs,
)
from gkd.loading import (  # noqa: F401  (re-exported: gkd.build's names before gkd.loading existed)
    Models,
    enable_checkpointing,
    init_kwargs,
    load_models,
    load_reference,
    load_student,
    resolve_dtype,
    student_load_dtype,
)
from gkd.objective import Objective
from gkd.rl import load_reward
from gkd.run import Coin, Dist, Run
from gkd.sampling import LocalSampler, Sampler, SamplingParams, get_sampler
from gkd.sampling.fast import auto_fast_reason
from gkd.teacher import CachedTeacher, TopKCache, build_topk_cache, seqkd_dataset
from gkd.xtok import AlignedTeacher, aligned_seqkd_dataset

__all__ = ["Dist", "Run", "build_run", "load_dataset"]  # Dist and Run live in gkd.run


def build_run(
    cfg: GKDConfig,
    *,
    student: nn.Module | None = None,
    teacher: nn.Module | None = None,
    tokenizer: Any = None,
    train_records: list[dict] | None = None,
    eval_records: list[dict] | None = None,
    train_dataset: TokenizedDataset | None = None,
    eval_dataset: TokenizedDataset | None = None,
    reward_fn: Any = None,
    sampler: Sampler | None = None,
    log: Callable[[str], None] = print,
) -> Run:
    """Check the inputs, load the models, build every component of the run: in the module docstring's order."""
    preflight.check_paths(
        cfg,
        have_student=student is not None,
        have_teacher=teacher is not None,
        have_data=train_records is not None or train_dataset is not None,
    )
    output_dir = Path(os.path.expanduser(cfg.output_dir))
    accelerator, dist = start_processes(cfg, output_dir, student, log)
    seed_everything(cfg.seed + dist.rank)
    # 1. everything that can be checked without model weights
    inputs = read_inputs(
        cfg,
        output_dir,
        student,
        teacher,
        tokenizer,
        train_records,
        eval_records,
        train_dataset,
        eval_dataset,
        log,
    )
    reward_fn = reward_fn or (
        load_reward(cfg.reward, tokenize=cfg.eval_tokenize) if cfg.reward is not None else None
    )
    # 2. the models
    models = load_models(cfg, inputs, student, teacher, dist.device, log)
    for note in packing_notes(cfg, models):
        log(note)
    # 3. what the teacher writes: SeqKD targets, the top-k cache
    train_data, topk_cache = teacher_outputs(cfg, inputs, models, output_dir, log)
    # 4. optimisation: AdamW and its schedule, the student's forward pass prepared for the processes (DDP)
    opt = optimization(cfg, accelerator, models, len(train_data), dist.world, inputs.eval_data is not None)
    objective = Objective.from_config(cfg)
    sampler = sampler or run_sampler(cfg)
    for note in path_notes(cfg, models.student, sampler, train_data):
        log(note)
    pad_id = inputs.tokenizer.pad_token_id
    return Run(
        cfg=cfg,
        accelerator=accelerator,
        dist=dist,
        output_dir=output_dir,
        tokenizer=inputs.tokenizer,
        student=models.student,
        student_forward=opt.student_forward,
        sampling_model=unwrap(models.student) if cfg.lora is None else models.student,
        teacher=teacher_for(models.teacher, topk_cache, objective),
        reference=models.reference,
        topk_cache=topk_cache,
        train_data=train_data,
        eval_data=inputs.eval_data,
        stream=make_stream(train_data, cfg.prompts_per_batch, cfg.seed, pad_id, dist.rank, dist.world),
        sampler=sampler,
        sampling=rollout_params(cfg, models.eos, pad_id, models.vocab),
        objective=objective,
        optimizer=opt.optimizer,
        scheduler=opt.scheduler,
        coin=Coin(cfg.seed, dist),
        rollout_gen=torch.Generator(device=dist.device).manual_seed(cfg.seed * 7919 + dist.rank),
        reward_fn=reward_fn,
        eos=models.eos,
        vocab=models.vocab,
        resume_dir=inputs.resume_dir,
        plan=opt.plan,
    )


def start_processes(
    cfg: GKDConfig, output_dir: Path, student: nn.Module | None, log: Callable[[str], None]
) -> tuple[Any, Dist]:
    """The accelerator and the processes of the run, the output folder prepared, and the config's warnings said."""
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    accelerator = make_accelerator(cfg)
    dist = Dist(accelerator)
    prepare_output_dir(cfg, output_dir, dist.is_main)
    accelerator.wait_for_everyone()
    for warning in cfg.warnings():
        log(f"warning: {warning}")
    if cfg.fsdp and dist.world == 1:
        log(
            "note: fsdp with one process: there is nothing to shard, the student trains unsharded; launch with "
            "torchrun --nproc_per_node N (or accelerate launch) to shard it"
        )
    if student is not None and cfg.student_dtype != "bfloat16" and _bf16_weights(student, cfg):
        log(
            "warning: "
            + bf16_weights_warning(
                "the student model object is bfloat16: it",
                cfg.learning_rate,
                "load it in float32 (from_pretrained(..., dtype=torch.float32)) and set bf16: true for mixed precision",
            )
        )
    return accelerator, dist


def teacher_for(teacher: Any, cache: TopKCache | None, objective: Objective) -> Any:
    """What the step asks for the teacher's view: the top-k cache in front of the live teacher where the loss is a
    divergence over the vocabulary (the sampled estimators need the teacher's log-probability of the sampled token,
    which a cache of fixed batches does not serve), else the teacher itself (local or served)."""
    if cache is not None and objective.mode == "divergence":
        return CachedTeacher(teacher, cache)
    return teacher


def path_notes(cfg: GKDConfig, student: nn.Module, sampler: Sampler, data: TokenizedDataset) -> list[str]:
    """Lines saying which sampler and which loss path this student takes, and why when it is the slower one."""
    notes = []
    if (
        isinstance(sampler, LocalSampler)
        and sampler.backend == "auto"
        and (cfg.lmbda > 0 or cfg.eval_dataset)
    ):
        model = unwrap(student) if cfg.lora is None else student
        longest = max((len(e.prompt) for e in data.examples), default=0)
        reason = auto_fast_reason(model, longest + cfg.max_new_tokens)
        notes.append(
            "rollouts: gkd's fast KV-cache loop"
            if reason is None
            else f"rollouts: model.generate, slower than gkd's fast loop ({reason})"
        )
    reason = fused_head_unsupported_reason(student)
    notes.append(
        "loss: chunked from hidden states (no [positions, vocab] logits)"
        if reason is None
        else f"loss: from full logits at the completion positions, more memory ({reason})"
    )
    return notes


def packing_notes(cfg: GKDConfig, models: Models) -> list[str]:
    """Turn packed forwards on for the student, the local teacher and the RL reference as ``packed_forward``
    says (:func:`gkd.forward.set_packed_forward`); one line per model that stays padded, saying why."""
    roles = {"student": models.student}
    for role, view in (("teacher", models.teacher), ("reference", models.reference)):
        if getattr(view, "model", None) is not None:  # a served teacher has no model here
            roles[role] = view.model
    packed, notes = [], []
    for role, model in roles.items():  # no probe on a sharded student: its forward is collective
        reason = set_packed_forward(model, cfg.packed_forward, probe=False if cfg.fsdp else None)
        if reason is None:
            packed.append(role)
        elif cfg.packed_forward is not False:
            notes.append(f"forwards: the {role} runs padded ({reason})")
    if packed:
        notes.insert(0, f"forwards: packed, real tokens only, for the {' and '.join(packed)}")
    return notes


def rollout_params(cfg: GKDConfig, eos: list[int], pad_id: int, vocab: int) -> SamplingParams:
    """How the student samples its rollouts (never an id beyond the tokenizer: padded heads have extra rows)."""
    return SamplingParams(
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        eos_token_ids=tuple(eos),
        pad_token_id=pad_id,
        vocab_size=vocab,
    )


def teacher_outputs(
    cfg: GKDConfig, inputs: Inputs, models: Models, output_dir: Path, log: Callable[[str], None]
) -> tuple[TokenizedDataset, TopKCache | None]:
    """The training data with SeqKD targets (the teacher's samples, generated once and cached) when off-policy
    steps use them, and the teacher's top-k cache over it when ``teacher_cache: topk``."""
    train_data = inputs.train_data
    teacher_name = str(cfg.teacher_model_name_or_path or "teacher")
    if teacher_name == "self":  # a copy of the starting student: name what it is a copy of
        teacher_name = f"self:{cfg.model_name_or_path}"
    # how the teacher writes SeqKD targets, and where they are cached (the same for either tokenizer)
    sampling = {
        "cache_dir": output_dir,
        "teacher_name": teacher_name,
        "max_new_tokens": cfg.effective_max_completion_length,
        "temperature": cfg.temperature,
        "top_k": cfg.top_k,
        "top_p": cfg.top_p,
        "seed": cfg.seed,
        "backend": cfg.rollout_backend,
        "log": log,
    }
    if cfg.seq_kd and cfg.off_policy_possible and isinstance(models.teacher, AlignedTeacher):
        train_data = aligned_seqkd_dataset(  # another tokenizer: written in the teacher's, re-tokenized
            models.teacher,
            train_data,
            max_completion_length=cfg.effective_max_completion_length,
            **sampling,
        )
    elif cfg.seq_kd and cfg.off_policy_possible:
        assert models.teacher_model is not None
        train_data = seqkd_dataset(models.teacher_model, inputs.tokenizer, train_data, **sampling)
    topk_cache = None
    if cfg.teacher_cache == "topk":
        assert models.teacher is not None
        topk_cache = build_topk_cache(
            models.teacher,
            train_data,
            k=cfg.teacher_cache_topk,
            temperature=cfg.loss_temperature,
            pad_id=inputs.tokenizer.pad_token_id,
            cache_dir=output_dir,
            teacher_name=teacher_name,
            log=log,
        )
    return train_data, topk_cache


teacher_data = teacher_outputs  # the earlier name
check_inputs = read_inputs  # the earlier name (it reads the inputs as well as checking them)


@dataclass
class Optimization:
    """What :func:`optimization` prepared: the student's forward pass and the optimizer (both through accelerate),
    the learning-rate schedule and the run's step plan."""

    student_forward: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    plan: Plan


def optimization(
    cfg: GKDConfig, accelerator: Any, models: Models, n_train: int, world: int, has_eval_data: bool
) -> Optimization:
    """AdamW over the student's trainable parameters, its schedule over the run's step plan (``n_train`` training
    examples, ``world`` processes), and the student's forward pass (:class:`gkd.forward.StudentForward`) and the
    optimizer prepared by accelerate (DDP wraps the forward pass when the run has several processes)."""
    params = [p for p in models.student.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the student has no trainable parameters; check lora.target_modules")
    plan = training_plan(cfg, n_train, world, has_eval_data=has_eval_data)
    optimizer = adamw(params, cfg)
    scheduler = lr_scheduler(optimizer, cfg, plan)
    student_forward, optimizer = accelerator.prepare(StudentForward(models.student, models.vocab), optimizer)
    return Optimization(student_forward, optimizer, scheduler, plan)


def run_sampler(cfg: GKDConfig) -> Sampler:
    """The rollout backend of ``rollout_backend`` (vLLM with ``vllm_gpu_memory_utilization``)."""
    options = (
        {"gpu_memory_utilization": cfg.vllm_gpu_memory_utilization} if cfg.rollout_backend == "vllm" else {}
    )
    return get_sampler(cfg.rollout_backend, model_path=cfg.model_name_or_path, **options)


# ---------------------------------------------------------------------------------------------------------------
# the pieces
# ---------------------------------------------------------------------------------------------------------------
def make_accelerator(cfg: GKDConfig) -> Any:
    """accelerate's ``Accelerator``: CPU without a GPU; mixed precision from ``bf16`` / ``fp16`` (otherwise whatever
    ``accelerate config`` / ``accelerate launch`` set); the installed trackers of ``report_to`` (``all``: every
    installed one) as ``log_with``, local logs under ``output_dir/tensorboard`` (:class:`gkd.reporting.Tracker`
    starts them and warns about the ones that are not installed)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import ProjectConfiguration

    from gkd.config import REPORT_TO

    for env, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if os.environ.get(env, "").lower() in ("1", "true", "yes"):
            raise ConfigError(
                f"accelerate launch asked for {name} ({env}), which gkd does not support yet: the run would not be "
                "sharded correctly; launch with a DDP accelerate config (or torchrun)"
                + (
                    " and set config key 'fsdp: full_shard' (gkd shards with FSDP2 itself)"
                    if name == "FSDP"
                    else ""
                )
            )
    installed = {getattr(t, "value", str(t)) for t in get_available_trackers()}
    wanted = REPORT_TO if "all" in cfg.report_to else cfg.report_to
    out = Path(os.path.expanduser(cfg.output_dir))
    trackers: dict[str, Any] = {
        "log_with": [name for name in wanted if name in installed and name in REPORT_TO] or None,
        "project_config": ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "tensorboard")),
    }

    cpu = not torch.cuda.is_available()
    if cfg.fp16 and cpu:
        raise ConfigError(
            "config key 'fp16: true' needs a CUDA GPU (float16 autocast with loss scaling); on the CPU use bf16: true"
        )
    # without bf16/fp16: what `accelerate launch` / `accelerate config` asked for, else none
    precision = (
        "bf16" if cfg.bf16 else "fp16" if cfg.fp16 else os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    )
    if cfg.fsdp:  # gkd shards the student itself (gkd.fsdp); accelerate only launches and prepares the rest
        from gkd.fsdp import fsdp_accelerator

        Accelerator = fsdp_accelerator(Accelerator)
    try:
        return Accelerator(cpu=cpu, mixed_precision=precision, **trackers)
    except ValueError as e:
        if "already been initialized" not in str(e) or int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise
        # accelerate keeps one state per process: a second run in the same process (Python API, tests) with another
        # precision starts a fresh one. (Under a distributed launch the precision is fixed for every rank.) Trackers
        # belong to the Accelerator object, not to that state.
        AcceleratorState._reset_state(reset_partial_state=False)
        return Accelerator(cpu=cpu, mixed_precision=precision, **trackers)


def _bf16_weights(student: nn.Module, cfg: GKDConfig) -> bool:
    """Are the trainable weights of a given student object bfloat16 (trained without a float32 master copy)?"""
    params = [p for p in student.parameters() if p.requires_grad] or list(student.parameters())
    return bool(params) and cfg.lora is None and any(p.dtype == torch.bfloat16 for p in params)


def prepare_output_dir(cfg: GKDConfig, out: Path, is_main: bool) -> None:
    """A writable ``output_dir`` that holds no other run (unless resuming, or ``overwrite_output_dir``)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"output_dir '{out}' is not writable ({e.strerror}); choose another output_dir"
        ) from e
    ckpt.clean_partial(out)
    previous = ckpt.run_files(out)
    if previous and not cfg.resume_from_checkpoint:
        if not cfg.overwrite_output_dir:
            names = ", ".join(p.name for p in previous[:3]) + (", ..." if len(previous) > 3 else "")
            raise ConfigError(
                f"output_dir '{out}' already holds a run ({names}); set resume_from_checkpoint=latest to "
                "continue it, overwrite_output_dir=true to replace it, or choose another output_dir"
            )
        if is_main:
            ckpt.remove_run(out)


def adamw(params: list[torch.nn.Parameter], cfg: GKDConfig) -> torch.optim.Optimizer:
    """AdamW, fused into one kernel when every parameter allows it (much faster for large vocabularies)."""
    kwargs = {
        "lr": cfg.learning_rate,
        "betas": (cfg.adam_beta1, cfg.adam_beta2),
        "eps": cfg.adam_epsilon,
        "weight_decay": cfg.weight_decay,
    }
    if all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params):
        try:
            return torch.optim.AdamW(params, fused=True, **kwargs)
        except (RuntimeError, TypeError, ValueError):
            pass
    return torch.optim.AdamW(params, **kwargs)


def lr_scheduler(optimizer: torch.optim.Optimizer, cfg: GKDConfig, plan: Plan) -> Any:
    """``transformers.get_scheduler`` with the run's warm-up and length (transformers' semantics: the multiplier of
    optimizer step ``s`` is ``s / warmup`` during warm-up, so the first step's learning rate is 0; ``constant``
    ignores warm-up). ``min_lr_ratio`` with cosine is transformers' ``cosine_with_min_lr``."""
    from transformers import get_scheduler

    name, kwargs = cfg.lr_scheduler_type, dict(cfg.lr_scheduler_kwargs)
    if name == "cosine" and cfg.min_lr_ratio > 0:
        name, kwargs = "cosine_with_min_lr", {"min_lr_rate": cfg.min_lr_ratio, **kwargs}
    try:
        return get_scheduler(
            name,
            optimizer,
            num_warmup_steps=plan.warmup_steps,
            num_training_steps=plan.max_steps,
            scheduler_specific_kwargs=kwargs or None,
        )
    except (TypeError, ValueError) as e:
        raise ConfigError(
            f"config keys 'lr_scheduler_type: {name}' / 'lr_scheduler_kwargs: {cfg.lr_scheduler_kwargs}': "
            f"transformers.get_scheduler refused them ({str(e).splitlines()[0]}); check the schedule's arguments"
        ) from e


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
