"""The docs are tests: every command in README.md and docs/*.md runs as written, and so does every preset.

Commands are extracted from the fenced blocks, so a command added to the docs is tested without anyone remembering
to. What the harness changes, and only this: hub ids (``Qwen/...``) and the placeholder files the docs name
(``my_prompts.jsonl``, ``student/``, ...) are created as tiny local models and small data files in the working folder
before the command runs (so the command itself is unchanged); step counts are capped (``max_steps=N`` -> 2, with
``checkpoint-N`` following); ``gkd demo`` / ``gkd experiment`` get ``--quick``. ``gkd study FILE`` runs the doc's
YAML block that starts with ``# FILE``, written to the working folder with its ``max_steps`` capped the same way and
at most 2 seeds, its models and data provided like the commands' (``eval_dataset``: the held-out records). Commands that are the test suite
itself or need another machine are listed in ``NOT_RUN`` with the reason, and a command that is neither run nor
listed fails the test.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
from userland import run_cli

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
STEP_CAP = 2

# command prefix -> why it is not run here
NOT_RUN = {
    "make demo": "the full demo (10-14 min); `gkd demo --quick` and the demo's own tests cover it",
    "make test": "this test suite",
    "accelerate launch": "multi-process launch; tests/test_distributed.py runs the same trainer in 2 processes",
    "python benchmarks/": "benchmarks (minutes, install TRL); never timed in tests",
}


def fenced_blocks(path: Path) -> list[tuple[str, str, int]]:
    """(language, text, first line number) of every fenced block of a markdown file."""
    blocks, lang, buf, start = [], None, [], 0
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("```"):
            if lang is None:
                lang, buf, start = line[3:].strip() or "sh", [], i + 1
            else:
                blocks.append((lang, "\n".join(buf), start))
                lang = None
        elif lang is not None:
            buf.append(line)
    return blocks


def shell_commands(text: str) -> list[str]:
    """Commands of a shell block: continuation lines joined, comments dropped; lines that are not commands (a
    directory listing) are skipped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    cmds = []
    for line in joined.splitlines():
        first = line.split()[0] if line.split() else ""
        if first in ("gkd", "make", "python", "accelerate", "pip") or first.startswith("./"):
            words = shlex.split(line, comments=True)
            cmds.append(" ".join(shlex.quote(w) for w in words))
    return cmds


def documented() -> list[tuple[str, str, list[str]]]:
    """(doc:line id, language, commands or [code]) for every runnable block."""
    out = []
    for doc in DOCS:
        for lang, text, line in fenced_blocks(doc):
            ident = f"{doc.name}:{line}"
            if lang in ("sh", "bash", "shell", "console"):
                cmds = shell_commands(text)
                if cmds:
                    out.append((ident, "sh", cmds))
            elif lang == "python":
                out.append((ident, "python", [text]))
    return out


def _cap(cmd: str) -> str:
    cmd = re.sub(r"\bmax_steps=\d+", f"max_steps={STEP_CAP}", cmd)
    cmd = re.sub(r"--max_steps[ =]\d+", f"--max_steps {STEP_CAP}", cmd)  # TRL's flag form
    cmd = re.sub(r"\bcheckpoint-\d+", f"checkpoint-{STEP_CAP}", cmd)
    if re.match(r"gkd (demo|experiment)\b", cmd) and "--quick" not in cmd:
        cmd += " --quick"
    return cmd


def _hub_like(value: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+", value) is not None


def _provide(value: str, role: str, cwd: Path, world) -> None:
    """Create the local stand-in for a model / dataset the docs name, if it is not produced by an earlier command."""
    target = cwd / value
    if target.exists() or value.startswith("runs/"):
        return
    if role in ("student", "teacher"):
        shutil.copytree(
            world.model("qwen2", role), target
        )  # a chat model with padded head rows, 512 positions
    elif role == "dataset" and value.endswith(".jsonl"):
        fmt = "messages_prompt_only" if "prompt" in value else "prompt_completion"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(world.data(fmt), target)
    elif role == "held_out" and value.endswith(
        ".jsonl"
    ):  # a study's evaluation records (not its training data)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(world.data("prompt_completion", "test"), target)


ROLES = {
    "model_name_or_path": "student",
    "teacher_model_name_or_path": "teacher",
    "dataset": "dataset",
    "dataset_name": "dataset",
    "eval_dataset": "dataset",
    "model": "student",  # the TRL-shaped Python call
    "teacher_model": "teacher",
}


def _provide_for_command(cmd: str, cwd: Path, world) -> None:
    words = shlex.split(cmd)
    for i, word in enumerate(words):
        key, _, value = word.partition("=")
        if key.startswith("--"):  # TRL's --key value / --key=value
            key = key[2:]
            if not value and i + 1 < len(words) and not words[i + 1].startswith("--"):
                value = words[i + 1]
        if key in ROLES and value and (_hub_like(value) or not value.startswith("runs/")):
            _provide(value, ROLES[key], cwd, world)


STUDY_ROLES = {
    "teacher": "teacher",
    "student": "student",
    "train_dataset": "dataset",
    "eval_dataset": "held_out",
}


def _provide_study_file(cmd: str, doc: Path, cwd: Path, world) -> None:
    """``gkd study FILE``: the doc's YAML block headed ``# FILE``, capped (steps, seeds), and its models and data."""
    import yaml

    name = shlex.split(cmd)[2]
    text = next(
        (t for lang, t, _ in fenced_blocks(doc) if lang == "yaml" and t.startswith(f"# {name}")), None
    )
    assert text is not None, f"`{cmd}`: {doc.name} has no yaml block starting with '# {name}'"
    text = re.sub(r"\bmax_steps: \d+", f"max_steps: {STEP_CAP}", text)
    text = re.sub(r"^seeds: \d+", "seeds: 2", text, flags=re.M)
    (cwd / name).write_text(text)
    for key, value in yaml.safe_load(text).items():
        if key in STUDY_ROLES:
            _provide(value.rstrip("/"), STUDY_ROLES[key], cwd, world)


def _provide_for_python(code: str, cwd: Path, world) -> None:
    for key, value in re.findall(r"(\w+)=\"([^\"]+)\"", code):
        if key in ROLES:
            _provide(value.rstrip("/"), ROLES[key], cwd, world)


CASES = documented()


@pytest.mark.parametrize(("ident", "lang", "body"), CASES, ids=[c[0] for c in CASES])
def test_documented_commands_run_as_written(ident, lang, body, world, tmp_path):
    for cmd in body if lang == "sh" else []:
        reason = next((why for prefix, why in NOT_RUN.items() if cmd.startswith(prefix)), None)
        if reason is not None:
            continue
        assert cmd.startswith("gkd "), (
            f"{ident}: `{cmd}` is neither run by this harness nor listed in NOT_RUN"
        )
        _provide_for_command(cmd, tmp_path, world)
        if cmd.startswith("gkd study "):
            doc = next(d for d in DOCS if d.name == ident.split(":")[0])
            _provide_study_file(cmd, doc, tmp_path, world)
        result = run_cli(shlex.split(_cap(cmd))[1:], cwd=tmp_path)
        assert result.code == 0, f"{ident}: `{cmd}`\n{result}"
        assert "Traceback" not in result.err, f"{ident}: `{cmd}`\n{result}"
    if lang == "python":
        code = re.sub(r"\bmax_steps=\d+", f"max_steps={STEP_CAP}", body[0])
        _provide_for_python(code, tmp_path, world)
        import os

        old = os.getcwd()
        os.chdir(tmp_path)
        try:
            exec(compile(code, ident, "exec"), {"__name__": "__docs__"})
        finally:
            os.chdir(old)


def test_every_runnable_doc_block_is_collected():
    """Guard against the harness silently finding nothing (a renamed fence, a moved doc)."""
    idents = [c[0] for c in CASES]
    assert any(i.startswith("README.md") for i in idents)
    assert sum(lang == "python" for _, lang, _ in CASES) >= 1
    every = [cmd for _, lang, cmds in CASES if lang == "sh" for cmd in cmds]
    assert any(cmd.startswith("gkd distill") for cmd in every)
    assert any(cmd.startswith("gkd eval") for cmd in every)


# ---------------------------------------------------------------------------------------------------------------
# docs/config.md: the complete config block is the truth about keys and defaults
# ---------------------------------------------------------------------------------------------------------------
def _config_block() -> tuple[dict, set[str]]:
    from gkd.config import parse_value

    text = next(t for lang, t, _ in fenced_blocks(ROOT / "docs" / "config.md") if lang == "yaml")
    data = parse_value(text)  # the YAML as gkd reads a config file
    marked = {line.split(":")[0].strip() for line in text.splitlines() if "(required" in line}
    return data, marked


def test_config_md_lists_every_key_with_its_default():
    import dataclasses

    from gkd.config import GKDConfig, LoraConfig

    data, marked = _config_block()
    fields = {f.name: f for f in dataclasses.fields(GKDConfig)}
    assert set(data) == set(fields), "docs/config.md and GKDConfig disagree on the keys"
    defaults = GKDConfig()
    for key, value in data.items():
        if key in marked:
            continue
        field = fields[key]
        # the declared default (max_steps: null is resolved when the config is built, and documented as such)
        ours = field.default if field.default is not dataclasses.MISSING else getattr(defaults, key)
        if dataclasses.is_dataclass(ours):
            ours = dataclasses.asdict(ours)
        assert value == ours, f"docs/config.md says {key}: {value!r}, the default is {ours!r}"
    lora_doc = re.search(r"lora: null\s+# e\.g\. (\{.*?\})", (ROOT / "docs" / "config.md").read_text())
    assert lora_doc is not None
    from gkd.config import parse_value

    assert set(parse_value(lora_doc.group(1))) == {f.name for f in dataclasses.fields(LoraConfig)}


def test_the_complete_config_block_is_a_valid_config():
    from gkd.config import config_from_dict

    data, _ = _config_block()
    cfg = config_from_dict(data)
    assert cfg.model_name_or_path == data["model_name_or_path"]


# ---------------------------------------------------------------------------------------------------------------
# every preset, by name, as a pip user reaches it
# ---------------------------------------------------------------------------------------------------------------
def _presets() -> list[str]:
    from gkd.config import presets

    return presets()


@pytest.mark.parametrize("preset", _presets())
def test_every_preset_runs_by_name(preset, world, tmp_path):
    args = [
        "distill",
        "--config",
        preset,
        f"model_name_or_path={world.model('llama', 'student')}",
        f"teacher_model_name_or_path={world.model('llama', 'teacher')}",
        f"dataset={world.data('prompt_completion')}",
        f"max_steps={STEP_CAP}",
        "max_new_tokens=6",
        "per_device_train_batch_size=4",
        f"output_dir={tmp_path / 'run'}",
    ]
    result = run_cli(args)
    assert result.code == 0, str(result)
    summary = json.loads(result.out.strip().splitlines()[-1])
    assert summary["step"] == STEP_CAP and summary["status"] == "finished"
    assert (tmp_path / "run" / f"checkpoint-{STEP_CAP}").is_dir()
