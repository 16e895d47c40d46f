"""A Python interpreter that can import both gkd and TRL, for the side-by-side benchmarks.

TRL is never a dependency of gkd. When the interpreter running a benchmark cannot import ``trl``, a separate
virtual environment is created (once) and reused:

    python benchmarks/_trl_env.py            # create / check it and print its interpreter

Location: ``$GKD_TRL_VENV`` if set, else ``~/.cache/gkd/bench-venv-trl`` (outside the repository, so it never ends
up in git). It is a fresh venv (not ``--system-site-packages``) with, in this order:

1. ``torch==<the version of the current interpreter, default 2.13.0>`` first, so that pip takes the CPU wheel that
   lies on disk instead of resolving a multi-GB CUDA build;
2. ``trl==1.16.*`` plus ``transformers``/``accelerate``/``datasets``/``tokenizers`` pinned to the versions of the
   current interpreter (so gkd and TRL run on the same library versions), and gkd's own runtime dependencies from
   ``pyproject.toml``. gkd itself is used from ``src/`` via ``PYTHONPATH`` (nothing is installed in the repo).
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import os
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRL_SPEC = "trl==1.16.*"
PINNED = ("transformers", "accelerate", "datasets", "tokenizers")


def venv_dir() -> Path:
    return Path(os.environ.get("GKD_TRL_VENV") or Path.home() / ".cache" / "gkd" / "bench-venv-trl")


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _gkd_dependencies() -> list[str]:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    return [d for d in data["project"]["dependencies"] if not d.replace(" ", "").startswith("torch")]


def _has_trl(python: str) -> bool:
    code = "import trl, torch, transformers; from trl.experimental.gkd import GKDTrainer"
    return subprocess.run([python, "-c", code], capture_output=True).returncode == 0


def _pip(python: Path, *args: str, log=print) -> None:
    cmd = [str(python), "-m", "pip", "install", "--quiet", *args]
    log("  $ " + " ".join(cmd))
    subprocess.run(cmd, check=True)


def trl_python(log=print) -> str:
    """The interpreter to run the benchmark children with: this one if it has TRL, else the benchmark venv."""
    if importlib.util.find_spec("trl") is not None and _has_trl(sys.executable):
        return sys.executable
    venv = venv_dir()
    python = venv / "bin" / "python"
    if python.exists() and _has_trl(str(python)):
        return str(python)
    log(f"TRL is not importable here; creating the benchmark environment {venv} (once, a few minutes)")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    torch_version = (_version("torch") or "2.13.0").split("+")[0]
    _pip(python, f"torch=={torch_version}", log=log)
    pins = [f"{d}=={v}" for d in PINNED if (v := _version(d))]
    _pip(python, TRL_SPEC, *pins, *_gkd_dependencies(), log=log)
    if not _has_trl(str(python)):
        raise RuntimeError(f"{venv}: trl still cannot be imported after installation")
    return str(python)


if __name__ == "__main__":
    print(trl_python())
