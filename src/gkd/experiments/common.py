"""The lowest pieces of the experiments: task data on disk and the demo teacher gkd ships.

``prepare_task`` is ``gkd prepare``: a built-in task's JSONL splits, tokenizer and untrained tiny models in a folder.
The study machinery that the demo and the experiment families share is in :mod:`gkd.experiments.study`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gkd.io import write_jsonl

__all__ = ["ASSET_TEACHER", "prepare_task", "read_jsonl", "write_jsonl"]

# the demo's teacher, trained by `gkd demo --train-teacher` (maintainers, in a source checkout) and shipped with gkd
ASSET_TEACHER = Path(__file__).resolve().parent.parent / "assets" / "demo_teacher"


# ---------------------------------------------------------------------------------------------------------------
# data on disk
# ---------------------------------------------------------------------------------------------------------------
def read_jsonl(path: Path) -> list[dict]:
    with path.open() as fh:
        return [json.loads(line) for line in fh if line.strip()]


def prepare_task(
    name: str,
    out: Path,
    *,
    n_train: int = 20000,
    n_eval: int = 500,
    seed: int = 0,
    params: dict[str, Any] | None = None,
    force: bool = False,
) -> dict[str, Path]:
    """Write a built-in task's train/validation/test JSONL, its tokenizer and randomly initialised tiny models.

    The result is everything ``gkd sft`` / ``gkd distill`` need, e.g.
    ``gkd sft model_name_or_path=OUT/teacher-init dataset=OUT/train.jsonl output_dir=OUT/teacher``.
    ``OUT/task.json`` records which task the folder holds; another task's folder is refused unless ``force``.
    """
    from gkd.errors import ConfigError
    from gkd.models import build_model
    from gkd.tasks import TASKS, get_task

    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(TASKS))}")
    marker = out / "task.json"
    if not force and out.is_dir() and any(out.iterdir()):
        held = json.loads(marker.read_text()).get("task") if marker.is_file() else None
        if held != name:
            what = f"task '{held}'" if held else "other files"
            raise ConfigError(
                f"'{out}' already holds {what}; choose another --out folder or pass --force to overwrite it"
            )
    task = get_task(name, **(params or {}))
    out.mkdir(parents=True, exist_ok=True)
    tok = task.build_tokenizer(str(out / "tokenizer"))
    paths: dict[str, Path] = {"tokenizer": out / "tokenizer"}
    for split, n in (("train", n_train), ("validation", n_eval), ("test", n_eval)):
        paths[split] = out / f"{split}.jsonl"
        write_jsonl(paths[split], task.generate(split, n, seed))
    for role, spec in (
        ("teacher-init", task.teacher_model_config()),
        ("student-init", task.student_model_config()),
    ):
        model = build_model(spec, tok, seed=seed)
        model.save_pretrained(out / role)
        tok.save_pretrained(out / role)
        paths[role] = out / role
    marker.write_text(json.dumps({"task": name, "params": params or {}, "seed": seed}) + "\n")
    return paths
