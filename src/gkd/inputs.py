"""What a run reads before any model weights load: :func:`read_inputs` returns the :class:`Inputs`.

The tokenizer (``chat_template_path`` applied), the checkpoint to resume from, the models' ``config.json`` files and
the training and evaluation data, each read and checked (:mod:`gkd.preflight`), so that a run whose input is wrong
fails before a 7B teacher spends minutes loading. :func:`load_dataset` reads and tokenizes one dataset and reports
what it skipped or truncated. Step 1 of :func:`gkd.build.build_run`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from gkd import checkpoint as ckpt
from gkd import preflight
from gkd.config import GKDConfig
from gkd.data import (
    TeacherPrompt,
    TokenizedDataset,
    check_apply_chat_template,
    load_records,
    load_with_datasets,
    process_position,
    read_chat_template,
    read_with_datasets,
    tokenize_records,
    with_chat_template,
)
from gkd.errors import ConfigError
from gkd.forward import unwrap
from gkd.models import load_config, load_tokenizer

__all__ = [
    "Inputs",
    "load_dataset",
    "model_configs",
    "read_inputs",
    "teacher_prompt_of",
    "teacher_tokenizer_of",
    "tokenizer_kwargs",
]


@dataclass
class Inputs:
    """What :func:`read_inputs` read and checked before any weights load."""

    tokenizer: Any
    resume_dir: Path | None
    train_data: TokenizedDataset
    eval_data: TokenizedDataset | None
    teacher_tokenizer: Any = None  # the teacher folder's own tokenizer, when it has one


def read_inputs(
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
        cfg,
        train_records,
        cfg.dataset,
        cfg.dataset_split,
        "train",
        tokenizer,
        seq2seq,
        log,
        teacher_prompt_of(cfg),
    )
    evaluation = eval_dataset
    if evaluation is None and (eval_records is not None or cfg.eval_dataset is not None):
        evaluation = load_dataset(
            cfg, eval_records, cfg.eval_dataset, cfg.eval_split, "eval", tokenizer, seq2seq, log
        )
        evaluation = TokenizedDataset(evaluation.examples[: cfg.eval_max_samples])
    preflight.check_data(cfg, train, evaluation)
    preflight.check_context(cfg, configs, train, evaluation)
    teacher_tokenizer = teacher_tokenizer_of(cfg) if cfg.needs_teacher and teacher is None else None
    preflight.check_teacher_tokenizer(cfg, configs, tokenizer, teacher_tokenizer, train)
    return Inputs(tokenizer, resume_dir, train, evaluation, teacher_tokenizer)


def teacher_tokenizer_of(cfg: GKDConfig) -> Any:
    """The teacher folder's own tokenizer, when it has one (the same as the student's, or another: gkd.xtok)."""
    path = cfg.teacher_model_name_or_path
    if path is None or path == "self" or not os.path.isdir(os.path.expanduser(path)):
        return None
    folder = Path(os.path.expanduser(path))
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model")
    if any((folder / f).exists() for f in names):
        return load_tokenizer(path, "teacher tokenizer")
    return None


def teacher_prompt_of(cfg: GKDConfig) -> TeacherPrompt | None:
    """The teacher's own view of the training prompts (``teacher_prompt_field``, ``teacher_system_prompt``,
    ``teacher_chat_template`` read, ``teacher_chat_template_kwargs``), or None when it is the student's (then the
    examples carry nothing extra). Only the training data gets it: evaluation and rollouts use the student's
    prompt."""
    if (
        cfg.teacher_prompt_field is None
        and cfg.teacher_system_prompt is None
        and cfg.teacher_chat_template is None
        and not cfg.teacher_chat_template_kwargs
    ) or not cfg.needs_teacher:
        return None
    template = None
    if cfg.teacher_chat_template is not None:
        template = read_chat_template(cfg.teacher_chat_template, "teacher_chat_template")
    return TeacherPrompt(
        field=cfg.teacher_prompt_field,
        system_prompt=cfg.teacher_system_prompt,
        chat_template=template,
        chat_template_kwargs=dict(cfg.teacher_chat_template_kwargs or {}) or None,
    )


def model_configs(cfg: GKDConfig, student: nn.Module | None, teacher: nn.Module | None) -> dict[str, Any]:
    """The student's (and teacher's) transformers configs, read without loading weights."""
    out: dict[str, Any] = {}
    if student is not None:
        out["student"] = unwrap(student).config
    else:
        out["student"] = load_config(cfg.model_name_or_path, "student")  # type: ignore[arg-type]
    if cfg.needs_teacher and cfg.teachers:
        # several teachers: each local one's config (a served one's is not read here)
        for spec in cfg.teacher_specs():
            if spec.model_name_or_path == "self":
                out[f"teacher {spec.name}"] = out["student"]
            elif spec.model_name_or_path is not None:
                out[f"teacher {spec.name}"] = load_config(spec.model_name_or_path, f"teacher {spec.name}")
    elif cfg.needs_teacher:
        if teacher is not None:
            out["teacher"] = unwrap(teacher).config
        elif cfg.teacher_model_name_or_path == "self":  # a frozen copy of the starting student
            out["teacher"] = out["student"]
        elif cfg.teacher_model_name_or_path is not None or not cfg.teacher_url:  # not a served teacher
            out["teacher"] = load_config(cfg.teacher_model_name_or_path, "teacher")  # type: ignore[arg-type]
    return out


def tokenizer_kwargs(cfg: GKDConfig) -> dict[str, Any]:
    """``from_pretrained`` arguments of the student's tokenizer: ``trust_remote_code`` and the student's revision
    (when the tokenizer is the student's folder)."""
    out: dict[str, Any] = {"trust_remote_code": True} if cfg.trust_remote_code else {}
    if cfg.model_revision is not None and cfg.tokenizer_name_or_path is None:
        out["revision"] = cfg.model_revision
    return out


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


def load_dataset(
    cfg: GKDConfig,
    records: list[dict] | None,
    spec: str | None,
    split: str,
    what: str,
    tokenizer: Any,
    seq2seq: bool,
    log: Callable[[str], None],
    teacher_prompt: TeacherPrompt | None = None,
) -> TokenizedDataset:
    """Records (given, or read from ``spec``) tokenized, with what was skipped or truncated reported.

    With ``dataset_adapter`` the records (read or given) are in a benchmark's own layout and are mapped to
    prompt/completion/references first (:mod:`gkd.tasks.adapters`); a hub name gets the benchmark's config
    (``openai/gsm8k`` -> ``main``) unless ``dataset_config_name`` is set. ``teacher_prompt``: each example also gets
    the teacher's own prompt (:func:`teacher_prompt_of`).
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
                cfg, spec, split, config_name, split_key, tokenizer, seq2seq, log, adapt, teacher_prompt
            )
        records, skipped = load_records(spec, split, config_name, cfg.skip_bad_lines, split_key=split_key)
        source = f"dataset '{spec}'"
    if adapter is not None:
        records = adapt_records(adapter, records, source)
    if what == "eval" and cfg.eval_fewshot_file is not None:
        from gkd.evaluation import load_fewshot, with_fewshot

        shots = load_fewshot(cfg.eval_fewshot_file, cfg.eval_fewshot_k)
        records = with_fewshot(records, shots)
        log(f"eval: {len(shots)}-shot prompts from {cfg.eval_fewshot_file}")
    data = tokenize_records(
        records,
        tokenizer,
        max_prompt_length=cfg.max_prompt_length,
        max_completion_length=cfg.effective_max_completion_length,
        source=source,
        seq2seq=seq2seq,
        apply_chat_template=cfg.apply_chat_template,
        teacher_prompt=teacher_prompt,
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
