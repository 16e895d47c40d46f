"""Checks that run before any model weights load: everything that can be known from the config, the model configs
(``config.json``, read without weights) and the tokenized data.

With a 7B teacher a model load takes minutes, so a run that is going to fail on its input must fail here, with one
line naming the key, the value and the fix. Each check is a plain function of what it needs, so it can be tested
without a trainer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gkd.config import GKDConfig
from gkd.data import TokenizedDataset
from gkd.errors import ConfigError, DataError
from gkd.sampling.fast import fast_backend_config_reason
from gkd.teachers import check_routes

__all__ = [
    "check_backend",
    "check_context",
    "check_data",
    "check_names",
    "check_paths",
    "check_served_teacher",
]


def check_paths(cfg: GKDConfig, *, have_student: bool, have_teacher: bool, have_data: bool) -> None:
    """The keys a run cannot start without (objects given from Python stand in for paths)."""
    if not have_student and cfg.model_name_or_path is None:
        raise ConfigError("config key 'model_name_or_path' (the student) is required")
    if cfg.teachers and have_teacher:
        raise ConfigError(
            "config key 'teachers' names the teachers, and a teacher model object was given too; give one of them"
        )
    if cfg.teachers and cfg.needs_teacher:  # several teachers: each served one checked as teacher_url is
        for spec in cfg.teacher_specs():
            if spec.teacher_url is not None:
                check_served_teacher(cfg, spec.teacher_url)
    elif (
        cfg.needs_teacher
        and not have_teacher
        and cfg.teacher_model_name_or_path is None
        and not cfg.teacher_url
    ):
        raise ConfigError(
            f"config key 'teacher_model_name_or_path' (or 'teacher_url', a served teacher) is required for "
            f"divergence '{cfg.divergence}' (use divergence: nll for plain SFT without a teacher)"
        )
    if cfg.needs_teacher and not have_teacher and cfg.teacher_model_name_or_path is None and cfg.teacher_url:
        check_served_teacher(cfg)
    if not have_data and cfg.dataset is None:
        raise ConfigError("config key 'dataset' is required (a JSONL file, a folder or a datasets hub name)")
    check_names(cfg)


def check_served_teacher(cfg: GKDConfig, url: str | None = None) -> None:
    """What a served teacher (``teacher_url``, or ``url`` of an entry of ``teachers``: top-k log-probs over HTTP, no
    logits, no sampling) cannot do yet."""
    url = str(url or cfg.teacher_url)
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"config key 'teacher_url' must be an http:// or https:// URL, got '{url}'")
    unsupported = []
    if cfg.seq_kd and cfg.off_policy_possible:
        unsupported.append("seq_kd (the teacher would have to sample)")
    if cfg.teacher_cache == "topk":
        unsupported.append("teacher_cache: topk")
    if cfg.teacher_kl_estimator == "sampled":
        unsupported.append("teacher_kl_estimator: sampled")
    if unsupported:
        raise ConfigError(
            f"{', '.join(unsupported)} not supported with teacher_url yet; use teacher_model_name_or_path (a local "
            "teacher) for it"
        )


def check_names(cfg: GKDConfig) -> None:
    """``eval_metric`` and ``reward`` are names of gkd's one vocabulary (:mod:`gkd.scoring`) or ``module:function``."""
    from gkd.scoring import check_metric_name, check_reward_name

    if cfg.eval_metric is not None:
        check_metric_name(cfg.eval_metric, "eval_metric")
    if cfg.reward is not None:
        check_reward_name(cfg.reward, "reward")


def check_data(cfg: GKDConfig, train: TokenizedDataset, evaluation: TokenizedDataset | None) -> None:
    """Do the records carry what the λ schedule, the eval metric and the reward need?"""
    from gkd.scoring import check_records

    if not train.has_targets and cfg.needs_targets:
        examples = getattr(train, "examples", None)
        missing = (
            [i for i, e in enumerate(examples) if e.completion is None] if isinstance(examples, list) else []
        )
        if missing and len(missing) < len(examples):  # one broken record, not prompt-only data
            raise DataError(
                f"record {missing[0] + 1} of the training data has no completion; {len(examples) - len(missing)} "
                f"records do ({len(missing)} do not): add the missing completion{'s' if len(missing) > 1 else ''} "
                "or remove those records (or set lmbda: 1, which trains on the student's samples only)"
            )
        when = (
            "lmbda < 1"
            if cfg.lmbda < 1.0
            else f"the linear lmbda schedule (from lmbda_start={cfg.lmbda_start})"
        )
        raise DataError(
            f"the dataset has prompt-only records but {when} makes off-policy steps, which train on targets; "
            "set lmbda: 1 (constant), or seq_kd: true to let the teacher write targets, or add completions"
        )
    if evaluation is not None:
        check_records(
            cfg.eval_metric or "exact_match", [e.record for e in evaluation.examples], "eval_metric"
        )
    if cfg.reward is not None and ":" not in cfg.reward:
        check_records(cfg.reward, [e.record for e in train.examples], "reward")
    if cfg.teachers and cfg.needs_teacher and isinstance(getattr(train, "examples", None), Sequence):
        # several teachers: every record names a known one, or none (a streamed dataset is checked per batch)
        check_routes(
            (e.record for e in train.examples), cfg.teacher_field, [t.name for t in cfg.teacher_specs()]
        )


def _longest(data: TokenizedDataset | None) -> tuple[int, int]:
    if data is None or not len(data):
        return 0, 0
    prompt = max(len(e.prompt) for e in data.examples)
    completion = max((len(e.completion) for e in data.examples if e.completion is not None), default=0)
    return prompt, completion


def check_context(
    cfg: GKDConfig,
    model_configs: dict[str, Any],
    train: TokenizedDataset,
    evaluation: TokenizedDataset | None,
) -> None:
    """Prompt + generated (or dataset) tokens must fit every model's context: past it, learned position tables
    index out of range (GPT-2) and rotary models leave the range they were trained on."""
    from gkd.models import context_length

    prompts = max(_longest(train)[0], _longest(evaluation)[0])
    completion = max(cfg.max_new_tokens, min(_longest(train)[1], cfg.effective_max_completion_length))
    for who, config in model_configs.items():
        limit = context_length(config)
        if limit is None or getattr(config, "is_encoder_decoder", False):
            continue
        if prompts + completion > limit:
            raise ConfigError(
                f"the longest prompt ({prompts} tokens) plus max_new_tokens={cfg.max_new_tokens} (or the longest "
                f"completion) needs {prompts + completion} positions but the {who} reads at most {limit}; lower "
                f"max_prompt_length (prompts are cut from the left) or max_new_tokens so they sum to <= {limit}"
            )


def check_backend(cfg: GKDConfig, student_config: Any) -> None:
    """``rollout_backend`` against the student, known from its config (and the LoRA setting)."""
    if cfg.rollout_backend == "fast":
        reason = fast_backend_config_reason(student_config)
        if reason is None and cfg.lora is not None:
            reason = "a LoRA (peft) student"
        if reason is not None:
            raise ConfigError(
                f"config key 'rollout_backend: fast' cannot sample this student ({reason}); use rollout_backend: "
                "auto (it picks the fast loop where it can and model.generate elsewhere)"
            )
    if cfg.rollout_backend == "vllm" and cfg.lora is not None:
        raise ConfigError("rollout_backend: vllm does not support LoRA students; use rollout_backend: auto")


def check_teacher_tokenizer(
    cfg: GKDConfig, configs: dict[str, Any], tokenizer: Any, teacher_tokenizer: Any, train: TokenizedDataset
) -> None:
    """A teacher folder whose tokenizer differs from the student's is aligned (gkd.xtok): refuse, before any
    weights load, what that path does not do (seq2seq, the top-k cache, the sampled estimator) and
    conversational data the teacher's tokenizer has no chat template for."""
    from gkd.models import same_tokenizer

    if teacher_tokenizer is None or same_tokenizer(tokenizer, teacher_tokenizer):
        return
    if any(getattr(configs.get(k), "is_encoder_decoder", False) for k in ("student", "teacher")):
        raise ConfigError(
            "a teacher with another tokenizer works with decoder-only models; use a seq2seq teacher and student "
            "that share a tokenizer"
        )
    if cfg.teacher_cache == "topk":
        raise ConfigError(
            "teacher_cache: topk with a teacher whose tokenizer differs from the student's is not supported yet; "
            "unset it or use a teacher with the student's tokenizer"
        )
    if cfg.teacher_kl_estimator == "sampled":
        raise ConfigError(
            "teacher_kl_estimator: sampled needs the teacher's probability of the student's token; with a teacher "
            "of another tokenizer use teacher_kl_estimator: exact"
        )
    chat = cfg.apply_chat_template or any(
        e.record.get("messages") is not None or isinstance(e.record.get("prompt"), list)
        for e in train.examples
    )
    if chat and cfg.teacher_chat_template is None and not getattr(teacher_tokenizer, "chat_template", None):
        raise ConfigError(
            "the teacher's tokenizer differs from the student's and has no chat template for these chat prompts; "
            "set teacher_chat_template (a Jinja file or a folder with one)"
        )
