"""Bad input through the CLI: one line naming the problem and the fix, exit code 2, no traceback.

Plus the faults a run must survive: non-finite steps, all-masked batches.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY, base_config, make_model

from gkd.cli import main
from gkd.errors import TrainingError
from gkd.trainer import GKDTrainer


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory, tokenizer, task):
    """Models that cannot be paired with the tiny student: another tokenizer, a short vocab, a seq2seq model."""
    from gkd.models import build_model
    from gkd.tasks import get_task

    root = tmp_path_factory.mktemp("bad_models")
    other_tok = get_task("arithmetic").build_tokenizer()
    m = build_model(TINY["llama_teacher"], other_tok, seed=0)
    m.save_pretrained(root / "other_tokenizer")
    other_tok.save_pretrained(root / "other_tokenizer")
    m = build_model({**TINY["llama_teacher"], "vocab_size": len(tokenizer) - 10}, tokenizer, seed=0)
    m.save_pretrained(root / "short_vocab")
    m = make_model("t5", tokenizer, seed=0)
    m.save_pretrained(root / "seq2seq")
    tokenizer.save_pretrained(root / "seq2seq")
    padded = build_model({**TINY["llama_teacher"], "vocab_size": len(tokenizer) + 8}, tokenizer, seed=0)
    padded.save_pretrained(root / "padded_vocab")
    return root


def _run(tmp_path: Path, capsys, config: dict | None, *extra: str, raw: str | None = None) -> tuple[int, str]:
    path = tmp_path / "run.yaml"
    if raw is not None:
        path.write_bytes(raw.encode("latin-1"))
    elif config is not None:
        path.write_text(yaml.safe_dump(config))
    code = main(["distill", "--config", str(path), *extra])
    captured = capsys.readouterr()
    return code, captured.err + captured.out


def _base(model_dir: Path, tmp_path: Path, **kw) -> dict:
    cfg = {
        "model_name_or_path": str(model_dir / "student"),
        "teacher_model_name_or_path": str(model_dir / "teacher"),
        "dataset": str(model_dir / "train.jsonl"),
        "output_dir": str(tmp_path / "out"),
        "max_steps": 2,
        "per_device_train_batch_size": 4,
        "max_new_tokens": 4,
        "progress": False,
        "save_steps": 0,
    }
    cfg.update(kw)
    return cfg


def _jsonl(tmp_path: Path, name: str, lines: list[str]) -> str:
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return str(p)


GOOD = json.dumps({"prompt": "Q a b C :", "completion": "c"})

# (case id, config builder, expected message fragment)
CASES = [
    ("unknown key", lambda d, t, b: {**_base(d, t), "lmbd": 0.5}, "did you mean 'lmbda'"),
    ("wrong type", lambda d, t, b: _base(d, t, learning_rate="fast"), "'learning_rate' must be float"),
    ("lambda out of range", lambda d, t, b: _base(d, t, lmbda=2.0), "'lmbda' must be in [0, 1]"),
    ("beta out of range", lambda d, t, b: _base(d, t, beta=1.5), "'beta' must be in [0, 1]"),
    (
        "beta out of range normalized",
        lambda d, t, b: _base(d, t, beta=-0.5, jsd_normalize=True),
        "'beta' must be in [0, 1]",
    ),
    (
        "unknown divergence",
        lambda d, t, b: _base(d, t, divergence="wasserstein"),
        "'divergence' must be one of",
    ),
    ("zero learning rate", lambda d, t, b: _base(d, t, learning_rate=0.0), "'learning_rate' must be > 0"),
    (
        "negative learning rate",
        lambda d, t, b: _base(d, t, learning_rate=-1.0),
        "'learning_rate' must be > 0",
    ),
    (
        "zero batch size",
        lambda d, t, b: _base(d, t, per_device_train_batch_size=0),
        "'per_device_train_batch_size'",
    ),
    ("zero steps", lambda d, t, b: _base(d, t, max_steps=0), "'max_steps' must be a positive integer"),
    (
        "max_new_tokens zero",
        lambda d, t, b: _base(d, t, max_new_tokens=0),
        "'max_new_tokens' must be a positive",
    ),
    (
        "missing student",
        lambda d, t, b: _base(d, t, model_name_or_path=str(t / "nope")),
        "is not a local folder",
    ),
    ("missing teacher", lambda d, t, b: _base(d, t, teacher_model_name_or_path=str(t / "nope")), "teacher"),
    (
        "different tokenizers with the top-k cache",
        lambda d, t, b: _base(
            d, t, teacher_model_name_or_path=str(b / "other_tokenizer"), teacher_cache="topk"
        ),
        "teacher_cache: topk with a teacher whose tokenizer differs",
    ),
    (
        "vocab mismatch",
        lambda d, t, b: _base(d, t, teacher_model_name_or_path=str(b / "short_vocab")),
        "output layer has",
    ),
    (
        "seq2seq teacher causal student",
        lambda d, t, b: _base(d, t, teacher_model_name_or_path=str(b / "seq2seq")),
        "seq2seq",
    ),
    ("empty dataset", lambda d, t, b: _base(d, t, dataset=_jsonl(t, "empty.jsonl", [])), "is empty"),
    ("missing dataset", lambda d, t, b: _base(d, t, dataset=str(t / "none.jsonl")), "does not exist"),
    (
        "bad json line",
        lambda d, t, b: _base(d, t, dataset=_jsonl(t, "bad.jsonl", [GOOD, "{oops", GOOD])),
        "bad.jsonl:2: not valid JSON",
    ),
    (
        "missing prompt",
        lambda d, t, b: _base(d, t, dataset=_jsonl(t, "np.jsonl", [json.dumps({"text": "x"})])),
        "has no 'prompt' field",
    ),
    (
        "prompt-only with lambda < 1",
        lambda d, t, b: _base(
            d, t, lmbda=0.5, dataset=_jsonl(t, "po.jsonl", [json.dumps({"prompt": "Q a :"})])
        ),
        "prompt-only",
    ),
    ("all prompts too long", lambda d, t, b: _base(d, t, max_prompt_length=3), "every prompt"),
    (
        "output dir not writable",
        lambda d, t, b: _base(d, t, output_dir=_jsonl(t, "file.txt", ["x"]) + "/sub"),
        "is not writable",
    ),
    (
        "resume missing",
        lambda d, t, b: _base(d, t, resume_from_checkpoint=str(t / "checkpoint-7")),
        "does not exist",
    ),
    ("alpha without reward", lambda d, t, b: _base(d, t, alpha=0.5, lmbda=1.0), "needs a 'reward'"),
    ("unknown reward", lambda d, t, b: _base(d, t, alpha=0.5, lmbda=1.0, reward="bogus"), "built-in reward"),
]


@pytest.mark.parametrize(("case", "build", "fragment"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(case, build, fragment, model_dir, bad_models, tmp_path, capsys):
    code, err = _run(tmp_path, capsys, build(model_dir, tmp_path, bad_models))
    assert code == 2, err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, err
    assert fragment in lines[0], err
    assert "Traceback" not in err


def test_missing_and_unreadable_config(tmp_path, capsys):
    assert main(["distill", "--config", str(tmp_path / "absent.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    code, err = _run(tmp_path, capsys, None, raw="\xff\xfe\x00 not text")
    assert code == 2 and "cannot read config" in err


def test_skip_bad_lines_counts_them(model_dir, tmp_path, capsys):
    data = _jsonl(tmp_path, "bad.jsonl", [GOOD, "{oops", GOOD, "[1, 2]", GOOD])
    code, output = _run(tmp_path, capsys, _base(model_dir, tmp_path, dataset=data, skip_bad_lines=True))
    assert code == 0, output
    assert "skipped 2 lines" in output


def test_padded_vocab_is_compared_over_the_tokenizer(model_dir, bad_models, tmp_path, capsys):
    """A teacher whose output layer has extra padding rows is fine: only the tokenizer's entries are compared."""
    code, err = _run(
        tmp_path,
        capsys,
        _base(model_dir, tmp_path, teacher_model_name_or_path=str(bad_models / "padded_vocab")),
    )
    assert code == 0, err


def test_resume_from_an_incompatible_config(model_dir, tmp_path, capsys):
    assert _run(tmp_path, capsys, _base(model_dir, tmp_path))[0] == 0
    code, err = _run(
        tmp_path,
        capsys,
        _base(model_dir, tmp_path, per_device_train_batch_size=2, resume_from_checkpoint="latest"),
    )
    assert code == 2 and "per_device_train_batch_size" in err


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def raises(prompts, completions, records):\n    raise RuntimeError('boom')\n"
        "def wrong_len(prompts, completions, records):\n    return [1.0]\n"
        "def nan(prompts, completions, records):\n    return [float('nan')] * len(completions)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_rewards"


@pytest.mark.parametrize(
    ("fn", "fragment"),
    [("raises", "raised RuntimeError: boom"), ("wrong_len", "returned 1 values"), ("nan", "non-finite")],
)
def test_bad_rewards_stop_the_run_naming_the_reward(model_dir, tmp_path, capsys, reward_module, fn, fragment):
    cfg = _base(model_dir, tmp_path, lmbda=1.0, alpha=0.5, reward=f"{reward_module}:{fn}")
    code, err = _run(tmp_path, capsys, cfg)
    assert code == 2 and f"reward '{reward_module}:{fn}'" in err and fragment in err


def test_process_level_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "gkd.cli", "distill", "--config", str(tmp_path / "missing.yaml")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    debug = subprocess.run(
        [sys.executable, "-m", "gkd.cli", "--debug", "distill", "--config", str(tmp_path / "missing.yaml")],
        capture_output=True,
        text=True,
    )
    assert "Traceback" in debug.stderr


# ----------------------------------------------------------------------------------------------------------------
# faults survived
# ----------------------------------------------------------------------------------------------------------------
def test_non_finite_steps_are_skipped_then_the_run_stops_with_a_checkpoint(tokenizer, records, tmp_path):
    student = make_model("llama_student", tokenizer, seed=1)
    teacher = make_model("llama_teacher", tokenizer, seed=0)
    with torch.no_grad():
        teacher.lm_head.weight.fill_(float("nan"))
    cfg = base_config(
        output_dir=str(tmp_path / "out"),
        lmbda=0.0,
        divergence="forward_kl",
        max_steps=20,
        max_consecutive_nonfinite=3,
    )
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    trainer = GKDTrainer(cfg, student=student, teacher=teacher, tokenizer=tokenizer, train_records=records)
    with pytest.raises(TrainingError, match="3 consecutive steps had a non-finite loss") as err:
        trainer.train()
    assert "checkpoint" in str(err.value)
    assert trainer.skipped_steps == 3
    assert (tmp_path / "out" / "checkpoint-3").exists()
    for n, p in trainer.student.named_parameters():  # skipped steps never touched the weights
        torch.testing.assert_close(p, before[n])


def test_a_single_bad_step_is_skipped_and_training_continues(tokenizer, records, tmp_path):
    student = make_model("llama_student", tokenizer, seed=1)
    teacher = make_model("llama_teacher", tokenizer, seed=0)
    cfg = base_config(output_dir=str(tmp_path / "out"), lmbda=0.0, divergence="forward_kl", max_steps=4)
    trainer = GKDTrainer(cfg, student=student, teacher=teacher, tokenizer=tokenizer, train_records=records)
    objective = trainer.setup().objective
    real = objective.loss
    calls = {"n": 0}

    def poisoned(*a, **k):
        calls["n"] += 1
        loss = real(*a, **k)
        return loss * float("inf") if calls["n"] == 2 else loss

    objective.loss = poisoned  # the run's objective is a component: a test may replace its loss
    result = trainer.train()
    assert result.step == 4 and result.skipped_steps == 1


def test_an_all_masked_batch_gives_zero_loss_and_no_nan(tokenizer, records, tmp_path):

    student = make_model("llama_student", tokenizer, seed=1)
    teacher = make_model("llama_teacher", tokenizer, seed=0)
    cfg = base_config(output_dir=str(tmp_path / "out"), lmbda=1.0, divergence="jsd", max_steps=1)
    trainer = GKDTrainer(cfg, student=student, teacher=teacher, tokenizer=tokenizer, train_records=records)
    from gkd.sampling import LocalSampler, Rollout

    class EmptySampler(LocalSampler):  # a rollout backend whose samples are all masked
        def sample(self, model, prompt_ids, prompt_mask, params, generator=None):
            ids = torch.zeros(prompt_ids.shape[0], 3, dtype=torch.long)
            return Rollout(ids, torch.zeros_like(ids, dtype=torch.bool))

    trainer.setup().sampler = EmptySampler()
    record = trainer.train_step()
    assert record["loss"] == 0.0 and record["empty_batch"] is True
    assert math.isfinite(record["grad_norm"]) and record["skipped_steps"] == 0
    for p in trainer.student.parameters():
        assert torch.isfinite(p).all()


def test_vllm_backend_is_a_clear_error_without_vllm_or_a_gpu(model_dir, tmp_path, capsys):
    """vLLM cannot run on this CPU-only machine: asking for it is a one-line error, not a crash."""
    code, err = _run(tmp_path, capsys, _base(model_dir, tmp_path, rollout_backend="vllm"))
    assert code == 2 and "rollout_backend: vllm needs" in err
