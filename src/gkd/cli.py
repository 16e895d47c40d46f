"""The ``gkd`` command line.

    gkd distill --config run.yaml [--key value ...] [key=value ...]   distil a teacher into a student
    gkd sft --config run.yaml [--key value ...] [key=value ...]       supervised fine-tuning (a teacher, or a start)
    gkd generate --model M --dataset D --out F      sample completions to JSONL
    gkd eval --model M --dataset D --metric NAME    score a model (greedy and/or sampled)
    gkd prepare TASK --out DIR                      write a built-in task's data, tokenizer and tiny models
    gkd diagnose --teacher T --student S --dataset D   will on-policy data help here? (docs/diagnose.md)
    gkd demo                                        the built-in end-to-end comparison of distillation methods
    gkd experiment NAME                             the paper's experiment families at toy scale
    gkd study FILE.yaml                             compare methods on your own models and data (paired seeds)

``gkd distill`` and ``gkd sft`` take config keys the way TRL's scripts do (TrlParser / HfArgumentParser): ``--key
value``, ``--key=value``, a bare ``--flag`` (true), ``--key v1 v2`` (a list), dotted keys (``--lora.r 8``), mixed
freely with gkd's ``key=value`` overrides and ``--config FILE`` (repeatable); TRL's key names are accepted with TRL's
meaning (``gkd.config.trl_keys``). Later keys win, the command line wins over the config files. ``--help`` lists every
key, generated from ``gkd.config``.

This module is the parser, its help and the dispatch; what each command does is :mod:`gkd.commands`. Errors the
user can fix are printed as one line (exit code 2); ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import os
import re
import shutil
import sys
import textwrap
import typing
from typing import Any

from gkd.commands import (
    cmd_demo,
    cmd_diagnose,
    cmd_distill,
    cmd_eval,
    cmd_experiment,
    cmd_generate,
    cmd_prepare,
    cmd_serve_teacher,
    cmd_study,
)
from gkd.commands import generated_record as generated_record  # moved to gkd.commands; still importable here
from gkd.commands import watch_launcher as watch_launcher
from gkd.errors import ConfigError, GKDError
from gkd.io import quiet_libraries
from gkd.trl_compat import same_key

__all__ = ["main"]


CONFIG_COMMANDS = ("distill", "sft")
SFT_DEFAULTS = {"divergence": "nll", "lmbda": 0.0}  # gkd sft = gkd distill on ground truth


class _SubParser(argparse.ArgumentParser):
    """A subcommand's parser. Those of ``gkd distill`` / ``gkd sft`` end their ``--help`` with every config key, built
    from ``gkd.config`` only when help is asked for (building the parser must not import the config's dependencies)."""

    lists_config_keys = False
    config_defaults: dict[str, Any] | None = None

    def format_help(self) -> str:
        if self.lists_config_keys:
            self.epilog = config_keys_help(_help_width(), self.config_defaults)
        return super().format_help()


_CONFIG_USAGE = "gkd {name} [-h] [--config FILE] [--KEY VALUE ...] [--FLAG] [--KEY V1 V2 ...] [KEY=VALUE ...]"
_CONFIG_DESCRIPTION = """\
{what}

Config keys come from YAML files (--config, repeatable: later files win) and from the
command line, in TRL's forms (TrlParser / HfArgumentParser) and gkd's, mixed freely:
  --learning_rate 2e-5    --learning_rate=2e-5    --push_to_hub (a bare flag: true)
  --report_to wandb tensorboard (several values: a list)    --lora.r 8 (a nested key)
  lmbda=0.5 (gkd's key=value)
Values are read as YAML scalars (1e-5, true, null, [a, b]). Later keys win; the command line
wins over the config files. TRL's key names are accepted with TRL's meaning (listed below).
Unknown keys stop the run with one line naming them all."""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        "-c",
        action="append",
        metavar="FILE",
        help="YAML config file or preset name; repeat to layer files (later ones win)",
    )


def _help_width() -> int:
    return max(60, min(100, shutil.get_terminal_size((100, 24)).columns))


def _field_docs(cls_name: str) -> list[tuple[str, str, str]]:
    """(section, field, attribute docstring) of each field of a dataclass in ``gkd.config``, read from its source:
    the docstring is the string literal right after the field, the section the last ``# --- name ---`` comment."""
    import gkd.config

    source = inspect.getsource(gkd.config)
    lines = source.splitlines()
    cls = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == cls_name)
    out: list[tuple[str, str, str]] = []
    section, prev_end = "", cls.lineno
    for i, node in enumerate(cls.body):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            for line in lines[prev_end : node.lineno - 1]:
                m = re.match(r"\s*#\s*-{3,}\s*([^-\s].*?)\s*-{3,}\s*$", line)
                if m:
                    section = m.group(1)
            nxt = cls.body[i + 1] if i + 1 < len(cls.body) else None
            doc = ""
            if (
                isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                doc = nxt.value.value
            out.append((section, node.target.id, doc))
        prev_end = node.end_lineno or node.lineno
    return out


def _first_sentence(doc: str) -> str:
    text = " ".join(doc.replace("``", "").split())
    m = re.search(r"(?<=[.!?])\s+(?=[A-Z])", text)
    return text[: m.start()] if m else text


def _show(value: Any) -> str:
    """A default as it is written in YAML."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)) and not value:
        return "[]" if isinstance(value, list) else "{}"
    return str(value)


def _choices(annotation: Any) -> str:
    for opt in typing.get_args(annotation) or (annotation,):
        if typing.get_origin(opt) is typing.Literal:
            return "one of " + ", ".join(str(a) for a in typing.get_args(opt))
    return ""


def _key_rows(
    cls: type, prefix: str = "", defaults: dict[str, Any] | None = None
) -> list[tuple[str, str, str]]:
    """(section, "key = default", help) of every field of ``cls`` (a gkd.config dataclass); ``defaults`` replace the
    dataclass's (gkd sft's)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    rows = []
    for section, name, doc in _field_docs(cls.__name__):
        f = fields[name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        default = (defaults or {}).get(name, default)
        rows.append(
            (section, f"{prefix}{name} = {_show(default)}", _first_sentence(doc) or _choices(hints[name]))
        )
    return rows


def config_keys_help(width: int = 100, defaults: dict[str, Any] | None = None) -> str:
    """The key listing of ``gkd distill --help``: every GKDConfig key (LoraConfig's as ``lora.KEY``) with its default
    and the first sentence of its attribute docstring, then every TRL / transformers key gkd accepts
    (``gkd.config.trl_keys``). Generated from ``gkd.config``, so it cannot drift from the code."""
    from gkd.config import GKDConfig, LoraConfig, trl_keys

    col = 34
    rows: list[tuple[str, str, str]] = []
    for row in _key_rows(GKDConfig, defaults=defaults):
        rows.append(row)
        if row[1].startswith("lora ="):
            rows += [(row[0], key, help_) for _, key, help_ in _key_rows(LoraConfig, prefix="lora.")]

    def entry(key: str, help_: str) -> list[str]:
        head = f"  {key}"
        if not help_:
            return [head]
        wrapped = textwrap.wrap(help_, width - col) or [""]
        if len(head) + 2 > col:
            return [head, *(" " * col + w for w in wrapped)]
        return [head.ljust(col) + wrapped[0], *(" " * col + w for w in wrapped[1:])]

    out = ["config keys, with their defaults (explained in full: docs/config.md):"]
    section = None
    for sec, key, help_ in rows:
        if sec != section:
            out += ["", f"{sec}:"]
            section = sec
        out += entry(key, help_)
    out += ["", "TRL / transformers keys (TRL's meaning; docs/from-trl.md):", ""]
    for key, help_ in trl_keys().items():
        out += entry(key, help_)
    return "\n".join(out)


# A token that starts a new key: ``--key``, or a ``key=value`` override (a value that contains "=" is written
# ``--key=a=b``).
_OVERRIDE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*=")
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def _starts_key(token: str) -> bool:
    return (token.startswith("--") and len(token) > 2) or _OVERRIDE.match(token) is not None


def _scalar(raw: str) -> Any:
    """A command-line value as ``parse_overrides`` reads it: YAML (``1e-5``, ``true``, ``null``, ``[a, b]``), an
    empty value is null, text that is not valid YAML stays text."""
    import yaml

    from gkd.config import parse_value

    if raw.strip() == "":
        return None
    try:
        return parse_value(raw)
    except yaml.YAMLError:
        return raw


def _overlay(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` merged over ``base`` (nested mappings merged), a key of ``top`` also replacing its synonyms in base."""
    from gkd.config import merge

    base = {k: v for k, v in base.items() if not any(same_key(k, t) for t in top)}
    return merge(base, top)


def cli_overrides(tokens: list[str]) -> dict[str, Any]:
    """The config keys of a ``gkd distill`` / ``gkd sft`` command line (everything but ``--config``) as the nested
    dict :func:`gkd.config.parse_overrides` makes, in TRL's forms and gkd's, later ones winning:

    ``--key value`` / ``--key=value`` -> value; a bare ``--key`` (followed by another ``--key``, a ``key=value``
    override or nothing) -> true; ``--key v1 v2`` -> [v1, v2]; ``--lora.r 8`` -> {"lora": {"r": 8}}; ``key=value`` as
    ``parse_overrides`` reads it. Dashes in ``--key`` names are underscores (``--per-device-train-batch-size``), as
    HfArgumentParser accepts. Keys are not checked here: config_from_dict reports every unknown key in one line.
    """
    from gkd.config import parse_overrides

    out: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if token.startswith("--") and len(token) > 2:
            key, eq, raw = token[2:].partition("=")
            key = key.replace("-", "_")
            if not _KEY.fullmatch(key):
                raise ConfigError(
                    f"'{token}' is not a config key; write --key value (e.g. --learning_rate 2e-5)"
                )
            if eq:
                value = _scalar(raw)
            else:
                values = []
                while i < len(tokens) and not _starts_key(tokens[i]):
                    values.append(_scalar(tokens[i]))
                    i += 1
                value = True if not values else values[0] if len(values) == 1 else values
            layer: dict[str, Any] = {}
            node = layer
            parts = key.split(".")
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = value
        elif "=" in token:
            layer = parse_overrides([token])
        else:
            raise ConfigError(
                f"'{token}' is not a config key: write --key value or key=value (e.g. --lmbda 0.5 or lmbda=0.5)"
            )
        out = _overlay(out, layer)
    return out


def run_config(config_files: list[str] | None, tokens: list[str], sft: bool = False):
    """The validated GKDConfig of ``gkd distill`` / ``gkd sft``: gkd sft's defaults (divergence nll, lmbda 0), then
    the YAML files in order, then the command line's keys (:func:`cli_overrides`); config_from_dict translates TRL's
    keys and reports unknown ones."""
    from gkd.config import config_from_dict, read_yaml

    name = "sft" if sft else "distill"
    if not config_files and not tokens:
        raise ConfigError(
            f"gkd {name} needs --config FILE and/or config keys (--key value or key=value); see gkd {name} -h"
        )
    data: dict[str, Any] = dict(SFT_DEFAULTS) if sft else {}
    for path in config_files or []:
        data = _overlay(data, read_yaml(path))
    data = _overlay(data, cli_overrides(tokens))
    cfg = config_from_dict(data)
    if sft and (cfg.divergence != "nll" or cfg.lmbda != 0.0):
        raise GKDError("gkd sft trains on ground truth: leave divergence and lmbda unset (use gkd distill)")
    return cfg


def config_from_argv(argv: list[str]):
    """The GKDConfig that ``gkd ARGV`` (a distill or sft command line) would train with; nothing is loaded."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command not in CONFIG_COMMANDS:
        raise GKDError(f"not a gkd distill / gkd sft command line: {' '.join(argv)}")
    return run_config(args.config, extra, sft=args.command == "sft")


def _version() -> str:
    from gkd import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    """The ``gkd`` parser: its options, then one parser per command, in the order ``gkd --help`` lists them."""
    parser = argparse.ArgumentParser(
        prog="gkd", description="On-policy distillation of language models (GKD)."
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    parser.add_argument("--version", action="version", version=f"gkd {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_SubParser)
    _add_training_commands(sub)
    _add_inference_commands(sub)
    _add_diagnose_command(sub)
    _add_tool_commands(sub)
    return parser


def _add_training_commands(sub: argparse._SubParsersAction) -> None:
    """gkd distill and gkd sft: config files and keys; their ``--help`` ends with every config key."""
    for name, short, what in (
        (
            "distill",
            "distil a teacher into a student",
            "Distil a teacher into a student (any GKD configuration).",
        ),
        (
            "sft",
            "supervised fine-tuning on ground truth (divergence: nll, lmbda: 0)",
            "Supervised fine-tuning on ground truth (gkd distill with divergence: nll, lmbda: 0).",
        ),
    ):
        p = sub.add_parser(
            name,
            help=short,
            usage=_CONFIG_USAGE.format(name=name),
            description=_CONFIG_DESCRIPTION.format(what=what),
            formatter_class=argparse.RawDescriptionHelpFormatter,
            allow_abbrev=False,  # --conf is a config key, not --config
        )
        p.lists_config_keys = True
        p.config_defaults = SFT_DEFAULTS if name == "sft" else None
        _add_config_args(p)


def _add_inference_commands(sub: argparse._SubParsersAction) -> None:
    """gkd generate and gkd eval: a model, a dataset, the sampling settings."""
    for name in ("generate", "eval"):
        p = sub.add_parser(
            name, help="sample completions to JSONL" if name == "generate" else "score a model"
        )
        p.add_argument("--model", required=True)
        p.add_argument("--dataset", required=True)
        p.add_argument("--split", default="test")
        p.add_argument("--max-samples", type=int, default=None)
        p.add_argument("--max-new-tokens", type=int, default=128)
        p.add_argument("--max-prompt-length", type=int, default=1024)
        p.add_argument("--temperature", type=float, default=1.0)
        p.add_argument("--batch-size", type=int, default=64)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
        p.add_argument(
            "--dtype",
            default="auto",
            choices=["auto", "float32", "bfloat16", "float16"],
            help="auto: bfloat16 on a CUDA GPU that supports it, float32 on the CPU",
        )
        p.add_argument(
            "--apply-chat-template",
            action="store_true",
            help="wrap plain-string prompts in the tokenizer's chat template (chat records always use it)",
        )
        p.add_argument(
            "--chat-template-path", default=None, help="a Jinja chat template file or tokenizer folder"
        )
        p.add_argument(
            "--fewshot-file",
            default=None,
            help="worked examples (records with a prompt and a target) put before every prompt (docs/config.md)",
        )
        p.add_argument(
            "--fewshot-k",
            type=int,
            default=None,
            help="use the first K examples of --fewshot-file (default: all)",
        )
        if name == "generate":
            p.add_argument("--out", required=True)
            p.add_argument("--greedy", action="store_true")
            p.add_argument("--top-k", type=int, default=0)
            p.add_argument("--top-p", type=float, default=1.0)
            p.add_argument("--num-samples", type=int, default=1)
        else:
            p.add_argument(
                "--metric",
                required=True,
                help="a metric name, a built-in task name, or mc_accuracy (multiple-choice records: no generation)",
            )
            p.add_argument("--greedy-only", action="store_true")
            p.add_argument(
                "--tokenize",
                default="standard",
                choices=["standard", "whitespace"],
                help="bleu/rouge tokenisation: standard (sacrebleu 13a, rouge-score) or whitespace (task names: always)",
            )
            p.add_argument(
                "--num-beams",
                type=int,
                default=1,
                metavar="N",
                help="beam search with N beams instead of greedy decoding (reported as beam/<metric>)",
            )
            p.add_argument(
                "--length-penalty", type=float, default=1.0, metavar="P", help="beam search's length penalty"
            )
            p.add_argument(
                "--bootstrap",
                type=int,
                default=0,
                metavar="N",
                help="95%% bootstrap intervals from N resamples of the examples (<metric>_ci_low/_ci_high)",
            )


def _add_diagnose_command(sub: argparse._SubParsersAction) -> None:
    """gkd diagnose: a teacher, a student, a dataset and the measurement's settings."""
    p = sub.add_parser(
        "diagnose",
        help="will on-policy data help? divergence on dataset vs student prefixes, off-track and recovery rates",
        description="Measure whether on-policy distillation (lambda > 0) should help, before training "
        "(docs/diagnose.md).",
    )
    p.add_argument("--teacher", required=True, help="a local folder or hub id")
    p.add_argument(
        "--student", required=True, help="a local folder or hub id (same tokenizer as the teacher)"
    )
    p.add_argument(
        "--dataset", required=True, help="records: prompt[/completion] or messages (JSONL, folder, hub)"
    )
    p.add_argument("--metric", default=None, help="a metric or task name, or module:function (1.0 = right)")
    p.add_argument("--split", default="test")
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-prompt-length", type=int, default=1024)
    p.add_argument(
        "--temperature", type=float, default=1.0, help="the student's (and teacher's) sampling temperature"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--off-track", type=float, default=0.05, help="a token is off-track below this teacher probability"
    )
    p.add_argument("--out", default=None, help="write DIR/diagnose.json (every number, by position too)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument(
        "--apply-chat-template", action="store_true", help="wrap plain-string prompts in the chat template"
    )
    p.add_argument(
        "--chat-template-path", default=None, help="a Jinja chat template file or tokenizer folder"
    )


def _add_tool_commands(sub: argparse._SubParsersAction) -> None:
    """gkd prepare, demo, serve-teacher and experiment."""
    p = sub.add_parser("prepare", help="write a built-in task's data, tokenizer and tiny models")
    p.add_argument("task")
    p.add_argument("--out", required=True)
    p.add_argument("--n-train", type=int, default=20000)
    p.add_argument("--n-eval", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="overwrite a folder that holds another task's files")

    p = sub.add_parser(
        "demo", help="the built-in comparison of distillation methods (about 10 minutes on 2 cores)"
    )
    p.add_argument("--output-dir", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="a reduced run that takes seconds (for tests)")
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--workers", type=int, default=None, help="parallel worker processes (default: 2)")
    p.add_argument(
        "--retrain-teacher", action="store_true", help="train the teacher instead of using the shipped one"
    )
    p.add_argument(
        "--train-teacher",
        action="store_true",
        help="(maintainers) train the teacher and write it to gkd's assets",
    )

    p = sub.add_parser(
        "serve-teacher",
        help="serve a teacher's log-probs over HTTP (vLLM-compatible /v1/completions; pip install 'gkd[serve]')",
    )
    p.add_argument("model", help="the teacher: a local folder or hub id")
    p.add_argument("--host", default="127.0.0.1", help="any address but loopback needs --api-key")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--api-key", default=None, help="required bearer token (Authorization: Bearer KEY)")
    p.add_argument("--max-batch-tokens", type=int, default=8192, help="tokens per forward and per request")
    p.add_argument("--served-model-name", default=None, help="the model id in /v1/models (default: MODEL)")

    from gkd.experiments import (
        EXPERIMENTS,
        INVESTIGATIONS,
    )  # tuples of names: importing them loads nothing heavy

    p = sub.add_parser("experiment", help="run one of the paper's experiment families at toy scale")
    p.add_argument(
        "name", help=", ".join(EXPERIMENTS + INVESTIGATIONS) + " (RESULTS.md has what each measured)"
    )
    p.add_argument("--output-dir", default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--workers", type=int, default=None, help="parallel worker processes (default: 2)")

    p = sub.add_parser(
        "study",
        help="compare distillation methods on your own models and data, paired by seed (docs/studies.md)",
    )
    p.add_argument("file", help="the study file (YAML): teacher, student, data, metric, methods, seeds, ...")
    p.add_argument(
        "--out", default=None, help="output folder (default: the file's output_dir, else runs/study-NAME)"
    )
    p.add_argument("--workers", type=int, default=None, help="parallel worker processes (default: 2)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command in CONFIG_COMMANDS:
        args.overrides = extra  # config keys, TRL's --key value forms and key=value (see cli_overrides)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    quiet_libraries()
    handlers = {
        "distill": lambda a: cmd_distill(run_config(a.config, a.overrides)),
        "sft": lambda a: cmd_distill(run_config(a.config, a.overrides, sft=True)),
        "generate": cmd_generate,
        "eval": cmd_eval,
        "prepare": cmd_prepare,
        "diagnose": cmd_diagnose,
        "demo": cmd_demo,
        "experiment": cmd_experiment,
        "study": cmd_study,
        "serve-teacher": cmd_serve_teacher,
    }
    try:
        return handlers[args.command](args)
    except GKDError as e:
        if args.debug:
            raise
        if (
            int(os.environ.get("RANK", "0")) == 0
        ):  # under torchrun: one error line (rank 0's), not one per process
            print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
