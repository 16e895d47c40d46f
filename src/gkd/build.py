"""Everything a run needs, built once from the config: :func:`build_run` returns a :class:`Run`.

The order matters and is the contract of this module: first everything that can be checked without model weights
(keys, output folder, tokenizer, ``config.json`` files, the data and what the λ schedule, metric and reward need
from it: :mod:`gkd.preflight`), then the models, then what the teacher writes (SeqKD targets, the top-k cache),
then the optimizer. A run that is going to fail on its input fails before a 7B teacher spends minutes loading.

Objects given from Python (models, tokenizer, records, a tokenized dataset, a reward function, a sampler) replace
the corresponding paths of the config.
"""

from __future__ import annotations

import copy
import functools
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
from gkd.data import (
    TokenizedDataset,
    check_apply_chat_template,
    load_records,
    load_with_datasets,
    make_stream,
    process_position,
    read_with_datasets,
    tokenize_records,
    with_chat_template,
)
from gkd.errors import ConfigError
from gkd.models import (
    StudentForward,
    apply_lora,
    check_teacher_student,
    disable_dropout,
    is_seq2seq,
    load_config,
    load_model,
    load_tokenizer,
    unwrap,
)
from gkd.objective import Objective
from gkd.rl import load_reward
from gkd.run import Coin, Dist, Run
from gkd.sampling import LocalSampler, Sampler, SamplingParams, eos_ids, get_sampler
from gkd.sampling.fast import auto_fast_reason
from gkd.teacher import CachedTeacher, Reference, Teacher, TopKCache, build_topk_cache, seqkd_dataset

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
    """Check the inputs, load models and data, build every component of the run (see the module docstring).

    (Its length is the :class:`Run`'s fields, one per line; the work is in the functions it calls, in order.)
    """

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
    inputs = check_inputs(
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
    models = load_models(cfg, inputs, student, teacher, dist.device)
    # 3. what the teacher writes: SeqKD targets, the top-k cache
    train_data, topk_cache = teacher_data(cfg, inputs, models, output_dir, log)
    # 4. optimisation
    params = [p for p in models.student.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the student has no trainable parameters; check lora.target_modules")
    plan = training_plan(cfg, len(train_data), dist.world, has_eval_data=inputs.eval_data is not None)
    optimizer = adamw(params, cfg)
    scheduler = lr_scheduler(optimizer, cfg, plan)
    student_forward, optimizer = accelerator.prepare(StudentForward(models.student, models.vocab), optimizer)
    objective = Objective.from_config(cfg)
    tok = inputs.tokenizer
    options = (
        {"gpu_memory_utilization": cfg.vllm_gpu_memory_utilization} if cfg.rollout_backend == "vllm" else {}
    )
    sampler = sampler or get_sampler(cfg.rollout_backend, model_path=cfg.model_name_or_path, **options)
    for note in path_notes(cfg, models.student, sampler, train_data):
        log(note)
    return Run(
        cfg=cfg,
        accelerator=accelerator,
        dist=dist,
        output_dir=output_dir,
        tokenizer=tok,
        student=models.student,
        student_forward=student_forward,
        sampling_model=unwrap(models.student) if cfg.lora is None else models.student,
        teacher=teacher_for(models.teacher, topk_cache, objective),
        reference=models.reference,
        topk_cache=topk_cache,
        train_data=train_data,
        eval_data=inputs.eval_data,
        stream=make_stream(
            train_data, cfg.prompts_per_batch, cfg.seed, tok.pad_token_id, dist.rank, dist.world
        ),
        sampler=sampler,
        sampling=rollout_params(cfg, models.eos, tok.pad_token_id, models.vocab),
        objective=objective,
        optimizer=optimizer,
        scheduler=scheduler,
        coin=Coin(cfg.seed, dist),
        rollout_gen=torch.Generator(device=dist.device).manual_seed(cfg.seed * 7919 + dist.rank),
        reward_fn=reward_fn,
        eos=models.eos,
        vocab=models.vocab,
        resume_dir=inputs.resume_dir,
        plan=plan,
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
    from gkd.models import fused_head_unsupported_reason

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


@dataclass
class Inputs:
    """What :func:`check_inputs` read and checked before any weights load."""

    tokenizer: Any
    resume_dir: Path | None
    train_data: TokenizedDataset
    eval_data: TokenizedDataset | None


def check_inputs(
    cfg: GKDConfig,
    output_dir: Path,
    student: nn.Module | None,
    teacher: nn.Module | None,
    tokenizer: Any,
    train_records: list[dict] | None,
    eval_records: list[dict] | None,
    train_dataset: TokenizedDataset | None,
    eval_dataset: TokenizedDataset | None,
    log: Callable[[str], None],
) -> Inputs:
    """Tokenizer, resume checkpoint, model ``config.json`` files and data: read and checked (:mod:`gkd.preflight`).

    ``chat_template_path`` replaces the tokenizer's chat template (a given tokenizer is copied, not changed); the
    run's tokenizer (saved with the model) is that one.
    """
    from gkd.tasks.adapters import check_adapter

    if cfg.dataset_adapter is not None:
        check_adapter(cfg.dataset_adapter)
    if tokenizer is None:
        path = cfg.tokenizer_name_or_path or cfg.model_name_or_path or _name_or_path(student)
        tokenizer = load_tokenizer(
            path,  # type: ignore[arg-type]
            "tokenizer",
            chat_template_path=cfg.chat_template_path,
            init_kwargs=tokenizer_kwargs(cfg),
        )
    elif cfg.chat_template_path is not None:
        tokenizer = with_chat_template(tokenizer, cfg.chat_template_path)
    if cfg.apply_chat_template:
        check_apply_chat_template(tokenizer)
    resume_dir = None
    if cfg.resume_from_checkpoint:
        from gkd.state import check_resume_compat

        resume_dir = ckpt.resolve_resume(cfg.resume_from_checkpoint, output_dir)
        check_resume_compat(cfg, resume_dir)
    configs = model_configs(cfg, student, teacher)
    preflight.check_backend(cfg, configs["student"])
    seq2seq = bool(getattr(configs["student"], "is_encoder_decoder", False))
    train = train_dataset or load_dataset(
        cfg, train_records, cfg.dataset, cfg.dataset_split, "train", tokenizer, seq2seq, log
    )
    evaluation = eval_dataset
    if evaluation is None and (eval_records is not None or cfg.eval_dataset is not None):
        evaluation = load_dataset(
            cfg, eval_records, cfg.eval_dataset, cfg.eval_split, "eval", tokenizer, seq2seq, log
        )
        evaluation = TokenizedDataset(evaluation.examples[: cfg.eval_max_samples])
    preflight.check_data(cfg, train, evaluation)
    preflight.check_context(cfg, configs, train, evaluation)
    return Inputs(tokenizer, resume_dir, train, evaluation)


@dataclass
class Models:
    student: nn.Module
    teacher_model: nn.Module | None
    teacher: Teacher | None
    reference: Teacher | None
    vocab: int
    eos: list[int]


def load_models(
    cfg: GKDConfig, inputs: Inputs, student: nn.Module | None, teacher: nn.Module | None, device: Any
) -> Models:
    """Student (trainable, on ``device``), frozen teacher and reference, and the vocabulary they are compared on."""
    tokenizer = inputs.tokenizer
    given_student = student
    student = load_student(cfg, given_student, inputs.resume_dir, device)
    teacher_view = None
    vocab = len(tokenizer)
    if cfg.needs_teacher and teacher is None and cfg.teacher_url and cfg.teacher_model_name_or_path is None:
        from gkd.teacher_client import ServedTeacher  # a served teacher: top-k log-probs over HTTP

        if is_seq2seq(student):
            raise ConfigError("teacher_url serves decoder-only teachers; use a local teacher for seq2seq")
        teacher_view = ServedTeacher(
            cfg.teacher_url, vocab=vocab, topk=cfg.teacher_topk, student_topk=cfg.teacher_student_topk,
            api_key=cfg.teacher_api_key or os.environ.get("GKD_TEACHER_API_KEY") or os.environ.get("OPENAI_API_KEY"),
            timeout=cfg.teacher_timeout, max_retries=cfg.teacher_max_retries, temperature=cfg.loss_temperature,
            student=student,
        ).connect(tokenizer)  # fmt: skip
    elif cfg.needs_teacher:
        teacher_tokenizer = None
        if teacher is None:
            teacher = load_model(
                cfg.teacher_model_name_or_path,  # type: ignore[arg-type]
                what="teacher",
                dtype=resolve_dtype(cfg.teacher_dtype, device),
                attn_implementation=cfg.attn_implementation,
                init_kwargs=init_kwargs(cfg, teacher=True),
            )
            teacher_tokenizer = _teacher_tokenizer(cfg)
        vocab = check_teacher_student(student, teacher, tokenizer, teacher_tokenizer)
        teacher.to(device)
        teacher_view = Teacher(teacher, vocab)
    reference = None
    if cfg.kl_to_initial > 0 or cfg.reward is not None:  # RL runs log the KL to the initial student
        initial = given_student if cfg.model_name_or_path is None else None
        reference = Reference(load_reference(cfg, initial).to(device), vocab)
    return Models(student, teacher, teacher_view, reference, vocab, eos_ids(student, tokenizer))


def teacher_data(
    cfg: GKDConfig, inputs: Inputs, models: Models, output_dir: Path, log: Callable[[str], None]
) -> tuple[TokenizedDataset, TopKCache | None]:
    """The training data with SeqKD targets (the teacher's samples, generated once and cached) when off-policy
    steps use them, and the teacher's top-k cache over it when ``teacher_cache: topk``."""
    train_data = inputs.train_data
    teacher_name = str(cfg.teacher_model_name_or_path or "teacher")
    if cfg.seq_kd and cfg.off_policy_possible:
        assert models.teacher_model is not None
        train_data = seqkd_dataset(
            models.teacher_model,
            inputs.tokenizer,
            train_data,
            cache_dir=output_dir,
            teacher_name=teacher_name,
            max_new_tokens=cfg.effective_max_completion_length,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            seed=cfg.seed,
            backend=cfg.rollout_backend,
            log=log,
        )
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


def student_load_dtype(cfg: GKDConfig) -> str:
    """The student's load dtype: ``student_dtype``, except that mixed precision keeps float32 master weights."""
    if (cfg.bf16 or cfg.fp16) and cfg.student_dtype == "auto":
        return "float32"
    return cfg.student_dtype


def resolve_dtype(name: str, device: Any) -> str:
    """A dtype name; ``auto`` (``teacher_dtype``, ``--dtype``): bfloat16 on a CUDA GPU that supports it, else float32."""
    if name != "auto":
        return name
    if torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"


def _name_or_path(student: nn.Module | None) -> str:
    """TRL's tokenizer fallback for a model object given without ``processing_class``: the folder or hub id it was
    loaded from (``model.config._name_or_path``); a one-line error when it has none."""
    name = (
        getattr(getattr(unwrap(student), "config", None), "_name_or_path", None)
        if student is not None
        else None
    )
    if not name:
        raise ConfigError(
            "GKDTrainer: the student is a model object without a known origin (model.config._name_or_path is "
            "empty), so there is no tokenizer to load; pass processing_class=AutoTokenizer.from_pretrained(...) "
            "(or set tokenizer_name_or_path)"
        )
    return str(name)


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


def model_configs(cfg: GKDConfig, student: nn.Module | None, teacher: nn.Module | None) -> dict[str, Any]:
    """The student's (and teacher's) transformers configs, read without loading weights."""
    out: dict[str, Any] = {}
    if student is not None:
        out["student"] = unwrap(student).config
    else:
        out["student"] = load_config(cfg.model_name_or_path, "student")  # type: ignore[arg-type]
    if cfg.needs_teacher:
        if teacher is not None:
            out["teacher"] = unwrap(teacher).config
        elif cfg.teacher_model_name_or_path is not None or not cfg.teacher_url:  # not a served teacher
            out["teacher"] = load_config(cfg.teacher_model_name_or_path, "teacher")  # type: ignore[arg-type]
    return out


def load_student(cfg: GKDConfig, given: nn.Module | None, resume_dir: Path | None, device: Any) -> nn.Module:
    """The student in train mode on ``device``: loaded (or the given object), from a checkpoint when resuming,
    wrapped in a LoRA adapter when ``lora`` is set, dropout off when ``disable_dropout``; sharded with FSDP2 when
    ``fsdp`` is set and the run has several processes (a :class:`gkd.fsdp.ShardedStudent`)."""
    if given is not None:
        student = given
        if resume_dir is not None and cfg.lora is None:
            from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

            cls = AutoModelForSeq2SeqLM if is_seq2seq(student) else AutoModelForCausalLM
            student.load_state_dict(cls.from_pretrained(str(resume_dir)).state_dict())
    else:
        path = str(resume_dir) if resume_dir is not None and cfg.lora is None else cfg.model_name_or_path
        student = load_model(
            path,  # type: ignore[arg-type]
            what="student",
            dtype=student_load_dtype(cfg),
            attn_implementation=cfg.attn_implementation,
            init_kwargs=init_kwargs(cfg, teacher=False)
            if resume_dir is None or cfg.lora is not None
            else None,
        )
    if cfg.gradient_checkpointing:
        enable_checkpointing(student)
    if cfg.lora is not None:
        if resume_dir is not None:
            from peft import PeftModel

            student = PeftModel.from_pretrained(student, str(resume_dir), is_trainable=True)
        else:
            lc = cfg.lora
            student = apply_lora(student, lc.r, lc.alpha, lc.dropout, lc.target_modules)
    if cfg.disable_dropout:
        disable_dropout(student)
    student.train()
    student = student.to(device)
    if cfg.fsdp and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from gkd.fsdp import shard_student

        return shard_student(student, device)
    return student


def enable_checkpointing(model: nn.Module) -> None:
    """Activation (gradient) checkpointing of the student's layers, non-reentrant: it works with frozen inputs (LoRA)
    and needs no ``enable_input_require_grads``. (transformers >= 5.20 renamed the method.)"""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def load_reference(cfg: GKDConfig, given: nn.Module | None) -> nn.Module:
    """The initial student (RL runs: KL to it is logged, or is the RLEF* regulariser)."""
    if given is not None:
        return copy.deepcopy(unwrap(given))
    return load_model(
        cfg.model_name_or_path,  # type: ignore[arg-type]
        what="student",
        dtype=student_load_dtype(cfg),
        attn_implementation=cfg.attn_implementation,
        init_kwargs=init_kwargs(cfg, teacher=False),
    )


def init_kwargs(cfg: GKDConfig, *, teacher: bool) -> dict[str, Any]:
    """Extra ``from_pretrained`` arguments of the student or the teacher: ``trust_remote_code``, the revision, and
    ``model_init_kwargs`` / ``teacher_model_init_kwargs`` (TRL's keys)."""
    out: dict[str, Any] = dict((cfg.teacher_model_init_kwargs if teacher else cfg.model_init_kwargs) or {})
    if cfg.trust_remote_code:
        out["trust_remote_code"] = True
    revision = cfg.teacher_model_revision if teacher else cfg.model_revision
    if revision is not None:
        out["revision"] = revision
    return out


def tokenizer_kwargs(cfg: GKDConfig) -> dict[str, Any]:
    """``from_pretrained`` arguments of the student's tokenizer: ``trust_remote_code`` and the student's revision
    (when the tokenizer is the student's folder)."""
    out: dict[str, Any] = {"trust_remote_code": True} if cfg.trust_remote_code else {}
    if cfg.model_revision is not None and cfg.tokenizer_name_or_path is None:
        out["revision"] = cfg.model_revision
    return out


def _teacher_tokenizer(cfg: GKDConfig) -> Any:
    """The teacher folder's own tokenizer, when it has one (to check it is the student's)."""
    path = cfg.teacher_model_name_or_path
    if path is None or not os.path.isdir(os.path.expanduser(path)):
        return None
    folder = Path(os.path.expanduser(path))
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model")
    if any((folder / f).exists() for f in names):
        return load_tokenizer(path, "teacher tokenizer")
    return None


def load_dataset(
    cfg: GKDConfig,
    records: list[dict] | None,
    spec: str | None,
    split: str,
    what: str,
    tokenizer: Any,
    seq2seq: bool,
    log: Callable[[str], None],
) -> TokenizedDataset:
    """Records (given, or read from ``spec``) tokenized, with what was skipped or truncated reported.

    With ``dataset_adapter`` the records (read or given) are in a benchmark's own layout and are mapped to
    prompt/completion/references first (:mod:`gkd.tasks.adapters`); a hub name gets the benchmark's config
    (``openai/gsm8k`` -> ``main``) unless ``dataset_config_name`` is set.
    """
    from gkd.tasks.adapters import HUB_CONFIGS, adapt_records

    skipped = 0
    source = f"{what} data"
    adapter = cfg.dataset_adapter
    if records is None:
        assert spec is not None
        split_key = "dataset_split" if what == "train" else "eval_split"
        config_name = cfg.dataset_config_name
        if adapter is not None and config_name is None and not os.path.exists(os.path.expanduser(spec)):
            config_name = HUB_CONFIGS.get(adapter)
        if what == "train" and read_with_datasets(cfg, spec, process_position()[1]):
            adapt = None if adapter is None else functools.partial(adapt_records, adapter)
            return load_with_datasets(
                cfg, spec, split, config_name, split_key, tokenizer, seq2seq, log, adapt
            )
        records, skipped = load_records(spec, split, config_name, cfg.skip_bad_lines, split_key=split_key)
        source = f"dataset '{spec}'"
    if adapter is not None:
        records = adapt_records(adapter, records, source)
    data = tokenize_records(
        records,
        tokenizer,
        max_prompt_length=cfg.max_prompt_length,
        max_completion_length=cfg.effective_max_completion_length,
        source=source,
        seq2seq=seq2seq,
        apply_chat_template=cfg.apply_chat_template,
    )
    data.skipped_lines = skipped
    if skipped:
        lines = "1 line that was" if skipped == 1 else f"{skipped} lines that were"
        log(f"warning: {source}: skipped {lines} not valid JSON")
    if data.truncated_prompts:
        log(
            f"warning: {source}: {data.truncated_prompts} of {len(data)} prompts were longer than "
            f"max_prompt_length={cfg.max_prompt_length} and were truncated from the left"
        )
    if data.truncated_completions:
        log(
            f"warning: {source}: {data.truncated_completions} completions were longer than "
            f"{cfg.effective_max_completion_length} tokens and were truncated"
        )
    return data


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
