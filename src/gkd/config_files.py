"""Config keys as people write them: YAML files, ``key=value`` overrides, values coerced to each key's type, presets.

gkd reads YAML numbers and booleans as every other trainer does (``1e-5`` is a float, ``no`` is the word, which a
bool key reads as false); ``lora.r=8`` overrides a nested key; ``--config NAME`` finds a packaged preset. The
``GKDConfig`` itself (and :func:`gkd.config.load_config` / ``config_from_dict``, which build one from what this module
reads) is :mod:`gkd.config`; it builds its fields with :func:`build` and :func:`coerce`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from gkd.config_checks import describe, field_types, type_ok
from gkd.errors import ConfigError
from gkd.trl_compat import as_bool, unknown_key

__all__ = [
    "PRESETS_DIR",
    "build",
    "check_known",
    "coerce",
    "merge",
    "parse_overrides",
    "parse_value",
    "presets",
    "read_yaml",
    "resolve_config_path",
]


# ---------------------------------------------------------------------------------------------------------------
# YAML as gkd reads it
# ---------------------------------------------------------------------------------------------------------------
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
# ``save_strategy: no``); a bool key takes those words as bools (``coerce``)
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


# ---------------------------------------------------------------------------------------------------------------
# key=value overrides, and layers of keys merged
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
    """``extra`` over ``base``: nested mappings merged, any other value of ``extra`` replacing base's."""
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


# ---------------------------------------------------------------------------------------------------------------
# values coerced to a key's type, mappings built into the config's dataclasses
# ---------------------------------------------------------------------------------------------------------------
def coerce(value: Any, annotation: Any) -> Any:
    """``value`` as people write it, converted to what ``annotation`` expects where the intent is unambiguous.

    ``"1e-5"`` (a string from Python or an old YAML reader) -> 1e-05 for a float key; ``2.0`` or ``1e3`` -> an int for
    an int key; a single name -> a one-element list for a list key (``report_to: tensorboard``), ``none``/null -> [];
    null -> ``"none"`` for a choice key that has that value. Anything else is returned unchanged (and then checked).
    """
    if type_ok(value, annotation):
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


def _accepts_text(options: tuple[Any, ...]) -> bool:
    """Does a key of these type options take a string (``str``, or a choice of strings)?"""
    for opt in options:
        if opt is str:
            return True
        if typing.get_origin(opt) is Literal and any(isinstance(a, str) for a in typing.get_args(opt)):
            return True
    return False


def build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """``cls(**data)`` for a config dataclass (``GKDConfig``, ``LoraConfig`` with ``prefix`` ``lora.``): unknown keys
    reported all at once, each value coerced to its field's type and checked (one line naming the key)."""
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.')}' must be a mapping, got {type(data).__name__}")
    hints = field_types(cls)
    data = dict(data)
    check_known(cls, data, prefix)
    for key, value in data.items():
        data[key] = value = coerce(value, hints[key])
        if dataclasses.is_dataclass(_dataclass_of(hints[key])) and isinstance(value, dict):
            continue  # built (and checked) by the dataclass's own __post_init__ / build
        if not type_ok(value, hints[key]):
            raise ConfigError(
                f"config key '{prefix}{key}' must be {describe(hints[key])}, got {value!r} ({type(value).__name__})"
            )
    return cls(**data)


def check_known(cls: type, data: dict[str, Any], prefix: str = "") -> None:
    """Every key of ``data`` a field of ``cls``, else one error naming all unknown ones, each with a suggestion."""
    hints = field_types(cls)
    unknown = [unknown_key(str(k), list(hints), prefix) for k in data if k not in hints]
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


# ---------------------------------------------------------------------------------------------------------------
# config files and presets
# ---------------------------------------------------------------------------------------------------------------
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
    """The mapping in a YAML config file (or a preset's, by name); one-line errors for what is not one."""
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
