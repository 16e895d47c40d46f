"""gkd.evaluation: the one evaluation loop (greedy and sampled modes, several samples, any scorer)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model

from gkd.data import tokenize_records
from gkd.errors import ConfigError
from gkd.evaluation import evaluate, flatten, generate_ids, generate_texts
from gkd.metrics import self_bleu
from gkd.sampling import Rollout, get_sampler
from gkd.sampling.local import sample_completions
from gkd.scoring import resolve_scorer
from gkd.tasks import get_task


@pytest.fixture
def student(tokenizer):
    return make_model("llama_student", tokenizer, seed=1)


@pytest.fixture
def data(tokenizer, eval_records):
    return tokenize_records(eval_records[:10], tokenizer, max_prompt_length=64, max_completion_length=16)


class OracleSampler:
    """Answers every prompt with its dataset completion (a perfect model), whatever the mode."""

    def __init__(self, dataset):
        self.answers = {tuple(e.prompt): e.completion for e in dataset.examples}
        self.synced = 0

    def sync(self, model):
        self.synced += 1

    def sample(self, model, prompt_ids, prompt_mask, params, generator):
        rows = [
            self.answers[tuple(r[m].tolist())][: params.max_new_tokens]
            for r, m in zip(prompt_ids, prompt_mask)
        ]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), params.pad_token_id)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), True
        return Rollout(ids, mask)


def test_greedy_and_sampled_modes_equal_their_own_generations(tokenizer, data, student):
    records = [e.record for e in data.examples]
    result = evaluate(
        student,
        tokenizer,
        data,
        "rouge2",
        max_new_tokens=8,
        sampled={"sample": 0.8},
        seeds=(3,),
        batch_size=4,
    )
    assert list(result) == ["greedy", "sample"] and all(list(v) == ["rouge2"] for v in result.values())
    common = {"max_new_tokens": 8, "batch_size": 4}
    greedy = generate_texts(student, tokenizer, data, greedy=True, **common)
    sampled = generate_texts(student, tokenizer, data, greedy=False, temperature=0.8, seed=3, **common)
    score = resolve_scorer("rouge2")
    assert result == {"greedy": score(records, greedy), "sample": score(records, sampled)}
    assert flatten(result, prefix="eval/") == {
        "eval/greedy/rouge2": result["greedy"]["rouge2"],
        "eval/sample/rouge2": result["sample"]["rouge2"],
    }
    assert list(flatten(result)) == ["greedy/rouge2", "sample/rouge2"]


def test_modes_can_be_left_out(tokenizer, data, student):
    only_greedy = evaluate(student, tokenizer, data, "exact_match", max_new_tokens=4, sampled={})
    assert list(only_greedy) == ["greedy"]
    only_sampled = evaluate(student, tokenizer, data, "exact_match", max_new_tokens=4, greedy=False)
    assert list(only_sampled) == ["sample"]  # the default sampled mode: temperature 1
    with pytest.raises(ValueError, match="seed"):
        evaluate(student, tokenizer, data, "exact_match", max_new_tokens=4, seeds=())


def test_several_temperatures_and_samples_average_and_add_self_bleu(tokenizer, data, student):
    task = get_task("summarization")
    records = [e.record for e in data.examples]
    seeds = [1000, 1001, 1002]
    result = evaluate(
        student,
        tokenizer,
        data,
        task.score,
        max_new_tokens=8,
        sampled={"sample_0.5": 0.5, "sample": 1.0},
        seeds=seeds,
        batch_size=500,
    )
    assert list(result) == ["greedy", "sample_0.5", "sample"]
    assert list(result["greedy"]) == list(task.metrics)
    for mode, temperature in (("sample_0.5", 0.5), ("sample", 1.0)):
        runs = [
            generate_texts(
                student,
                tokenizer,
                data,
                max_new_tokens=8,
                greedy=False,
                temperature=temperature,
                seed=s,
                batch_size=500,
            )
            for s in seeds
        ]
        assert runs[0] != runs[1]  # different seeds, different samples
        mean: dict[str, float] = {}
        for run in runs:
            for key, value in task.score(records, run).items():
                mean[key] = mean.get(key, 0.0) + value / len(runs)
        assert result[mode] == {**mean, "self_bleu": self_bleu([list(s) for s in zip(*runs)])}
    # one seed: no self-BLEU, and the mean of one run is the run's score
    single = evaluate(
        student, tokenizer, data, task.score, max_new_tokens=8, greedy=False, seeds=[1000], batch_size=500
    )
    run = generate_texts(student, tokenizer, data, max_new_tokens=8, greedy=False, seed=1000, batch_size=500)
    assert single == {"sample": task.score(records, run)}


def test_metric_names_go_through_gkd_scoring(tokenizer, data):
    oracle = OracleSampler(data)
    model = make_model("llama_student", tokenizer, seed=1)
    task_result = evaluate(model, tokenizer, data, "summarization", max_new_tokens=16, sampler=oracle)
    assert list(task_result["greedy"]) == list(
        get_task("summarization").metrics
    )  # a task name: all its metrics
    assert task_result["greedy"]["set_match"] == 100.0  # the oracle's answers are the references
    for name in ("exact_match", "rouge2", "bleu"):
        assert evaluate(model, tokenizer, data, name, max_new_tokens=16, sampled={}, sampler=oracle) == {
            "greedy": {name: 100.0}
        }
    assert oracle.synced == 4  # once per evaluation, before any sample
    with pytest.raises(ConfigError, match="eval_metric") as e:
        evaluate(model, tokenizer, data, "rouge3", max_new_tokens=4, sampler=oracle)
    assert "\n" not in str(e.value)


def test_messages_records_are_scored_against_their_final_assistant_turn(tokenizer, eval_records):
    messages = [
        {
            "messages": [
                {"role": "user", "content": r["prompt"]},
                {"role": "assistant", "content": r["completion"]},
            ]
        }
        for r in eval_records[:6]
    ]
    data = tokenize_records(messages, tokenizer, max_prompt_length=128, max_completion_length=16)
    model = make_model("llama_student", tokenizer, seed=1)
    seen = []

    def scorer(records, predictions):
        seen.append(records)
        return resolve_scorer("exact_match")(records, predictions)

    result = evaluate(model, tokenizer, data, scorer, max_new_tokens=16, sampler=OracleSampler(data))
    assert result == {"greedy": {"exact_match": 100.0}, "sample": {"exact_match": 100.0}}
    assert seen == [messages, messages]  # the records themselves, not a prompt/completion copy


def test_model_mode_is_kept_and_generate_ids_accepts_the_backend_keyword(tokenizer, data, student):
    student.train()
    evaluate(student, tokenizer, data, "exact_match", max_new_tokens=4)
    assert student.training
    kw = {"max_new_tokens": 6, "greedy": False, "seed": 2, "batch_size": 3}
    for backend in ("auto", "fast", "generate"):
        assert generate_ids(student, tokenizer, data, backend=backend, **kw) == generate_ids(
            student, tokenizer, data, sampler=get_sampler(backend), **kw
        )
    # callers that forward rollout_backend: vllm get in-process sampling (no engine to evaluate with here)
    assert generate_ids(student, tokenizer, data, backend="vllm", **kw) == generate_ids(
        student, tokenizer, data, **kw
    )
    with pytest.raises(TypeError, match="not both"):
        generate_ids(student, tokenizer, data, backend="auto", sampler=get_sampler("auto"), **kw)
    with pytest.raises(ConfigError, match="backend"):
        generate_ids(student, tokenizer, data, backend="beam", **kw)


def test_generate_ids_draws_every_batch_from_one_seeded_generator(tokenizer, data, student):
    """The exact sequence of random draws that published evaluation numbers depend on."""
    ids = generate_ids(
        student, tokenizer, data, max_new_tokens=6, greedy=False, temperature=0.9, seed=5, batch_size=4
    )
    gen = torch.Generator().manual_seed(5)
    expected = []
    from gkd.data import collate

    for start in range(0, len(data), 4):
        batch = collate(data.examples[start : start + 4], tokenizer.pad_token_id)
        roll = sample_completions(
            student,
            batch.prompt_ids,
            batch.prompt_mask,
            max_new_tokens=6,
            temperature=0.9,
            eos_token_ids=[tokenizer.eos_token_id],
            pad_token_id=tokenizer.pad_token_id,
            generator=gen,
            vocab_size=len(tokenizer),
        )
        for row, mask in zip(roll.completion_ids.tolist(), roll.completion_mask.tolist()):
            toks = [t for t, keep in zip(row, mask) if keep]
            expected.append(toks[:-1] if toks and toks[-1] == tokenizer.eos_token_id else toks)
    assert ids == expected


# --------------------------------------------------------------------------------------------------- few-shot


def test_with_fewshot_text_and_chat(tmp_path):
    import json

    from gkd.evaluation import load_fewshot, with_fewshot

    shots_file = tmp_path / "shots.jsonl"
    shots_file.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"prompt": "Q: 1+1?\nA:", "completion": " 2. The answer is 2."},
                {
                    "messages": [
                        {"role": "user", "content": "Q: 2+3?\nA:"},
                        {"role": "assistant", "content": " 5"},
                    ]
                },
                {"prompt": "Q: unused\nA:", "completion": " 0"},
            ]
        )
    )
    shots = load_fewshot(str(shots_file), 2)
    assert shots == [("Q: 1+1?\nA:", " 2. The answer is 2."), ("Q: 2+3?\nA:", " 5")]
    text = {"prompt": "Q: 4+4?\nA:", "completion": " 8", "references": ["8"]}
    chat = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Q: 4+4?"},
            {"role": "assistant", "content": "8"},
        ]
    }
    out_text, out_chat = with_fewshot([text, chat], shots)
    assert out_text == {
        "prompt": "Q: 1+1?\nA: 2. The answer is 2.\n\nQ: 2+3?\nA: 5\n\nQ: 4+4?\nA:",
        "completion": " 8",
        "references": ["8"],
    }
    assert [m["content"] for m in out_chat["messages"]] == [
        "Be brief.",
        "Q: 1+1?\nA:",
        " 2. The answer is 2.",
        "Q: 2+3?\nA:",
        " 5",
        "Q: 4+4?",
        "8",
    ]
    assert [m["role"] for m in out_chat["messages"]] == [
        "system", "user", "assistant", "user", "assistant", "user", "assistant"
    ]  # fmt: skip
    assert len(load_fewshot(str(shots_file))) == 3  # k = None: all


def test_fewshot_bad_input(tmp_path):
    import json

    from gkd.errors import DataError
    from gkd.evaluation import load_fewshot

    f = tmp_path / "shots.jsonl"
    f.write_text(
        json.dumps({"prompt": "Q", "completion": "A"}) + "\n" + json.dumps({"prompt": "only a prompt"})
    )
    with pytest.raises(DataError, match="has 2 examples, fewer than the 3"):
        load_fewshot(str(f), 3)
    with pytest.raises(DataError, match="example 1 has no target"):
        load_fewshot(str(f), 2)


def test_cli_fewshot_flags_are_checked(capsys, tmp_path):
    from gkd.cli import main

    base = ["eval", "--model", "none", "--dataset", str(tmp_path / "d.jsonl"), "--metric", "gsm8k_answer"]
    assert main([*base, "--fewshot-k", "2"]) == 2
    assert "--fewshot-k needs --fewshot-file" in capsys.readouterr().err
    assert main([*base, "--fewshot-file", str(tmp_path / "missing.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "missing.jsonl" in err and len(err.strip().splitlines()) == 1


def test_eval_fewshot_config_keys_shape_only_the_eval_data(tokenizer, tmp_path):
    import json

    from gkd.config import GKDConfig
    from gkd.errors import ConfigError as CE
    from gkd.inputs import load_dataset

    f = tmp_path / "shots.jsonl"
    f.write_text(json.dumps({"prompt": "a b ", "completion": "c"}) + "\n")
    cfg = GKDConfig(eval_fewshot_file=str(f), eval_fewshot_k=1)
    recs = [{"prompt": "d e", "completion": "f"}]
    logged = []
    ev = load_dataset(cfg, recs, None, "validation", "eval", tokenizer, False, logged.append)
    tr = load_dataset(cfg, recs, None, "train", "train", tokenizer, False, logged.append)
    assert ev.examples[0].record["prompt"] == "a b c\n\nd e"
    assert tr.examples[0].record["prompt"] == "d e"
    assert logged == [f"eval: 1-shot prompts from {f}"]
    with pytest.raises(CE, match="eval_fewshot_k"):
        GKDConfig(eval_fewshot_k=0)
