"""Test helpers that use gkd the way people do: the CLI in-process, on files in a working folder.

``World`` builds, once per test session, what a user brings: tiny models of several families saved as folders
(including ones named like the hub ids the docs use, so a documented command runs as written), and the same
records in every documented data format. ``run_cli`` runs ``gkd ...`` in-process (no 5-second interpreter start)
and returns the exit code, stdout and stderr, turning any escaping exception into a failure that shows the
traceback, which is exactly what a user must never see.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import traceback
from dataclasses import dataclass
from pathlib import Path

from conftest import TINY

# model folders a user might point gkd at: (name, spec overrides or architecture, role)
FAMILIES = {
    "llama": ({**TINY["llama_student"]}, {**TINY["llama_teacher"]}),
    # Qwen2.5-style: the head has padding rows beyond the tokenizer (vocab_size > len(tokenizer)), q/k/v bias
    "qwen2": (
        {**TINY["qwen2_student"], "max_position_embeddings": 512, "pad_rows": 8},
        {**TINY["qwen2_teacher"], "max_position_embeddings": 512, "pad_rows": 8},
    ),
    # GPT-2 with a short context (learned absolute positions: a hard limit)
    "gpt2": (TINY["gpt2_student"], TINY["gpt2_teacher"]),
    "t5": ({**TINY["t5"]}, {**TINY["t5"], "d_model": 32}),
}


@dataclass
class World:
    """Saved model pairs and data files; paths are absolute."""

    root: Path

    def model(self, family: str, role: str) -> str:
        return str(self.root / "models" / f"{family}-{role}")

    def data(self, fmt: str, split: str = "train") -> str:
        return str(self.root / "data" / f"{fmt}-{split}.jsonl")


DATA_FORMATS = ("prompt_completion", "messages", "prompt_only", "conversational", "messages_prompt_only")


def _format(record: dict, fmt: str) -> dict:
    p, c = record["prompt"], record["completion"]
    if fmt == "prompt_completion":
        return record
    if fmt == "messages":
        return {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": c}]}
    if fmt == "prompt_only":
        return {"prompt": p, "references": record["references"]}
    if fmt == "conversational":
        return {
            "prompt": [{"role": "user", "content": p}],
            "completion": [{"role": "assistant", "content": c}],
        }
    if fmt == "messages_prompt_only":
        return {"messages": [{"role": "user", "content": p}]}
    raise ValueError(fmt)


def build_world(root: Path, tokenizer, records: list[dict], eval_records: list[dict]) -> World:
    from gkd.models import build_model

    world = World(root)
    for family, specs in FAMILIES.items():
        for role, spec, seed in (("student", specs[0], 1), ("teacher", specs[1], 0)):
            spec = dict(spec)
            pad = spec.pop("pad_rows", 0)
            if pad:
                spec["vocab_size"] = len(tokenizer) + pad
            model = build_model(spec, tokenizer, seed=seed)
            folder = root / "models" / f"{family}-{role}"
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
    (root / "data").mkdir(parents=True, exist_ok=True)
    for fmt in DATA_FORMATS:
        for split, recs in (("train", records), ("test", eval_records)):
            with open(world.data(fmt, split), "w") as fh:
                for r in recs:
                    fh.write(json.dumps(_format(r, fmt)) + "\n")
    return world


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.startswith("error:")]

    def is_clean_error(self) -> bool:
        """Exit 2 with exactly one ``error:`` line and no traceback."""
        return self.code == 2 and len(self.error_lines) == 1 and "Traceback" not in self.err

    def __str__(self) -> str:
        return f"exit {self.code}\n--- stdout\n{self.out}\n--- stderr\n{self.err}"


def run_cli(argv: list[str] | str, cwd: Path | None = None) -> CliResult:
    """``gkd ARGV`` in this process, in ``cwd``; an exception escaping ``main`` becomes exit code -1 plus traceback."""
    from gkd.cli import main

    if isinstance(argv, str):
        argv = shlex.split(argv)
    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as e:  # argparse
                code = e.code if isinstance(e.code, int) else 2
            except BaseException:
                err.write("Traceback (escaped main):\n" + traceback.format_exc())
                code = -1
    finally:
        os.chdir(old)
    return CliResult(code, out.getvalue(), err.getvalue())
