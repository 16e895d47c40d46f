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
