"""Loading teacher and student (and tokenizers, LoRA adapters), checking they can be compared, saving merged.

Any ``AutoModelForCausalLM`` (decoder-only) or ``AutoModelForSeq2SeqLM`` (T5-style, as in the paper) works, loaded
with the real ``from_pretrained`` from a local folder or a hub id. A folder holding only a LoRA adapter (what a LoRA
run saves: ``adapter_config.json`` + adapter weights, no ``config.json``) loads as its base model with the adapter
applied (merged by default). A path that can only be local (``./x``, ``/x``, ``a/b/c``, or ``runs/x`` when ``runs``
is a folder here) and does not exist fails at once, without querying the hub. The forward pass at the completion
positions (hidden states + output head, or logits: :func:`score_positions`, :class:`StudentForward`) is
:mod:`gkd.forward`; its names stay importable from here.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gkd.errors import ModelError
from gkd.forward import (  # noqa: F401  (re-exported: gkd.models' names before gkd.forward existed)
    Scorer,
    StudentForward,
    causal_inputs,
    fused_head_supported,
    fused_head_unsupported_reason,
    head_of,
    is_seq2seq,
    score_positions,
    unwrap,
)
from gkd.io import cannot_be_hub_id, hub_kwargs, hub_offline_reason, missing_local_path, quiet_progress_bars
from gkd.outputs import Head, ScoringOutput  # noqa: F401  (Head: re-exported, as before)

__all__ = [
    "Scorer",
    "ScoringOutput",
    "StudentForward",
    "apply_lora",
    "build_model",
    "check_teacher_student",
    "context_length",
    "disable_dropout",
    "is_seq2seq",
    "load_config",
    "load_error",
    "load_model",
    "load_tokenizer",
    "missing_local_path",
    "same_tokenizer",
    "save_merged",
    "score_positions",
    "unwrap",
]

_DTYPES: dict[str, Any] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "auto": "auto",
}

# Config attributes that bound the number of positions a model can read (learned position tables, rope ranges).
_CONTEXT_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_sequence_length",
    "max_seq_len",
    "seq_length",
    "n_ctx",
)

_ADAPTER_CONFIG = "adapter_config.json"


# ---------------------------------------------------------------------------------------------------------------
# paths: local folders, hub ids and LoRA adapter folders
# ---------------------------------------------------------------------------------------------------------------
def _check_exists(path: str, what: str) -> None:
    if missing_local_path(path):
        where = os.path.abspath(os.path.expanduser(path))
        raise ModelError(f"{what} '{path}' is not a local folder: {where} does not exist; check the path")


def load_error(what: str, path: str, err: Exception) -> ModelError:
    """The one-line error for a model, config or tokenizer at ``path`` that failed to load with ``err``."""
    offline = hub_offline_reason() if not os.path.exists(os.path.expanduser(path)) else None
    if offline is not None:
        return ModelError(
            f"{what} '{path}' is not a local folder nor in the local hub cache, and {offline}; download it where "
            f"there is a network (hf download {path}) or give a local folder"
        )
    if not os.path.exists(os.path.expanduser(path)):
        return ModelError(
            f"{what} '{path}' is not a local folder and could not be loaded from the hub; "
            "check the path (or the hub id and your network)"
        )
    reason = " ".join(str(err).split())  # every line of it (the first may end in "one of:")
    if len(reason) > 300:
        reason = reason[:297] + "..."
    return ModelError(f"{what} '{path}' could not be loaded: {reason}")


def _is_adapter_folder(path: str) -> bool:
    local = Path(os.path.expanduser(path))
    return (local / _ADAPTER_CONFIG).is_file() and not (local / "config.json").exists()


def _adapter_base(path: str, what: str) -> str:
    """The base model of the LoRA adapter folder ``path``: a local folder (absolute) or a hub id.

    Adapters record ``base_model_name_or_path``; gkd writes it absolute, but older runs (and other tools) wrote the
    path the base was loaded from, relative to the run's working directory. A relative base is looked up from the
    current directory, then from each folder above the adapter (a run's ``output_dir`` usually lies below the
    directory it was started from).
    """
    config_file = Path(os.path.expanduser(path)) / _ADAPTER_CONFIG
    try:
        base = json.loads(config_file.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError) as e:
        raise ModelError(f"{what} '{path}': cannot read {config_file} ({e}); fix or replace the file") from e
    fix = f"set base_model_name_or_path in {config_file} to the base model's folder or hub id"
    if not isinstance(base, str) or not base:
        raise ModelError(f"{what} '{path}' is a LoRA adapter that does not name its base model; {fix}")
    expanded = os.path.expanduser(base)
    if os.path.isabs(expanded):
        if os.path.exists(expanded):
            return expanded
    else:
        if os.path.exists(expanded):
            return os.path.abspath(expanded)
        for parent in config_file.resolve().parent.parents:
            if (parent / expanded).exists():
                return str(parent / expanded)
        if not cannot_be_hub_id(base) and not missing_local_path(base):
            return base  # a hub id
    raise ModelError(
        f"{what} '{path}' is a LoRA adapter whose base model '{base}' does not exist (looked in {os.getcwd()} "
        f"and the folders above the adapter); {fix}"
    )


def load_tokenizer(
    path: str,
    what: str = "tokenizer",
    chat_template_path: str | None = None,
    init_kwargs: dict[str, Any] | None = None,
) -> Any:
    """Load a tokenizer; give it a pad token (the EOS) if it has none. Masks never rely on pad ids.

    A LoRA adapter folder without tokenizer files gives its base model's tokenizer. ``chat_template_path`` (a Jinja
    file or a tokenizer folder, see :func:`gkd.data.read_chat_template`) replaces its chat template.
    ``init_kwargs`` (``revision``, ``trust_remote_code``) go to ``from_pretrained``.
    """
    from transformers import AutoTokenizer

    from gkd.data import with_chat_template

    _check_exists(path, what)
    try:
        tok = AutoTokenizer.from_pretrained(
            os.path.expanduser(path), **{**hub_kwargs(path), **(init_kwargs or {})}
        )
    except (OSError, ValueError, TypeError) as e:
        if not _is_adapter_folder(path):
            raise load_error(what, path, e) from e
        base = _adapter_base(path, what)
        return load_tokenizer(base, f"{what} (base of the adapter '{path}')", chat_template_path, init_kwargs)
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ModelError(f"{what} '{path}' has neither a pad nor an EOS token; add an eos_token to it")
        tok.pad_token = tok.eos_token
    if tok.eos_token_id is None:
        raise ModelError(f"{what} '{path}' has no EOS token; completions could never end. Add an eos_token")
    if chat_template_path is not None:
        tok = with_chat_template(tok, chat_template_path, copy=False)
    return tok


def load_config(path: str, what: str = "model") -> Any:
    """The transformers config of a model folder or hub id, without loading weights (one-line ``ModelError``).

    For a LoRA adapter folder it is the base model's config (the adapter changes weights, not the architecture).
    """
    return _load_config(path, what, frozenset())


def _load_config(path: str, what: str, seen: frozenset[str]) -> Any:
    from transformers import AutoConfig

    _check_exists(path, what)
    if _is_adapter_folder(path):
        base = _adapter_base(path, what)
        _check_no_cycle(path, base, what, seen)
        return _load_config(base, f"{what} (base of the adapter '{path}')", seen | {_key(path)})
    try:
        return AutoConfig.from_pretrained(os.path.expanduser(path), **hub_kwargs(path))
    except (OSError, ValueError) as e:
        raise load_error(what, path, e) from e


def _key(path: str) -> str:
    return os.path.realpath(os.path.expanduser(path))


def _check_no_cycle(path: str, base: str, what: str, seen: frozenset[str]) -> None:
    if _key(base) in seen | {_key(path)}:
        raise ModelError(
            f"{what} '{path}' is a LoRA adapter whose base model '{base}' is itself (directly or through other "
            f"adapters); set base_model_name_or_path in its {_ADAPTER_CONFIG} to the real base model"
        )


def context_length(config: Any) -> int | None:
    """The most positions (prompt + completion tokens) the model of ``config`` can read, or ``None`` without a
    hard limit (e.g. T5's relative attention).

    Read from the config alone (``max_position_embeddings``, ``n_positions``, ``max_sequence_length``, ...), so it
    can be checked before any weights are loaded. Multimodal configs are read through their text (decoder) config.
    """
    configs = [config]
    get_text = getattr(config, "get_text_config", None)
    if callable(get_text):
        with contextlib.suppress(Exception):
            configs.insert(0, get_text(decoder=True))
    for cfg in configs:
        if getattr(cfg, "relative_attention_num_buckets", None) is not None:
            return None  # relative position buckets: any length runs (T5, mT5, UMT5, LongT5, ...)
        for key in _CONTEXT_KEYS:
            value = getattr(cfg, key, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def load_model(
    path: str,
    *,
    what: str,
    dtype: str = "float32",
    merge: bool = True,
    attn_implementation: str | None = None,
    init_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """``from_pretrained`` of a causal or seq2seq LM from a local folder or hub id, with a one-line error.

    ``dtype`` is ``float32`` / ``bfloat16`` / ``float16`` or ``auto`` (the checkpoint's stored dtype);
    ``attn_implementation`` (``sdpa``, ``eager``, ``flash_attention_2``, ...) and ``init_kwargs`` (``revision``,
    ``trust_remote_code``, ...) go to ``from_pretrained``.

    A LoRA adapter folder (``adapter_config.json``, no ``config.json``) loads its base model (itself possibly an
    adapter folder) and applies the adapter with peft. ``merge=True`` folds it into the weights and returns a plain
    transformers model, whose ``name_or_path`` is then the adapter folder (a LoRA applied on top of it records that
    folder as its base). ``merge=False`` returns the ``PeftModel`` with the adapter weights trainable, to train it
    further.
    """
    extra = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    extra.update(init_kwargs or {})  # trust_remote_code, revision, model_init_kwargs
    return _load_model(path, what, dtype, merge, frozenset(), extra)


def _load_model(
    path: str, what: str, dtype: str, merge: bool, seen: frozenset[str], extra: dict[str, Any]
) -> nn.Module:
    _check_exists(path, what)
    if not _is_adapter_folder(path):
        return _load_plain(path, what, dtype, extra)
    base = _adapter_base(path, what)
    _check_no_cycle(path, base, what, seen)
    try:
        from peft import PeftModel
    except ImportError as e:
        raise ModelError(
            f"{what} '{path}' is a LoRA adapter; loading it needs peft (pip install peft)"
        ) from e
    model = _load_model(
        base, f"{what} (base of the adapter '{path}')", dtype, True, seen | {_key(path)}, extra
    )
    local = os.path.expanduser(path)
    try:
        with _quiet_peft():
            model = PeftModel.from_pretrained(model, local, is_trainable=not merge)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelError(
            f"{what} '{path}': the LoRA adapter could not be applied to its base model '{base}': "
            f"{str(e).splitlines()[0]}"
        ) from e
    if not merge:
        return model
    model = model.merge_and_unload()
    model.config._name_or_path = os.path.abspath(local)
    return model


@contextlib.contextmanager
def _quiet_peft():
    """Hide the deprecation warning peft triggers in transformers 5 (``is_gradient_checkpointing``): it is about
    peft's code, not the user's, and would be printed on every load."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        yield


def _load_plain(path: str, what: str, dtype: str, extra: dict[str, Any]) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    local = os.path.expanduser(path)
    try:
        config = AutoConfig.from_pretrained(local, **hub_kwargs(path))
    except (OSError, ValueError) as e:
        raise load_error(what, path, e) from e
    cls = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    try:
        with quiet_progress_bars():
            model = cls.from_pretrained(
                local, dtype=_DTYPES.get(dtype, dtype), **{**hub_kwargs(path), **extra}
            )
    except (OSError, ValueError, KeyError, ImportError) as e:
        raise ModelError(
            f"{what} '{path}' could not be loaded as {cls.__name__}: {str(e).splitlines()[0]}"
        ) from e
    return model


def build_model(spec: dict[str, Any], tokenizer: Any, seed: int | None = None) -> nn.Module:
    """A randomly initialised model from a small spec such as ``{"architecture": "llama", "hidden_size": 64, ...}``.

    Used by the built-in tasks and the tests: models are built from a config, never downloaded.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    spec = dict(spec)
    arch = spec.pop("architecture", "llama")
    vocab = spec.pop("vocab_size", len(tokenizer))
    ids = {
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }
    if arch == "t5":
        ids["decoder_start_token_id"] = tokenizer.pad_token_id
    config = AutoConfig.for_model(arch, vocab_size=vocab, **ids, **spec)
    if seed is not None:
        torch.manual_seed(seed)
    cls = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    return cls.from_config(config)


def disable_dropout(model: nn.Module) -> None:
    """Zero every dropout: ``nn.Dropout`` modules and the attention-probability dropout that transformers applies
    functionally from float attributes (``attention_dropout`` of Llama/Qwen/Mistral attention, ``dropout`` of
    T5 attention)."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        for attr in ("attention_dropout", "dropout"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)
    config = getattr(model, "config", None)
    for attr in ("attention_dropout", "dropout_rate", "attn_pdrop", "resid_pdrop", "embd_pdrop"):
        if isinstance(getattr(config, attr, None), float):
            setattr(config, attr, 0.0)


def apply_lora(model: nn.Module, r: int, alpha: int, dropout: float, target_modules: Any) -> nn.Module:
    """Wrap the student in a peft LoRA adapter; only adapter weights stay trainable.

    When the student was loaded from a local folder, the adapter records that folder's absolute path as its base
    model, so a saved adapter loads (``load_model``) from any working directory.
    """
    from peft import LoraConfig, TaskType, get_peft_model

    task = TaskType.SEQ_2_SEQ_LM if is_seq2seq(model) else TaskType.CAUSAL_LM
    cfg = LoraConfig(
        task_type=task, r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules
    )
    try:
        with _quiet_peft():
            peft_model = get_peft_model(model, cfg)
    except ValueError as e:
        raise ModelError(
            f"LoRA could not be applied: {str(e).splitlines()[0]}; check lora.target_modules"
        ) from e
    base = getattr(unwrap(model).config, "_name_or_path", None) or ""
    if base and os.path.isdir(os.path.expanduser(base)):
        for adapter_config in peft_model.peft_config.values():
            adapter_config.base_model_name_or_path = os.path.abspath(os.path.expanduser(base))
    return peft_model


def save_merged(model: nn.Module, tokenizer: Any, path: str | os.PathLike) -> Path:
    """Save ``model`` as a plain transformers folder (``config.json`` + safetensors + ``tokenizer``) that
    ``from_pretrained`` loads without peft. A LoRA (peft) model is saved with its adapters merged into the weights.

    The training model is not modified: the merge runs on a copy that shares every tensor the merge does not write
    (only the weights of adapted layers are copied, so the extra memory is small).
    """
    while hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP / accelerate wrappers
        model = model.module
    out = Path(path)
    if callable(getattr(model, "merge_and_unload", None)) and hasattr(model, "peft_config"):
        model = _merged_copy(model)
    with quiet_progress_bars():
        model.save_pretrained(str(out), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def _merged_copy(model: nn.Module) -> nn.Module:
    from peft.tuners.tuners_utils import BaseTunerLayer

    written = {
        id(t)
        for m in model.modules()
        if isinstance(m, BaseTunerLayer)
        for t in (*m.get_base_layer().parameters(), *m.get_base_layer().buffers())
    }
    shared: dict[int, Any] = {
        id(t): t for t in (*model.parameters(), *model.buffers()) if id(t) not in written
    }
    with torch.no_grad():
        return copy.deepcopy(model, shared).merge_and_unload()


def output_rows(model: nn.Module) -> int:
    head = unwrap(model).get_output_embeddings()
    if head is not None and hasattr(head, "weight"):
        return int(head.weight.shape[0])
    return int(unwrap(model).config.vocab_size)


def same_tokenizer(tokenizer: Any, teacher_tokenizer: Any) -> bool:
    """Whether two tokenizers have the same vocabulary and EOS id (else the teacher is aligned: gkd.xtok)."""
    return (
        tokenizer.get_vocab() == teacher_tokenizer.get_vocab()
        and tokenizer.eos_token_id == teacher_tokenizer.eos_token_id
    )


def check_teacher_student(
    student: nn.Module, teacher: nn.Module, tokenizer: Any, teacher_tokenizer: Any
) -> int:
    """Fail early, with a clear message, if teacher and student cannot be compared token by token.

    Returns the number of vocabulary entries to compare: the tokenizer's real length. Models whose output layers
    are padded beyond it (e.g. 151,936 vs 152,064 rows for one tokenizer) are compared on the real entries only.
    """
    if is_seq2seq(student) != is_seq2seq(teacher):
        kinds = {True: "seq2seq (encoder-decoder)", False: "causal (decoder-only)"}
        raise ModelError(
            f"the teacher is {kinds[is_seq2seq(teacher)]} but the student is {kinds[is_seq2seq(student)]}; "
            "use two models of the same kind"
        )
    if teacher_tokenizer is not None:
        if tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
            raise ModelError(
                "teacher and student tokenizers differ (different vocabularies); distillation compares "
                "distributions token by token, so use a teacher and student that share a tokenizer"
            )
        if tokenizer.eos_token_id != teacher_tokenizer.eos_token_id:
            raise ModelError(
                f"teacher and student tokenizers have different EOS ids ({teacher_tokenizer.eos_token_id} vs "
                f"{tokenizer.eos_token_id}); use the same tokenizer for both"
            )
    vocab = len(
        tokenizer
    )  # padding rows of a larger head (Qwen2.5: 151,936 for 151,665 tokens) are never compared
    for what, m in (("student", student), ("teacher", teacher)):
        rows = output_rows(m)
        if rows < vocab:
            raise ModelError(
                f"the {what}'s output layer has {rows} rows but the tokenizer has {vocab} tokens; "
                "the model does not match the tokenizer"
            )
    return vocab


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)
