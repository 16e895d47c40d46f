"""Evaluation as papers report it: beam search, multiple-choice log-likelihood scoring, bootstrap intervals.

Every expected value is computed in the test itself: beam search against an enumeration of every two-token
completion of a bigram model whose log-probabilities the test writes, multiple-choice log-likelihoods against an
explicit forward of the prompt and each choice, bootstrap intervals against numpy's resampling.
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from conftest import base_config, make_model

from gkd.data import tokenize_records
from gkd.errors import ConfigError, DataError
from gkd.evaluation import (
    beam_search_texts,
    choice_loglikelihoods,
    evaluate,
    flatten,
    generate_texts,
)
from gkd.metrics import bleu, bootstrap_ci, bootstrap_ci_of, mc_accuracy
from gkd.models import build_model
from gkd.scoring import check_records, check_reward_name, resolve_scorer

# --------------------------------------------------------------------------------------------------- beam search


def bigram_model(tokenizer, table: torch.Tensor):
    """A Llama with no layers whose next-token logits after token ``i`` are ``table[i]``.

    The embedding is the identity (hidden size = vocabulary), RMSNorm scales the one-hot row to ``sqrt(V)`` (its
    epsilon is negligible) and the head holds ``table.T / sqrt(V)``, so the logits are exactly ``table[last token]``.
    """
    v = len(tokenizer)
    spec = {
        "architecture": "llama",
        "hidden_size": v,
        "num_hidden_layers": 0,
        "num_attention_heads": 1,
        "intermediate_size": 4,
        "max_position_embeddings": 64,
        "tie_word_embeddings": False,
        "rms_norm_eps": 1e-12,
    }
    model = build_model(spec, tokenizer, seed=0)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(v))
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.copy_(table.T / math.sqrt(v))
    return model


@pytest.fixture
def bigram(tokenizer):
    """A bigram model where greedy's first token (``a``, p = 0.5 after ``p``) leads to a flat next step, and the
    second-best first token ``b`` is followed by ``c`` almost surely: greedy says ``a d``, the best pair is ``b c``."""
    v, ids = len(tokenizer), tokenizer.convert_tokens_to_ids
    table = torch.full((v, v), -12.0)
    table[ids("p"), ids("a")] = math.log(5.0)
    table[ids("p"), ids("b")] = math.log(4.0)
    table[ids("a"), :] = 0.0
    table[ids("a"), ids("d")] = 0.5
    table[ids("b"), ids("c")] = 6.0
    table[:, tokenizer.eos_token_id] = -12.0
    table[:, tokenizer.pad_token_id] = -12.0
    return bigram_model(tokenizer, table), table


def test_beam_search_finds_the_pair_greedy_misses_by_enumeration(tokenizer, bigram):
    model, table = bigram
    data = tokenize_records(
        [{"prompt": "q p", "completion": "b c"}], tokenizer, max_prompt_length=8, max_completion_length=8
    )
    last = data.examples[0].prompt[-1]
    logits = model(torch.tensor([data.examples[0].prompt])).logits[0, -1]
    assert torch.allclose(logits, table[last], atol=1e-4)  # the model is the table

    logp = torch.log_softmax(table, dim=-1)
    first = int(logp[last].argmax())
    greedy_pair = (first, int(logp[first].argmax()))
    vocab = range(len(tokenizer))
    best_pair = max(
        itertools.product(vocab, vocab), key=lambda xy: float(logp[last, xy[0]] + logp[xy[0], xy[1]])
    )
    assert greedy_pair != best_pair  # the case is one where beam search matters

    def text(pair):
        return tokenizer.decode(list(pair), skip_special_tokens=True).strip()

    assert generate_texts(model, tokenizer, data, max_new_tokens=2, greedy=True) == [text(greedy_pair)]
    assert beam_search_texts(model, tokenizer, data, num_beams=2, max_new_tokens=2) == [text(best_pair)]
    assert beam_search_texts(model, tokenizer, data, num_beams=1, max_new_tokens=2) == [text(greedy_pair)]

    # through evaluate: beam search is the mode "beam", in place of "greedy"
    greedy = evaluate(model, tokenizer, data, "exact_match", max_new_tokens=2, sampled={})
    beam = evaluate(model, tokenizer, data, "exact_match", max_new_tokens=2, sampled={}, num_beams=2)
    assert greedy == {"greedy": {"exact_match": 0.0}}
    assert beam == {"beam": {"exact_match": 100.0}}


def test_beam_search_batches_left_padded_prompts_like_one_at_a_time(tokenizer, student, eval_records):
    data = tokenize_records(eval_records[:5], tokenizer, max_prompt_length=64, max_completion_length=16)
    kw = {"num_beams": 3, "max_new_tokens": 6}
    batched = beam_search_texts(student, tokenizer, data, batch_size=5, **kw)
    single = beam_search_texts(student, tokenizer, data, batch_size=1, **kw)
    assert batched == single and len(batched) == 5


@pytest.fixture
def student(tokenizer):
    return make_model("llama_student", tokenizer, seed=1)


def test_beam_and_bootstrap_options_are_checked(tokenizer, student, eval_records):
    data = tokenize_records(eval_records[:1], tokenizer, max_prompt_length=64, max_completion_length=8)
    with pytest.raises(ConfigError, match="num_beams"):
        evaluate(student, tokenizer, data, "rouge2", max_new_tokens=2, num_beams=0)
    with pytest.raises(ConfigError, match="bootstrap"):
        evaluate(student, tokenizer, data, "rouge2", max_new_tokens=2, bootstrap=-1)
    with pytest.raises(DataError, match="at least 2 examples"):
        evaluate(student, tokenizer, data, "rouge2", max_new_tokens=2, bootstrap=10)


# --------------------------------------------------------------------------------------------------- multiple choice

MC_RECORDS = [
    {"prompt": "q t m :", "choices": ["a", "b c d", "e f"], "answer": 1},
    {"prompt": "x y", "choices": ["k", "l m"], "answer": "k"},
    {"prompt": "h i j k l :", "choices": ["n o p q", "r", "s t"], "answer": 2},
    {"prompt": "u", "choices": ["v w", "x"], "answer": 0},
]


def hand_loglikelihood(model, prompt_ids: list[int], choice_ids: list[int]) -> float:
    """Sum of log p(choice token | everything before it), from one explicit forward of prompt + choice."""
    full = torch.tensor([prompt_ids + choice_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(full).logits[0].float(), dim=-1)
    return sum(float(logp[len(prompt_ids) + j - 1, t]) for j, t in enumerate(choice_ids))


def test_choice_loglikelihoods_and_mc_accuracy_equal_an_explicit_forward(tokenizer, student):
    data = tokenize_records(MC_RECORDS, tokenizer, max_prompt_length=64, max_completion_length=8)
    hand = [
        [
            hand_loglikelihood(student, ex.prompt, tokenizer(" " + c, add_special_tokens=False)["input_ids"])
            for c in ex.record["choices"]
        ]
        for ex in data.examples
    ]
    for batch_size in (1, 3):  # several pairs per forward: right padding must not change a score
        got = choice_loglikelihoods(student, tokenizer, data, batch_size=batch_size)
        assert np.allclose(np.concatenate(got), np.concatenate(hand), atol=1e-4)

    gold = [1, 0, 2, 0]
    plain = [int(np.argmax(h)) == g for h, g in zip(hand, gold)]
    norm = [
        int(np.argmax([ll / len(c) for ll, c in zip(h, rec["choices"])])) == g
        for h, g, rec in zip(hand, gold, MC_RECORDS)
    ]
    want = {"mc_accuracy": 100.0 * np.mean(plain), "mc_accuracy_norm": 100.0 * np.mean(norm)}
    assert mc_accuracy(MC_RECORDS, hand) == pytest.approx(want)
    out = evaluate(student, tokenizer, data, "mc_accuracy_norm", max_new_tokens=1)
    assert list(out) == ["mc"] and list(out["mc"]) == ["mc_accuracy_norm", "mc_accuracy"]
    assert out["mc"] == pytest.approx(want)


def test_mc_accuracy_from_log_likelihoods_by_hand():
    records = [
        {
            "prompt": "p",
            "choices": ["aaaa", "b"],
            "answer": 0,
        },  # sum: b (-2 > -3); per char: aaaa (-0.75 > -2)
        {"prompt": "p", "choices": ["x", "y"], "answer": "y"},
    ]
    lls = [[-3.0, -2.0], [-1.0, -0.5]]
    assert mc_accuracy(records, lls) == {"mc_accuracy": 50.0, "mc_accuracy_norm": 100.0}


def test_multiple_choice_records_and_names_are_checked():
    with pytest.raises(DataError, match="'choices'"):
        check_records("mc_accuracy", [{"prompt": "p", "completion": "c"}], key="--metric")
    with pytest.raises(DataError, match="'answer'"):
        check_records("mc_accuracy", [{"prompt": "p", "choices": ["a", "b"], "answer": 2}], key="--metric")
    with pytest.raises(DataError, match="'answer'"):
        check_records("mc_accuracy", [{"prompt": "p", "choices": ["a", "b"], "answer": "c"}], key="--metric")
    check_records("mc_accuracy", MC_RECORDS, key="--metric")
    with pytest.raises(ConfigError, match="not a reward"):
        check_reward_name("mc_accuracy")
    with pytest.raises(ConfigError, match="log-likelihood"):
        resolve_scorer("mc_accuracy")


# --------------------------------------------------------------------------------------------------- bootstrap


def numpy_percentile_ci(stat, n: int, n_resamples: int, seed: int) -> np.ndarray:
    """The percentile interval by hand: resample indices with numpy's generator, take the 2.5 / 97.5 percentiles."""
    idx = np.random.default_rng(seed).integers(0, n, (n_resamples, n))
    return np.percentile([stat(i) for i in idx], [2.5, 97.5])


def test_bootstrap_ci_equals_numpy_resampling():
    values = np.array([0.0, 100.0, 100.0, 0.0, 100.0, 100.0, 100.0, 0.0, 100.0])
    low, high = bootstrap_ci(values, 300, seed=7)
    assert [float(low), float(high)] == pytest.approx(
        list(numpy_percentile_ci(lambda i: values[i].mean(), 9, 300, 7))
    )
    assert low <= values.mean() <= high
    again = bootstrap_ci(values, 300, seed=7)
    assert (float(again[0]), float(again[1])) == (float(low), float(high))
    # the index form draws the same resamples
    low2, high2 = bootstrap_ci_of(lambda i: [values[i].mean()], 9, 300, seed=7)
    assert (float(low2[0]), float(high2[0])) == (float(low), float(high))


def test_evaluate_intervals_mean_metric_and_corpus_bleu(tokenizer, bigram):
    """Greedy output of every prompt is ``a d``; exact match is per example, BLEU is recomputed per resample."""
    model, _ = bigram
    targets = ["a d", "a d", "b c", "a d", "a e", "a d", "b c"]
    records = [{"prompt": "q p", "completion": t} for t in targets]
    data = tokenize_records(records, tokenizer, max_prompt_length=8, max_completion_length=8)
    n, n_resamples, seed = len(records), 200, 3
    kw = {"max_new_tokens": 2, "sampled": {}, "bootstrap": n_resamples, "bootstrap_seed": seed}

    em = evaluate(model, tokenizer, data, "exact_match", **kw)["greedy"]
    hits = np.array([100.0 * (t == "a d") for t in targets])
    assert em["exact_match"] == pytest.approx(hits.mean())
    want = numpy_percentile_ci(lambda i: hits[i].mean(), n, n_resamples, seed)
    assert [em["exact_match_ci_low"], em["exact_match_ci_high"]] == pytest.approx(list(want))
    assert em["exact_match_ci_low"] <= em["exact_match"] <= em["exact_match_ci_high"]
    assert evaluate(model, tokenizer, data, "exact_match", **kw)["greedy"] == em  # reproducible with the seed

    # a callable scorer is recomputed on every resample: the same interval as the per-example values
    em_fn = resolve_scorer("exact_match")
    assert evaluate(model, tokenizer, data, em_fn, **kw)["greedy"] == pytest.approx(em)

    preds = ["a d"] * n
    b = evaluate(model, tokenizer, data, "bleu", tokenize="whitespace", **kw)["greedy"]
    want = numpy_percentile_ci(
        lambda i: bleu([preds[k] for k in i], [records[k] for k in i]), n, n_resamples, seed
    )
    assert list(b) == ["bleu", "bleu_ci_low", "bleu_ci_high"]
    assert [b["bleu_ci_low"], b["bleu_ci_high"]] == pytest.approx(list(want))
    assert b["bleu_ci_low"] <= b["bleu"] <= b["bleu_ci_high"]
    flat = flatten({"greedy": b}, prefix="eval/")
    assert "eval/greedy/bleu_ci_low" in flat


def test_mc_intervals_resample_per_example_correctness(tokenizer, student):
    data = tokenize_records(MC_RECORDS, tokenizer, max_prompt_length=64, max_completion_length=8)
    out = evaluate(
        student, tokenizer, data, "mc_accuracy", max_new_tokens=1, bootstrap=100, bootstrap_seed=1
    )["mc"]
    hand = choice_loglikelihoods(student, tokenizer, data)
    correct = np.array([100.0 * (int(np.argmax(h)) == g) for h, g in zip(hand, [1, 0, 2, 0])])
    want = numpy_percentile_ci(lambda i: correct[i].mean(), len(correct), 100, 1)
    assert [out["mc_accuracy_ci_low"], out["mc_accuracy_ci_high"]] == pytest.approx(list(want))
    assert "mc_accuracy_norm_ci_high" in out


# --------------------------------------------------------------------------------------------------- CLI and config


def test_cli_eval_multiple_choice_beam_and_bootstrap(model_dir, tmp_path, capsys):
    from gkd.cli import main

    mc = tmp_path / "mc.jsonl"
    mc.write_text("".join(json.dumps(r) + "\n" for r in MC_RECORDS))
    base = ["eval", "--model", str(model_dir / "student"), "--device", "cpu"]
    assert main([*base, "--dataset", str(mc), "--metric", "mc_accuracy", "--bootstrap", "50"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {
        f"mc/{m}{s}" for m in ("mc_accuracy", "mc_accuracy_norm") for s in ("", "_ci_low", "_ci_high")
    }
    test = str(model_dir / "test.jsonl")
    args = [
        "--dataset",
        test,
        "--metric",
        "rouge2",
        "--max-samples",
        "4",
        "--max-new-tokens",
        "4",
        "--greedy-only",
    ]
    assert main([*base, *args, "--num-beams", "2", "--bootstrap", "20"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out) == ["beam/rouge2", "beam/rouge2_ci_low", "beam/rouge2_ci_high"]
    assert main([*base, *args, "--num-beams", "0"]) == 2
    assert "--num-beams must be" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    assert main([*base, "--dataset", str(bad), "--metric", "mc_accuracy"]) == 2
    err = capsys.readouterr().err
    assert "'choices'" in err and len(err.strip().splitlines()) == 1


def test_config_keys_are_checked():
    from gkd.config import GKDConfig

    cfg = GKDConfig(eval_num_beams=4, eval_length_penalty=0.6, eval_bootstrap=500, eval_metric="mc_accuracy")
    assert (cfg.eval_num_beams, cfg.eval_length_penalty, cfg.eval_bootstrap) == (4, 0.6, 500)
    for key, value in (("eval_num_beams", 0), ("eval_bootstrap", -1), ("eval_length_penalty", float("nan"))):
        with pytest.raises(ConfigError, match=key):
            GKDConfig(**{key: value})


def test_in_training_evaluation_takes_beams_bootstrap_and_multiple_choice(
    tokenizer, records, eval_records, tmp_path
):
    from gkd.trainer import GKDTrainer

    def trainer(name, metric, evals, **keys):
        cfg = base_config(
            output_dir=str(tmp_path / name), max_steps=1, eval_metric=metric, eval_max_samples=4, **keys
        )
        student, teacher = (
            make_model(k, tokenizer, seed=s) for k, s in (("llama_student", 1), ("llama_teacher", 0))
        )
        return GKDTrainer(
            cfg,
            student=student,
            teacher=teacher,
            tokenizer=tokenizer,
            train_records=records,
            eval_records=evals,
        )

    out = trainer("beam", "rouge2", eval_records, eval_num_beams=2, eval_bootstrap=20).evaluate()
    assert {"eval/beam/rouge2", "eval/beam/rouge2_ci_low", "eval/sample/rouge2_ci_high"} <= set(out)
    assert not any(k.startswith("eval/greedy/") for k in out)
    assert out["eval/beam/rouge2_ci_low"] <= out["eval/beam/rouge2"] <= out["eval/beam/rouge2_ci_high"]

    out = trainer("mc", "mc_accuracy", MC_RECORDS).evaluate()
    assert set(out) == {"step", "eval/mc/mc_accuracy", "eval/mc/mc_accuracy_norm"}


def test_bleu_from_summed_statistics_equals_corpus_bleu():
    """The BLEU bootstrap scores resamples from per-example statistics: the same number as corpus BLEU."""
    from gkd.metrics import bleu_from_statistics, bleu_statistics

    records = [
        {
            "prompt": "x",
            "completion": "The cat sat on the mat.",
            "references": ["A cat was sitting on the mat."],
        },
        {"prompt": "y", "completion": "Hello, world! How are you today?"},
        {"prompt": "z", "completion": "one two three four five"},
    ]
    preds = ["The cat is on the mat.", "Hello world, how are you today?", "one two three four five six"]
    for tokenize in ("standard", "whitespace"):
        stats = np.array(bleu_statistics(preds, records, tokenize))
        for rows in ([0, 1, 2], [2, 2, 0], [1, 1, 1]):
            want = bleu([preds[i] for i in rows], [records[i] for i in rows], tokenize)
            assert bleu_from_statistics(stats[rows].sum(0)) == pytest.approx(want, abs=1e-9)


def test_encoder_decoder_choices_and_beams(tokenizer):
    """T5: the prompt goes to the encoder, each choice is scored as the decoder's labels."""
    model = make_model("t5", tokenizer, seed=0)
    data = tokenize_records(
        MC_RECORDS, tokenizer, max_prompt_length=64, max_completion_length=8, seq2seq=True
    )
    got = choice_loglikelihoods(model, tokenizer, data, batch_size=4)
    for ex, lls in zip(data.examples, got):
        for choice, ll in zip(ex.record["choices"], lls):
            labels = torch.tensor([tokenizer(" " + choice, add_special_tokens=False)["input_ids"]])
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ex.prompt]), labels=labels).logits[0]
            hand = float(torch.log_softmax(logits.float(), -1).gather(-1, labels[0][:, None]).sum())
            assert ll == pytest.approx(hand, abs=1e-4)
    kw = {"num_beams": 2, "max_new_tokens": 4}
    assert beam_search_texts(model, tokenizer, data, batch_size=4, **kw) == beam_search_texts(
        model, tokenizer, data, batch_size=1, **kw
    )
