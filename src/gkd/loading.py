"""The models of a run, loaded after its inputs are checked: :func:`load_models` returns the :class:`Models`.

The student (trainable, on the run's device: from a checkpoint when resuming, with a LoRA adapter, activation
checkpointing, sharded with FSDP2), the frozen teacher (local, or served over HTTP) with the vocabulary the two are
compared on, and the RL reference (the initial student). Step 2 of :func:`gkd.build.build_run`.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gkd.config import GKDConfig
from gkd.errors import ConfigError, ModelError
from gkd.forward import is_seq2seq, unwrap
from gkd.inputs import Inputs, teacher_prompt_of, teacher_tokenizer_of
from gkd.models import (
    apply_lora,
    check_teacher_student,
    disable_dropout,
    load_model,
    same_tokenizer,
)
from gkd.sampling import eos_ids
from gkd.teacher import Reference, Teacher
from gkd.xtok import AlignedTeacher

__all__ = [
    "Models",
    "enable_checkpointing",
    "init_kwargs",
    "load_models",
    "load_reference",
    "load_self_teacher",
    "load_student",
    "load_teachers",
    "resolve_dtype",
    "student_load_dtype",
]


@dataclass
class Models:
    """What :func:`load_models` loaded: the student; the teacher's model (given or loaded; ``None`` when served) and
    its view (:class:`gkd.teacher.Teacher`, or a ``ServedTeacher``); the RL reference; the vocabulary size they are
    compared on and the student's EOS ids."""

    student: nn.Module
    teacher_model: nn.Module | None
    teacher: Teacher | None
    reference: Teacher | None
    vocab: int
    eos: list[int]


def load_models(
    cfg: GKDConfig,
    inputs: Inputs,
    student: nn.Module | None,
    teacher: nn.Module | None,
    device: Any,
    log: Callable[[str], None] = print,
    *,
    student_loaded: bool = False,
) -> Models:
    """Student (trainable, on ``device``), frozen teacher and reference, and the vocabulary they are compared on.
    ``student_loaded``: ``student`` is already the run's student (:func:`load_teachers` loads each of several
    teachers through here): only the teacher is loaded, and no reference."""
    tokenizer = inputs.tokenizer
    given_student = student
    if cfg.teachers and cfg.needs_teacher:  # several teachers, each loaded by this path (load_teachers)
        from gkd.teachers import RoutedTeachers

        self_copy = load_self_teacher(cfg, given_student, device) if _has_self(cfg) else None
        student = load_student(cfg, given_student, inputs.resume_dir, device)
        views, vocab = load_teachers(cfg, inputs, student, self_copy, device, log)
        routed = RoutedTeachers(views, {t.name: t.weight for t in cfg.teacher_specs()}, cfg.teacher_field)
        reference = _reference(cfg, given_student, vocab, device)
        return Models(student, None, routed, reference, vocab, eos_ids(student, tokenizer))  # type: ignore[arg-type]
    if cfg.needs_teacher and teacher is None and cfg.teacher_model_name_or_path == "self":
        teacher = load_self_teacher(cfg, given_student, device)  # before the student is resumed or wrapped
    if not student_loaded:
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
            teacher_tokenizer = inputs.teacher_tokenizer
        if teacher_tokenizer is not None and not same_tokenizer(tokenizer, teacher_tokenizer):
            teacher_view = _aligned_teacher(cfg, inputs, student, teacher, teacher_tokenizer, device, log)
        else:
            vocab = check_teacher_student(student, teacher, tokenizer, teacher_tokenizer)
            teacher.to(device)
            teacher_view = Teacher(teacher, vocab)
    reference = None if student_loaded else _reference(cfg, given_student, vocab, device)
    return Models(student, teacher, teacher_view, reference, vocab, eos_ids(student, tokenizer))  # type: ignore[arg-type]


def load_teachers(
    cfg: GKDConfig,
    inputs: Inputs,
    student: nn.Module,
    self_copy: nn.Module | None,
    device: Any,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, Any], int]:
    """Each entry of ``teachers``, loaded once through the single-teacher path of :func:`load_models` (a copy of
    the config naming that teacher alone, with the student already loaded): per name its view (a local
    :class:`gkd.teacher.Teacher` or a ``ServedTeacher``), and the vocabulary they are compared on with the student.
    ``self_copy`` is the frozen starting student, for an entry ``model_name_or_path: self``."""
    views: dict[str, Any] = {}
    vocabs: dict[str, int] = {}
    for spec in cfg.teacher_specs():
        one = dataclasses.replace(
            cfg,
            teachers=None,
            teacher_model_name_or_path=spec.model_name_or_path,
            teacher_url=spec.teacher_url,
        )
        given = self_copy if spec.model_name_or_path == "self" else None
        # each teacher with its own tokenizer: the student's, or another one (then aligned: gkd.xtok)
        mine = dataclasses.replace(
            inputs, teacher_tokenizer=None if given is not None else teacher_tokenizer_of(one)
        )
        loaded = load_models(one, mine, student, given, device, log, student_loaded=True)
        views[spec.name], vocabs[spec.name] = loaded.teacher, loaded.vocab
    if len(set(vocabs.values())) > 1:
        sizes = ", ".join(f"{name}: {v}" for name, v in vocabs.items())
        raise ModelError(
            f"the teachers are compared with the student on different vocabularies ({sizes}); use teachers whose "
            "heads cover the student's tokenizer alike"
        )
    return views, next(iter(vocabs.values()))


def _has_self(cfg: GKDConfig) -> bool:
    return any(t.model_name_or_path == "self" for t in cfg.teacher_specs())


def _reference(cfg: GKDConfig, given_student: nn.Module | None, vocab: int, device: Any) -> Teacher | None:
    """The RL reference (the initial student) when the run needs one."""
    if cfg.kl_to_initial > 0 or cfg.reward is not None:  # RL runs log the KL to the initial student
        initial = given_student if cfg.model_name_or_path is None else None
        return Reference(load_reference(cfg, initial).to(device), vocab)
    return None


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


def load_self_teacher(cfg: GKDConfig, given: nn.Module | None, device: Any) -> nn.Module:
    """``teacher_model_name_or_path: self``: a frozen copy of the STARTING student (self-distillation), in
    ``teacher_dtype``: the model object given (copied before it trains, is resumed or gets an adapter), else
    ``model_name_or_path`` loaded again (a resumed run's teacher is still the start, not the checkpoint)."""
    dtype = resolve_dtype(cfg.teacher_dtype, device)
    if given is not None:
        teacher = copy.deepcopy(unwrap(given))
        return teacher.to(dtype=getattr(torch, dtype))
    return load_model(
        cfg.model_name_or_path,  # type: ignore[arg-type]
        what="teacher (self: the starting student)",
        dtype=dtype,
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


def _aligned_teacher(
    cfg: GKDConfig,
    inputs: Inputs,
    student: nn.Module,
    teacher: nn.Module,
    teacher_tokenizer: Any,
    device: Any,
    log: Callable[[str], None],
) -> AlignedTeacher:
    """A teacher with another tokenizer (:mod:`gkd.xtok`): its distributions projected onto the student's
    vocabulary."""
    # what this path does not do was refused before any weights loaded (gkd.preflight.check_teacher_tokenizer)
    teacher.to(device)
    aligned = AlignedTeacher(
        teacher,
        inputs.tokenizer,
        teacher_tokenizer,
        len(inputs.tokenizer),
        temperature=cfg.loss_temperature,
        teacher_prompt=teacher_prompt_of(cfg),
        apply_chat_template=cfg.apply_chat_template,
    )
    log(aligned.describe())
    return aligned
