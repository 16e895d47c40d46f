"""TRL's and transformers' config keys, read as gkd's: one place for every key name another trainer uses.

A TRL user's config, command line or ``GKDConfig(**keys)`` works unchanged: TRL's names of gkd's keys are synonyms
(``dataset_name``, ``torch_dtype``, ...), LoRA the TRL way (``use_peft`` + ``lora_r``, ...) becomes gkd's ``lora``,
``fsdp: full_shard`` turns on FSDP2, keys gkd accepts but does not need are named in a warning when they ask for
something gkd does not do, and keys gkd cannot honour are refused in one line that says what to do instead.
:func:`trl_keys` lists them all (``gkd distill --help``, ``docs/from-trl.md``).

The config modules read keys through it: :func:`from_trl` when a config is built (``gkd.config``), :func:`unknown_key`
for the one-line error with a suggestion (``gkd.config_files``); the command line asks :func:`same_key` whether two
keys set one setting. GKDTrainer's TRL-shaped arguments (``model``, ``args``, ``processing_class``, ``peft_config``,
``reward_funcs``, datasets) are :mod:`gkd.trl_trainer`: they build ``GKDConfig`` objects and recognise gkd's
datasets, so they import ``gkd.config`` and ``gkd.data``, and ``gkd.config`` imports this module: one module for
both would be an import cycle.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from typing import Any

from gkd.errors import ConfigError

__all__ = ["IGNORED_KEYS", "as_bool", "from_trl", "same_key", "trl_keys", "unknown_key"]

# Names users often type for a key (from transformers' TrainingArguments, peft, other trainers), tried before any
# spelling match: "lr" is learning_rate, not the closest spelling "lora". Keys inside ``lora`` are looked up with their
# ``lora.`` prefix. (TRL's own names are not here: they are accepted, see trl_keys().)
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
IGNORED_KEYS: dict[str, tuple[tuple[Any, ...], str]] = {
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


def from_trl(data: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """TRL / transformers keys in ``data`` turned into gkd keys with the same meaning; returns the new dict and the
    warnings to print (keys accepted but ignored)."""
    out = dict(data)
    notes: list[str] = []
    _synonyms(out)
    _init_kwargs_dtypes(out)
    _sharding(out, notes)
    _peft(out, notes)
    _eval_split(out)
    mode = out.pop("vllm_mode", None)
    if mode not in (None, "colocate"):
        raise ConfigError(
            f"config key 'vllm_mode: {mode}': gkd's vLLM rollouts (rollout_backend: vllm) run colocated in the "
            "training process; a vLLM server is not supported: set vllm_mode: colocate or drop the key"
        )
    _ignored(out, notes)
    return out, notes


def _synonyms(out: dict[str, Any]) -> None:
    """Other trainers' names of gkd's keys, renamed (``disable_tqdm`` negated into ``progress``)."""
    for alias, key in _SYNONYMS.items():
        if alias in out:
            if key in out:
                raise ConfigError(f"config keys '{alias}' and '{key}' set the same thing; give only '{key}'")
            value = out.pop(alias)
            if alias == "disable_tqdm" and as_bool(value) is not None:
                value = not as_bool(value)
            out[key] = value


def _init_kwargs_dtypes(out: dict[str, Any]) -> None:
    """The dtype inside TRL's (teacher_)model_init_kwargs becomes gkd's student_dtype / teacher_dtype."""
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


def _sharding(out: dict[str, Any], notes: list[str]) -> None:
    """deepspeed refused (never a silent single-process run); TRL's ``fsdp: full_shard`` turns on FSDP2."""
    if out.get("deepspeed"):
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


def _peft(out: dict[str, Any], notes: list[str]) -> None:
    """LoRA the TRL way: ``use_peft`` switches it on, ``lora_*`` set it (ignored, with a warning, when off)."""
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


def _eval_split(out: dict[str, Any]) -> None:
    """TRL's example script evaluates on the dataset's test split whenever eval_strategy is not "no"."""
    if out.get("eval_strategy") in ("steps", "epoch") and not out.get("eval_dataset") and out.get("dataset"):
        if os.path.isfile(os.path.expanduser(str(out["dataset"]))):
            raise ConfigError(
                f"config key 'eval_strategy: {out['eval_strategy']}' evaluates on the dataset's test split (as TRL's "
                f"script), but dataset '{out['dataset']}' is a single file with one split; set eval_dataset (e.g. a "
                "test.jsonl file) or eval_strategy: no"
            )
        out["eval_dataset"] = out["dataset"]
        out.setdefault("eval_split", "test")


def _ignored(out: dict[str, Any], notes: list[str]) -> None:
    """:data:`IGNORED_KEYS` dropped, each named in a warning when it asks for something gkd does not do."""
    for key in [k for k in out if k in IGNORED_KEYS]:
        value = out.pop(key)
        quiet, why = IGNORED_KEYS[key]
        if any(isinstance(q, bool) for q in quiet) and as_bool(value) is not None:
            value = as_bool(value)  # read as HfArgumentParser reads a flag: --packing no
        if value not in quiet:
            notes.append(f"config key '{key}: {value}' is ignored: {why}")


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
    for key, (_quiet, why) in IGNORED_KEYS.items():
        out[key] = f"accepted and ignored: {why}"
    for key, why in _FOREIGN.items():
        out[key] = f"refused: {why}"
    return out


def unknown_key(key: str, valid: list[str], prefix: str = "") -> ConfigError:
    """The error for an unknown key ``prefix + key`` (``prefix``: ``lora.`` inside the lora mapping): another trainer's
    key gkd refuses says why; a common alias, TRL's key or the closest of ``valid`` is suggested."""
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


def same_key(a: str, b: str) -> bool:
    """Do two top-level keys name the same setting (a TRL synonym and gkd's key)? Then a later one replaces an
    earlier one instead of both reaching config_from_dict (which refuses both in one layer)."""
    # max_completion_length is TRL's name for max_new_tokens (gkd.config: "give one, or both equal")
    canon = {**_SYNONYMS, "max_completion_length": "max_new_tokens"}
    return a != b and canon.get(a, a) == canon.get(b, b)
