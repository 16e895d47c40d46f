"""Is a config valid? Types, ranges and combinations of keys, each checked before any model loads.

:func:`validate` raises :class:`gkd.errors.ConfigError` naming the first bad key and what is allowed; one check
function per concern (types, the objective, the teacher's source, precision, RL, tracker names, the schedule).
``gkd.config`` calls it for every ``GKDConfig`` it builds, so this module comes before it and takes the config as
``cfg`` without importing its class (``validate`` reads the fields of the config it is given).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Callable
from typing import Any, Literal

from gkd.divergences import DIVERGENCES, validate_divergence_params
from gkd.errors import ConfigError

__all__ = [
    "LR_SCHEDULERS",
    "OPTIMIZERS",
    "REPORT_TO",
    "TeacherSpec",
    "describe",
    "field_types",
    "teacher_specs",
    "type_ok",
    "validate",
]


def type_ok(value: Any, annotation: Any) -> bool:
    """Does ``value`` fit the (string-free) type annotation? Ints are accepted for floats."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(type_ok(value, a) for a in typing.get_args(annotation))
    if origin is Literal:
        return value in typing.get_args(annotation)
    if annotation is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(annotation) or (Any,)
        return isinstance(value, list) and all(type_ok(v, item) for v in value)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is bool:
        return isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def describe(annotation: Any) -> str:
    """What a type annotation allows, in words (``one of 'token', 'sequence'``, ``int or null``)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in typing.get_args(annotation))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    if origin is list:
        return f"a list of {describe(typing.get_args(annotation)[0])}"
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        return "a mapping"
    return getattr(annotation, "__name__", str(annotation))


def field_types(cls: type) -> dict[str, Any]:
    """The resolved type annotation of every field of the dataclass ``cls``."""
    return typing.get_type_hints(cls)


# Float keys where infinity means something (no clipping).
_INF_OK = ("max_grad_norm",)
REPORT_TO = ("tensorboard", "wandb", "trackio", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab")
# transformers.SchedulerType's values (tests/test_trl_keys.py checks the list against transformers)
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "reduce_lr_on_plateau",
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
    "warmup_stable_decay",
    "greedy",
)
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_hf")


def _check(cond: bool, key: str, allowed: str, value: Any) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}' must be {allowed}, got {value!r}")


_POSITIVE = "a positive integer"
# key -> (is the value allowed?, what is allowed); null values of optional keys are not checked
_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "lmbda": (lambda v: 0.0 <= v <= 1.0, "in [0, 1] (the student data fraction)"),
    "lmbda_start": (lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
    "lmbda_warmup_steps": (lambda v: v >= 0, ">= 0"),
    "loss_temperature": (lambda v: v > 0, "> 0"),
    "temperature": (lambda v: v > 0, "> 0"),
    "vllm_gpu_memory_utilization": (lambda v: 0.0 < v <= 1.0, "in (0, 1]"),
    "top_p": (lambda v: 0.0 < v <= 1.0, "in (0, 1]"),
    "top_k": (lambda v: v >= 0, ">= 0 (0 disables top-k)"),
    "max_new_tokens": (lambda v: v > 0, _POSITIVE),
    "max_completion_length": (lambda v: v > 0, _POSITIVE),
    "max_prompt_length": (lambda v: v > 0, _POSITIVE),
    "learning_rate": (lambda v: v > 0, "> 0"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "adam_beta1": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "adam_beta2": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "adam_epsilon": (lambda v: v > 0, "> 0"),
    "per_device_train_batch_size": (lambda v: v > 0, _POSITIVE),
    "gradient_accumulation_steps": (lambda v: v > 0, _POSITIVE),
    "max_steps": (lambda v: v > 0 or v == -1, "a positive integer, or -1 (train for num_train_epochs)"),
    "num_train_epochs": (lambda v: v > 0, "> 0"),
    "warmup_steps": (
        lambda v: v >= 0 and (v < 1 or float(v).is_integer()),
        ">= 0 (an integer, or a fraction < 1)",
    ),
    "warmup_ratio": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "min_lr_ratio": (lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
    "max_grad_norm": (lambda v: v >= 0, ">= 0 (0 disables clipping)"),
    "max_consecutive_nonfinite": (lambda v: v > 0, _POSITIVE),
    "logging_steps": (
        lambda v: v > 0 and (v < 1 or float(v).is_integer()),
        "a positive integer or a fraction < 1",
    ),
    "save_steps": (
        lambda v: v >= 0 and (v < 1 or float(v).is_integer()),
        ">= 0 (0: save only at the end; an integer, or a fraction < 1 of the run)",
    ),
    "eval_steps": (
        lambda v: v >= 0 and (v < 1 or float(v).is_integer()),
        ">= 0 (0: evaluate only at the end; an integer, or a fraction < 1 of the run)",
    ),
    "eval_max_samples": (lambda v: v > 0, _POSITIVE),
    "eval_batch_size": (lambda v: v > 0, _POSITIVE),
    "eval_fewshot_k": (lambda v: v > 0, "a positive integer or null (every example of eval_fewshot_file)"),
    "eval_num_beams": (lambda v: v > 0, "a positive integer (1: greedy decoding)"),
    "eval_length_penalty": (lambda v: math.isfinite(v), "a finite number"),
    "eval_bootstrap": (lambda v: v >= 0, ">= 0 (0: no confidence intervals)"),
    "save_total_limit": (lambda v: v > 0, "a positive integer or null"),
    "num_threads": (lambda v: v > 0, _POSITIVE),
    "loss_chunk_size": (lambda v: v > 0, _POSITIVE),
    "max_tokens_per_batch": (lambda v: v > 0, "a positive integer or null (micro-batches by sequence count)"),
    "teacher_cache_topk": (lambda v: v > 0, _POSITIVE),
    "teacher_topk": (lambda v: v > 0, _POSITIVE),
    "teacher_student_topk": (lambda v: v >= 0, ">= 0"),
    "teacher_timeout": (lambda v: v > 0, "> 0 (seconds)"),
    "teacher_max_retries": (lambda v: v >= 0, ">= 0"),
    "dataset_num_proc": (lambda v: v > 0, _POSITIVE),
    "alpha": (lambda v: 0.0 <= v <= 1.0, "in [0, 1] (weight of the distillation term)"),
    "num_generations": (lambda v: v > 0, _POSITIVE),
    "kl_to_initial": (lambda v: v >= 0, ">= 0"),
    "rkl_discount": (lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
}


def validate(cfg: Any) -> None:
    """Check every key of ``cfg`` (a GKDConfig): types, ranges, combinations; raise ConfigError naming the first bad
    key."""
    _check_types(cfg)
    for key, (ok, allowed) in _RANGES.items():
        value = getattr(cfg, key)
        if value is not None:
            _check(ok(value), key, allowed, value)
    _check_objective(cfg)
    _check_teacher_source(cfg)
    _check_teachers(cfg)
    _check_teacher_view(cfg)
    _check_precision(cfg)
    _check_rl(cfg)
    _check_names(cfg)
    _check_schedule(cfg)
    if cfg.max_tokens_per_batch is not None and cfg.fsdp:
        raise ConfigError(
            "config key 'max_tokens_per_batch' cannot be used with fsdp yet (ranks would run different numbers of "
            "sharded forwards); unset max_tokens_per_batch or fsdp"
        )
    if cfg.lora is not None:
        _check(cfg.lora.r > 0, "lora.r", _POSITIVE, cfg.lora.r)
        _check(0.0 <= cfg.lora.dropout < 1.0, "lora.dropout", "in [0, 1)", cfg.lora.dropout)


def _check_types(cfg: Any) -> None:
    hints = field_types(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if not type_ok(value, hints[f.name]):
            raise ConfigError(
                f"config key '{f.name}' must be {describe(hints[f.name])}, got {value!r} ({type(value).__name__})"
            )
        if isinstance(value, float) and (math.isnan(value) or (math.isinf(value) and f.name not in _INF_OK)):
            raise ConfigError(f"config key '{f.name}' must be a finite number, got {value}")


def _check_objective(cfg: Any) -> None:
    """The divergence and its parameters, and λ-schedule settings that could not do anything."""
    if cfg.lmbda_schedule == "linear":
        if cfg.lmbda_warmup_steps == 0:
            raise ConfigError(
                "config key 'lmbda_schedule: linear' ramps λ over lmbda_warmup_steps steps, which is 0; "
                "set lmbda_warmup_steps > 0 or use lmbda_schedule: constant"
            )
        if cfg.lmbda_start == cfg.lmbda:
            raise ConfigError(
                f"config key 'lmbda_schedule: linear' ramps from lmbda_start={cfg.lmbda_start} to lmbda={cfg.lmbda}, "
                "which are equal; set a different lmbda_start or use lmbda_schedule: constant"
            )
    if cfg.seq_kd and not cfg.off_policy_possible:
        raise ConfigError(
            "config key 'seq_kd: true' replaces the targets of off-policy batches, but with lmbda: 1 every batch is "
            "the student's own samples; set lmbda < 1 (or a linear lmbda schedule) or drop seq_kd"
        )
    if cfg.teacher_cache == "topk" and not cfg.off_policy_possible:
        raise ConfigError(
            "config key 'teacher_cache: topk' caches the teacher on the fixed dataset, but with lmbda: 1 every "
            "batch is the student's own samples; set teacher_cache: none"
        )
    if cfg.divergence == "jsd" and not 0.0 <= cfg.beta <= 1.0:
        raise ConfigError(
            f"config key 'beta' must be in [0, 1] (0: forward KL, 1: reverse KL, as in TRL), got {cfg.beta}"
        )
    valid_div = [*DIVERGENCES, "nll"]
    if cfg.divergence not in valid_div:
        close = difflib.get_close_matches(cfg.divergence, valid_div, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(
            f"config key 'divergence' must be one of {', '.join(valid_div)}, got {cfg.divergence!r}{hint}"
        )
    if cfg.divergence in DIVERGENCES:
        try:
            validate_divergence_params(cfg.divergence, cfg.divergence_params())
        except ValueError as e:
            raise ConfigError(_config_terms(cfg, str(e))) from e


_ATTN = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


def _check_teacher_source(cfg: Any) -> None:
    if cfg.teacher_url is not None and cfg.teacher_model_name_or_path is not None:
        raise ConfigError(
            "config keys 'teacher_url' and 'teacher_model_name_or_path' both name the teacher; give one (the served "
            "teacher, or the local one)"
        )


@dataclasses.dataclass(frozen=True)
class TeacherSpec:
    """One entry of ``teachers``: its name (in the records' ``teacher_field`` and the logs), where it comes from (a
    local model, ``self``, or a served ``teacher_url``) and its weight for records that name no teacher."""

    name: str
    model_name_or_path: str | None
    teacher_url: str | None
    weight: float


def teacher_specs(teachers: list[dict[str, Any]] | None) -> list[TeacherSpec]:
    """The (validated) ``teachers`` entries as :class:`TeacherSpec` s, weight 1 where none is given."""
    return [
        TeacherSpec(
            str(t["name"]), t.get("model_name_or_path"), t.get("teacher_url"), float(t.get("weight", 1.0))
        )
        for t in teachers or []
    ]


_TEACHER_KEYS = ("name", "model_name_or_path", "teacher_url", "weight")
_TEACHER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _check_teachers(cfg: Any) -> None:
    """``teachers``: a list of ``{name, model_name_or_path | teacher_url, weight}`` entries, the run's only source of
    teachers, with what several teachers cannot do yet."""
    if not cfg.teacher_field.strip():
        raise ConfigError(
            "config key 'teacher_field' is empty; give the record field that names a record's teacher"
        )
    if cfg.teachers is None:
        return
    if not cfg.teachers:
        raise ConfigError("config key 'teachers' is an empty list; give at least one teacher, or null")
    for key in ("teacher_model_name_or_path", "teacher_url"):
        if getattr(cfg, key) is not None:
            raise ConfigError(
                f"config keys 'teachers' and '{key}' both name the teacher; give one (move it into teachers as "
                f"{{name: ..., {'model_name_or_path' if key != 'teacher_url' else 'teacher_url'}: ...}})"
            )
    seen: set[str] = set()
    for i, entry in enumerate(cfg.teachers):
        where = f"config key 'teachers' entry {i + 1}"
        if not isinstance(entry, dict):
            raise ConfigError(
                f"{where} must be a mapping {{name, model_name_or_path | teacher_url, weight}}, got {entry!r}"
            )
        for key in entry:
            if key not in _TEACHER_KEYS:
                close = difflib.get_close_matches(str(key), _TEACHER_KEYS, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ConfigError(
                    f"{where} has an unknown key '{key}'{hint}; allowed: {', '.join(_TEACHER_KEYS)}"
                )
        name = entry.get("name")
        if not isinstance(name, str) or not _TEACHER_NAME.fullmatch(name):
            raise ConfigError(
                f"{where} needs a 'name' of letters, digits, '_', '.' or '-' (it names the teacher in the records "
                f"and the logs), got {name!r}"
            )
        if name in seen:
            raise ConfigError(f"config key 'teachers' names '{name}' twice; give every teacher its own name")
        seen.add(name)
        sources = [k for k in ("model_name_or_path", "teacher_url") if entry.get(k) is not None]
        if len(sources) != 1:
            said = (
                "both model_name_or_path and teacher_url"
                if sources
                else "neither model_name_or_path nor teacher_url"
            )
            raise ConfigError(
                f"teacher '{name}' ({where}) gives {said}; give one (a local model, self, or a served URL)"
            )
        if not isinstance(entry[sources[0]], str) or not entry[sources[0]].strip():
            raise ConfigError(
                f"teacher '{name}': '{sources[0]}' must be a non-empty string, got {entry[sources[0]]!r}"
            )
        weight = entry.get("weight", 1.0)
        if (
            isinstance(weight, bool)
            or not isinstance(weight, (int, float))
            or not math.isfinite(weight)
            or weight < 0
        ):
            raise ConfigError(f"teacher '{name}': 'weight' must be a finite number >= 0, got {weight!r}")
    if all(float(t.get("weight", 1.0)) == 0 for t in cfg.teachers):
        raise ConfigError(
            "config key 'teachers': every weight is 0, so records that name no teacher would have none; give at "
            "least one teacher a weight > 0"
        )
    _check_several_teachers(cfg)


def _check_several_teachers(cfg: Any) -> None:
    """What a run with ``teachers`` cannot do yet: one loss term per teacher needs a per-position divergence."""
    unsupported = []
    if cfg.divergence == "nll":
        unsupported.append("divergence: nll (it trains without a teacher)")
    if cfg.seq_kd:
        unsupported.append("seq_kd (which teacher would write the targets?)")
    if cfg.teacher_cache == "topk":
        unsupported.append("teacher_cache: topk")
    if cfg.rkl_discount > 0:
        unsupported.append("rkl_discount > 0")
    if unsupported:
        raise ConfigError(
            f"config key 'teachers' cannot be used with {', '.join(unsupported)} yet; use one teacher "
            "(teacher_model_name_or_path or teacher_url) for that"
        )


_TEACHER_VIEW_KEYS = (
    "teacher_prompt_field",
    "teacher_system_prompt",
    "teacher_chat_template",
    "teacher_chat_template_kwargs",
)


def _check_teacher_view(cfg: Any) -> None:
    """The teacher's own view of the prompt (``teacher_prompt_field`` and friends) and ``teacher: self``."""
    for key in ("teacher_prompt_field", "teacher_chat_template"):
        value = getattr(cfg, key)
        if value is not None and not value.strip():
            raise ConfigError(f"config key '{key}' is empty; give a value or null")
    given = [k for k in _TEACHER_VIEW_KEYS if getattr(cfg, k)]
    if given and cfg.divergence == "nll":
        raise ConfigError(
            f"config key '{given[0]}' shapes the teacher's prompt, but divergence nll trains without a teacher; "
            f"unset {given[0]} or choose a distillation divergence"
        )
    if cfg.teacher_prompt_field is not None and cfg.dataset_adapter is not None:
        raise ConfigError(
            "config key 'teacher_prompt_field' cannot be used with dataset_adapter yet (the adapter keeps only "
            "prompt, completion and references); write the records as prompt/completion plus your field, or unset "
            "teacher_prompt_field"
        )
    if cfg.teacher_model_name_or_path == "self" and cfg.model_name_or_path == "self":
        raise ConfigError(
            "config key 'model_name_or_path' cannot be 'self'; only the teacher can be the student"
        )


def _check_precision(cfg: Any) -> None:
    if cfg.bf16 and cfg.fp16:
        raise ConfigError("config keys 'bf16' and 'fp16' are both true; choose one mixed precision")
    if (cfg.bf16 or cfg.fp16) and cfg.student_dtype == "bfloat16":
        raise ConfigError(
            f"config key '{'bf16' if cfg.bf16 else 'fp16'}: true' keeps float32 master weights; leave student_dtype: "
            "float32 (student_dtype: bfloat16 trains bf16 weights directly, without mixed precision)"
        )
    if cfg.attn_implementation is not None and cfg.attn_implementation not in _ATTN:
        close = difflib.get_close_matches(cfg.attn_implementation, _ATTN, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(
            f"config key 'attn_implementation' must be one of {', '.join(_ATTN)} or null, got "
            f"{cfg.attn_implementation!r}{hint}"
        )


def _check_rl(cfg: Any) -> None:
    if cfg.alpha < 1.0 and cfg.reward is None:
        raise ConfigError("config key 'alpha' < 1 needs a 'reward' (a built-in name or module:function)")
    if cfg.reward is not None and cfg.lmbda != 1.0:
        raise ConfigError("RL + GKD trains on the student's own samples: set lmbda: 1 when 'reward' is given")
    if cfg.num_generations > 1 and cfg.lmbda != 1.0:
        raise ConfigError("config key 'num_generations' > 1 needs lmbda: 1 (samples are drawn per prompt)")
    if cfg.per_device_train_batch_size % cfg.num_generations:
        raise ConfigError(
            f"config key 'per_device_train_batch_size' ({cfg.per_device_train_batch_size}) counts completions and "
            f"must be a multiple of num_generations ({cfg.num_generations}), as in TRL"
        )
    if cfg.teacher_kl_estimator == "sampled" and cfg.divergence not in ("reverse_kl",):
        raise ConfigError(
            "config key 'teacher_kl_estimator: sampled' estimates the reverse KL; set divergence: reverse_kl"
        )


def _check_names(cfg: Any) -> None:
    """Tracker names. (Metric and reward names belong to gkd.scoring's vocabulary, one layer up: they are checked
    by gkd.preflight, still before any model loads.)"""
    for name in cfg.report_to:
        _check(
            name in (*REPORT_TO, "all"),
            "report_to",
            f"a name or list of {', '.join(REPORT_TO)}, all or none",
            name,
        )


def _check_schedule(cfg: Any) -> None:
    if cfg.lr_scheduler_type not in LR_SCHEDULERS:
        close = difflib.get_close_matches(cfg.lr_scheduler_type, LR_SCHEDULERS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(
            f"config key 'lr_scheduler_type' must be one of {', '.join(LR_SCHEDULERS)}, got "
            f"{cfg.lr_scheduler_type!r}{hint}"
        )
    if cfg.min_lr_ratio > 0 and cfg.lr_scheduler_type != "cosine":
        raise ConfigError(
            f"config key 'min_lr_ratio' applies to lr_scheduler_type: cosine, not {cfg.lr_scheduler_type}; use "
            "lr_scheduler_kwargs (e.g. {min_lr_rate: 0.1} with cosine_with_min_lr)"
        )
    if cfg.optim not in OPTIMIZERS:
        raise ConfigError(
            f"config key 'optim: {cfg.optim}' is not available in gkd: it trains with AdamW ({', '.join(OPTIMIZERS)})"
        )
    if cfg.save_strategy == "best" and cfg.eval_strategy == "no":
        raise ConfigError("config key 'save_strategy: best' needs evaluations; eval_strategy is 'no'")
    if cfg.load_best_model_at_end and cfg.eval_strategy == "no":
        raise ConfigError("config key 'load_best_model_at_end' needs evaluations; eval_strategy is 'no'")
    if cfg.load_best_model_at_end and cfg.save_strategy == "no":
        raise ConfigError(
            "config key 'load_best_model_at_end' keeps the best checkpoint, but save_strategy is 'no' (no "
            "checkpoints are written); set save_strategy: steps (or best), or drop load_best_model_at_end"
        )


def _config_terms(cfg: Any, message: str) -> str:
    """A divergence-parameter error of :mod:`gkd.divergences` (the one place they are checked) in config keys."""
    keys = dict(DIVERGENCES[cfg.divergence].config_keys)
    message = message.removeprefix(f"{cfg.divergence}: ")
    for param, key in keys.items():
        message = re.sub(rf"\b{param}\b(?!_)", key, message)
    named = next((key for key in keys.values() if key in message), "divergence")
    return f"config key '{named}' (divergence {cfg.divergence}): {message}"
