"""GKDTrainer: the training loop around :func:`gkd.step.gkd_step` (Algorithm 1 of the GKD paper, in ``step.py``).

One trainer, many methods (see the presets in ``configs/presets``):

    SFT              divergence: nll, lmbda: 0                 supervised KD    divergence: forward_kl, lmbda: 0
    SeqKD            divergence: nll, lmbda: 0, seq_kd: true   ImitKD           divergence: forward_kl, lmbda: 0.5
    f-distill        divergence: tvd, lmbda: 0.5               on-policy GKD    lmbda: 1 (any divergence)
    RL + GKD         lmbda: 1, alpha < 1, reward: ...          (add kl_to_initial for the RLEF* baseline)

The trainer owns only the loop: logging, evaluation and checkpoint cadence (``run.plan``, see
:func:`gkd.config.training_plan`), the best evaluation (``metric_for_best_model``), the final model in ``output_dir``
(:meth:`GKDTrainer.save_model`, uploaded with ``push_to_hub``), the non-finite policy and signals. The components it
drives are built by :func:`gkd.build.build_run` (``trainer.run`` after :meth:`setup`); the step is
:func:`gkd.step.gkd_step`; checkpoints and resume are :mod:`gkd.state`.

``load_best_model_at_end``: a checkpoint is saved at every evaluation (whatever ``save_steps`` says; transformers
instead refuses save and eval cadences that do not line up), the best one by ``metric_for_best_model`` is never
removed by ``save_total_limit``, and at the end its weights are loaded back into the student, which is then saved as
the final model. The last checkpoint (``checkpoint-<last step>``) still holds the last state, for resuming.

Not supported / untested here (2 CPU cores, no GPU): CUDA and mixed precision have never run; FSDP and DeepSpeed
through ``accelerate config`` are documented but only CPU DDP (gloo, 2 processes) is tested; vLLM rollouts are
import-guarded and untested. Model families off the fast sampler (anything but Llama, Mistral, Qwen2/3, GPT-2,
plain LoRA on them included; DoRA; dropout on) sample with ``model.generate``; seq2seq students and heads with a logit transform
(softcapping) score from full logits instead of the chunked fused path.
"""

from __future__ import annotations

import contextlib
import glob
import inspect
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn
from transformers.trainer_utils import TrainOutput

from gkd import checkpoint as ckpt
from gkd import state as run_state
from gkd.build import Run, build_run
from gkd.config import GKDConfig
from gkd.data import TokenizedDataset
from gkd.errors import ConfigError, GKDError, TrainingError, TrainingInterrupted
from gkd.evaluation import evaluate, flatten
from gkd.models import save_merged
from gkd.reporting import Progress, Tracker, banner, format_record, log_record
from gkd.sampling import Sampler
from gkd.state import TrainState
from gkd.step import gkd_step

__all__ = ["GKDTrainer", "TrainResult", "TrainingInterrupted"]


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


# --- the TRL-shaped arguments of GKDTrainer, turned into gkd's (config changes and objects) ---------------------


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
        from gkd.config import config_from_dict

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
    import dataclasses

    from gkd.config import LoraConfig

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


class GKDTrainer:
    """Distil ``teacher`` into ``student`` with the GKD objective of ``config``.

    Two ways to call it, mixable::

        GKDTrainer(GKDConfig(model_name_or_path=..., teacher_model_name_or_path=..., dataset=...)).train()
        GKDTrainer(model=..., teacher_model=..., args=GKDConfig(...), train_dataset=hf_dataset,   # TRL's names
                   processing_class=tokenizer, peft_config=peft.LoraConfig(r=16)).train()

    Models, tokenizer and data are loaded from the paths in ``config`` unless given here:

    * ``config`` / ``args`` (TRL's name; give one): a :class:`GKDConfig`, or a dict of its keys (TRL's key names are
      accepted there, see :func:`gkd.config.config_from_dict`). Neither: ``GKDConfig()``. The caller's config object
      is never changed: arguments that set a config key work on a copy (``dataclasses.replace``).
    * ``model`` / ``student``, ``teacher_model`` / ``teacher``: a transformers model object, or a local path / hub
      id string (it sets ``model_name_or_path`` / ``teacher_model_name_or_path``).
    * ``processing_class`` / ``tokenizer``: the tokenizer (a processor's tokenizer is used), or its path (sets
      ``tokenizer_name_or_path``).
    * ``train_dataset`` / ``eval_dataset``: a ``datasets.Dataset`` (its rows are the records; a ``DatasetDict``
      needs one split chosen), a list of records (dicts in any of gkd's formats: prompt/completion, ``messages``,
      conversational, prompt-only), or a tokenized :class:`gkd.data.TokenizedDataset`. ``train_records`` /
      ``eval_records`` are the older names for lists of records.
    * ``peft_config``: a ``peft.LoraConfig`` (r, lora_alpha, lora_dropout, target_modules; None = peft's default
      modules for the architecture) trains a LoRA adapter, as the config key ``lora`` does (give one of them).
      Settings gkd cannot honour (``use_dora``, ``modules_to_save``, a non-LM ``task_type``, ...) are an error.
    * ``reward_funcs`` / ``reward_fn``: one reward (RL + GKD, ``lmbda: 1``): a built-in name or ``module:function``
      (sets ``reward``), or a function ``(prompts, completions, records) -> floats`` (TRL-style functions taking
      keywords, ``completions=``, ``prompts=`` and one list per dataset column, work too). A function is named
      ``module:qualname`` in the config's ``reward`` unless the config names it; as the config checks ``alpha < 1``
      against ``reward`` when it is built, a run that optimises the reward (``alpha < 1``) names it there.
    * ``sampler``: any :class:`gkd.sampling.Sampler`, e.g. to plug in a rollout backend; ``log``: where the
      console lines go (stderr by default).

    A wrong type or a clash (both names of one argument given) is a one-line :class:`gkd.errors.ConfigError` naming
    the argument.
    """

    def __init__(
        self,
        config: GKDConfig | dict[str, Any] | None = None,
        *,
        args: GKDConfig | dict[str, Any] | None = None,
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
        sampler: Sampler | None = None,
        log: Any = None,
    ) -> None:
        import dataclasses

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
        self.cfg = cfg
        self._given = {
            "student": student,
            "teacher": teacher,
            "tokenizer": tokenizer,
            **data,
            "reward_fn": reward_fn,
            "sampler": sampler,
        }
        self._log_fn = log
        self.run: Run | None = None
        self.state = TrainState()
        """The loop's counters: ``state.global_step`` and ``state.log_history`` as in transformers' Trainer."""

    def log(self, msg: str) -> None:
        """A console line (banner, warnings, steps, evaluations): stderr, or the ``log`` callable given."""
        main = self.run.dist.is_main if self.run is not None else int(os.environ.get("RANK", "0")) == 0
        if not main:  # one console for a multi-process run (before setup ends, the launcher's RANK says)
            return
        if self._log_fn is not None:
            self._log_fn(msg)
        else:
            print(msg, file=sys.stderr, flush=True)

    def setup(self) -> Run:
        """Check the inputs, load models and data, build the components, resume. Idempotent."""
        if self.run is None:
            run = build_run(self.cfg, **self._given, log=self.log)
            self._best = _BestMetric.of(self.cfg, run)
            self.tracker = Tracker(
                run.output_dir,
                self.cfg.report_to,
                enabled=run.dist.is_main,
                config=run_state.public_config(self.cfg),
                accelerator=run.accelerator,
                project_name=self.cfg.run_name or run.output_dir.resolve().name,
                log=self.log,
            )
            if run.resume_dir is not None:
                self.state = run_state.restore(run, run.resume_dir)
                self.log(f"resumed from {run.resume_dir} at step {self.state.step}")
            self.run = run
        return self.run

    # the components, for Python users and tests
    @property
    def student(self) -> nn.Module:
        return self.setup().student

    @property
    def model(self) -> nn.Module:
        """The student being trained (transformers' / TRL's ``trainer.model``; a peft model for LoRA runs)."""
        return self.setup().student

    @property
    def args(self) -> GKDConfig:
        """The run's config (TRL's ``trainer.args``)."""
        return self.cfg

    @property
    def processing_class(self) -> Any:
        """The run's tokenizer (TRL's ``trainer.processing_class``; ``trainer.tokenizer`` is the older name)."""
        return self.setup().tokenizer

    @property
    def tokenizer(self) -> Any:
        return self.processing_class

    @property
    def teacher(self) -> Any:
        return self.setup().teacher

    @property
    def stream(self) -> Any:
        return self.setup().stream

    @property
    def optimizer(self) -> Any:
        return self.setup().optimizer

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def skipped_steps(self) -> int:
        return self.state.skipped_steps

    # ------------------------------------------------------------------------------------------------------------
    def train_step(self) -> dict[str, Any]:
        """One optimizer step; returns its log record (diagnostics included on logging steps)."""
        run, st = self.setup(), self.state
        t0 = time.perf_counter()
        # logging_steps 0: never (logging_strategy: no); else every that many steps, and the first one
        every = run.plan.logging_steps
        logging_step = every > 0 and ((st.step + 1) % every == 0 or st.step == 0)
        raw = gkd_step(run, st.step, log_stats=logging_step)
        st.step += 1
        if raw["nonfinite"]:
            st.skipped_steps += 1
            st.nonfinite_in_a_row += 1
        else:
            st.nonfinite_in_a_row = 0
        st.last_loss = raw["loss"]
        record = log_record(raw, run.scheduler.get_last_lr()[0], time.perf_counter() - t0, st.skipped_steps)
        record["logged"] = logging_step
        return record

    def train(self) -> TrainResult:
        """Run for the plan's ``max_steps`` (``max_steps``, or ``num_train_epochs`` passes over the data); log,
        evaluate and checkpoint on the plan's cadence. At the end: the final checkpoint, the final model in
        ``output_dir`` (:meth:`save_model`; the best evaluated one with ``load_best_model_at_end``), a last
        evaluation, and the upload with ``push_to_hub``. Ctrl-C / SIGTERM save a checkpoint and stop."""
        run, cfg, st = self.setup(), self.cfg, self.state
        plan = run.plan
        t_begin = time.perf_counter()
        if st.step >= plan.max_steps:
            length, knob = (
                (f"max_steps={plan.max_steps}", "max_steps")
                if cfg.max_steps > 0
                else (
                    f"num_train_epochs={cfg.num_train_epochs:g}: {plan.max_steps} steps",
                    "num_train_epochs",
                )
            )
            self.log(
                f"nothing to do: the run is already at step {st.step} ({length}); raise {knob} to train further"
            )
            return TrainResult(
                st.step,
                st.last_loss,
                st.skipped_steps,
                run.output_dir,
                0.0,
                already_finished=True,
                metrics={"train_runtime": 0.0, "epoch": st.step / plan.steps_per_epoch},
            )
        if cfg.push_to_hub:
            self._hub_repo(before_training=True)  # the token and the repo, before hours of training
        self.log(banner(run))
        progress = Progress(plan.max_steps, st.step, show_bar=cfg.progress and run.dist.is_main, log=self.log)
        interrupted = _catch_signals(run.dist.is_main)
        first_step, losses = st.step, []
        try:
            while st.step < plan.max_steps:
                record = self.train_step()
                if not record.get("nonfinite") and math.isfinite(record["loss"]):
                    losses.append(record["loss"])
                progress.update(st.step, record)
                if record.pop("logged"):
                    self.tracker.log(record)
                    st.log_history.append(self._history(record))
                    progress.print(format_record(record))
                if record.get("nonfinite"):
                    self._skipped(record["nonfinite"])
                if st.step < plan.max_steps:  # the last step's evaluation and checkpoint come below
                    self._evaluate_and_save_on_cadence()
                if interrupted.flag:
                    raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            progress.close()
            if self._checkpoints:
                saved = f"checkpoint saved to {self.save()}. Resume with resume_from_checkpoint=latest"
            else:
                saved = "no checkpoint written (save_strategy: no), so the run cannot be resumed"
            if isinstance(
                e, GKDError
            ):  # e.g. the served teacher stopped answering: an error (exit 2), not Ctrl-C
                raise TrainingError(f"{e}; stopped at step {st.step}; {saved}") from None
            raise TrainingInterrupted(f"interrupted at step {st.step}; {saved}") from None
        finally:
            progress.close()
            interrupted.restore()
        evaluated = False
        if plan.evaluate and self._best is not None:  # the last evaluation may be the best: before the save
            self._evaluate_and_track()
            evaluated = True
        if self._checkpoints:
            self.save()
        if cfg.load_best_model_at_end:
            self._load_best()
        if cfg.lora is not None and cfg.lora.save_merged and run.dist.is_main:
            self.log(
                f"LoRA adapter merged into the base model: {save_merged(run.student, run.tokenizer, run.output_dir / 'merged')}"
            )
        final = self.save_model()
        if plan.evaluate and not evaluated:
            self.evaluate()
        self.tracker.close()
        wall = time.perf_counter() - t_begin
        self.log(
            f"done: {st.step} steps in {wall:.1f}s, final loss {st.last_loss:.4f}; model saved to {final}"
        )
        if cfg.push_to_hub:
            self.push_to_hub()
        steps = st.step - first_step
        per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * run.dist.world
        training_loss = sum(losses) / len(losses) if losses else float("nan")
        metrics = {
            "train_runtime": round(wall, 4),
            "train_samples_per_second": round(steps * per_step / wall, 3) if wall > 0 else 0.0,
            "train_steps_per_second": round(steps / wall, 3) if wall > 0 else 0.0,
            "train_loss": training_loss,
            "epoch": st.step / plan.steps_per_epoch,
        }
        st.log_history.append({**metrics, "step": st.step})
        return TrainResult(
            st.step,
            st.last_loss,
            st.skipped_steps,
            run.output_dir,
            wall,
            training_loss=training_loss,
            metrics=metrics,
        )

    def _history(self, record: dict[str, Any]) -> dict[str, Any]:
        """A logged step's record as a ``log_history`` entry: transformers' names (``learning_rate``, ``epoch``)
        first, then gkd's own diagnostics."""
        out = {"loss": record["loss"], "grad_norm": record.get("grad_norm"), "learning_rate": record["lr"]}
        out.update({k: v for k, v in record.items() if k not in ("lr", "step")})
        out.update(epoch=self.state.step / self.setup().plan.steps_per_epoch, step=record["step"])
        return out

    @property
    def _checkpoints(self) -> bool:
        """Does the run write ``checkpoint-N`` folders? Not with ``save_strategy: no`` (transformers' meaning: none at
        all; the final model is still saved in ``output_dir``)."""
        return self.cfg.save_strategy != "no"

    def _evaluate_and_save_on_cadence(self) -> None:
        """After a step before the last: evaluate every ``eval_steps``; checkpoint every ``save_steps``, at every
        evaluation with ``load_best_model_at_end``, and when the metric improved with ``save_strategy: best``."""
        plan, st = self.setup().plan, self.state
        evaluated = improved = False
        if plan.eval_steps and st.step % plan.eval_steps == 0:
            improved = self._evaluate_and_track()
            evaluated = True
        if self._checkpoints and (
            (plan.save_steps and st.step % plan.save_steps == 0)
            or (evaluated and self.cfg.load_best_model_at_end)
            or (improved and plan.save_best)
        ):
            self.save()

    def _skipped(self, what: str) -> None:
        """A step was skipped (non-finite): warn; after ``max_consecutive_nonfinite`` in a row, save and stop."""
        st = self.state
        self.log(f"warning: step {st.step} skipped: non-finite {what}")
        if st.nonfinite_in_a_row >= self.cfg.max_consecutive_nonfinite:
            where = (
                f"checkpoint {self.save()}" if self._checkpoints else "no checkpoint: save_strategy is 'no'"
            )
            raise TrainingError(
                f"{st.nonfinite_in_a_row} consecutive steps had a non-finite {what}; stopped at step {st.step} "
                f"({where}). Lower learning_rate or check the data"
            )

    # ------------------------------------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Score the student on the eval split, decoding greedily and by sampling at ``temperature``."""
        run, cfg = self.setup(), self.cfg
        if run.eval_data is None or not run.dist.is_main:
            return {}
        scores = evaluate(
            run.sampling_model,
            run.tokenizer,
            run.eval_data,
            cfg.eval_metric or "exact_match",
            max_new_tokens=cfg.max_new_tokens,
            sampled={"sample": cfg.temperature},
            seeds=(cfg.seed,),
            batch_size=cfg.eval_batch_size,
            sampler=run.sampler,
            tokenize=cfg.eval_tokenize,
        )
        out: dict[str, float] = {"step": self.state.step, **flatten(scores, prefix="eval/")}
        self.tracker.log(out)
        named = {"eval_" + name: out[key] for key, name in zip(out, _user_names(list(out))) if key != "step"}
        self.state.log_history.append(
            {**named, "epoch": self.state.step / run.plan.steps_per_epoch, "step": self.state.step}
        )
        self.log("eval: " + ", ".join(f"{k}={v:.2f}" for k, v in out.items() if k != "step"))
        return out

    def _evaluate_and_track(self) -> bool:
        """:meth:`evaluate`, noting a new best ``metric_for_best_model`` in the state; True (on every process) when
        this evaluation is the best so far."""
        out = self.evaluate()
        best, st, run = self._best, self.state, self.setup()
        if best is None:
            return False
        improved = False
        if run.dist.is_main:
            value = best.value(out)
            if best.better(value, st.best_metric):
                st.best_metric = value
                improved = True
        improved = run.dist.broadcast_flag(improved)
        if improved:
            st.best_step = st.step
        return improved

    def _load_best(self) -> None:
        """``load_best_model_at_end``: the best checkpoint's weights into the student (before the final model is
        saved); one line naming the step and the value."""
        run, st, best = self.setup(), self.state, self._best
        what = (
            f"{best.name}={st.best_metric:.4g}" if best is not None and st.best_metric is not None else "best"
        )
        if st.best_checkpoint is None or st.best_step is None:
            self.log(
                "warning: load_best_model_at_end: no evaluation was saved as a checkpoint; the final model is the "
                "last one"
            )
            return
        if st.best_step == st.step:
            self.log(f"best model: the last one, step {st.step} ({what})")
            return
        folder = run.output_dir / st.best_checkpoint
        if not ckpt.is_complete(folder):
            self.log(
                f"warning: load_best_model_at_end: the best checkpoint '{folder}' is gone; the final model is the "
                "last one"
            )
            return
        run.accelerator.wait_for_everyone()
        ckpt.load_model_weights(run.student, folder)
        self.log(f"best model: step {st.best_step} ({what}), loaded from {folder}")

    def save(self) -> Path | None:
        """Write ``checkpoint-STEP`` atomically (main process only); returns its path."""
        return run_state.save(self.setup(), self.state)

    def save_model(self, output_dir: str | os.PathLike | None = None) -> Path:
        """Save the student as it is now (its LoRA adapter for LoRA runs; with ``merge_lora`` the adapter merged into
        plain weights) and the tokenizer in ``output_dir`` (default: the run's), as TRL's ``trainer.save_model``: the
        folder loads with ``AutoModelForCausalLM.from_pretrained`` / ``PeftModel.from_pretrained`` and
        ``AutoTokenizer.from_pretrained``. Written atomically by the main process (its files are listed in
        ``final_model.json``); checkpoints are untouched. ``train()`` calls it at the end."""
        run, st, cfg = self.setup(), self.state, self.cfg
        out = run.output_dir if output_dir is None else Path(os.path.expanduser(os.fspath(output_dir)))
        weights = "merged" if cfg.merge_lora and cfg.lora is not None else "adapter" if cfg.lora else "full"
        info: dict[str, Any] = {"step": st.step, "weights": weights}
        if cfg.load_best_model_at_end and st.best_checkpoint is not None:
            info.update(
                best_checkpoint=st.best_checkpoint,
                best_global_step=st.best_step,
                metric_for_best_model=self._best.name if self._best is not None else None,
                best_metric=st.best_metric,
            )
        run.accelerator.wait_for_everyone()
        if run.dist.is_main:
            ckpt.save_final_model(
                out, model=run.student, tokenizer=run.tokenizer, merged=cfg.merge_lora, info=info
            )
        run.accelerator.wait_for_everyone()
        return out

    def _hub_repo(self, before_training: bool = False) -> str | None:
        """Create (or find) the hub repo ``hub_model_id`` (main process only); returns its id. Called before training
        with ``push_to_hub``, so a missing token, no network or no permission stops the run at once."""
        import huggingface_hub

        run, cfg = self.setup(), self.cfg
        if not run.dist.is_main:
            return None
        repo_id = cfg.hub_model_id or run.output_dir.resolve().name
        if not before_training:
            url = huggingface_hub.HfApi().create_repo(
                repo_id, private=cfg.hub_private_repo, exist_ok=True, token=cfg.hub_token
            )
            return getattr(url, "repo_id", None) or repo_id
        try:
            url = huggingface_hub.HfApi().create_repo(
                repo_id, private=cfg.hub_private_repo, exist_ok=True, token=cfg.hub_token
            )
        except Exception as e:  # no token, no network, no permission
            reason = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
            raise GKDError(
                f"push_to_hub: the hub repo '{repo_id}' cannot be created or reached ({type(e).__name__}"
                f"{': ' + reason if reason else ''}); log in (hf auth login, HF_TOKEN or hub_token), check the "
                "network, or set push_to_hub: false. Nothing was trained"
            ) from e
        repo_id = getattr(url, "repo_id", None) or repo_id
        self._created_repo = (cfg.hub_model_id, repo_id)
        return repo_id

    def push_to_hub(self) -> str | None:
        """Upload the final model and tokenizer of ``output_dir`` (the files :meth:`save_model` wrote, not the
        checkpoints) to the hub repo ``hub_model_id`` (default: the output folder's name), created if needed
        (private with ``hub_private_repo``; token ``hub_token``, else the stored login). Main process only; returns
        the repo id there. A failure (no token, no network) raises a one-line error; the model stays saved."""
        import huggingface_hub

        run, cfg = self.setup(), self.cfg
        if not run.dist.is_main:
            return None
        repo_id = cfg.hub_model_id or run.output_dir.resolve().name
        files = ckpt.final_model_files(run.output_dir)
        if not files:
            raise GKDError(
                f"push_to_hub: '{run.output_dir}' holds no final model yet; call save_model() first"
            )
        try:
            api = huggingface_hub.HfApi()
            created = getattr(self, "_created_repo", None)  # made before training, for this hub_model_id
            repo_id = created[1] if created and created[0] == cfg.hub_model_id else self._hub_repo()
            api.upload_folder(
                repo_id=repo_id,
                folder_path=str(run.output_dir),
                allow_patterns=[glob.escape(f) for f in files],
                commit_message=f"gkd: final model (step {self.state.step})",
                token=cfg.hub_token,
            )
        except Exception as e:  # no token, no network, no permission: the local model is what matters
            reason = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
            raise GKDError(
                f"push_to_hub: uploading to '{repo_id}' failed ({type(e).__name__}{': ' + reason if reason else ''}); "
                f"the final model is saved in '{run.output_dir}'"
            ) from e
        self.log(f"pushed the final model to the hub: {repo_id}")
        return repo_id


class _BestMetric:
    """Which evaluation value picks the best model (``metric_for_best_model``) and which way is better."""

    def __init__(self, key: str | None, name: str, greater: bool) -> None:
        self.key = key
        """The evaluation record's key (``eval/greedy/exact_match``); None: the first greedy metric, taken at the
        first evaluation."""
        self.name = name
        self.greater = greater

    @staticmethod
    def record_key(name: str) -> str:
        """``metric_for_best_model`` as an evaluation key. With or without transformers' ``eval_`` prefix (or
        ``eval/``) and the decoding mode: ``exact_match``, ``eval_exact_match``, ``greedy/exact_match`` and
        ``eval/greedy/exact_match`` are all ``eval/greedy/exact_match``; ``sample/exact_match`` is the sampled
        score."""
        for prefix in ("eval/", "eval_"):
            if name.startswith(prefix):
                name = name[len(prefix) :]
                break
        return f"eval/{name}" if "/" in name else f"eval/greedy/{name}"

    @classmethod
    def of(cls, cfg: GKDConfig, run: Run) -> _BestMetric | None:
        """None when no best is tracked (none of load_best_model_at_end, save_strategy: best, metric_for_best_model;
        or no evaluations); a ConfigError for a metric the evaluation does not produce."""
        if not (cfg.load_best_model_at_end or run.plan.save_best or cfg.metric_for_best_model is not None):
            return None
        if not run.plan.evaluate:
            if cfg.load_best_model_at_end or run.plan.save_best:
                key = "load_best_model_at_end" if cfg.load_best_model_at_end else "save_strategy: best"
                raise ConfigError(
                    f"config key '{key}' needs evaluations: give an eval dataset (eval_dataset) and leave "
                    "eval_strategy on (steps or epoch)"
                )
            return None
        known = _evaluation_keys(cfg, run)
        key = cls.record_key(cfg.metric_for_best_model) if cfg.metric_for_best_model else None
        if key is not None and key.rsplit("/", 1)[-1] == "loss":
            example = _user_names(known)[0] if known else "exact_match"
            raise ConfigError(
                f"config key 'metric_for_best_model: {cfg.metric_for_best_model}': gkd evaluates generated "
                f"completions with eval_metric and computes no eval loss; name a metric, e.g. {example}"
            )
        if key is not None and known is not None and key not in known:
            raise ConfigError(
                f"config key 'metric_for_best_model: {cfg.metric_for_best_model}' is not a value of the evaluation "
                f"(eval_metric: {cfg.eval_metric or 'exact_match'}); use one of {', '.join(_user_names(known))}"
            )
        if key is None and known:
            key = known[0]
        name = key[len("eval/") :] if key else "eval_metric"
        greater = cfg.greater_is_better
        if greater is None:  # transformers: lower is better for a loss, higher for anything else
            greater = "loss" not in (cfg.metric_for_best_model or name)
        return cls(key, name, greater)

    def value(self, out: dict[str, float]) -> float:
        """The metric's value in an evaluation record."""
        if self.key is None:
            self.key = next((k for k in out if k.startswith("eval/greedy/")), None)
            if self.key is not None:
                self.name = self.key[len("eval/") :]
        if self.key not in out:
            raise TrainingError(
                f"metric_for_best_model: the evaluation has no '{self.name}'; it has "
                f"{', '.join(_user_names([k for k in out if k.startswith('eval/')]))}"
            )
        return float(out[self.key])

    def better(self, value: float, best: float | None) -> bool:
        if not math.isfinite(value):
            return False
        return best is None or (value > best if self.greater else value < best)


def _evaluation_keys(cfg: GKDConfig, run: Run) -> list[str] | None:
    """The keys of the trainer's evaluation record (``eval/<mode>/<metric>``, greedy first), from scoring one
    record; None when that cannot be told before the first evaluation."""
    from gkd.scoring import resolve_scorer

    try:
        score = resolve_scorer(cfg.eval_metric or "exact_match")
        record = run.eval_data.examples[0].record  # type: ignore[union-attr]
        names = list(score([record], [""]))
    except Exception:
        return None
    return [f"eval/{mode}/{n}" for mode in ("greedy", "sample") for n in names]


def _user_names(keys: list[str]) -> list[str]:
    """``eval/greedy/x`` -> ``x``, ``eval/sample/x`` -> ``sample/x``: as metric_for_best_model names them."""
    return [k.removeprefix("eval/").removeprefix("greedy/") for k in keys]


class _catch_signals:
    """SIGTERM and the first Ctrl-C only raise a flag: the current step finishes, then a checkpoint is saved (an
    exception raised at an arbitrary point inside library code is not a safe place to save from). A second Ctrl-C
    interrupts at once."""

    def __init__(self, install: bool) -> None:
        self.flag = False
        self._previous: dict[int, Any] = {}
        if not install:
            return
        for sig in (signal.SIGINT, getattr(signal, "SIGTERM", None)):
            if sig is not None:
                with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                    self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.flag = True
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
