"""GKDTrainer's TRL-shaped surface: what goes in (TRL's argument names and types) and what comes out (TrainResult).

``GKDTrainer(model=..., teacher_model=..., args=..., processing_class=..., peft_config=..., reward_funcs=...,
train_dataset=...)`` (TRL's names) and ``GKDTrainer(config, student=..., teacher=..., tokenizer=...,
train_records=..., reward_fn=...)`` (gkd's) meet in :func:`trainer_arguments`: a path or hub id sets a config key, a
model or tokenizer object is handed to :func:`gkd.build.build_run`, a ``datasets.Dataset`` becomes its records, a
``peft.LoraConfig`` becomes the config's ``lora``, a TRL-style reward function is called with TRL's keywords. A wrong
type or a clash (both names of one argument given) is a one-line :class:`gkd.errors.ConfigError` naming the
argument. ``train()`` returns a :class:`TrainResult`: transformers' ``TrainOutput`` with its metrics, as TRL scripts
read it, and gkd's fields besides.

TRL's config *keys* are :mod:`gkd.trl_compat`, which ``gkd.config`` reads keys through; this module builds
``GKDConfig`` objects and recognises gkd's ``TokenizedDataset`` (so it comes after ``gkd.config`` and ``gkd.data``;
one module for both would be an import cycle).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn
from transformers.trainer_utils import TrainOutput

from gkd.config import GKDConfig, LoraConfig, config_from_dict
from gkd.data import TokenizedDataset
from gkd.errors import ConfigError
from gkd.run import Run
from gkd.state import TrainState

__all__ = ["TrainResult", "trainer_arguments"]


def trainer_arguments(
    config: GKDConfig | dict[str, Any] | None = None,
    args: GKDConfig | dict[str, Any] | None = None,
    *,
    model: nn.Module | str | None = None,
    teacher_model: nn.Module | str | None = None,
    processing_class: Any = None,
    peft_config: Any = None,
    reward_funcs: Any = None,
    student: nn.Module | str | None = None,
    teacher: nn.Module | str | None = None,
    tokenizer: Any = None,
    train_records: list[dict] | None = None,
    eval_records: list[dict] | None = None,
    train_dataset: Any = None,
    eval_dataset: Any = None,
    reward_fn: Any = None,
) -> tuple[GKDConfig, dict[str, Any]]:
    """GKDTrainer's arguments (each explained in :class:`gkd.trainer.GKDTrainer`) as ``(config, given)``: the run's
    config, and what was given instead of a path, as :func:`gkd.build.build_run` takes it (``student``,
    ``teacher``, ``tokenizer``, ``train_records``, ``train_dataset``, ``eval_records``, ``eval_dataset``,
    ``reward_fn``; None: loaded or built from the config). The caller's config object is never changed: arguments
    that set a config key work on a copy (``dataclasses.replace``)."""
    cfg = _trainer_config(config, args)
    changes: dict[str, Any] = {}
    student, path = _model_arg(
        _one_of(model, "model", student, "student"), "model" if model is not None else "student"
    )
    if path is not None:
        changes["model_name_or_path"] = path
    teacher, path = _model_arg(
        _one_of(teacher_model, "teacher_model", teacher, "teacher"),
        "teacher_model" if teacher_model is not None else "teacher",
    )
    if path is not None:
        changes["teacher_model_name_or_path"] = path
    tokenizer, path = _tokenizer_arg(
        _one_of(processing_class, "processing_class", tokenizer, "tokenizer"),
        "processing_class" if processing_class is not None else "tokenizer",
    )
    if path is not None:
        changes["tokenizer_name_or_path"] = path
    data: dict[str, Any] = {}
    for split in ("train", "eval"):
        new, old = (train_dataset, train_records) if split == "train" else (eval_dataset, eval_records)
        name = f"{split}_dataset" if new is not None else f"{split}_records"
        data[f"{split}_records"], data[f"{split}_dataset"] = _data_arg(
            _one_of(new, f"{split}_dataset", old, f"{split}_records"), name
        )
    if peft_config is not None:
        if cfg.lora is not None:
            raise ConfigError(
                "GKDTrainer: give the LoRA settings once, as peft_config or the config key 'lora'"
            )
        changes["lora"] = _lora_arg(peft_config)
    if reward_funcs is not None:
        if reward_fn is not None:
            raise ConfigError("GKDTrainer: give 'reward_funcs' (TRL's name) or 'reward_fn', not both")
        name, reward_fn = _reward_arg(reward_funcs)
        if reward_fn is None or cfg.reward is None:
            changes["reward"] = name
    if changes:
        notes = getattr(cfg, "notes", None)  # what config_from_dict noted is not a field: carry it over
        cfg = dataclasses.replace(cfg, **changes)
        if notes is not None:
            cfg.notes = notes
    given = {"student": student, "teacher": teacher, "tokenizer": tokenizer, **data, "reward_fn": reward_fn}
    return cfg, given


class TrainResult(TrainOutput):
    """What :meth:`GKDTrainer.train` returns: transformers' ``TrainOutput`` (``global_step``, ``training_loss``, the
    mean loss of the steps this call trained, and ``metrics``: ``train_runtime``, ``train_samples_per_second``,
    ``train_steps_per_second``, ``train_loss``, ``epoch``), as TRL scripts read it, with gkd's fields besides:
    ``step``, ``final_loss`` (the last step's), ``skipped_steps``, ``output_dir``, ``wall_s`` and
    ``already_finished`` (the run was already complete, resumed at ``max_steps``: nothing was trained or saved)."""

    step: int
    final_loss: float
    skipped_steps: int
    output_dir: Path
    wall_s: float
    already_finished: bool

    def __new__(
        cls,
        step: int,
        final_loss: float,
        skipped_steps: int,
        output_dir: Path,
        wall_s: float,
        already_finished: bool = False,
        training_loss: float | None = None,
        metrics: dict[str, float] | None = None,
    ) -> TrainResult:
        self = super().__new__(
            cls, step, final_loss if training_loss is None else training_loss, metrics or {}
        )
        self.step, self.final_loss, self.skipped_steps = step, final_loss, skipped_steps
        self.output_dir, self.wall_s, self.already_finished = output_dir, wall_s, already_finished
        return self

    @classmethod
    def of_run(
        cls, run: Run, cfg: GKDConfig, st: TrainState, wall: float, trained: int, losses: list[float]
    ) -> TrainResult:
        """The result of a ``train()`` call that trained ``trained`` steps in ``wall`` seconds (``losses``: the finite
        losses of those steps), with ``metrics`` as transformers' Trainer reports them."""
        per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * run.dist.world
        training_loss = sum(losses) / len(losses) if losses else float("nan")
        metrics = {
            "train_runtime": round(wall, 4),
            "train_samples_per_second": round(trained * per_step / wall, 3) if wall > 0 else 0.0,
            "train_steps_per_second": round(trained / wall, 3) if wall > 0 else 0.0,
            "train_loss": training_loss,
            "epoch": st.step / run.plan.steps_per_epoch,
        }
        return cls(
            st.step,
            st.last_loss,
            st.skipped_steps,
            run.output_dir,
            wall,
            training_loss=training_loss,
            metrics=metrics,
        )


def _trainer_config(config: Any, args: Any) -> GKDConfig:
    """The run's config from ``config`` (gkd's positional name) or ``args`` (TRL's): a GKDConfig or a dict of keys."""
    if config is not None and args is not None:
        raise ConfigError(
            "GKDTrainer: give the config once, as GKDTrainer(config) or args= (TRL's name), not both"
        )
    given, name = (config, "config") if config is not None else (args, "args")
    if given is None:
        return GKDConfig()
    if isinstance(given, GKDConfig):
        return given
    if isinstance(given, dict):
        return config_from_dict(dict(given))
    if isinstance(given, (str, os.PathLike, nn.Module)):
        raise ConfigError(
            f"GKDTrainer: the first positional argument is the GKDConfig, got {_type_name(given)}; pass the student "
            "as model= (and the config as GKDTrainer(config) or args=)"
        )
    raise ConfigError(
        f"GKDTrainer: argument '{name}' must be a gkd.GKDConfig (or a dict of its keys), got {_type_name(given)}; "
        "build gkd.GKDConfig(...) with the same keys (TRL's names are accepted in a dict)"
    )


def _type_name(value: Any) -> str:
    cls = type(value)
    return cls.__name__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def _one_of(new: Any, new_name: str, old: Any, old_name: str) -> Any:
    """The value of an argument that has a TRL name and a gkd name: at most one of them may be given."""
    if new is not None and old is not None:
        raise ConfigError(f"GKDTrainer: give '{new_name}' (TRL's name) or '{old_name}', not both")
    return new if new is not None else old


def _model_arg(value: Any, name: str) -> tuple[nn.Module | None, str | None]:
    """``model`` / ``teacher_model``: a model object, or a path / hub id string (-> the config's path)."""
    if value is None or isinstance(value, nn.Module):
        return value, None
    if isinstance(value, (str, os.PathLike)):
        return None, os.fspath(value)
    raise ConfigError(
        f"GKDTrainer: argument '{name}' must be a transformers model or a model path / hub id (str), "
        f"got {_type_name(value)}"
    )


def _tokenizer_arg(value: Any, name: str) -> tuple[Any, str | None]:
    """``processing_class`` / ``tokenizer``: a tokenizer (a processor's own tokenizer), or a path / hub id."""
    if value is None:
        return None, None
    if isinstance(value, (str, os.PathLike)):
        return None, os.fspath(value)
    if not callable(getattr(value, "encode", None)) and callable(
        getattr(getattr(value, "tokenizer", None), "encode", None)
    ):
        value = value.tokenizer  # a processor (ProcessorMixin): text models use its tokenizer
    if not callable(getattr(value, "encode", None)):
        raise ConfigError(
            f"GKDTrainer: argument '{name}' must be a tokenizer (e.g. AutoTokenizer.from_pretrained(...)) or its "
            f"path / hub id, got {_type_name(value)}"
        )
    return value, None


def _data_arg(value: Any, name: str) -> tuple[list[dict] | None, TokenizedDataset | None]:
    """``train_dataset`` / ``eval_dataset``: (records, tokenized dataset). A ``datasets.Dataset`` (or
    ``IterableDataset``, read to the end) becomes its rows, a list of dicts is the records, a gkd
    :class:`TokenizedDataset` is used as is. ``datasets`` is never imported: its objects are recognised by shape."""
    if value is None:
        return None, None
    if isinstance(value, TokenizedDataset):
        return None, value
    kind = type(value).__name__
    if kind in ("DatasetDict", "IterableDatasetDict") or (
        isinstance(getattr(value, "column_names", None), dict) and callable(getattr(value, "keys", None))
    ):
        splits = ", ".join(str(k) for k in value)
        first = next(iter(value.keys()), "train")
        raise ConfigError(
            f"GKDTrainer: argument '{name}' is a datasets.{kind} with splits {splits}; pass one split, e.g. "
            f"{name}=dataset[{first!r}]"
        )
    if hasattr(value, "column_names") and (
        callable(getattr(value, "to_list", None)) or hasattr(value, "__iter__")
    ):
        rows = value.to_list() if callable(getattr(value, "to_list", None)) else list(value)
        # Arrow fills a column a row does not have with None: drop those, so a row is the record it was written as
        return [{k: v for k, v in dict(row).items() if v is not None} for row in rows], None
    if isinstance(value, (list, tuple)):
        for i, row in enumerate(value):
            if not isinstance(row, dict):
                raise ConfigError(
                    f"GKDTrainer: argument '{name}' must hold records (dicts such as {{'prompt': ..., "
                    f"'completion': ...}}), but item {i} is a {_type_name(row)}"
                )
        return list(value), None
    raise ConfigError(
        f"GKDTrainer: argument '{name}' must be a datasets.Dataset, a list of records (dicts) or a gkd "
        f"TokenizedDataset, got {_type_name(value)}"
    )


# peft LoraConfig fields gkd reads (r, lora_alpha, lora_dropout, target_modules, task_type) or that carry no training
# choice (metadata; fan_in_fan_out is set per layer by peft itself); any other field must keep peft's default
_PEFT_READ = {"r", "lora_alpha", "lora_dropout", "target_modules", "task_type"}
_PEFT_METADATA = {
    "peft_type",
    "auto_mapping",
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "megatron_core",
    "fan_in_fan_out",
}
_PEFT_TASKS = ("CAUSAL_LM", "SEQ_2_SEQ_LM")


def _lora_arg(value: Any) -> Any:
    """``peft_config`` as gkd's ``lora`` setting: a ``peft.LoraConfig`` translated (r, lora_alpha, lora_dropout,
    target_modules; None = peft's default modules for the architecture), or gkd's own LoraConfig / dict."""
    if isinstance(value, (LoraConfig, dict)):
        return value
    peft_type = getattr(getattr(value, "peft_type", None), "value", getattr(value, "peft_type", None))
    if peft_type is None or not dataclasses.is_dataclass(value):
        raise ConfigError(
            f"GKDTrainer: argument 'peft_config' must be a peft.LoraConfig, got {_type_name(value)}"
        )
    if peft_type != "LORA":
        raise ConfigError(
            f"GKDTrainer: argument 'peft_config' is a {type(value).__name__} ({peft_type}); gkd trains LoRA "
            "adapters only: pass a peft.LoraConfig"
        )
    task = getattr(value.task_type, "value", value.task_type)
    if task is not None and task not in _PEFT_TASKS:
        raise ConfigError(
            f"GKDTrainer: peft_config task_type {task} is not a language-model task; use CAUSAL_LM or "
            "SEQ_2_SEQ_LM (or leave it unset)"
        )
    default = type(value)()
    unsupported = [
        f"{f.name}={getattr(value, f.name)!r}"
        for f in dataclasses.fields(value)
        if f.name not in _PEFT_READ | _PEFT_METADATA and getattr(value, f.name) != getattr(default, f.name)
    ]
    if unsupported:
        raise ConfigError(
            f"GKDTrainer: peft_config sets {', '.join(unsupported)}, which gkd cannot honour (it trains plain LoRA "
            "adapters from r, lora_alpha, lora_dropout and target_modules); remove them"
        )
    modules = value.target_modules
    if isinstance(modules, (set, frozenset, tuple, list)):
        modules = sorted(modules)
    return LoraConfig(r=value.r, alpha=value.lora_alpha, dropout=value.lora_dropout, target_modules=modules)


def _reward_arg(value: Any) -> tuple[str | None, Any]:
    """``reward_funcs`` (TRL's name): (the config's ``reward`` name, a reward function or None). One reward: a
    built-in name / ``module:function``, or a callable, alone or as a one-item list."""
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise ConfigError(
                f"GKDTrainer: argument 'reward_funcs' holds {len(value)} rewards; gkd takes one (combine them into "
                "one function)"
            )
        value = value[0]
    if isinstance(value, str):
        return value, None
    if callable(value):
        fn = _as_gkd_reward(value)
        name = getattr(value, "__qualname__", None) or type(value).__qualname__
        return f"{getattr(value, '__module__', None) or 'python'}:{name}", fn
    raise ConfigError(
        "GKDTrainer: argument 'reward_funcs' must be a reward function, a built-in reward name or "
        f"module:function, got {_type_name(value)}"
    )


def _as_gkd_reward(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with gkd's reward signature ``(prompts, completions, records)``. A TRL-style reward that takes keyword
    arguments (``prompts=``, ``completions=`` and one list per dataset column, e.g. ``def f(completions,
    **kwargs)``) is called that way; prompts and completions are text."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return fn
    try:
        sig.bind(None, None, None)
        return fn  # gkd's signature
    except TypeError:
        pass
    params = sig.parameters
    any_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())

    def reward(prompts: list[str], completions: list[str], records: list[dict]) -> Any:
        columns = dict.fromkeys(k for r in records for k in r if k not in ("prompt", "completion"))
        kwargs = {k: [r.get(k) for r in records] for k in columns}
        kwargs.update(prompts=prompts, completions=completions)
        if not any_keyword:
            kwargs = {k: v for k, v in kwargs.items() if k in params}
        return fn(**kwargs)

    reward.__name__ = reward.__qualname__ = getattr(fn, "__name__", "reward")
    return reward
