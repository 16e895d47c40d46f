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
import inspect
import math
import os
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from gkd.divergences import DIVERGENCES, validate_divergence_params
from gkd.errors import ConfigError

__all__ = [
    "GKDConfig",
    "LoraConfig",
    "Plan",
    "load_config",
    "parse_overrides",
    "parse_value",
    "resolve_config_path",
    "training_plan",
    "trl_keys",
]


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with the number and null spellings people actually write.

    PyYAML implements YAML 1.1, where ``no`` / ``yes`` / ``on`` / ``off`` are booleans (here, as in YAML 1.2 and
    HfArgumentParser, they are strings, which a bool key reads as bools), and where ``1e-5`` (no dot), ``1E-5``, ``inf`` and ``nan`` are *strings* and only
    ``1.0e-5`` / ``.inf`` are floats; every other trainer (and YAML 1.2, and Python) reads them as numbers. ``None``
    (Python's spelling) is read as null like ``null`` and ``~``. ``none`` stays a string (``teacher_cache: none``).
    """


_Loader.yaml_implicit_resolvers = {
    k: [(tag, regexp) for tag, regexp in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
# YAML 1.2's booleans only (HfArgumentParser / TrlParser read ``no``, ``yes``, ``on``, ``off`` as the strings they are:
# ``save_strategy: no``); a bool key takes those words as bools (``_coerce``)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_FLOAT_RE = re.compile(
    r"""^[-+]?(?:
        (?:[0-9][0-9_]*)?\.?[0-9_]*[eE][-+]?[0-9]+    # 1e-5, 2E-4, 1.5e3, .5e-3
      | [0-9][0-9_]*\.[0-9_]*                        # 1. 1.5
      | \.[0-9][0-9_]*                               # .5
      | \.?(?:inf|Inf|INF)                           # inf .inf
      | \.?(?:nan|NaN|NAN)                           # nan .nan
    )$""",
    re.X,
)
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RE, list("-+0123456789.iInN"))
_Loader.add_implicit_resolver("tag:yaml.org,2002:null", re.compile(r"^None$"), ["N"])


def _construct_float(loader: yaml.SafeLoader, node: yaml.Node) -> float:
    text = str(loader.construct_scalar(node)).replace("_", "").lower().lstrip("+")
    if text.lstrip("-").lstrip(".") in ("inf", "nan"):
        sign = -1.0 if text.startswith("-") else 1.0
        return sign * float(text.lstrip("-").lstrip("."))
    return float(text)


_Loader.add_constructor("tag:yaml.org,2002:float", _construct_float)


def parse_value(text: str) -> Any:
    """A command-line or YAML scalar as gkd reads it: ``1e-5`` -> 1e-05, ``None`` -> None, ``[a, b]`` -> list."""
    return yaml.load(text, Loader=_Loader)  # _Loader is a SafeLoader


@dataclass
class LoraConfig:
    """LoRA settings for the student (peft). Only the adapters are trained; the base weights stay frozen."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] | str | None = "all-linear"
    """Module names (or ``all-linear``) that get adapters; null: peft's default for the architecture (TRL's
    ``lora_target_modules`` default)."""
    save_merged: bool = False
    """At the end of the run also write ``output_dir/merged``: the adapter merged into the base model, a plain
    model folder that any tool loads (gkd's own eval/generate/teacher loading also reads adapter checkpoints)."""


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
    teacher_url: str | None = None
    """A served teacher instead of ``teacher_model_name_or_path``: the base URL of a vLLM OpenAI-compatible server
    (``vllm serve TEACHER``) or of ``gkd serve-teacher``, e.g. ``http://127.0.0.1:8000``. The loss then runs on the
    served support: the actual token, the teacher's top ``teacher_topk`` and a tail bucket."""
    teacher_topk: int = 20
    """Teacher log-probs per position fetched from ``teacher_url`` (vLLM's ``prompt_logprobs``)."""
    teacher_student_topk: int = 0
    """With ``gkd serve-teacher`` only: also fetch the teacher's log-probs at the student's top-k tokens of each
    position (much more accurate reverse KL / JSD on the served support)."""
    teacher_api_key: str | None = None
    """API key sent to ``teacher_url`` (default: the ``GKD_TEACHER_API_KEY`` or ``OPENAI_API_KEY`` variable)."""
    teacher_timeout: float = 120.0
    """Seconds to wait for one teacher request before retrying."""
    teacher_max_retries: int = 3
    """Retries (with back-off) of a failed teacher request before the run saves a checkpoint and stops."""
    teacher_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """The teacher only runs forward passes, so a lower precision is usually fine. ``auto``: bfloat16 on a CUDA GPU
    that supports it, float32 elsewhere (the CPU)."""
    student_dtype: Literal["float32", "bfloat16", "auto"] = "float32"
    """The dtype the student's weights are loaded and trained in (``dtype`` / ``torch_dtype``, TRL's names, set it
    too). ``auto``: the checkpoint's stored dtype. For mixed precision keep float32 and set ``bf16``/``fp16``."""
    bf16: bool = False
    """Mixed precision (TRL's key): forward passes under bfloat16 autocast, float32 master weights and optimizer
    (through accelerate). Works on CPU too."""
    fp16: bool = False
    """Mixed precision with float16 autocast and dynamic loss scaling (CUDA only)."""
    gradient_checkpointing: bool = False
    """Recompute the student's activations in backward instead of storing them (less memory, ~30% more compute).
    Rollouts still decode with a KV cache (they sample in eval mode)."""
    attn_implementation: str | None = None
    """Passed to ``from_pretrained`` for student and teacher: ``eager``, ``sdpa``, ``flash_attention_2``, ..."""
    lora: LoraConfig | None = None
    """Train a LoRA adapter on the student instead of all its weights, e.g. ``lora: {r: 16}``."""
    disable_dropout: bool = True
    """Turn student dropout off (the teacher always runs in eval mode)."""
    merge_lora: bool = False
    """With LoRA: the final model saved in ``output_dir`` is the adapter merged into the base model (plain weights
    any tool loads) instead of the adapter alone."""
    trust_remote_code: bool = False
    """Passed to ``from_pretrained`` (models and tokenizer): run model code shipped with a checkpoint."""
    model_revision: str | None = None
    """Branch, tag or commit of the student on the hub (``from_pretrained(revision=...)``)."""
    teacher_model_revision: str | None = None
    """Branch, tag or commit of the teacher on the hub."""
    model_init_kwargs: dict[str, Any] | None = None
    """Extra keyword arguments for the student's ``from_pretrained`` (TRL's key)."""
    teacher_model_init_kwargs: dict[str, Any] | None = None
    """Extra keyword arguments for the teacher's ``from_pretrained`` (TRL's key)."""

    # --- data -------------------------------------------------------------------------------------------------
    dataset: str | None = None
    """A JSONL/JSON file, a local folder (saved dataset or data files), or a ``datasets`` hub name."""
    dataset_split: str = "train"
    dataset_config_name: str | None = None
    eval_dataset: str | None = None
    eval_split: str = "validation"
    dataset_num_proc: int | None = None
    """Processes that tokenise the dataset (``datasets.map(num_proc=...)``, cached); default: one."""
    dataset_streaming: bool = False
    """Read a hub or local dataset as a stream (``datasets`` streaming; on-policy runs with prompt-only data)."""
    skip_bad_lines: bool = False
    """Skip JSONL lines that are not valid JSON (counted and reported) instead of stopping."""
    max_prompt_length: int = 512
    """Longer prompts are truncated from the left (counted and reported)."""
    max_completion_length: int | None = None
    """TRL's DistillationConfig name for the completion length: the student generates at most this many tokens and
    longer dataset completions are truncated to it. Same as ``max_new_tokens`` (give one, or both equal)."""
    apply_chat_template: bool = False
    """Also wrap plain-string prompts in the tokenizer's chat template (as one user turn, with the generation
    prompt). Conversational records (``messages``, or ``prompt`` as a list of messages) always use it."""
    chat_template_path: str | None = None
    """A Jinja chat template file (or a tokenizer folder whose template to use) for the student's tokenizer."""
    dataset_adapter: str | None = None
    """Read ``dataset`` through a built-in adapter of a public benchmark's field layout: gsm8k, xsum or wmt14
    (``gkd.tasks.adapters``); the records get prompt, completion and references."""

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
    vllm_gpu_memory_utilization: float = 0.3
    """With ``rollout_backend: vllm``: the GPU memory fraction of the student's colocated vLLM engine (TRL's key)."""

    # --- RL + GKD ---------------------------------------------------------------------------------------------
    alpha: float = 1.0
    """Weight of the distillation term: maximise (1-α)·E[r] - α·D. α = 1 is pure distillation."""
    reward: str | None = None
    """A built-in reward name or ``module:function`` (prompts, completions, records) -> list of floats."""
    num_generations: int = 1
    """Completions per prompt (TRL's meaning): each per-device batch of ``per_device_train_batch_size`` sequences
    holds ``per_device_train_batch_size / num_generations`` prompts, each sampled this many times (RL advantages are
    computed within each prompt's group)."""
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
    max_steps: int | None = None
    """Optimizer steps of the run. -1: ``num_train_epochs`` passes over the training data (as in transformers).
    Unset: ``num_train_epochs`` when that is set, else 1000 steps."""
    num_train_epochs: float | None = None
    """Passes over the training data (fractions allowed), used unless ``max_steps`` > 0; 3 when ``max_steps: -1``
    and unset (transformers' default)."""
    warmup_steps: int | float = 0
    """Warm-up steps of the learning-rate schedule (a value below 1 is a fraction of the run, as in transformers)."""
    warmup_ratio: float = 0.0
    """Warm-up as a fraction of the run (used when ``warmup_steps`` is 0)."""
    lr_scheduler_type: str = "linear"
    """Any schedule of ``transformers.get_scheduler``: linear, cosine, cosine_with_restarts, polynomial, constant,
    constant_with_warmup, inverse_sqrt, reduce_lr_on_plateau, cosine_with_min_lr, cosine_warmup_with_min_lr,
    warmup_stable_decay, greedy (``constant`` ignores warm-up, as in transformers)."""
    lr_scheduler_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra arguments of the schedule, e.g. ``{num_cycles: 2}`` or ``{min_lr_rate: 0.1}``."""
    min_lr_ratio: float = 0.0
    """Cosine decays to ``learning_rate * min_lr_ratio`` (transformers' ``cosine_with_min_lr``)."""
    optim: str = "adamw_torch"
    """The optimizer: AdamW (``adamw_torch`` / ``adamw_torch_fused``, the same fused kernel where possible)."""
    max_grad_norm: float = 1.0
    """Gradient clipping (0 disables)."""
    seed: int = 42
    max_consecutive_nonfinite: int = 10
    """Non-finite steps are skipped; after this many in a row the run stops with a checkpoint."""

    # --- performance ------------------------------------------------------------------------------------------
    num_threads: int | None = None
    """torch intra-op threads (default: torch's choice)."""
    fsdp: bool = False
    """Shard the student with FSDP2 over the processes of a ``torchrun`` / ``accelerate launch`` run (TRL's
    ``fsdp: full_shard``); see docs/config.md, Distributed training."""
    loss_chunk_size: int | None = None
    """Positions per chunk of the fused loss (default: about 8M logits per chunk)."""
    teacher_cache: Literal["none", "topk"] = "none"
    """``topk``: store the teacher's top-k log-probs + tail for the fixed dataset once, instead of rerunning it."""
    teacher_cache_topk: int = 64

    # --- output, logging, evaluation --------------------------------------------------------------------------
    output_dir: str = "runs/gkd"
    overwrite_output_dir: bool = False
    """Start a fresh run in an ``output_dir`` that already holds one (its checkpoints and metrics.jsonl are removed).
    Without it such a run is refused unless ``resume_from_checkpoint`` is set."""
    logging_steps: int | float = 10
    """Log every this many steps (a value below 1 is a fraction of the run, as in transformers)."""
    logging_strategy: Literal["steps", "epoch", "no"] = "steps"
    save_steps: int | float = 500
    """Checkpoint every this many steps (0: only at the end; below 1: a fraction of the run)."""
    save_strategy: Literal["steps", "epoch", "best", "no"] | None = None
    """``steps``: every ``save_steps``; ``epoch``: after every epoch; ``best``: when ``metric_for_best_model``
    improves; ``no``: no checkpoints at all (no ``checkpoint-N`` folder, not even at the end or on Ctrl-C: the run
    cannot be resumed), as in transformers. Unset: ``steps``. The final model is saved in ``output_dir`` either
    way."""
    save_total_limit: int | None = 2
    """Checkpoints kept (oldest removed first; the best one is never removed with ``load_best_model_at_end``)."""
    eval_steps: int | float = 0
    """Evaluate every this many steps (0: only at the end, if an eval dataset is set; below 1: a fraction)."""
    eval_strategy: Literal["no", "steps", "epoch"] | None = None
    """``steps``: every ``eval_steps`` (default: ``logging_steps``, as in transformers); ``epoch``: after every
    epoch; ``no``: never. Unset: every ``eval_steps`` if set, and at the end when there is eval data."""
    load_best_model_at_end: bool = False
    """Checkpoint at every evaluation, keep the best by ``metric_for_best_model``, and save that model as the final
    one."""
    metric_for_best_model: str | None = None
    """The evaluation value that picks the best checkpoint (default: the eval metric's greedy score; gkd's
    evaluation generates, so there is no eval loss)."""
    greater_is_better: bool | None = None
    """Whether a larger ``metric_for_best_model`` is better (default: false for names containing ``loss``)."""
    eval_metric: str | None = None
    """A metric name from ``gkd.metrics`` or a built-in task name (its headline metric)."""
    eval_max_samples: int = 256
    eval_batch_size: int = 64
    eval_tokenize: Literal["standard", "whitespace"] = "standard"
    """How ``eval_metric: bleu`` / ``rouge*`` tokenise text: ``standard`` = sacrebleu's 13a and rouge-score's
    default tokenizer (real text); ``whitespace`` = split on spaces (the built-in tasks' token text, which their
    task metrics use regardless)."""
    report_to: list[str] = field(default_factory=list)
    """Trackers, through accelerate: tensorboard, wandb, trackio, mlflow, comet_ml, aim, clearml, dvclive, swanlab
    (a name or a list; ``all``: every installed one; ``none``: none). Local tracker files go to
    ``output_dir/tensorboard/<run_name>``; metrics.jsonl is always written."""
    run_name: str | None = None
    """The run's name in the trackers (default: the output folder's name)."""
    resume_from_checkpoint: str | bool | None = None
    """A ``checkpoint-STEP`` folder, or ``latest`` (or ``true``) for the newest complete one in ``output_dir``."""
    push_to_hub: bool = False
    """At the end, upload the final model and tokenizer to the hub repo ``hub_model_id`` (huggingface_hub)."""
    hub_model_id: str | None = None
    """``user/name`` of the hub repo (default: the output folder's name under your account)."""
    hub_private_repo: bool | None = None
    hub_token: str | None = None
    """Token for the upload (default: the one ``huggingface-cli login`` stored, or ``HF_TOKEN``)."""
    progress: bool = True

    # ----------------------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            self.lora = _build(LoraConfig, self.lora, prefix="lora.")
        hints = _hints(GKDConfig)
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(getattr(self, f.name), hints[f.name]))
        if self.max_steps is None:  # TRL's command lines give num_train_epochs alone
            self.max_steps = -1 if self.num_train_epochs is not None else _DEFAULT_MAX_STEPS
        if self.num_train_epochs is None:
            self.num_train_epochs = 3.0
        if self.resume_from_checkpoint is True:  # TRL: true = the newest checkpoint in output_dir
            self.resume_from_checkpoint = "latest"
        elif self.resume_from_checkpoint is False:
            self.resume_from_checkpoint = None
        if self.max_completion_length is not None and self.max_new_tokens != self.max_completion_length:
            if self.max_new_tokens != _DEFAULT_MAX_NEW_TOKENS:
                raise ConfigError(
                    f"config keys 'max_new_tokens' ({self.max_new_tokens}) and 'max_completion_length' "
                    f"({self.max_completion_length}) both set the completion length; give one of them"
                )
            self.max_new_tokens = self.max_completion_length  # TRL's DistillationConfig name
        if self.divergence == "jsd" and self.beta in (0, 1) and not self.jsd_normalize:
            # TRL's generalized JSD at the ends of [0, 1]: exactly forward KL (β = 0) or reverse KL (β = 1)
            self.divergence = "forward_kl" if self.beta == 0 else "reverse_kl"
        validate(self)

    @property
    def effective_max_completion_length(self) -> int:
        return self.max_completion_length or self.max_new_tokens

    @property
    def prompts_per_batch(self) -> int:
        """Prompts in a per-device micro-batch: ``per_device_train_batch_size`` counts sequences (TRL's meaning)."""
        return self.per_device_train_batch_size // self.num_generations

    @property
    def off_policy_possible(self) -> bool:
        """Can any step take a fixed dataset batch? (λ < 1 at some step of the λ schedule.)"""
        if self.lmbda < 1.0:
            return True
        return self.lmbda_schedule == "linear" and self.lmbda_warmup_steps > 0 and self.lmbda_start < 1.0

    @property
    def needs_targets(self) -> bool:
        """Do off-policy batches need dataset completions? (No when the teacher writes them: SeqKD.)"""
        return self.off_policy_possible and not self.seq_kd

    @property
    def needs_teacher(self) -> bool:
        distill = self.divergence != "nll" and self.alpha > 0
        return distill or (self.seq_kd and self.off_policy_possible) or self.teacher_cache == "topk"

    def warnings(self) -> list[str]:
        """Settings that are valid but probably not what the user meant (printed when a run starts)."""
        out = list(getattr(self, "notes", []))
        if self.top_k > 0 or self.top_p < 1.0:
            out.append(
                "top_k/top_p truncate the student's sampling distribution, so rollouts are no longer exactly "
                "on-policy samples of the student"
            )
        if self.teacher_cache == "topk" and self.divergence in (
            "reverse_kl",
            "skew_reverse_kl",
            "jsd",
            "tvd",
        ):
            rkl_like = self.divergence in ("reverse_kl", "skew_reverse_kl") or (
                self.divergence == "jsd" and self.beta > 0.5
            )
            if rkl_like:
                out.append(
                    f"teacher_cache: topk with divergence {self.divergence} is approximate: the student's mass "
                    "outside the teacher's top-k is lumped into one tail bucket (measured relative error 0.27 for "
                    "reverse KL at k=8); prefer forward-KL-like divergences with the cache, or a larger "
                    "teacher_cache_topk"
                )
        if self.student_dtype == "bfloat16":
            out.append(bf16_weights_warning("student_dtype: bfloat16", self.learning_rate))
        if (
            self.divergence == "nll"
            and self.teacher_model_name_or_path is not None
            and not self.needs_teacher
        ):
            out.append("teacher_model_name_or_path is ignored: divergence nll trains on the dataset alone")
        if self.teacher_kl_estimator == "sampled":
            out.append(
                "teacher_kl_estimator: sampled logs a surrogate loss (its gradient is the reverse KL's); its value "
                "can be negative and is not the divergence: read reverse_kl in the logs instead"
            )
        return out

    def divergence_params(self) -> dict[str, Any]:
        """Parameters of the training divergence (without temperature, which the loss passes itself), read from the
        config keys its registry entry names (``gkd.divergences.DIVERGENCES[name].config_keys``)."""
        spec = DIVERGENCES.get(self.divergence)
        if spec is None:
            return {}
        return {param: getattr(self, key) for param, key in spec.config_keys.items()}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def bf16_weights_warning(what: str, learning_rate: float, fix: str = "use student_dtype: float32") -> str:
    """The warning for a student trained in bf16 weights (``student_dtype: bfloat16``, or a bf16 model object)."""
    lost = learning_rate * 2**9  # |w| above this: an update of ~lr is below half a bf16 spacing
    return (
        f"{what} trains the bf16 weights directly (no float32 master copy): an update of about "
        f"learning_rate={learning_rate:g} is rounded away for every weight with |w| > {lost:.2g} (bf16 keeps 8 "
        f"significant bits), e.g. all RMSNorm/LayerNorm gains near 1; {fix} unless the learning rate is large"
    )


_dataclass_init = GKDConfig.__init__


def _gkd_config_init(self: GKDConfig, *args: Any, **kwargs: Any) -> None:
    """``GKDConfig(**keys)`` takes every key the command line and YAML take, with the same meaning: gkd's keys,
    TRL's names of them (``dataset_name``, ``torch_dtype``, ``use_peft`` + ``lora_r``, ...), TRL keys gkd ignores
    (named in a warning when they ask for something gkd does not do) and the same one-line error, with the closest
    key, for an unknown one (a :class:`gkd.errors.ConfigError`, not Python's ``TypeError``)."""
    names = [f.name for f in dataclasses.fields(GKDConfig)]
    if len(args) > len(names):
        raise ConfigError(f"GKDConfig takes keyword arguments (config keys), got {len(args)} positional ones")
    for name, value in zip(names, args, strict=False):
        if name in kwargs:
            raise ConfigError(f"GKDConfig: config key '{name}' given twice (positionally and by name)")
        kwargs[name] = value
    data, notes = _from_trl(kwargs)
    _check_known(GKDConfig, data)
    self.notes = notes
    _dataclass_init(self, **data)


_gkd_config_init.__signature__ = inspect.signature(_dataclass_init)  # type: ignore[attr-defined]
_gkd_config_init.__wrapped__ = _dataclass_init  # type: ignore[attr-defined]
GKDConfig.__init__ = _gkd_config_init  # type: ignore[method-assign]


@dataclass(frozen=True)
class Plan:
    """The run's step counts, resolved from the config and the size of the training data (TRL's epoch and ratio
    semantics): every cadence is a whole number of optimizer steps, 0 meaning "never" (save/eval: only at the end)."""

    max_steps: int
    steps_per_epoch: int
    warmup_steps: int
    logging_steps: int
    save_steps: int
    eval_steps: int
    evaluate: bool
    """Evaluate at all (on the cadence and at the end)? False with ``eval_strategy: no`` or without eval data."""
    save_best: bool
    """Checkpoint when ``metric_for_best_model`` improves (``save_strategy: best``)."""

    @property
    def epochs(self) -> float:
        return self.max_steps / self.steps_per_epoch


def training_plan(
    cfg: GKDConfig, train_examples: int, world_size: int = 1, has_eval_data: bool = False
) -> Plan:
    """Resolve ``max_steps: -1`` + ``num_train_epochs``, fractional ``*_steps`` / ``warmup_ratio`` and the
    ``*_strategy`` keys into step counts, as transformers' Trainer does. An epoch is one pass over the training
    prompts: ``per_device_train_batch_size / num_generations`` prompts x ``gradient_accumulation_steps`` x processes
    per optimizer step."""
    per_step = cfg.prompts_per_batch * cfg.gradient_accumulation_steps * world_size
    steps_per_epoch = max(1, math.ceil(train_examples / per_step))
    if cfg.max_steps > 0:
        max_steps = cfg.max_steps
    else:
        max_steps = max(1, math.ceil(cfg.num_train_epochs * steps_per_epoch))

    def steps(value: float) -> int:
        return math.ceil(value * max_steps) if 0 < value < 1 else int(value)

    warmup = steps(cfg.warmup_steps) if cfg.warmup_steps else math.ceil(cfg.warmup_ratio * max_steps)
    logging = {"steps": steps(cfg.logging_steps), "epoch": steps_per_epoch, "no": 0}[cfg.logging_strategy]
    save = {"steps": steps(cfg.save_steps), "epoch": steps_per_epoch, "no": 0, "best": 0}[
        cfg.save_strategy or "steps"
    ]
    evaluate = has_eval_data and cfg.eval_strategy != "no"
    eval_every = steps(cfg.eval_steps)
    if cfg.eval_strategy == "steps" and not eval_every:
        eval_every = steps(cfg.logging_steps)  # transformers: eval_steps defaults to logging_steps
    elif cfg.eval_strategy == "epoch":
        eval_every = steps_per_epoch
    return Plan(
        max_steps=max_steps,
        steps_per_epoch=steps_per_epoch,
        warmup_steps=warmup,
        logging_steps=logging,
        save_steps=save,
        eval_steps=eval_every if evaluate else 0,
        evaluate=evaluate,
        save_best=cfg.save_strategy == "best",
    )


_DEFAULT_MAX_NEW_TOKENS = 128
_DEFAULT_MAX_STEPS = 1000
assert GKDConfig.max_new_tokens == _DEFAULT_MAX_NEW_TOKENS

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


# Names users often type for a key (from transformers' TrainingArguments, peft, other trainers), tried before any
# spelling match: "lr" is learning_rate, not the closest spelling "lora". Keys inside ``lora`` are looked up with their
# ``lora.`` prefix. (TRL's own names are not here: they are accepted, see TRL_KEYS.)
_ALIASES = {
    "lr": "learning_rate",
    "lambda": "lmbda",
    "lam": "lmbda",
    "batch_size": "per_device_train_batch_size",
    "train_batch_size": "per_device_train_batch_size",
    "steps": "max_steps",
    "num_steps": "max_steps",
    "epochs": "num_train_epochs",
    "num_epochs": "num_train_epochs",
    "model": "model_name_or_path",
    "student": "model_name_or_path",
    "student_model_name_or_path": "model_name_or_path",
    "teacher": "teacher_model_name_or_path",
    "teacher_model": "teacher_model_name_or_path",
    "loss": "divergence",
    "max_completion_tokens": "max_completion_length",
    "gradient_clip": "max_grad_norm",
    "dataset_path": "dataset",
    "train_dataset": "dataset",
    "test_dataset": "eval_dataset",
    "validation_dataset": "eval_dataset",
    "lora_rank": "lora_r",
    "lora.rank": "lora.r",
    "lora.lora_r": "lora.r",
    "lora.lora_alpha": "lora.alpha",
    "lora.lora_dropout": "lora.dropout",
    "lora.modules": "lora.target_modules",
}

# Keys of other trainers that gkd cannot honour: one line that says so and what to do instead.
_FOREIGN = {
    "max_length": "gkd limits prompts and completions separately: set max_prompt_length and max_new_tokens",
    "logging_dir": "metrics go to output_dir/metrics.jsonl (and the report_to trackers)",
    "load_in_4bit": "quantized (bitsandbytes) students are not supported yet; load in bf16 (dtype: bfloat16)",
    "load_in_8bit": "quantized (bitsandbytes) students are not supported yet; load in bf16 (dtype: bfloat16)",
    "use_dora": "DoRA adapters are not supported yet; use plain LoRA (use_peft: true)",
    "lora_modules_to_save": "not supported yet; LoRA trains the adapters only",
}

# Other trainers' names for a gkd key, accepted as that key with the same meaning.
_SYNONYMS = {
    "dtype": "student_dtype",  # TRL's ModelConfig: the dtype the trained model is loaded in
    "torch_dtype": "student_dtype",
    "dataset_name": "dataset",  # TRL's ScriptArguments
    "dataset_config": "dataset_config_name",
    "dataset_train_split": "dataset_split",
    "dataset_test_split": "eval_split",
    "per_device_eval_batch_size": "eval_batch_size",
    "evaluation_strategy": "eval_strategy",  # transformers' old name
    "disable_tqdm": "progress",  # negated below
}

# TRL / TrainingArguments keys gkd accepts and ignores (named in a warning when they ask for something gkd does not
# do), with the value that needs no warning (gkd already behaves that way) and why.
_IGNORED: dict[str, tuple[tuple[Any, ...], str]] = {
    "logging_first_step": ((False,), "gkd logs step 1 anyway"),
    "logging_nan_inf_filter": ((True, False), "non-finite steps are skipped and reported"),
    "save_safetensors": ((True,), "checkpoints are always safetensors"),
    "save_only_model": ((False, True), "checkpoints always hold what an exact resume needs"),
    "remove_unused_columns": ((True, False), "records keep every field (rewards and metrics may read them)"),
    "dataloader_num_workers": ((0,), "batches are built in the main process"),
    "dataloader_pin_memory": ((True, False), "batches are small index tensors"),
    "dataset_text_field": (("text",), "gkd trains on prompt/completion or messages records"),
    "dataset_kwargs": ((None,), "not used"),
    "packing": ((False,), "gkd does not pack sequences"),
    "completion_only_loss": ((None, True), "the loss is always over completion tokens only"),
    "assistant_only_loss": ((False,), "the loss is over the completion (the last assistant turn)"),
    "tf32": ((None,), "set torch.backends.cuda.matmul.allow_tf32 yourself"),
    "use_liger_kernel": ((False,), "gkd's fused chunked loss already avoids [positions, vocab] logits"),
    "torch_compile": ((False,), "not used"),
    "gradient_checkpointing_kwargs": ((None,), "gkd checkpoints with the model's defaults"),
    "eval_on_start": ((False,), "evaluation runs on the eval_strategy cadence and at the end"),
    "eval_accumulation_steps": ((None,), "evaluation is generation-based"),
    "ddp_find_unused_parameters": ((None, False), "every trained parameter is used"),
    "ddp_timeout": ((1800,), "accelerate's default is used"),
    "hub_strategy": (("every_save", "end"), "the final model is pushed at the end"),
    "log_level": (("passive", "info", "warning"), "console lines are gkd's own"),
    "log_completions": ((False,), "evaluations write their generations to output_dir"),
    "do_train": ((True, False), "gkd distill always trains"),
    "do_eval": ((True, False), "evaluation follows eval_strategy / eval_dataset"),
    "use_vllm": ((False,), "set rollout_backend: vllm for vLLM rollouts"),
    "lora_task_type": (("CAUSAL_LM", "SEQ_2_SEQ_LM"), "the task type follows the student's architecture"),
    "use_rslora": ((False,), "not used"),
}

# TRL's ModelConfig LoRA keys -> gkd's ``lora`` mapping (used when ``use_peft: true``, ignored otherwise, as in TRL)
_PEFT_KEYS = {
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "lora_target_modules": "target_modules",
}
# TRL ModelConfig's defaults for them (peft picks the target modules of the architecture when None)
_PEFT_DEFAULTS = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": None}


def _from_trl(data: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """TRL / transformers keys in ``data`` turned into gkd keys with the same meaning; returns the new dict and the
    warnings to print (keys accepted but ignored)."""
    out = dict(data)
    notes: list[str] = []
    for alias, key in _SYNONYMS.items():
        if alias in out:
            if key in out:
                raise ConfigError(f"config keys '{alias}' and '{key}' set the same thing; give only '{key}'")
            value = out.pop(alias)
            if alias == "disable_tqdm" and as_bool(value) is not None:
                value = not as_bool(value)
            out[key] = value
    # the dtype inside TRL's model_init_kwargs / teacher_model_init_kwargs is gkd's student_dtype / teacher_dtype
    for kwargs_key, dtype_key in (
        ("model_init_kwargs", "student_dtype"),
        ("teacher_model_init_kwargs", "teacher_dtype"),
    ):
        kwargs = out.get(kwargs_key)
        if isinstance(kwargs, dict) and ({"dtype", "torch_dtype"} & set(kwargs)):
            kwargs = dict(kwargs)
            value = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None)
            kwargs.pop("torch_dtype", None)
            if dtype_key in out and out[dtype_key] != value:
                raise ConfigError(
                    f"config keys '{kwargs_key}.dtype' ({value}) and '{dtype_key}' ({out[dtype_key]}) disagree; give one"
                )
            out[dtype_key], out[kwargs_key] = value, kwargs
    # deepspeed / fsdp: never a silent single-process run
    if out.get("deepspeed"):
        import importlib.util

        have = importlib.util.find_spec("deepspeed") is not None
        why = (
            "it is not supported yet"
            if have
            else "DeepSpeed is not installed here, and gkd does not support it yet"
        )
        raise ConfigError(
            f"config key 'deepspeed': {why}; train with accelerate's DDP (accelerate launch) or drop the key"
        )
    out.pop("deepspeed", None)
    # fsdp: TRL's "full_shard [auto_wrap]" (or a list of them, or gkd's true/false) -> FSDP2 (gkd.fsdp)
    fsdp = out.pop("fsdp", None)
    if out.pop("fsdp_config", None):  # gkd wraps every decoder layer and the root itself
        notes.append(
            "config key 'fsdp_config' is ignored: gkd shards every decoder layer and the model's root itself"
        )
    if isinstance(fsdp, str) and (fsdp.strip() == "" or as_bool(fsdp) is not None):
        fsdp = bool(as_bool(fsdp))  # TrainingArguments' default "" (and yes/no): not sharded
    if isinstance(fsdp, str | list | tuple):
        options = fsdp.split() if isinstance(fsdp, str) else [str(o) for o in fsdp]
        other = [o for o in options if o not in ("full_shard", "auto_wrap")]
        if other:
            raise ConfigError(
                f"config key 'fsdp: {fsdp}': gkd shards fully with FSDP2 (full_shard, auto_wrap); "
                f"{' '.join(other)} is not supported; use 'fsdp: full_shard' or drop the key"
            )
        fsdp = "full_shard" in options
    if fsdp is not None:
        out["fsdp"] = fsdp
    # LoRA the TRL way: use_peft switches it on, lora_* set it
    raw_peft = out.pop("use_peft", False)
    use_peft = False if raw_peft is None else as_bool(raw_peft)
    if use_peft is None:
        raise ConfigError("config key 'use_peft' must be true or false (TRL's flag that turns LoRA on)")
    given = [k for k in out if k in _PEFT_KEYS]
    peft = {_PEFT_KEYS[k]: out.pop(k) for k in given}
    if use_peft:
        lora = out.get("lora") if isinstance(out.get("lora"), dict) else {}
        out["lora"] = {**_PEFT_DEFAULTS, **lora, **peft}
    elif peft:
        names = ", ".join(f"'{k}'" for k in given)
        notes.append(
            f"config key{'s' if len(given) > 1 else ''} {names} {'are' if len(given) > 1 else 'is'} ignored: LoRA is "
            "off (as in TRL, set use_peft: true to train a LoRA adapter)"
        )
    # TRL's example script evaluates on the dataset's test split whenever eval_strategy is not "no"
    if out.get("eval_strategy") in ("steps", "epoch") and not out.get("eval_dataset") and out.get("dataset"):
        if os.path.isfile(os.path.expanduser(str(out["dataset"]))):
            raise ConfigError(
                f"config key 'eval_strategy: {out['eval_strategy']}' evaluates on the dataset's test split (as TRL's "
                f"script), but dataset '{out['dataset']}' is a single file with one split; set eval_dataset (e.g. a "
                "test.jsonl file) or eval_strategy: no"
            )
        out["eval_dataset"] = out["dataset"]
        out.setdefault("eval_split", "test")
    mode = out.pop("vllm_mode", None)
    if mode not in (None, "colocate"):
        raise ConfigError(
            f"config key 'vllm_mode: {mode}': gkd's vLLM rollouts (rollout_backend: vllm) run colocated in the "
            "training process; a vLLM server is not supported: set vllm_mode: colocate or drop the key"
        )
    for key in [k for k in out if k in _IGNORED]:
        value = out.pop(key)
        quiet, why = _IGNORED[key]
        if any(isinstance(q, bool) for q in quiet) and as_bool(value) is not None:
            value = as_bool(value)  # read as HfArgumentParser reads a flag: --packing no
        if value not in quiet:
            notes.append(f"config key '{key}: {value}' is ignored: {why}")
    return out, notes


def trl_keys() -> dict[str, str]:
    """TRL / transformers key -> what gkd does with it (one line; ``gkd distill --help`` lists them)."""
    out = {alias: f"same as {key}" for alias, key in _SYNONYMS.items()}
    out["disable_tqdm"] = "the opposite of progress"
    out["use_peft"] = "train a LoRA adapter (with lora_r, lora_alpha, lora_dropout, lora_target_modules)"
    for key, name in _PEFT_KEYS.items():
        out[key] = f"lora.{name} when use_peft is true (TRL default {_PEFT_DEFAULTS[name]!r})"
    out["deepspeed"] = "not supported yet (an error)"
    out["fsdp"] = "full_shard [auto_wrap]: shard the student with FSDP2 (other options: an error)"
    out["fsdp_config"] = "accepted and ignored: gkd shards every decoder layer and the model's root itself"
    out["vllm_mode"] = "colocate: what rollout_backend: vllm does (server: an error)"
    for key, (_quiet, why) in _IGNORED.items():
        out[key] = f"accepted and ignored: {why}"
    for key, why in _FOREIGN.items():
        out[key] = f"refused: {why}"
    return out


def _unknown_key(key: str, valid: list[str], prefix: str = "") -> ConfigError:
    full = f"{prefix}{key}"
    if full in _FOREIGN:
        return ConfigError(f"unknown config key '{full}': {_FOREIGN[full]}")
    alias = _ALIASES.get(full)
    if alias is not None:
        return ConfigError(f"unknown config key '{full}'; did you mean '{alias}'?")
    if not prefix:
        valid = [*valid, *(k for k in trl_keys() if k not in _FOREIGN)]
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.7)
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else "; valid keys are listed in docs/config.md"
    return ConfigError(f"unknown config key '{full}'{hint}")


def _coerce(value: Any, annotation: Any) -> Any:
    """``value`` as people write it, converted to what ``annotation`` expects where the intent is unambiguous.

    ``"1e-5"`` (a string from Python or an old YAML reader) -> 1e-05 for a float key; ``2.0`` or ``1e3`` -> an int for
    an int key; a single name -> a one-element list for a list key (``report_to: tensorboard``), ``none``/null -> [];
    null -> ``"none"`` for a choice key that has that value. Anything else is returned unchanged (and then checked).
    """
    if _type_ok(value, annotation):
        return value
    args = (
        typing.get_args(annotation)
        if typing.get_origin(annotation) in (typing.Union, types.UnionType)
        else ()
    )
    options = args or (annotation,)
    if value is None:
        for opt in options:
            if typing.get_origin(opt) is list:
                return []
            if typing.get_origin(opt) is Literal and "none" in typing.get_args(opt):
                return "none"
        return value
    if bool in options and not _accepts_text(options):
        word = as_bool(value)  # HfArgumentParser's string_to_bool: yes/no, true/false, on/off, y/n, t/f, 1/0
        if word is not None:
            return word
    if isinstance(value, bool) and bool not in options and _accepts_text(options):
        return (
            "true" if value else "false"
        )  # a text key: the word as written (YAML reads true/false as bools)
    if isinstance(value, str) and (float in options or int in options):
        try:
            parsed = parse_value(value)
        except yaml.YAMLError:
            parsed = value
        if isinstance(parsed, (int, float)) and not isinstance(parsed, bool):
            value = parsed
    if (
        isinstance(value, float)
        and int in options
        and float not in options
        and math.isfinite(value)
        and value.is_integer()
    ):
        return int(value)
    for opt in options:
        if typing.get_origin(opt) is list and isinstance(value, str):
            return [] if value.lower() == "none" else [value]
    return value


_TRUE = ("yes", "true", "t", "y", "1", "on")
_FALSE = ("no", "false", "f", "n", "0", "off")


def as_bool(value: Any) -> bool | None:
    """``value`` read as a bool the way HfArgumentParser's ``string_to_bool`` reads a flag (``yes``/``no``,
    ``true``/``false``, ``on``/``off``, ``y``/``n``, ``t``/``f``, ``1``/``0``, any case); None if it is not one."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
    return None


def _accepts_text(options: tuple[Any, ...]) -> bool:
    """Does a key of these type options take a string (``str``, or a choice of strings)?"""
    for opt in options:
        if opt is str:
            return True
        if typing.get_origin(opt) is Literal and any(isinstance(a, str) for a in typing.get_args(opt)):
            return True
    return False


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.')}' must be a mapping, got {type(data).__name__}")
    hints = _hints(cls)
    data = dict(data)
    _check_known(cls, data, prefix)
    for key, value in data.items():
        data[key] = value = _coerce(value, hints[key])
        if dataclasses.is_dataclass(_dataclass_of(hints[key])) and isinstance(value, dict):
            continue  # built (and checked) by the dataclass's own __post_init__ / _build
        if not _type_ok(value, hints[key]):
            raise ConfigError(
                f"config key '{prefix}{key}' must be {_describe(hints[key])}, got {value!r} ({type(value).__name__})"
            )
    return cls(**data)


def _check_known(cls: type, data: dict[str, Any], prefix: str = "") -> None:
    """Every key of ``data`` a field of ``cls``, else one error naming all unknown ones, each with a suggestion."""
    hints = _hints(cls)
    unknown = [_unknown_key(str(k), list(hints), prefix) for k in data if k not in hints]
    if len(unknown) == 1:
        raise unknown[0]
    if unknown:  # all of them at once: a migrated config is fixed in one go, not one key per run
        parts = [str(e).removeprefix("unknown config key ") for e in unknown]
        raise ConfigError(f"{len(unknown)} unknown config keys: " + " | ".join(parts))


def _dataclass_of(annotation: Any) -> Any:
    for opt in typing.get_args(annotation) or (annotation,):
        if isinstance(opt, type) and dataclasses.is_dataclass(opt):
            return opt
    return None


# Float keys where infinity means something (no clipping).
_INF_OK = ("max_grad_norm",)
REPORT_TO = ("tensorboard", "wandb", "trackio", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab")
# transformers.SchedulerType's values (tests/test_config.py checks the list against transformers)
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
    "save_total_limit": (lambda v: v > 0, "a positive integer or null"),
    "num_threads": (lambda v: v > 0, _POSITIVE),
    "loss_chunk_size": (lambda v: v > 0, _POSITIVE),
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


def validate(cfg: GKDConfig) -> None:
    """Check every key (types, ranges, combinations); raise ConfigError naming the first bad key."""
    _check_types(cfg)
    for key, (ok, allowed) in _RANGES.items():
        value = getattr(cfg, key)
        if value is not None:
            _check(ok(value), key, allowed, value)
    _check_objective(cfg)
    _check_teacher_source(cfg)
    _check_precision(cfg)
    _check_rl(cfg)
    _check_names(cfg)
    _check_schedule(cfg)
    if cfg.lora is not None:
        _check(cfg.lora.r > 0, "lora.r", _POSITIVE, cfg.lora.r)
        _check(0.0 <= cfg.lora.dropout < 1.0, "lora.dropout", "in [0, 1)", cfg.lora.dropout)


def _check_types(cfg: GKDConfig) -> None:
    hints = _hints(GKDConfig)
    for f in dataclasses.fields(GKDConfig):
        value = getattr(cfg, f.name)
        if not _type_ok(value, hints[f.name]):
            raise ConfigError(
                f"config key '{f.name}' must be {_describe(hints[f.name])}, got {value!r} ({type(value).__name__})"
            )
        if isinstance(value, float) and (math.isnan(value) or (math.isinf(value) and f.name not in _INF_OK)):
            raise ConfigError(f"config key '{f.name}' must be a finite number, got {value}")


def _check_objective(cfg: GKDConfig) -> None:
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


def _check_teacher_source(cfg: GKDConfig) -> None:
    if cfg.teacher_url is not None and cfg.teacher_model_name_or_path is not None:
        raise ConfigError(
            "config keys 'teacher_url' and 'teacher_model_name_or_path' both name the teacher; give one (the served "
            "teacher, or the local one)"
        )


def _check_precision(cfg: GKDConfig) -> None:
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


def _check_rl(cfg: GKDConfig) -> None:
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


def _check_names(cfg: GKDConfig) -> None:
    """Tracker names. (Metric and reward names belong to gkd.scoring's vocabulary, one layer up: they are checked
    by gkd.preflight, still before any model loads.)"""
    for name in cfg.report_to:
        _check(
            name in (*REPORT_TO, "all"),
            "report_to",
            f"a name or list of {', '.join(REPORT_TO)}, all or none",
            name,
        )


def _check_schedule(cfg: GKDConfig) -> None:
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


def _config_terms(cfg: GKDConfig, message: str) -> str:
    """A divergence-parameter error of :mod:`gkd.divergences` (the one place they are checked) in config keys."""
    keys = dict(DIVERGENCES[cfg.divergence].config_keys)
    message = message.removeprefix(f"{cfg.divergence}: ")
    for param, key in keys.items():
        message = re.sub(rf"\b{param}\b(?!_)", key, message)
    named = next((key for key in keys.values() if key in message), "divergence")
    return f"config key '{named}' (divergence {cfg.divergence}): {message}"


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
            value = parse_value(raw) if raw.strip() != "" else None
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
    """Build and validate a GKDConfig from a plain dict: gkd's keys, and TRL's (``TRL_KEYS``) with TRL's meaning.
    Unknown keys are all reported in one error, each with a suggestion."""
    data, notes = _from_trl(data)
    if "lora" in data and data["lora"] is not None and not isinstance(data["lora"], str):
        data["lora"] = _build(LoraConfig, data["lora"], prefix="lora.")
    cfg = _build(GKDConfig, data)
    cfg.notes = notes
    return cfg


PRESETS_DIR = Path(__file__).parent / "configs" / "presets"


def presets() -> list[str]:
    """Names of the packaged method presets (``--config NAME`` finds them without a path)."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def resolve_config_path(path: str | Path) -> Path:
    """A config file path, or the packaged preset of that name (``on_policy_gkd`` or ``on_policy_gkd.yaml``)."""
    p = Path(os.path.expanduser(str(path)))
    if p.exists():
        return p
    name = p.name.removesuffix(".yaml").removesuffix(".yml")
    if str(p.parent) in (".", "presets", "configs/presets") and name in presets():
        return PRESETS_DIR / f"{name}.yaml"
    close = difflib.get_close_matches(name, presets(), n=1, cutoff=0.7)
    hint = f"; did you mean the preset '{close[0]}'?" if close else f"; presets: {', '.join(presets())}"
    raise ConfigError(f"config file '{path}' does not exist and is not a preset name{hint}")


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = resolve_config_path(path)
    if p.is_dir():
        raise ConfigError(f"config path '{p}' is a folder; pass a YAML file to --config")
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file '{p}': {e.strerror}; check its permissions") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"cannot read config file '{p}': it is not UTF-8 text; pass a YAML file") from e
    try:
        data = yaml.load(text, Loader=_Loader)  # _Loader is a SafeLoader
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
