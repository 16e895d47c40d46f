"""The two-process launch of the distributed tests: a script under torchrun on 2 CPU processes (gloo).

A plain module (no pytest), like ``tiny.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def two_processes(
    script: str | Path, *args: str | Path, port: int, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run ``script args...`` under ``python -m torch.distributed.run --nproc_per_node 2 --master_port port`` and
    return the finished process (stdout and stderr captured as text; the caller checks its return code).

    Each process runs one thread (``OMP_NUM_THREADS=1``) and imports what this interpreter imports (its ``sys.path``
    as ``PYTHONPATH``: this gkd and the tests' helper modules); ``env`` adds to that environment.
    """
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port),
    ]
    return subprocess.run(
        [*launch, str(script), *(str(a) for a in args)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path), **(env or {})},
        timeout=timeout,
    )
