"""One config for every run: ``GKDConfig``.

Keys follow TRL's ``GKDConfig`` where TRL has one (``lmbda``, ``beta``, ``temperature``, ``max_new_tokens``,
``seq_kd``, ``per_device_train_batch_size``, ...) so a TRL user feels at home. SFT, supervised KD, SeqKD, ImitKD,
on-policy GKD and RL + GKD are all values of this one config (see ``configs/presets/``).

Everything is validated before any model loads: unknown keys (with the closest valid key suggested), wrong types and
out-of-range values raise ``ConfigError`` with one line naming the key and what is allowed.

This module holds the fields (``GKDConfig``, ``LoraConfig``), what follows from them (properties, ``warnings()``, the
step plan) and the two ways to build a config from plain data (:func:`config_from_dict`, :func:`load_config`). The
checks are :mod:`gkd.config_checks`, YAML files, ``key=value`` overrides and coercion :mod:`gkd.config_files`, TRL's
key names :mod:`gkd.trl_compat`; their public names are importable from here too, as before.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gkd.config_checks import LR_SCHEDULERS as LR_SCHEDULERS
from gkd.config_checks import OPTIMIZERS as OPTIMIZERS
from gkd.config_checks import REPORT_TO as REPORT_TO
from gkd.config_checks import TeacherSpec as TeacherSpec
from gkd.config_checks import field_types, teacher_specs, validate
from gkd.config_files import PRESETS_DIR as PRESETS_DIR
from gkd.config_files import (
    build,
    check_known,
    coerce,
    merge,
    parse_overrides,
    parse_value,
    read_yaml,
    resolve_config_path,
)
from gkd.config_files import presets as presets
from gkd.divergences import DIVERGENCES
from gkd.errors import ConfigError
from gkd.trl_compat import as_bool as as_bool
from gkd.trl_compat import from_trl, trl_keys

__all__ = [
    "GKDConfig",
    "LoraConfig",
    "Plan",
    "TeacherSpec",
    "load_config",
    "parse_overrides",
    "parse_value",
    "resolve_config_path",
    "training_plan",
    "trl_keys",
]


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
    """The teacher (same tokenizer as the student). Not needed for ``divergence: nll`` (SFT). ``self``: a frozen copy
    of the starting student (``model_name_or_path``, or the model object given; self-distillation), usually with
    ``teacher_prompt_field`` so that the teacher knows what the student does not."""
    tokenizer_name_or_path: str | None = None
    """Defaults to the student's folder."""
    teacher_url: str | None = None
    """A served teacher instead of ``teacher_model_name_or_path``: the base URL of a vLLM OpenAI-compatible server
    (``vllm serve TEACHER``) or of ``gkd serve-teacher``, e.g. ``http://127.0.0.1:8000``. The loss then runs on the
    served support: the actual token, the teacher's top ``teacher_topk`` and a tail bucket."""
    teachers: list[dict[str, Any]] | None = None
    """Several teachers at once, instead of ``teacher_model_name_or_path`` / ``teacher_url``: a list of
    ``{name, model_name_or_path | teacher_url, weight}`` (``model_name_or_path: self`` is the starting student; local
    and served teachers mix). A record whose ``teacher_field`` names a teacher is distilled from that teacher only;
    a record without it from every teacher, each term weighted by ``weight / sum of weights`` (weight default 1)."""
    teacher_field: str = "teacher"
    """With ``teachers``: the record field that names the teacher of that record (absent or null: all teachers)."""
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
    teacher_prompt_field: str | None = None
    """The name of a record field whose text only the teacher sees, in front of the prompt (privileged information:
    a hint, the solution, a document; context distillation, on-policy self-distillation). Chat prompts: in front of
    the last user turn's content; plain prompts: in front of the prompt text (a blank line between). Every record
    needs the field, a string. The student (training, rollouts, evaluation) never sees it."""
    teacher_system_prompt: str | None = None
    """A system message only the teacher sees: chat prompts get it as a system turn first (in front of the record's
    own system turn, a blank line between); plain prompts get it as text in front (a blank line between)."""
    teacher_chat_template: str | None = None
    """A Jinja chat template file (or a tokenizer folder, e.g. the teacher's own) the teacher's view of chat prompts
    is rendered with; null: the student's template (the run's tokenizer)."""
    teacher_chat_template_kwargs: dict[str, Any] | None = None
    """Template variables for rendering the teacher's view of chat prompts, e.g. ``{enable_thinking: false}``."""
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
    packed_forward: Literal["auto"] | bool = "auto"
    """Teacher and student forwards on the batch's real tokens only: its sequences end to end, attention kept
    inside each (``gkd.packing``; TRL's ``padding_free``, for every attention kernel, not flash only). ``auto``:
    where the model supports it (the log says which models pack, and why not where one does not); ``true``: an
    error for a model that cannot; ``false``: padded forwards."""
    max_tokens_per_batch: int | None = None
    """Micro-batches by token count instead of sequence count: after the rollout, the step's sequences (all
    ``gradient_accumulation_steps`` batches of them) are sorted by length and regrouped into micro-batches of at
    most this many forward tokens (real tokens when the forwards pack, else rows x padded width; a longer sequence
    gets a micro-batch of its own). The step's data, loss and gradient are unchanged: only memory and padding are."""

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
    """A metric name from ``gkd.metrics``, a built-in task name (its headline metric), or ``mc_accuracy`` /
    ``mc_accuracy_norm`` for multiple-choice eval records (``choices`` + ``answer``, scored by log-likelihood)."""
    eval_max_samples: int = 256
    eval_batch_size: int = 64
    eval_fewshot_file: str | None = None
    """A file of worked examples (any dataset format with a prompt and a target) put in front of every evaluation
    prompt (:func:`gkd.evaluation.with_fewshot`): a text prompt gets ``prompt + target + "\\n\\n"`` per shot, a
    conversation a user and an assistant turn per shot. Training data is never changed."""
    eval_fewshot_k: int | None = None
    """How many of ``eval_fewshot_file``'s examples (the first k; null: all)."""
    eval_tokenize: Literal["standard", "whitespace"] = "standard"
    """How ``eval_metric: bleu`` / ``rouge*`` tokenise text: ``standard`` = sacrebleu's 13a and rouge-score's
    default tokenizer (real text); ``whitespace`` = split on spaces (the built-in tasks' token text, which their
    task metrics use regardless)."""
    eval_num_beams: int = 1
    """Beam search with this many beams instead of greedy decoding in evaluation (1: greedy). Its scores are the
    mode ``beam`` (``eval/beam/<metric>``; ``metric_for_best_model: beam/<metric>``) in place of ``greedy``."""
    eval_length_penalty: float = 1.0
    """Beam search's length penalty (transformers'): a beam's score is its log-probability / length ** penalty."""
    eval_bootstrap: int = 0
    """Bootstrap resamples of the eval examples for 95 % percentile intervals of every eval metric, logged as
    ``<metric>_ci_low`` / ``<metric>_ci_high`` (0: none; drawn from ``seed``). BLEU, chrF and task metrics are
    recomputed on every resample: keep it modest (e.g. 200-1000)."""
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
            self.lora = build(LoraConfig, self.lora, prefix="lora.")
        hints = field_types(GKDConfig)
        for f in dataclasses.fields(self):
            setattr(self, f.name, coerce(getattr(self, f.name), hints[f.name]))
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

    def teacher_specs(self) -> list[TeacherSpec]:
        """The ``teachers`` entries (validated) as :class:`TeacherSpec` s, weights filled in; [] without ``teachers``."""
        return teacher_specs(self.teachers)

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
    data, notes = from_trl(kwargs)
    check_known(GKDConfig, data)
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
    "teachers",
    "lora",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "divergence",
    "student_dtype",
)


# ---------------------------------------------------------------------------------------------------------------
# a config from plain data: a dict of keys, or YAML files + key=value overrides
# ---------------------------------------------------------------------------------------------------------------
def config_from_dict(data: dict[str, Any]) -> GKDConfig:
    """Build and validate a GKDConfig from a plain dict: gkd's keys, and TRL's (``TRL_KEYS``) with TRL's meaning.
    Unknown keys are all reported in one error, each with a suggestion."""
    data, notes = from_trl(data)
    if "lora" in data and data["lora"] is not None and not isinstance(data["lora"], str):
        data["lora"] = build(LoraConfig, data["lora"], prefix="lora.")
    cfg = build(GKDConfig, data)
    cfg.notes = notes
    return cfg


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
