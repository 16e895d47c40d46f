"""Shared fixtures: tiny models built from a config (never downloaded) and a small built-in dataset."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(int(os.environ.get("GKD_TEST_THREADS", "2")))

from tiny import TINY, base_config, make_model  # noqa: E402,F401  (plain module: usable without pytest)


@pytest.fixture(scope="session")
def task():
    from gkd.tasks import get_task

    return get_task("summarization")


@pytest.fixture(scope="session")
def tokenizer(task):
    return task.build_tokenizer()


@pytest.fixture(scope="session")
def records(task):
    return task.generate("train", 256, seed=0)


@pytest.fixture(scope="session")
def eval_records(task):
    return task.generate("test", 32, seed=0)


@pytest.fixture
def llama_pair(tokenizer):
    """(student, teacher) tiny Llama models, freshly initialised."""
    return make_model("llama_student", tokenizer, seed=1), make_model("llama_teacher", tokenizer, seed=0)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer, records, eval_records) -> Path:
    """A folder with saved tiny student/teacher models (with tokenizer) and train/test JSONL files."""
    root = tmp_path_factory.mktemp("models")
    for name, kind, seed in (("student", "llama_student", 1), ("teacher", "llama_teacher", 0)):
        m = make_model(kind, tokenizer, seed=seed)
        m.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    for name, recs in (("train.jsonl", records), ("test.jsonl", eval_records)):
        with (root / name).open("w") as fh:
            for r in recs:
                fh.write(json.dumps(r) + "\n")
    return root


@pytest.fixture(scope="session")
def world(tmp_path_factory, tokenizer, records, eval_records):
    """Saved tiny model pairs of several families and the records in every data format (see ``userland``)."""
    from userland import build_world

    return build_world(tmp_path_factory.mktemp("world"), tokenizer, records, eval_records)
