"""The end of a run as TRL users expect it: the final model in output_dir, the best model, the hub, trackers, epochs.

Runs are tiny SFT runs (divergence nll: no teacher, no sampling) so each takes a second or two; evaluations that only
need to return numbers are scripted (``gkd.trainer.evaluate`` replaced), so the best model is known in advance.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch
from conftest import base_config
from safetensors.torch import load_file

import gkd.trainer
from gkd import checkpoint as ckpt
from gkd.errors import CheckpointError, ConfigError, GKDError
from gkd.state import BestMetric
from gkd.trainer import GKDTrainer

SFT = {"divergence": "nll", "lmbda": 0.0, "per_device_train_batch_size": 4, "max_new_tokens": 4}


def _trainer(
    out: Path, tokenizer, records, *, student=None, eval_records=None, log=None, **cfg
) -> GKDTrainer:
    from conftest import make_model

    config = base_config(output_dir=str(out), **{**SFT, **cfg})
    if student is None and config.model_name_or_path is None:
        student = make_model("llama_student", tokenizer, seed=1)
    return GKDTrainer(
        config,
        student=student,
        tokenizer=tokenizer if config.model_name_or_path is None else None,
        train_records=records[:16],
        eval_records=eval_records,
        log=log,
    )


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def scripted(monkeypatch):
    """``gkd.trainer.evaluate`` returning the scores of a list in turn (greedy and sampled exact_match); the list of
    evaluations made is ``scripted.calls``."""

    script = SimpleNamespace(scores=[], calls=[])

    def fake(model, tokenizer, data, scorer, **kw):
        value = script.scores[len(script.calls)]
        script.calls.append(value)
        return {"greedy": {"exact_match": value}, "sample": {"exact_match": -value}}

    monkeypatch.setattr(gkd.trainer, "evaluate", fake)
    return script


# --------------------------------------------------------------------------------------------------- final model
def test_the_final_model_and_tokenizer_load_from_output_dir(tokenizer, records, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    t = _trainer(out, tokenizer, records, max_steps=2)
    t.train()
    final = _state(t.student)
    assert _same(_state(AutoModelForCausalLM.from_pretrained(out)), final)
    assert AutoTokenizer.from_pretrained(out)("a b").input_ids == tokenizer("a b").input_ids
    manifest = json.loads((out / ckpt.FINAL_JSON).read_text())
    assert manifest["complete"] and manifest["step"] == 2 and manifest["weights"] == "full"
    assert {"config.json", "model.safetensors"} <= set(manifest["files"])
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()  # the last checkpoint is still written
    # gkd's own tools: `gkd eval --model out` loads the final model; resume still finds the checkpoint
    from gkd.models import load_model

    assert _same(_state(load_model(str(out), what="model")), final)
    assert ckpt.find_latest(out) == out / "checkpoint-2"
    with pytest.raises(CheckpointError, match="not a checkpoint; use resume_from_checkpoint=latest"):
        ckpt.resolve_resume(str(out), out)


def test_a_new_run_in_that_folder_is_refused_and_overwrite_removes_the_final_model(
    tokenizer, records, tmp_path
):
    out = tmp_path / "run"
    _trainer(out, tokenizer, records, max_steps=1).train()
    (out / "notes.txt").write_text("mine")  # not gkd's: never removed
    with pytest.raises(ConfigError, match="already holds a run"):
        _trainer(out, tokenizer, records, max_steps=1).setup()
    listed = ckpt.final_model_files(out)
    _trainer(out, tokenizer, records, max_steps=1, overwrite_output_dir=True).setup()
    assert not any((out / name).exists() for name in listed)
    assert not (out / ckpt.FINAL_JSON).exists() and (out / "notes.txt").read_text() == "mine"


def test_save_model_elsewhere_and_a_kill_mid_write_leaves_a_listed_incomplete_model(
    tokenizer, records, tmp_path
):
    t = _trainer(tmp_path / "run", tokenizer, records, max_steps=1)
    t.train()
    other = t.save_model(tmp_path / "elsewhere")
    assert ckpt.final_model_complete(other) and (other / "model.safetensors").is_file()

    real_replace, calls = ckpt.os.replace, []

    def dies_after_one(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while moving the files into place
        real_replace(src, dst)

    ckpt.os.replace = dies_after_one
    try:
        with pytest.raises(KeyboardInterrupt):
            t.save_model(tmp_path / "elsewhere")
    finally:
        ckpt.os.replace = real_replace
    assert not ckpt.final_model_complete(other)  # never mistaken for a complete model
    assert set(ckpt.final_model_files(other)) >= {"config.json", "model.safetensors"}  # still removable
    t.save_model(tmp_path / "elsewhere")
    assert ckpt.final_model_complete(other)


def test_a_lora_run_saves_its_adapter_and_merge_lora_saves_plain_weights(
    tokenizer, records, model_dir, tmp_path
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 6, 7, 8]])
    out = tmp_path / "lora"
    t = _trainer(
        out,
        tokenizer,
        records,
        model_name_or_path=str(model_dir / "student"),
        lora={"r": 4, "save_merged": True},
        max_steps=2,
        learning_rate=3e-2,
    )
    t.train()
    with torch.no_grad():
        expected = t.student(input_ids=ids).logits
    assert (out / "adapter_config.json").is_file() and not (out / "config.json").exists()
    base = AutoModelForCausalLM.from_pretrained(model_dir / "student")
    with torch.no_grad():
        before = base(input_ids=ids).logits.clone()
        loaded = PeftModel.from_pretrained(base, out)(input_ids=ids).logits
    assert torch.allclose(loaded, expected, atol=1e-5) and not torch.allclose(loaded, before, atol=1e-4)
    assert (out / "merged" / "config.json").is_file()  # lora.save_merged still writes output_dir/merged

    merged = tmp_path / "merged-run"
    t = _trainer(
        merged,
        tokenizer,
        records,
        model_name_or_path=str(model_dir / "student"),
        lora={"r": 4},
        merge_lora=True,
        max_steps=2,
        learning_rate=3e-2,
    )
    t.train()
    with torch.no_grad():
        expected = t.student(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(merged)(input_ids=ids).logits
    assert torch.allclose(plain, expected, atol=1e-5)
    assert not (merged / "adapter_config.json").exists()
    assert (merged / "checkpoint-2" / "adapter_config.json").is_file()  # checkpoints stay adapters
    # saving the adapter over the merged model removes the files of the merged one (and vice versa)
    ckpt.save_final_model(merged, model=t.student, tokenizer=t.run.tokenizer, merged=False)
    assert (merged / "adapter_config.json").is_file() and not (merged / "model.safetensors").exists()


# ------------------------------------------------------------------------------------------------ the best model
def test_load_best_model_at_end_saves_the_best_checkpoint_and_keeps_it(
    tokenizer, records, eval_records, tmp_path, scripted
):
    from transformers import AutoModelForCausalLM

    scripted.scores = [10.0, 50.0, 20.0]  # evaluations at steps 2, 4 and the last one (6): step 4 is the best
    out, lines = tmp_path / "run", []
    t = _trainer(
        out,
        tokenizer,
        records,
        eval_records=eval_records[:4],
        max_steps=6,
        eval_steps=2,
        save_steps=0,  # with load_best_model_at_end a checkpoint is saved at every evaluation anyway
        save_total_limit=1,
        load_best_model_at_end=True,
        learning_rate=3e-2,
        log=lines.append,
    )
    t.train()
    assert scripted.calls == [10.0, 50.0, 20.0]
    # the best is kept beside the newest one (transformers' rule with save_total_limit: 1)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    best = load_file(str(out / "checkpoint-4" / "model.safetensors"))
    final = load_file(str(out / "model.safetensors"))
    assert set(best) == set(final) and all(torch.equal(best[k], final[k]) for k in best)
    last = load_file(str(out / "checkpoint-6" / "model.safetensors"))
    assert not all(torch.equal(last[k], final[k]) for k in last)
    assert _same(_state(AutoModelForCausalLM.from_pretrained(out)), _state(t.student))
    assert any("best model: step 4 (greedy/exact_match=50)" in line for line in lines), lines
    info = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert info["best_global_step"] == 4 and info["best_metric"] == 50.0
    assert info["best_model_checkpoint"].endswith("checkpoint-4")
    assert json.loads((out / ckpt.FINAL_JSON).read_text())["best_checkpoint"] == "checkpoint-4"

    resumed = _trainer(
        out,
        tokenizer,
        records,
        eval_records=eval_records[:4],
        max_steps=6,
        load_best_model_at_end=True,
        resume_from_checkpoint="latest",
    )
    resumed.setup()  # a resumed run knows the best checkpoint
    assert (resumed.state.best_step, resumed.state.best_checkpoint) == (4, "checkpoint-4")
    assert resumed.state.best_metric == 50.0


def test_save_strategy_best_saves_when_the_metric_improves_lower_is_better(
    tokenizer, records, eval_records, tmp_path, scripted
):
    # sample/exact_match is -greedy in the script: with greater_is_better false, higher greedy scores are better
    scripted.scores = [10.0, 5.0, 30.0, 1.0]  # steps 2, 4, 6, 8: improves at 2 and 6
    out = tmp_path / "run"
    _trainer(
        out,
        tokenizer,
        records,
        eval_records=eval_records[:4],
        max_steps=8,
        eval_steps=2,
        save_strategy="best",
        eval_strategy="steps",
        save_total_limit=None,
        metric_for_best_model="eval_sample/exact_match",
        greater_is_better=False,
    ).train()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [
        "checkpoint-2",
        "checkpoint-6",
        "checkpoint-8",
    ]
    assert json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())["best_global_step"] == 6


def test_metric_names_as_transformers_accepts_them_and_clear_errors(
    tokenizer, records, eval_records, tmp_path
):
    for name in ("exact_match", "eval_exact_match", "greedy/exact_match", "eval/greedy/exact_match"):
        assert BestMetric.record_key(name) == "eval/greedy/exact_match"
    assert BestMetric.record_key("eval_sample/bleu") == "eval/sample/bleu"
    kw = {"eval_records": eval_records[:4], "max_steps": 1, "load_best_model_at_end": True}
    with pytest.raises(ConfigError, match="computes no eval loss"):
        _trainer(tmp_path / "a", tokenizer, records, metric_for_best_model="eval_loss", **kw).setup()
    with pytest.raises(ConfigError, match="use one of exact_match, sample/exact_match"):
        _trainer(tmp_path / "b", tokenizer, records, metric_for_best_model="bleu", **kw).setup()
    with pytest.raises(ConfigError, match="'load_best_model_at_end' needs evaluations"):
        _trainer(tmp_path / "c", tokenizer, records, max_steps=1, load_best_model_at_end=True).setup()


# -------------------------------------------------------------------------------------------------------- the hub
class _FakeHub:
    calls: ClassVar[list[tuple[str, dict]]] = []
    fail: ClassVar[Exception | None] = None

    def create_repo(self, repo_id, **kw):
        _FakeHub.calls.append(("create_repo", {"repo_id": repo_id, **kw}))
        if _FakeHub.fail is not None:
            raise _FakeHub.fail
        return SimpleNamespace(repo_id=repo_id if "/" in repo_id else f"me/{repo_id}")

    def upload_folder(self, **kw):
        _FakeHub.calls.append(("upload_folder", kw))


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub

    _FakeHub.calls, _FakeHub.fail = [], None
    monkeypatch.setattr(huggingface_hub, "HfApi", _FakeHub)
    return _FakeHub


def test_push_to_hub_uploads_the_final_model_and_tokenizer_only(tokenizer, records, tmp_path, hub):
    out = tmp_path / "tiny-sft"
    t = _trainer(
        out,
        tokenizer,
        records,
        max_steps=2,
        save_steps=1,
        push_to_hub=True,
        hub_model_id="someone/tiny",
        hub_private_repo=True,
        hub_token="hf_x",
    )
    t.train()
    (name, create), (_, upload) = hub.calls
    assert name == "create_repo"
    assert create == {"repo_id": "someone/tiny", "private": True, "exist_ok": True, "token": "hf_x"}
    assert upload["repo_id"] == "someone/tiny" and Path(upload["folder_path"]) == out
    assert upload["token"] == "hf_x"
    everything = [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()]
    sent = {f for f in everything if any(fnmatch.fnmatch(f, pat) for pat in upload["allow_patterns"])}
    assert sent == set(ckpt.final_model_files(out))
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= sent
    assert not any(f.startswith("checkpoint-") or f == "metrics.jsonl" for f in sent)
    assert (
        "hf_x" not in (out / "checkpoint-2" / "trainer_state.json").read_text()
    )  # the token is never written

    hub.calls = []
    t.cfg.hub_model_id = None  # default repo: the output folder's name
    assert t.push_to_hub() == "me/tiny-sft" and hub.calls[0][1]["repo_id"] == "tiny-sft"


def test_a_bad_token_is_one_line_before_training(tokenizer, records, tmp_path, hub):
    """The repo is created before the first step (as transformers' Trainer does): a bad token stops the run at once,
    not after hours of training."""
    hub.fail = OSError("Invalid user token.\nMore details here")
    out = tmp_path / "run"
    with pytest.raises(GKDError) as e:
        _trainer(out, tokenizer, records, max_steps=1, push_to_hub=True).train()
    message = str(e.value)
    assert "\n" not in message and "Invalid user token" in message and "Nothing was trained" in message
    assert not list(out.glob("checkpoint-*")) and not (out / "model.safetensors").exists()


def test_a_failed_upload_is_one_line_after_the_model_is_saved(tokenizer, records, tmp_path, hub, monkeypatch):
    def upload_fails(self, **kw):
        raise OSError("Connection reset by peer")

    monkeypatch.setattr(hub, "upload_folder", upload_fails)
    out = tmp_path / "run"
    with pytest.raises(GKDError) as e:
        _trainer(out, tokenizer, records, max_steps=1, push_to_hub=True).train()
    message = str(e.value)
    assert "\n" not in message and "Connection reset" in message and str(out) in message
    assert ckpt.final_model_complete(out) and (out / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------------- trackers
def test_trackers_go_through_accelerate(tokenizer, records, tmp_path, monkeypatch):
    """tensorboard is not installed here: a GeneralTracker stands in for it in accelerate's registry, so the path
    (log_with -> init_trackers -> log -> finish) is accelerate's own."""
    import accelerate.tracking
    from accelerate.utils import LoggerType

    class FakeTensorBoard(accelerate.tracking.GeneralTracker):
        name = "tensorboard"
        requires_logging_directory = True

        def __init__(self, run_name, logging_dir, **kwargs):
            super().__init__()
            self.dir = Path(logging_dir) / run_name

        def start(self):
            self.dir.mkdir(parents=True, exist_ok=True)

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            assert all(isinstance(v, (bool, int, float, str)) for v in values.values())
            (self.dir / "config.json").write_text(json.dumps(values))

        def log(self, values, step=None, **kwargs):
            with (self.dir / "events.jsonl").open("a") as fh:
                fh.write(json.dumps({"step": step, **values}) + "\n")

        def finish(self):
            (self.dir / "finished").write_text("")

    monkeypatch.setattr(accelerate.tracking, "_available_trackers", [LoggerType.TENSORBOARD])
    monkeypatch.setitem(accelerate.tracking.LOGGER_TYPE_TO_CLASS, "tensorboard", FakeTensorBoard)
    out, lines = tmp_path / "run", []
    _trainer(
        out,
        tokenizer,
        records,
        max_steps=3,
        report_to=["tensorboard", "wandb"],
        run_name="r1",
        log=lines.append,
    ).train()
    events = [json.loads(x) for x in (out / "tensorboard" / "r1" / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events] == [1, 2, 3] and all("loss" in e for e in events)
    assert json.loads((out / "tensorboard" / "r1" / "config.json").read_text())["max_steps"] == 3
    assert (out / "tensorboard" / "r1" / "finished").exists()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]  # metrics.jsonl as always
    warned = [line for line in lines if "wandb" in line]
    assert len(warned) == 1 and "pip install wandb" in warned[0] and warned[0].startswith("warning:")

    # 'all': every installed tracker, the project named after the output folder; bf16 after a float32 run makes
    # make_accelerator start a fresh accelerate state, and the trackers come along
    out2 = tmp_path / "all"
    t = _trainer(out2, tokenizer, records, max_steps=1, report_to=["all"], bf16=True)
    t.train()
    assert t.run.accelerator.mixed_precision == "bf16"
    assert (out2 / "tensorboard" / "all" / "events.jsonl").is_file()


# ------------------------------------------------------------------------------------------ epochs and strategies
def test_epochs_fractional_logging_and_eval_each_epoch(tokenizer, records, eval_records, tmp_path, scripted):
    scripted.scores = [1.0, 2.0]
    out, lines = tmp_path / "run", []
    t = _trainer(
        out,
        tokenizer,
        records[:12],
        eval_records=eval_records[:4],
        max_steps=-1,
        num_train_epochs=2,  # 12 examples / 4 per step = 3 steps an epoch
        logging_steps=0.5,  # half the run: every 3 steps (and the first)
        eval_strategy="epoch",
        save_steps=0,
        log=lines.append,
    )
    result = t.train()
    assert result.step == 6 and t.run.plan.max_steps == 6
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 3, 6]
    assert [r["step"] for r in rows if "eval/greedy/exact_match" in r] == [3, 6]
    assert any("6 steps (2 epochs of 3)" in line for line in lines), lines
    again = _trainer(
        out, tokenizer, records[:12], max_steps=-1, num_train_epochs=2, resume_from_checkpoint="latest"
    )
    assert again.train().already_finished
