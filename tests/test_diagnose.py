"""gkd diagnose: the CLI and the Python API end to end on tiny models, the math on identical models, the reading
rule, bad input, and a user's own task (its own tokenizer, models and module:function metric)."""

from __future__ import annotations

import json
import math

import pytest
from userland import run_cli

from gkd.diagnose import (
    LARGE_GAP,
    MIN_ERROR_RISE,
    READINGS,
    SMALL_GAP,
    diagnose,
    format_report,
    reading,
)

SECTIONS = {"settings", "divergence", "by_position", "scores", "off_track", "recovery", "reading", "notes"}
FAST = ["--num-prompts", "10", "--max-new-tokens", "6", "--batch-size", "8"]


def _check_sane(result: dict, n: int, max_new: int) -> None:
    assert set(result) == SECTIONS
    assert result["settings"]["num_prompts"] == n
    for name in ("dataset", "student"):
        d = result["divergence"][name]
        assert d["sequences"] == n
        assert all(d[k] >= 0 for k in ("forward_kl", "reverse_kl", "nll_teacher_argmax"))
        # the by-position counts add up to the tokens
        assert sum(row[name]["count"] for row in result["by_position"]) == d["tokens"]
    table = result["by_position"]
    assert [row["position"] for row in table] == list(range(1, len(table) + 1)) and len(table) <= max_new
    assert table[0]["student"]["count"] == n  # every sample has a first token
    off = result["off_track"]
    assert off["sequences"] == n and 0 <= off["sequences_off_track"] <= n
    assert off["tokens"] == result["divergence"]["student"]["tokens"]
    assert sum(row["first_off_track"] for row in table) == off["sequences_off_track"]
    for rate in (off["sequence_rate"], off["token_rate"]):
        assert 0 <= rate <= 100
    rec = result["recovery"]
    assert rec["prompts"] == off["sequences_off_track"]
    if rec["kind"] == "recovery_rate" and rec["prompts"]:
        for key in (
            "student_greedy",
            "student_sample",
            "teacher_greedy",
            "teacher_sample",
            "original_sample",
        ):
            assert 0 <= rec[key] <= 100
    assert result["reading"]["verdict"] in READINGS
    assert "heuristic" in result["reading"]["text"]
    json.dumps(result, allow_nan=False)  # strict JSON


def test_cli_end_to_end_on_the_builtin_task(model_dir, tmp_path):
    args = ["diagnose", "--teacher", str(model_dir / "teacher"), "--student", str(model_dir / "student")]
    args += ["--dataset", str(model_dir / "test.jsonl"), "--metric", "summarization", *FAST]
    result = run_cli([*args, "--out", str(tmp_path / "d")])
    assert result.code == 0, result
    out = json.loads((tmp_path / "d" / "diagnose.json").read_text())
    _check_sane(out, 10, 6)
    assert out["scores"]["metric"] == "summarization"
    assert all(0 <= out["scores"][k] <= 100 for k in ("student_sample", "student_greedy", "teacher_sample"))
    assert out["settings"]["teacher"] == str(model_dir / "teacher")
    assert "reading [" in result.out and "KL(P|Q)" in result.out
    assert max(len(line) for line in result.out.splitlines() if not line.startswith("wrote")) <= 100


def test_python_api_with_loaded_models(llama_pair, tokenizer, eval_records):
    student, teacher = llama_pair
    result = diagnose(
        teacher, student, tokenizer, eval_records, "exact_match", num_prompts=8, max_new_tokens=5
    )
    _check_sane(result, 8, 5)
    assert result["settings"]["metric"] == "exact_match"
    # the same seed gives the same numbers
    again = diagnose(
        teacher, student, tokenizer, eval_records, "exact_match", num_prompts=8, max_new_tokens=5
    )
    assert again == result
    assert "reading [" in format_report(result)


def test_prompt_only_records_skip_the_dataset_side(llama_pair, tokenizer, eval_records):
    student, teacher = llama_pair
    prompts = [{"prompt": r["prompt"]} for r in eval_records]
    result = diagnose(teacher, student, tokenizer, prompts, num_prompts=6, max_new_tokens=4)
    assert result["divergence"]["dataset"] is None
    assert any("prompt-only" in note for note in result["notes"])
    assert result["reading"]["exposure_gap"] is None
    assert result["recovery"]["kind"] == "teacher_logprob"
    assert "skipped" in format_report(result)


def test_identical_models_show_no_divergence_and_equal_recovery(model_dir, tokenizer, eval_records):
    from gkd.models import load_model

    model = load_model(str(model_dir / "student"), what="student")
    same = load_model(str(model_dir / "student"), what="teacher")  # the same weights, loaded twice
    kw = {"num_prompts": 10, "max_new_tokens": 6}
    strict = diagnose(same, model, tokenizer, eval_records, "summarization", off_track=1e-9, **kw)
    for name in ("dataset", "student"):
        d = strict["divergence"][name]
        assert abs(d["forward_kl"]) < 1e-6 and abs(d["reverse_kl"]) < 1e-6
    assert all(
        abs(row[name]["forward_kl"]) < 1e-6
        for row in strict["by_position"]
        for name in ("dataset", "student")
        if row[name]["count"]
    )
    assert strict["off_track"]["tokens_off_track"] <= 1  # a probability below 1e-9 is (almost) never sampled
    assert strict["reading"]["exposure_gap"] == pytest.approx(1.0, abs=1e-3)
    assert strict["reading"]["verdict"] == "lambda_unlikely_to_matter"
    # a loose threshold makes prefixes off-track: the teacher (the same model) recovers exactly as the student
    loose = diagnose(same, model, tokenizer, eval_records, "summarization", off_track=0.5, **kw)
    rec = loose["recovery"]
    assert rec["prompts"] > 0
    assert rec["teacher_greedy"] == rec["student_greedy"] and rec["teacher_sample"] == rec["student_sample"]
    assert loose["reading"]["steer_back_gap"] == 0


def _result(ds: float | None, st: float, prompts: int = 10, teacher: float = 50.0, student: float = 10.0):
    rec = {"prompts": prompts, "kind": "recovery_rate", "teacher_greedy": teacher, "student_greedy": student}
    div = {"dataset": None if ds is None else {"forward_kl": ds}, "student": {"forward_kl": st}}
    return {"divergence": div, "recovery": rec}


def _shifted(e_data: float, e_own: float, e_teacher: float | None = None, **kw):
    case = _result(1.0, 2.0, teacher=0.0, student=0.0, **kw)  # mistakes unrecoverable, exposure gap 2
    case["divergence"]["dataset"]["error_mass"] = e_data
    case["divergence"]["student"]["error_mass_on_track"] = e_own
    if e_teacher is not None:
        case["divergence"]["teacher"] = {"error_mass": e_teacher}
    return case


@pytest.mark.parametrize(
    ("case", "verdict"),
    [
        # the student errs more on its own valid prefixes than on the dataset's: covered only by its own samples,
        # even though mistakes cannot be undone
        (_shifted(0.02, 0.09), "on_policy_covers"),
        (_shifted(0.06, 0.07, e_teacher=0.10), "on_policy_covers"),  # the teacher's prefixes show the shift
        (_shifted(0.02, 0.025), "unrecoverable"),  # no shift: the recovery rule decides
        (
            _shifted(0.001, 0.01),
            "unrecoverable",
        ),  # a large ratio of tiny masses is no shift (rise < 2 points)
    ],
)
def test_the_error_shift_rule(case, verdict):
    out = reading(case)
    assert out["verdict"] == verdict and out["thresholds"]["min_error_rise"] == MIN_ERROR_RISE


@pytest.mark.parametrize(
    ("case", "verdict"),
    [
        (_result(1.0, 2.0), "on_policy_helps"),  # gap 2, teacher +40 points
        (_result(None, 2.0), "on_policy_helps"),  # prompt-only data: the steer-back decides
        (_result(1.0, 1.1), "lambda_unlikely_to_matter"),  # small gap
        (_result(1.0, 2.0, teacher=15.0, student=12.0), "cannot_steer_back"),  # teacher no better
        (_result(1.0, 2.0, teacher=5.0, student=0.0), "unrecoverable"),  # neither recovers
        (_result(1.0, 1.3), "on_policy_may_help"),  # moderate gap, clear steer-back
        (_result(1.0, 2.0, prompts=0), "never_off_track"),
        ({**_result(1.0, 2.0), "recovery": {"prompts": 3, "kind": "teacher_logprob"}}, "on_policy_may_help"),
        ({**_result(1.0, 1.3), "recovery": {"prompts": 3, "kind": "teacher_logprob"}}, "undetermined"),
    ],
)
def test_the_reading_rule(case, verdict):
    out = reading(case)
    assert out["verdict"] == verdict
    assert out["thresholds"]["small_gap"] == SMALL_GAP and out["thresholds"]["large_gap"] == LARGE_GAP


def test_bad_input_is_one_error_line(model_dir, tmp_path):
    from gkd.tasks.base import build_word_tokenizer

    base = [
        "diagnose",
        "--teacher",
        str(model_dir / "teacher"),
        "--student",
        str(model_dir / "student"),
        *FAST,
    ]
    data = ["--dataset", str(model_dir / "test.jsonl")]
    cases = {
        "missing dataset": [*base, "--dataset", str(tmp_path / "nope.jsonl")],
        "unknown metric": [*base, *data, "--metric", "exact_mach"],
        "metric module": [*base, *data, "--metric", "no_such_module_xyz:score"],
        "bad threshold": [*base, *data, "--off-track", "1.5"],
    }
    other = tmp_path / "other"
    tok = build_word_tokenizer(["x", "y", "z"], str(other))
    from tiny import make_model

    make_model("llama_teacher", tok).save_pretrained(other)
    cases["vocabulary mismatch"] = [
        "diagnose",
        "--teacher",
        str(other),
        "--student",
        str(model_dir / "student"),
    ]
    cases["vocabulary mismatch"] += [*data, *FAST]
    for what, argv in cases.items():
        result = run_cli(argv)
        assert result.is_clean_error(), f"{what}: {result}"
    assert "differ" in run_cli(cases["vocabulary mismatch"]).error_lines[0]
    assert "did you mean 'exact_match'" in run_cli(cases["unknown metric"]).error_lines[0]


METRIC_MODULE = '''
def right(prompts, completions, records):
    """1.0 when the completion is the record's answer."""
    return [float(c.strip() == r["completion"]) for c, r in zip(completions, records)]
'''


def test_a_users_own_task_with_a_module_function_metric(tmp_path, monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    from gkd.tasks.base import build_word_tokenizer

    words = ["add", "one", "two", "three", "four", "five", "="]
    tok = build_word_tokenizer(words)
    for name, width in (("teacher", 32), ("student", 16)):
        cfg = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=32,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            bos_token_id=None,
        )
        LlamaForCausalLM(cfg).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    numbers = ["one", "two", "three", "four", "five"]
    rows = [
        {"prompt": f"add {a} {b} =", "completion": numbers[(i + j + 1) % 5]}
        for i, a in enumerate(numbers)
        for j, b in enumerate(numbers)
    ]
    (tmp_path / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "my_metric.py").write_text(METRIC_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    argv = ["diagnose", "--teacher", str(tmp_path / "teacher"), "--student", str(tmp_path / "student")]
    argv += ["--dataset", str(tmp_path / "mine.jsonl"), "--num-prompts", "12", "--max-new-tokens", "4"]
    metric = [
        "--metric",
        "my_metric:right",
        "--off-track",
        "0.5",
    ]  # a loose threshold: some prefixes go off-track
    result = run_cli([*argv, *metric, "--out", str(tmp_path / "out")])
    assert result.code == 0, result
    out = json.loads((tmp_path / "out" / "diagnose.json").read_text())
    _check_sane(out, 12, 4)
    assert out["scores"]["metric"] == "my_metric:right"
    assert out["recovery"]["prompts"] > 0 and out["recovery"]["kind"] == "recovery_rate"
    # without a metric: the teacher's log-probs of the continuations instead of recovery rates, and a note
    result = run_cli([*argv, "--off-track", "0.5", "--out", str(tmp_path / "plain")])
    assert result.code == 0, result
    plain = json.loads((tmp_path / "plain" / "diagnose.json").read_text())
    assert plain["scores"] is None and plain["recovery"]["kind"] == "teacher_logprob"
    if plain["recovery"]["prompts"]:
        assert all(plain["recovery"][k] <= 0 for k in ("student_greedy", "teacher_greedy"))
        assert any("log-prob" in note for note in plain["notes"])
    assert plain["reading"]["steer_back_gap"] is None
    assert not math.isnan(plain["divergence"]["student"]["forward_kl"])


@pytest.mark.parametrize(("family", "fmt"), [("qwen2", "messages"), ("t5", "prompt_completion")])
def test_chat_records_padded_heads_and_seq2seq(world, family, fmt):
    """Chat records through the chat template on a head with padding rows (Qwen2.5-style), and an encoder-decoder
    pair, whose recovery (continuing a decoder prefix) is skipped with a note."""
    argv = [
        "diagnose",
        "--teacher",
        world.model(family, "teacher"),
        "--student",
        world.model(family, "student"),
    ]
    argv += ["--dataset", world.data(fmt, "test"), "--metric", "summarization", *FAST]
    result = run_cli(argv)
    assert result.code == 0, result
    if family == "t5":
        assert "recovery needs a decoder-only model" in result.out
    else:
        assert "recovery of the" in result.out or "0/10 samples" in result.out
