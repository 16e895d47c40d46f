"""One config for every run: ``GKDConfig``.

Keys follow TRL's ``GKDConfig`` where TRL has one (``lmbda``, ``beta``, ``temperature``, ``max_new_tokens``,
``seq_kd``, ``per_device_train_batch_size``, ...) so a TRL user feels at home. SFT, supervised KD, SeqKD, ImitKD,
on-policy GKD and RL + GKD are all values of this one config (see ``configs/presets/``).

Everything is validated before any model loads: unknown keys (with the closest valid key suggested), wrong types and
out-of-range values raise ``ConfigError`` with one line naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from gkd.divergences import DIVERGENCES, validate_divergence_params
from gkd.errors import ConfigError

__all__ = ["GKDConfig", "LoraConfig", "load_config", "parse_overrides"]


@dataclass
class LoraConfig:
    """LoRA settings for the student (peft). Only the adapters are trained; the base weights stay frozen."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"


@dataclass
class GKDConfig:
    """All settings of a gkd run. See ``docs/config.md`` for every key explained."""

    # --- models ---------------------------------------------------------------------------------------------
    model_name_or_path: str | None = None
    """The student: a local folder or hub id of an AutoModelForCausalLM or AutoModelForSeq2SeqLM."""
    teacher_model_name_or_path: str | None = None
    """The teacher (same tokenizer as the student). Not needed for ``divergence: nll`` (SFT)."""
    tokenizer_name_or_path: str | None = None
    """Defaults to the student's folder."""
    teacher_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """The teacher only runs forward passes, so a lower precision is usually fine."""
    student_dtype: Literal["float32", "bfloat16"] = "float32"
    lora: LoraConfig | None = None
    """Train a LoRA adapter on the student instead of all its weights, e.g. ``lora: {r: 16}``."""
    disable_dropout: bool = True
    """Turn student dropout off (the teacher always runs in eval mode)."""

    # --- data -------------------------------------------------------------------------------------------------
    dataset: str | None = None
    """A JSONL/JSON file, a local folder (saved dataset or data files), or a ``datasets`` hub name."""
    dataset_split: str = "train"
    dataset_config_name: str | None = None
    eval_dataset: str | None = None
    eval_split: str = "validation"
    skip_bad_lines: bool = False
    """Skip JSONL lines that are not valid JSON (counted and reported) instead of stopping."""
    max_prompt_length: int = 512
    """Longer prompts are truncated from the left (counted and reported)."""
    max_completion_length: int | None = None
    """Longer dataset completions are truncated from the right. Defaults to ``max_new_tokens``."""

    # --- the GKD objective ------------------------------------------------------------------------------------
    lmbda: float = 0.5
    """Student data fraction λ: probability that a step's batch is the student's own samples (on-policy)."""
    lmbda_schedule: Literal["constant", "linear"] = "constant"
    """``linear`` ramps λ from ``lmbda_start`` to ``lmbda`` over ``lmbda_warmup_steps`` steps."""
    lmbda_start: float = 0.0
    lmbda_warmup_steps: int = 0
    seq_kd: bool = False
    """Off-policy batches use the teacher's own samples as targets (SeqKD), generated once and cached on disk."""
    divergence: str = "jsd"
    """forward_kl, reverse_kl, jsd, tvd, skew_forward_kl, skew_reverse_kl, or nll (plain SFT, no teacher)."""
    beta: float = 0.5
    """JSD(β) interpolation: β→0 behaves like forward KL, β→1 like reverse KL."""
    jsd_normalize: bool = False
    """Divide JSD(β) by β(1-β), making it continuous with forward/reverse KL at β = 0/1."""
    skew_alpha: float = 0.1
    """α of the skew KLs (DistiLLM)."""
    loss_temperature: float = 1.0
    """Softmax temperature of both models inside the loss (separate from the sampling temperature)."""
    reduction: Literal["token", "sequence"] = "token"
    """``token``: mean over the step's valid tokens; ``sequence``: the paper's per-sequence mean, then mean."""

    # --- sampling (on-policy rollouts, SeqKD, evaluation by sampling) -----------------------------------------
    temperature: float = 1.0
    """Sampling temperature of the student's rollouts (the paper uses 1)."""
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 128
    rollout_backend: Literal["auto", "fast", "generate", "vllm"] = "auto"

    # --- RL + GKD ---------------------------------------------------------------------------------------------
    alpha: float = 1.0
    """Weight of the distillation term: maximise (1-α)·E[r] - α·D. α = 1 is pure distillation."""
    reward: str | None = None
    """A built-in reward name or ``module:function`` (prompts, completions, records) -> list of floats."""
    num_generations: int = 1
    """Samples per prompt in RL mode (advantages are computed within each prompt's group)."""
    advantage: Literal["group", "rloo"] = "group"
    kl_to_initial: float = 0.0
    """Weight of a reverse KL to the initial student (the RLEF* baseline regulariser). Needs no teacher."""
    teacher_kl_estimator: Literal["full", "sampled"] = "full"
    """``full``: exact divergence over the vocabulary; ``sampled``: reverse KL as a per-token reward."""
    rkl_discount: float = 0.0
    """Discount of future per-token reverse-KL rewards when ``teacher_kl_estimator: sampled``."""

    # --- optimisation -----------------------------------------------------------------------------------------
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_steps: int = 1000
    warmup_steps: int = 0
    lr_scheduler_type: Literal["constant", "linear", "cosine"] = "linear"
    min_lr_ratio: float = 0.0
    """Linear/cosine schedules decay to ``learning_rate * min_lr_ratio``."""
    max_grad_norm: float = 1.0
    """Gradient clipping (0 disables)."""
    seed: int = 42
    max_consecutive_nonfinite: int = 10
    """Non-finite steps are skipped; after this many in a row the run stops with a checkpoint."""

    # --- performance ------------------------------------------------------------------------------------------
    num_threads: int | None = None
    """torch intra-op threads (default: torch's choice)."""
    loss_chunk_size: int | None = None
    """Positions per chunk of the fused loss (default: about 8M logits per chunk)."""
    teacher_cache: Literal["none", "topk"] = "none"
    """``topk``: store the teacher's top-k log-probs + tail for the fixed dataset once, instead of rerunning it."""
    teacher_cache_topk: int = 64

    # --- output, logging, evaluation --------------------------------------------------------------------------
    output_dir: str = "runs/gkd"
    logging_steps: int = 10
    save_steps: int = 500
    """Checkpoint every this many steps (0: only at the end)."""
    save_total_limit: int | None = 2
    eval_steps: int = 0
    """Evaluate every this many steps (0: only at the end, if an eval dataset is set)."""
    eval_metric: str | None = None
    """A metric name from ``gkd.metrics`` or a built-in task name (its headline metric)."""
    eval_max_samples: int = 256
    eval_batch_size: int = 64
    report_to: list[str] = field(default_factory=list)
    """Extra loggers when installed: tensorboard, wandb, trackio."""
    resume_from_checkpoint: str | None = None
    """A ``checkpoint-STEP`` folder, or ``latest`` for the newest complete one in ``output_dir``."""
    progress: bool = True

    # ----------------------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            self.lora = _build(LoraConfig, self.lora, prefix="lora.")
        validate(self)

    @property
    def effective_max_completion_length(self) -> int:
        return self.max_completion_length or self.max_new_tokens

    @property
    def needs_teacher(self) -> bool:
        distill = self.divergence != "nll" and self.alpha > 0
        return distill or (self.seq_kd and self.lmbda < 1.0) or self.teacher_cache == "topk"

    @property
    def rl(self) -> bool:
        return self.reward is not None and self.alpha < 1.0

    def divergence_params(self) -> dict[str, Any]:
        """Parameters of the training divergence (without temperature, which the loss passes itself)."""
        if self.divergence == "jsd":
            return {"beta": self.beta, "normalize": self.jsd_normalize}
        if self.divergence.startswith("skew_"):
            return {"alpha": self.skew_alpha}
        return {}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self, keys: tuple[str, ...]) -> str:
        data = {k: getattr(self, k) for k in keys}
        if "lora" in data and data["lora"] is not None:
            data["lora"] = dataclasses.asdict(data["lora"])
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Keys that must match for a checkpoint to be resumed.
RESUME_KEYS = (
    "model_name_or_path",
    "teacher_model_name_or_path",
    "lora",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "divergence",
    "student_dtype",
)


# ---------------------------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------------------------
def _type_ok(value: Any, annotation: Any) -> bool:
    """Does ``value`` fit the (string-free) type annotation? Ints are accepted for floats."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if origin is Literal:
        return value in typing.get_args(annotation)
    if annotation is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(annotation) or (Any,)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is bool:
        return isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def _describe(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(annotation))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    if origin is list:
        return f"a list of {_describe(typing.get_args(annotation)[0])}"
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        return "a mapping"
    return getattr(annotation, "__name__", str(annotation))


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


# Names users often type for a key (from TRL, peft, other trainers).
_ALIASES = {
    "rank": "r",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "lambda": "lmbda",
    "lam": "lmbda",
    "lr": "learning_rate",
    "batch_size": "per_device_train_batch_size",
    "train_batch_size": "per_device_train_batch_size",
    "steps": "max_steps",
    "num_steps": "max_steps",
    "model": "model_name_or_path",
    "student": "model_name_or_path",
    "student_model_name_or_path": "model_name_or_path",
    "teacher": "teacher_model_name_or_path",
    "teacher_model": "teacher_model_name_or_path",
    "loss": "divergence",
    "max_length": "max_prompt_length",
    "max_completion_tokens": "max_completion_length",
    "gradient_clip": "max_grad_norm",
}


def _unknown_key(key: str, valid: list[str], prefix: str = "") -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if not close and _ALIASES.get(key) in valid:
        close = [_ALIASES[key]]
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else "; valid keys are listed in docs/config.md"
    return ConfigError(f"unknown config key '{prefix}{key}'{hint}")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.')}' must be a mapping, got {type(data).__name__}")
    hints = _hints(cls)
    for key, value in data.items():
        if key not in hints:
            raise _unknown_key(str(key), list(hints), prefix)
        if not _type_ok(value, hints[key]):
            raise ConfigError(
                f"config key '{prefix}{key}' must be {_describe(hints[key])}, got {value!r} ({type(value).__name__})"
            )
    return cls(**data)


def _check(cond: bool, key: str, allowed: str, value: Any) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}' must be {allowed}, got {value!r}")


def validate(cfg: GKDConfig) -> None:
    """Check types and ranges of every key; raise ConfigError naming the first bad key."""
    hints = _hints(GKDConfig)
    for f in dataclasses.fields(GKDConfig):
        value = getattr(cfg, f.name)
        if not _type_ok(value, hints[f.name]):
            raise ConfigError(
                f"config key '{f.name}' must be {_describe(hints[f.name])}, got {value!r} ({type(value).__name__})"
            )
    _check(0.0 <= cfg.lmbda <= 1.0, "lmbda", "in [0, 1] (the student data fraction)", cfg.lmbda)
    _check(0.0 <= cfg.lmbda_start <= 1.0, "lmbda_start", "in [0, 1]", cfg.lmbda_start)
    _check(cfg.lmbda_warmup_steps >= 0, "lmbda_warmup_steps", ">= 0", cfg.lmbda_warmup_steps)
    valid_div = [*DIVERGENCES, "nll"]
    if cfg.divergence not in valid_div:
        close = difflib.get_close_matches(cfg.divergence, valid_div, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(
            f"config key 'divergence' must be one of {', '.join(valid_div)}, got {cfg.divergence!r}{hint}"
        )
    if cfg.divergence == "jsd":
        if cfg.jsd_normalize:
            _check(
                0.0 <= cfg.beta <= 1.0, "beta", "in [0, 1] for divergence jsd with jsd_normalize", cfg.beta
            )
        elif not 0.0 < cfg.beta < 1.0:
            raise ConfigError(
                f"config key 'beta' must be in (0, 1) for divergence jsd, got {cfg.beta}; for β=0 use "
                "divergence: forward_kl, for β=1 divergence: reverse_kl, or set jsd_normalize: true"
            )
    if cfg.divergence.startswith("skew_"):
        _check(0.0 <= cfg.skew_alpha < 1.0, "skew_alpha", "in [0, 1)", cfg.skew_alpha)
    if cfg.divergence in DIVERGENCES:
        try:
            validate_divergence_params(cfg.divergence, cfg.divergence_params())
        except ValueError as e:  # pragma: no cover - the checks above come first
            raise ConfigError(str(e)) from e
    _check(
        math.isfinite(cfg.loss_temperature) and cfg.loss_temperature > 0,
        "loss_temperature",
        "> 0",
        cfg.loss_temperature,
    )
    _check(math.isfinite(cfg.temperature) and cfg.temperature > 0, "temperature", "> 0", cfg.temperature)
    _check(0.0 < cfg.top_p <= 1.0, "top_p", "in (0, 1]", cfg.top_p)
    _check(cfg.top_k >= 0, "top_k", ">= 0 (0 disables top-k)", cfg.top_k)
    _check(cfg.max_new_tokens > 0, "max_new_tokens", "a positive integer", cfg.max_new_tokens)
    if cfg.max_completion_length is not None:
        _check(
            cfg.max_completion_length > 0,
            "max_completion_length",
            "a positive integer",
            cfg.max_completion_length,
        )
    _check(cfg.max_prompt_length > 0, "max_prompt_length", "a positive integer", cfg.max_prompt_length)
    _check(
        math.isfinite(cfg.learning_rate) and cfg.learning_rate > 0, "learning_rate", "> 0", cfg.learning_rate
    )
    _check(cfg.weight_decay >= 0, "weight_decay", ">= 0", cfg.weight_decay)
    _check(0 <= cfg.adam_beta1 < 1, "adam_beta1", "in [0, 1)", cfg.adam_beta1)
    _check(0 <= cfg.adam_beta2 < 1, "adam_beta2", "in [0, 1)", cfg.adam_beta2)
    _check(cfg.adam_epsilon > 0, "adam_epsilon", "> 0", cfg.adam_epsilon)
    _check(
        cfg.per_device_train_batch_size > 0,
        "per_device_train_batch_size",
        "a positive integer",
        cfg.per_device_train_batch_size,
    )
    _check(
        cfg.gradient_accumulation_steps > 0,
        "gradient_accumulation_steps",
        "a positive integer",
        cfg.gradient_accumulation_steps,
    )
    _check(cfg.max_steps > 0, "max_steps", "a positive integer", cfg.max_steps)
    _check(cfg.warmup_steps >= 0, "warmup_steps", ">= 0", cfg.warmup_steps)
    _check(0.0 <= cfg.min_lr_ratio <= 1.0, "min_lr_ratio", "in [0, 1]", cfg.min_lr_ratio)
    _check(cfg.max_grad_norm >= 0, "max_grad_norm", ">= 0 (0 disables clipping)", cfg.max_grad_norm)
    _check(
        cfg.max_consecutive_nonfinite > 0,
        "max_consecutive_nonfinite",
        "a positive integer",
        cfg.max_consecutive_nonfinite,
    )
    _check(cfg.logging_steps > 0, "logging_steps", "a positive integer", cfg.logging_steps)
    _check(cfg.save_steps >= 0, "save_steps", ">= 0 (0: save only at the end)", cfg.save_steps)
    _check(cfg.eval_steps >= 0, "eval_steps", ">= 0 (0: evaluate only at the end)", cfg.eval_steps)
    _check(cfg.eval_max_samples > 0, "eval_max_samples", "a positive integer", cfg.eval_max_samples)
    _check(cfg.eval_batch_size > 0, "eval_batch_size", "a positive integer", cfg.eval_batch_size)
    if cfg.save_total_limit is not None:
        _check(
            cfg.save_total_limit > 0, "save_total_limit", "a positive integer or null", cfg.save_total_limit
        )
    if cfg.num_threads is not None:
        _check(cfg.num_threads > 0, "num_threads", "a positive integer", cfg.num_threads)
    if cfg.loss_chunk_size is not None:
        _check(cfg.loss_chunk_size > 0, "loss_chunk_size", "a positive integer", cfg.loss_chunk_size)
    _check(cfg.teacher_cache_topk > 0, "teacher_cache_topk", "a positive integer", cfg.teacher_cache_topk)
    # RL
    _check(0.0 <= cfg.alpha <= 1.0, "alpha", "in [0, 1] (weight of the distillation term)", cfg.alpha)
    _check(cfg.num_generations > 0, "num_generations", "a positive integer", cfg.num_generations)
    _check(cfg.kl_to_initial >= 0, "kl_to_initial", ">= 0", cfg.kl_to_initial)
    _check(0.0 <= cfg.rkl_discount <= 1.0, "rkl_discount", "in [0, 1]", cfg.rkl_discount)
    if cfg.alpha < 1.0 and cfg.reward is None:
        raise ConfigError("config key 'alpha' < 1 needs a 'reward' (a built-in name or module:function)")
    if cfg.reward is not None and cfg.lmbda != 1.0:
        raise ConfigError("RL + GKD trains on the student's own samples: set lmbda: 1 when 'reward' is given")
    if cfg.num_generations > 1 and cfg.lmbda != 1.0:
        raise ConfigError("config key 'num_generations' > 1 needs lmbda: 1 (samples are drawn per prompt)")
    if cfg.teacher_kl_estimator == "sampled" and cfg.divergence not in ("reverse_kl",):
        raise ConfigError(
            "config key 'teacher_kl_estimator: sampled' estimates the reverse KL; set divergence: reverse_kl"
        )
    for name in cfg.report_to:
        _check(
            name in ("tensorboard", "wandb", "trackio"),
            "report_to",
            "a list of tensorboard, wandb, trackio",
            name,
        )
    if cfg.lora is not None:
        _check(cfg.lora.r > 0, "lora.r", "a positive integer", cfg.lora.r)
        _check(0.0 <= cfg.lora.dropout < 1.0, "lora.dropout", "in [0, 1)", cfg.lora.dropout)


def check_paths(cfg: GKDConfig) -> None:
    """Checks that need the configured inputs to exist (run before loading models)."""
    if cfg.model_name_or_path is None:
        raise ConfigError("config key 'model_name_or_path' (the student) is required")
    if cfg.needs_teacher and cfg.teacher_model_name_or_path is None:
        raise ConfigError(
            f"config key 'teacher_model_name_or_path' is required for divergence '{cfg.divergence}' "
            "(use divergence: nll for plain SFT without a teacher)"
        )
    if cfg.dataset is None:
        raise ConfigError("config key 'dataset' is required (a JSONL file, a folder or a datasets hub name)")


# ---------------------------------------------------------------------------------------------------------------
# loading: YAML + command-line overrides
# ---------------------------------------------------------------------------------------------------------------
def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["lmbda=0.5", "lora.r=8"]`` -> ``{"lmbda": 0.5, "lora": {"r": 8}}`` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value (e.g. lmbda=0.5)")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(raw) if raw.strip() != "" else None
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def config_from_dict(data: dict[str, Any]) -> GKDConfig:
    """Build and validate a GKDConfig from a plain dict (unknown keys get a suggestion)."""
    data = dict(data)
    if "lora" in data and data["lora"] is not None:
        data["lora"] = _build(LoraConfig, data["lora"], prefix="lora.")
    return _build(GKDConfig, data)


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file '{p}' does not exist; pass an existing YAML file to --config")
    if p.is_dir():
        raise ConfigError(f"config path '{p}' is a folder; pass a YAML file to --config")
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file '{p}': {e.strerror}; check its permissions") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"cannot read config file '{p}': it is not UTF-8 text; pass a YAML file") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file '{p}' is not valid YAML{where}; fix the syntax") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{p}' must hold a mapping of key: value, got {type(data).__name__}")
    return data


def load_config(
    path: str | Path | list[str | Path] | None, overrides: list[str] | None = None, **defaults: Any
) -> GKDConfig:
    """Read YAML config file(s) (later files win), apply ``key=value`` overrides, validate."""
    paths = path if isinstance(path, list) else ([] if path is None else [path])
    data = dict(defaults)
    for p in paths:
        data = merge(data, read_yaml(p))
    data = merge(data, parse_overrides(overrides or []))
    return config_from_dict(data)
