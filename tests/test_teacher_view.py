"""The teacher's own view of the prompt (issue 24 item 2): ``teacher_prompt_field``, ``teacher_system_prompt``,
``teacher_chat_template(_kwargs)`` and ``teacher_model_name_or_path: self``. The student never sees the teacher's
text: its inputs (training forward passes, rollouts, evaluation) are compared with a run without the keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import base_config, make_model

from gkd.cli import main
from gkd.config import config_from_dict
from gkd.data import Example, TeacherPrompt, TokenizedDataset, collate, tokenize_records
from gkd.errors import ConfigError, DataError
from gkd.forward import score_positions
from gkd.sampling import LocalSampler, SamplingParams, sample_batch
from gkd.teacher import Reference, Teacher, build_topk_cache, seqkd_dataset
from gkd.trainer import GKDTrainer

HINT = "H I N T"  # tokens that no prompt of the summarization task holds


def with_hint(records, n=None):
    return [{**r, "hint": f"{HINT} {r['completion']}"} for r in records[:n]]


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def holds(row: list[int], seq: list[int]) -> bool:
    return any(row[i : i + len(seq)] == seq for i in range(len(row) - len(seq) + 1))


# ---------------------------------------------------------------------------------------------------------------
# records -> the teacher's prompt
# ---------------------------------------------------------------------------------------------------------------
def test_plain_and_chat_records_get_the_teachers_prompt_and_keep_the_students(tokenizer, records):
    recs = with_hint(records, 4)
    view = TeacherPrompt(field="hint", system_prompt="Z Z")
    plain = tokenize_records(recs, tokenizer, max_prompt_length=64, max_completion_length=8)
    seen = tokenize_records(
        recs, tokenizer, max_prompt_length=64, max_completion_length=8, teacher_prompt=view
    )
    for a, b, r in zip(plain.examples, seen.examples, recs):
        assert (a.prompt, a.completion, a.teacher_prompt) == (b.prompt, b.completion, None)
        assert tokenizer.decode(b.teacher_prompt) == f"Z Z {r['hint']} {r['prompt']}"
    chat = [
        {"prompt": [{"role": "user", "content": r["prompt"]}], "completion": r["completion"], **r}
        for r in recs
    ]
    chat = [{**c, "prompt": [{"role": "user", "content": r["prompt"]}]} for c, r in zip(chat, recs)]
    got = tokenize_records(
        chat, tokenizer, max_prompt_length=64, max_completion_length=8, teacher_prompt=view
    )
    captured = {}

    def spy(msgs, **kw):
        captured["msgs"], captured["kw"] = msgs, kw
        return " ".join(m["content"] for m in msgs)

    orig = tokenizer.apply_chat_template
    try:
        tokenizer.apply_chat_template = spy
        tokenize_records(
            chat[:1],
            tokenizer,
            max_prompt_length=64,
            max_completion_length=8,
            teacher_prompt=TeacherPrompt("hint", "Z Z", "{{ messages }}", {"enable_thinking": False}),
        )
    finally:
        del tokenizer.apply_chat_template
    assert tokenizer.apply_chat_template == orig
    assert captured["msgs"][0] == {"role": "system", "content": "Z Z"}
    assert captured["msgs"][1]["content"] == f"{recs[0]['hint']}\n\n{recs[0]['prompt']}"
    assert captured["kw"]["enable_thinking"] is False and captured["kw"]["chat_template"] == "{{ messages }}"
    for e in got.examples:
        assert not holds(e.prompt, ids(tokenizer, HINT)) and holds(e.teacher_prompt, ids(tokenizer, HINT))


def test_a_teacher_view_equal_to_the_students_keeps_nothing(tokenizer, records):
    got = tokenize_records(
        records[:4],
        tokenizer,
        max_prompt_length=64,
        max_completion_length=8,
        teacher_prompt=TeacherPrompt(chat_template_kwargs={"unused": 1}),
    )
    assert all(e.teacher_prompt is None for e in got.examples)
    batch = collate(got.examples, tokenizer.pad_token_id)
    assert batch.teacher_prompt_ids is None and batch.teacher_prompt_mask is None


@pytest.mark.parametrize(
    ("value", "message"),
    [(None, "train data record 1 has no 'hint' field"), (3, "train data record 1: 'hint' (config key")],
)
def test_a_missing_or_non_string_field_names_the_record(tokenizer, records, value, message):
    recs = with_hint(records, 3)
    if value is None:
        del recs[1]["hint"]
    else:
        recs[1]["hint"] = value
    with pytest.raises(DataError, match="teacher_prompt_field") as e:
        tokenize_records(
            recs,
            tokenizer,
            max_prompt_length=64,
            max_completion_length=8,
            source="train data",
            teacher_prompt=TeacherPrompt(field="hint"),
        )
    assert message in str(e.value) and "\n" not in str(e.value)


def test_config_refuses_what_is_not_supported(tmp_path):
    for data, needle in (
        ({"teacher_prompt_field": "hint", "divergence": "nll"}, "divergence nll trains without a teacher"),
        ({"teacher_prompt_field": "hint", "dataset_adapter": "gsm8k"}, "cannot be used with dataset_adapter"),
        ({"teacher_prompt_field": " "}, "'teacher_prompt_field' is empty"),
        ({"teacher_model_name_or_path": "self", "teacher_url": "http://x"}, "both name the teacher"),
    ):
        with pytest.raises(ConfigError, match=needle):
            config_from_dict(data)
    cfg = config_from_dict({"teacher_chat_template_kwargs": {"enable_thinking": False}})
    assert cfg.teacher_chat_template_kwargs == {"enable_thinking": False}


# ---------------------------------------------------------------------------------------------------------------
# batches: collate, rollouts, the teacher's scores
# ---------------------------------------------------------------------------------------------------------------
def test_rollouts_carry_the_teacher_prompts_and_the_teacher_scores_after_them(tokenizer, records, llama_pair):
    student, teacher_model = llama_pair
    data = tokenize_records(
        with_hint(records, 3),
        tokenizer,
        max_prompt_length=64,
        max_completion_length=8,
        teacher_prompt=TeacherPrompt(field="hint"),
    )
    data.examples[1].teacher_prompt = None  # a row without its own view: the student's prompt
    batch = collate(data.examples, tokenizer.pad_token_id)
    t_rows = [r[m].tolist() for r, m in zip(batch.teacher_prompt_ids, batch.teacher_prompt_mask)]
    assert t_rows == [
        data.examples[0].teacher_prompt,
        data.examples[1].prompt,
        data.examples[2].teacher_prompt,
    ]
    params = SamplingParams(max_new_tokens=5, eos_token_ids=(1,), pad_token_id=0, vocab_size=len(tokenizer))
    rolled = sample_batch(
        LocalSampler(), student, batch, params, torch.Generator().manual_seed(0), num_generations=2
    )
    assert torch.equal(rolled.prompt_ids, batch.prompt_ids.repeat_interleave(2, 0))
    assert torch.equal(rolled.teacher_prompt_ids, batch.teacher_prompt_ids.repeat_interleave(2, 0))
    teacher = Teacher(teacher_model, len(tokenizer), fused=False)
    got = teacher.view(rolled)
    want = score_positions(
        teacher_model,
        rolled.teacher_prompt_ids,
        rolled.teacher_prompt_mask,
        rolled.completion_ids,
        rolled.completion_mask,
        vocab=len(tokenizer),
        fused=False,
    )
    assert torch.equal(got.logits, want.logits)
    plain = score_positions(
        teacher_model,
        rolled.prompt_ids,
        rolled.prompt_mask,
        rolled.completion_ids,
        rolled.completion_mask,
        vocab=len(tokenizer),
        fused=False,
    )
    assert got.logits.shape == plain.logits.shape and not torch.equal(got.logits, plain.logits)
    ref = Reference(teacher_model, len(tokenizer), fused=False).view(
        rolled
    )  # the RL reference: the student's view
    assert torch.equal(ref.logits, plain.logits)


def test_topk_cache_keys_on_and_scores_the_teachers_prompt(tokenizer, records, llama_pair, tmp_path):
    _, teacher_model = llama_pair
    teacher = Teacher(teacher_model, len(tokenizer))
    plain = tokenize_records(records[:4], tokenizer, max_prompt_length=64, max_completion_length=8)
    seen = tokenize_records(
        with_hint(records, 4),
        tokenizer,
        max_prompt_length=64,
        max_completion_length=8,
        teacher_prompt=TeacherPrompt(field="hint"),
    )
    kw = {
        "k": 4,
        "temperature": 1.0,
        "pad_id": 0,
        "cache_dir": tmp_path,
        "teacher_name": "t",
        "log": lambda m: None,
    }
    a, b = build_topk_cache(teacher, plain, **kw), build_topk_cache(teacher, seen, **kw)
    assert len(list(tmp_path.glob("teacher-top4-*.safetensors"))) == 2  # two keys
    batch = collate(seen.examples, 0, indices=[0, 1, 2, 3])
    top = b.lookup(batch.indices, batch.completion_mask)
    live = teacher.score(batch)
    logits = live.head.logits(live.hidden) if live.hidden is not None else live.logits
    assert torch.equal(top.ids, torch.log_softmax(logits.float(), -1).topk(4, -1).indices)
    assert not torch.equal(a.logprobs, b.logprobs)


def test_seqkd_samples_the_teacher_after_its_own_prompt(tokenizer, records, llama_pair, tmp_path):
    _, teacher_model = llama_pair
    seen = tokenize_records(
        with_hint(records, 3),
        tokenizer,
        max_prompt_length=64,
        max_completion_length=8,
        teacher_prompt=TeacherPrompt(field="hint"),
    )
    prompts = []

    class Spy(LocalSampler):
        def sample(self, model, prompt_ids, prompt_mask, params, generator):
            prompts.extend(r[m].tolist() for r, m in zip(prompt_ids, prompt_mask))
            return super().sample(model, prompt_ids, prompt_mask, params, generator)

    out = seqkd_dataset(
        teacher_model, tokenizer, seen, cache_dir=tmp_path, teacher_name="t", max_new_tokens=4, temperature=1.0,
        top_k=0, top_p=1.0, seed=0, sampler=Spy(), log=lambda m: None,
    )  # fmt: skip
    assert prompts == [e.teacher_prompt for e in seen.examples]
    assert [(e.prompt, e.teacher_prompt) for e in out.examples] == [
        (e.prompt, e.teacher_prompt) for e in seen.examples
    ]


def test_served_teacher_sends_the_teachers_prompt(tokenizer, records):
    from gkd.teacher_client import ServedTeacher

    seen = tokenize_records(
        with_hint(records, 2),
        tokenizer,
        max_prompt_length=64,
        max_completion_length=8,
        teacher_prompt=TeacherPrompt(field="hint"),
    )
    served = ServedTeacher("http://127.0.0.1:1", vocab=len(tokenizer), overlap=False)
    sent = []
    served.fetch = lambda rows, extra, device: sent.extend(rows)  # type: ignore[method-assign]
    served.topk(collate(seen.examples, 0))
    assert sent == [(e.teacher_prompt, e.completion) for e in seen.examples]


# ---------------------------------------------------------------------------------------------------------------
# runs: the student's inputs are unchanged; the teacher's are its own
# ---------------------------------------------------------------------------------------------------------------
class _Spy(LocalSampler):
    def __init__(self):
        super().__init__("auto")
        self.prompts: list[torch.Tensor] = []

    def sample(self, model, prompt_ids, prompt_mask, params, generator):
        self.prompts.append(prompt_ids.clone())
        return super().sample(model, prompt_ids, prompt_mask, params, generator)


def _inputs_of_run(tokenizer, records, eval_records, **keys):
    """(student forward inputs, teacher forward inputs, rollout/eval prompts, losses) of a 4-step run whose
    student does not move (lr 1e-30)."""
    student, teacher = (
        make_model("llama_student", tokenizer, seed=1),
        make_model("llama_teacher", tokenizer, seed=0),
    )
    seen: dict[str, list] = {"student": [], "teacher": []}
    for name, model in (("student", student), ("teacher", teacher)):
        model.get_input_embeddings().register_forward_hook(
            lambda m, args, out, name=name: seen[name].append(args[0].clone())
        )
    sampler = _Spy()
    cfg = base_config(
        lmbda=0.5, learning_rate=1e-30, eval_metric="summarization", eval_steps=2, eval_max_samples=4, **keys,
    )  # fmt: skip
    trainer = GKDTrainer(
        student=student, teacher=teacher, tokenizer=tokenizer, args=cfg, train_records=with_hint(records, 32),
        eval_records=with_hint(eval_records, 4), sampler=sampler,
    )  # fmt: skip
    trainer.train()
    return seen["student"], seen["teacher"], sampler.prompts, _losses(keys["output_dir"])


def _losses(output_dir):
    rows = [json.loads(x) for x in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_the_teacher_sees_the_field_and_the_student_never_does(tokenizer, records, eval_records, tmp_path):
    hint = ids(tokenizer, HINT)
    s0, t0, r0, _ = _inputs_of_run(tokenizer, records, eval_records, output_dir=str(tmp_path / "a"))
    s1, t1, r1, _ = _inputs_of_run(
        tokenizer, records, eval_records, output_dir=str(tmp_path / "b"), teacher_prompt_field="hint",
        teacher_system_prompt="Z Z",
    )  # fmt: skip
    # the student's forward passes (on- and off-policy), its rollouts and its evaluation prompts: all unchanged
    assert len(s0) == len(s1) and all(torch.equal(a, b) for a, b in zip(s0, s1))
    assert len(r0) == len(r1) > 0 and all(torch.equal(a, b) for a, b in zip(r0, r1))
    assert not any(holds(row, hint) for x in s1 + r1 for row in x.tolist())
    # the teacher: its own prompt in every forward pass of the run with the key, never without it
    assert t1 and all(holds(row, hint) for x in t1 for row in x.tolist())
    assert not any(holds(row, hint) for x in t0 for row in x.tolist())


def test_no_teacher_keys_leave_batches_and_losses_as_they_were(tokenizer, records, tmp_path):
    """Without the keys no example or batch carries a teacher prompt, so the step runs the code it always ran: the
    losses equal those of records without the extra field, bit for bit."""

    def losses(recs, out):
        torch.manual_seed(0)
        student, teacher = (
            make_model("llama_student", tokenizer, seed=1),
            make_model("llama_teacher", tokenizer, 0),
        )
        trainer = GKDTrainer(
            student=student, teacher=teacher, tokenizer=tokenizer, args=base_config(lmbda=0.5, output_dir=str(out)),
            train_records=recs,
        )  # fmt: skip
        run = trainer.setup()
        assert all(e.teacher_prompt is None for e in run.train_data.examples)
        assert collate(run.train_data.examples[:8], 0).teacher_prompt_ids is None
        trainer.train()
        return _losses(out)

    a, b = losses(records[:32], tmp_path / "a"), losses(with_hint(records, 32), tmp_path / "b")
    assert len(a) == 4 and a == b


def test_teacher_self_is_a_frozen_copy_of_the_starting_student(tokenizer, records, model_dir, tmp_path):
    from safetensors.torch import load_file

    cfg = base_config(
        model_name_or_path=str(model_dir / "student"), teacher_model_name_or_path="self", teacher_dtype="float32",
        teacher_prompt_field="hint", lmbda=0.5, output_dir=str(tmp_path / "run"),
    )  # fmt: skip
    trainer = GKDTrainer(args=cfg, train_records=with_hint(records, 32))
    run = trainer.setup()
    teacher = run.teacher.model
    start = load_file(str(model_dir / "student" / "model.safetensors"))
    assert teacher is not run.student and not any(p.requires_grad for p in teacher.parameters())
    for name, p in teacher.state_dict().items():
        if name in start:
            assert torch.equal(p, start[name]), name
    trainer.train()
    assert all(torch.equal(p, start[n]) for n, p in teacher.state_dict().items() if n in start)
    moved = [n for n, p in run.student.state_dict().items() if n in start and not torch.equal(p, start[n])]
    assert moved  # the student trained; its teacher stayed the start


# ---------------------------------------------------------------------------------------------------------------
# gkd distill, end to end
# ---------------------------------------------------------------------------------------------------------------
def _write(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


@pytest.mark.parametrize(
    "extra",
    [
        {"teacher_model_name_or_path": "self"},
        {"teacher_cache": "topk", "teacher_cache_topk": 8, "lmbda": 0.5},
        {"seq_kd": True, "lmbda": 0.0},
    ],
    ids=["self", "topk-cache", "seqkd"],
)
def test_gkd_distill_with_teacher_prompt_field(model_dir, records, tmp_path, extra):
    data = _write(tmp_path / "train.jsonl", with_hint(records, 32))
    config = {
        "model_name_or_path": str(model_dir / "student"),
        "teacher_model_name_or_path": str(model_dir / "teacher"),
        "dataset": str(data),
        "teacher_prompt_field": "hint",
        "teacher_system_prompt": "Z Z",
        "output_dir": str(tmp_path / "run"),
        "per_device_train_batch_size": 8,
        "max_new_tokens": 6,
        "max_steps": 3,
        "logging_steps": 1,
        "save_steps": 0,
        "progress": False,
        **extra,
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["distill", "--config", str(path)]) == 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in rows if "loss" in r]) == 3
    if extra.get("teacher_cache"):
        assert list((tmp_path / "run").glob("teacher-top8-*.safetensors"))


def test_gkd_distill_names_the_record_without_the_field(model_dir, records, tmp_path, capsys):
    recs = with_hint(records, 8)
    del recs[5]["hint"]
    data = _write(tmp_path / "train.jsonl", recs)
    args = [
        "distill", f"model_name_or_path={model_dir / 'student'}", f"teacher_model_name_or_path={model_dir / 'teacher'}",
        f"dataset={data}", "teacher_prompt_field=hint", f"output_dir={tmp_path / 'run'}", "max_steps=1",
    ]  # fmt: skip
    assert main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "record 5 has no 'hint' field" in err[0], err


def test_examples_hold_teacher_prompts_as_a_field():
    e = Example([1], [2], {})
    assert e.teacher_prompt is None
    assert TokenizedDataset([e]).examples[0].teacher_prompt is None


@pytest.mark.slow
@pytest.mark.parametrize("teacher", ["teacher", "self"])
def test_teacher_view_under_two_processes(model_dir, records, tmp_path, teacher):
    """``teacher_prompt_field`` (with a trained teacher, and with ``self``) under DDP: both ranks take the same λ
    decisions and the same all-reduced gradient norms, and the hint changes what the run learns (a run without it,
    same seed, ends with other gradient norms)."""
    from launch import two_processes

    data = tmp_path / "hinted.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in with_hint(records)))
    worker = Path(__file__).with_name("dist_worker.py")
    norms = {}
    for name, extra in (("hint", ["teacher_prompt_field=hint"]), ("plain", [])):
        out = tmp_path / name
        out.mkdir()
        teacher_path = "self" if teacher == "self" else str(model_dir / "teacher")
        args = [
            "train",
            f"dataset={data}",
            f"teacher_model_name_or_path={teacher_path}",
            "max_steps=4",
            *extra,
        ]
        port = 29561 + (teacher == "self") * 2 + (name == "plain")
        proc = two_processes(worker, model_dir, out, *args, port=port)
        assert proc.returncode == 0, proc.stderr[-3000:]
        r0, r1 = (json.loads((out / f"train-rank{r}.json").read_text()) for r in (0, 1))
        assert r0["world"] == r1["world"] == 2
        assert r0["flags"] == r1["flags"]
        assert r0["norms"] == pytest.approx(r1["norms"], rel=1e-6)
        norms[name] = r0["norms"]
    assert norms["hint"] != pytest.approx(norms["plain"], rel=1e-4)
