"""Generic metrics against hand-computed values (sacrebleu and rouge-score as the engines)."""

import math

import pytest

from gkd.metrics import (
    METRICS,
    NoReferenceError,
    bleu,
    bleu_score,
    exact_match,
    exact_match_score,
    extract_final_answer,
    final_answer,
    final_answer_score,
    get_metric,
    prompt_text_of,
    references_of,
    rouge2,
    rouge2_score,
    rougeL,
    rougeL_score,
    self_bleu,
)


def rec(completion: str, *references: str) -> dict:
    return {"prompt": "p", "completion": completion, "references": list(references)}


def test_registry():
    assert set(METRICS) == {"exact_match", "final_answer", "bleu", "rouge2", "rougeL"}
    assert get_metric("bleu") is bleu
    with pytest.raises(ValueError, match="valid metrics: bleu, exact_match"):
        get_metric("nope")


def test_input_checks():
    with pytest.raises(ValueError):
        exact_match(["a"], [])
    with pytest.raises(ValueError):
        bleu([], [])


def test_references_of_puts_completion_first_without_duplicates():
    assert references_of(rec("a b", "b a", "a b")) == ["a b", "b a"]
    assert references_of({"prompt": "p", "completion": "x"}) == ["x"]


USER, SYSTEM = {"role": "user", "content": "q"}, {"role": "system", "content": "sys"}


def test_references_of_every_record_format():
    answer = {"role": "assistant", "content": "a b"}
    # messages: the final assistant turn is the target, then the references
    assert references_of({"messages": [SYSTEM, USER, answer], "references": ["b a", "a b"]}) == ["a b", "b a"]
    # messages ending with a user turn are prompt-only: only the references
    assert references_of({"messages": [USER, answer, USER], "references": ["z"]}) == ["z"]
    assert references_of({"messages": [USER, answer, USER]}) == []
    # TRL conversational prompt/completion: the completion's assistant contents, joined
    assert references_of({"prompt": [USER], "completion": [answer]}) == ["a b"]
    two = [answer, {"role": "assistant", "content": "#### 4"}]
    assert references_of({"prompt": [USER], "completion": two, "references": ["r"]}) == ["a b\n#### 4", "r"]
    # prompt-only
    assert references_of({"prompt": "p"}) == []
    assert references_of({"prompt": "p", "references": ["x", "y", "x"]}) == ["x", "y"]
    # content given as a list of parts
    parts = {"role": "assistant", "content": [{"type": "text", "text": "a "}, {"type": "text", "text": "b"}]}
    assert references_of({"messages": [USER, parts]}) == ["a b"]


def test_prompt_text_of_every_record_format():
    assert prompt_text_of({"prompt": "4 + 5 =", "completion": "9"}) == "4 + 5 ="
    assert prompt_text_of({"prompt": "4 + 5 ="}) == "4 + 5 ="
    first = {"role": "user", "content": "first"}
    reply = {"role": "assistant", "content": "ok"}
    last = {"role": "user", "content": "4 + 5 ="}
    target = {"role": "assistant", "content": "9"}
    # the last user turn before the target, whatever comes before it
    assert prompt_text_of({"messages": [SYSTEM, first, reply, last, target]}) == "4 + 5 ="
    assert prompt_text_of({"messages": [SYSTEM, first, reply, last]}) == "4 + 5 ="  # prompt-only
    assert prompt_text_of({"prompt": [SYSTEM, last], "completion": [target]}) == "4 + 5 ="
    with pytest.raises(ValueError, match="no user turn"):
        prompt_text_of({"messages": [SYSTEM, target]})
    with pytest.raises(ValueError, match="no 'prompt' or 'messages'"):
        prompt_text_of({"text": "x"})


def test_metrics_on_every_record_format():
    answer = {"role": "assistant", "content": "a b c #### 4"}
    records = [
        {"prompt": "p", "completion": "a b c #### 4"},
        {"messages": [USER, answer]},
        {"prompt": [USER], "completion": [answer]},
        {"prompt": "p", "references": ["a b c #### 4"]},
    ]
    for metric in METRICS.values():
        assert metric(["a b c #### 4"] * 4, records) == pytest.approx(100.0), metric.__name__
        assert metric(["x"] * 4, records) == 0.0, metric.__name__


@pytest.mark.parametrize("metric", sorted(METRICS))
def test_reference_metrics_reject_records_without_targets(metric):
    records = [rec("a b c d"), {"prompt": "p"}]
    with pytest.raises(ValueError, match="record 1 has no reference") as info:
        METRICS[metric](["a b c d", "a b c d"], records)
    assert isinstance(info.value, NoReferenceError)


def test_per_example_scores_equal_the_metric_of_one_record():
    cases = [
        (rec("a b c e", "x y"), "a b c d"),
        (rec("... #### 9 0"), "x #### 90.0"),
        (rec("The cat sat", "the cat sat"), "the cat"),
        ({"messages": [USER, {"role": "assistant", "content": "a b"}]}, " a  b "),
    ]
    for record, pred in cases:
        for corpus, example in [
            (exact_match, exact_match_score),
            (final_answer, final_answer_score),
            (rouge2, rouge2_score),
            (rougeL, rougeL_score),
        ]:
            assert example(record, pred) == pytest.approx(corpus([pred], [record]) / 100), corpus.__name__
    for example in (exact_match_score, final_answer_score, rouge2_score, rougeL_score, bleu_score):
        with pytest.raises(NoReferenceError, match="record has no reference"):
            example({"prompt": "p"}, "x")


def test_bleu_score_is_sentence_bleu_with_effective_order():
    assert bleu_score(rec("#### 9 0"), "#### 9 0") == pytest.approx(1.0)  # corpus BLEU-4: 0 (no 4-gram)
    assert bleu(["#### 9 0"], [rec("#### 9 0")]) == 0.0
    # the same tokenisation as bleu(): whitespace only, so "x~" differs from "x"
    assert bleu_score(rec("x b c d e f"), "x~ b c d e f") == pytest.approx(
        bleu(["x~ b c d e f"], [rec("x b c d e f")]) / 100
    )
    assert bleu_score(rec("a b c d e f", "a b c d e g"), "a b c d e g") == pytest.approx(
        1.0
    )  # best reference
    assert bleu_score(rec("A b"), "a b", tokenize="13a") < 1.0  # case-sensitive


def test_exact_match():
    records = [rec("a b c"), rec("a b", "b a"), rec("x")]
    assert exact_match(["  a   b c ", "b a", "y"], records) == pytest.approx(200 / 3)
    assert exact_match(["a b c", "a b", "x"], records) == 100.0


def test_extract_final_answer():
    assert extract_final_answer("4 7 + 1 8 = 6 5 ; #### 6 5") == "65"
    assert extract_final_answer("so 3 #### 1,200.\nextra") == "1200"
    assert extract_final_answer("#### $90") == "90"
    assert extract_final_answer("no marker 12") is None
    assert extract_final_answer("a #### 1 b #### 2") == "2"  # the last marker counts
    assert extract_final_answer("The answer is 7", marker="The answer is") == "7"


def test_final_answer():
    records = [rec("... #### 9 0"), rec("steps\n#### 1,200"), rec("#### 5"), rec("42")]
    preds = ["x #### 9 0", "blah #### 1200.0", "5", "#### 42"]  # third has no marker -> wrong
    assert final_answer(preds, records) == 75.0
    assert final_answer(["A: 9 0"], [rec("A: 9 0")], marker="A:") == 100.0


def test_bleu_perfect_partial_and_brevity():
    assert bleu(["a b c d e"], [rec("a b c d e")]) == pytest.approx(100.0)
    # one substitution in six tokens: precisions 5/6, 4/5, 3/4, 2/3 -> geometric mean (1/3)^(1/4)
    assert bleu(["a b c d e f"], [rec("a b c d e g")]) == pytest.approx(100 * (1 / 3) ** 0.25)
    # a correct prefix of half the length: precisions 1, brevity penalty exp(1 - 8/4)
    assert bleu(["a b c d"], [rec("a b c d e f g h")]) == pytest.approx(100 * math.exp(-1))


def test_bleu_uses_every_reference_and_uneven_counts():
    records = [rec("a b c d", "d c b a"), rec("e f g h")]  # 2 references, then 1
    assert bleu(["d c b a", "e f g h"], records) == pytest.approx(100.0)


def test_bleu_tokenization_is_whitespace_only():
    # "x~" is one token that differs from "x": same value as one substitution in six tokens
    assert bleu(["x~ b c d e f"], [rec("x b c d e f")]) == pytest.approx(100 * (1 / 3) ** 0.25)
    assert bleu(["#### 9 0 ;"], [rec("#### 9 0 ;")]) == pytest.approx(100.0)
    assert bleu(["#### 9 0"], [rec("#### 9 0")]) == 0.0  # corpus BLEU-4 needs 4-grams somewhere


def test_rouge():
    assert rouge2(["a b c d"], [rec("a b c e")]) == pytest.approx(200 / 3)  # bigrams 2 of 3 on each side
    assert rougeL(["a b c d"], [rec("a b c e")]) == pytest.approx(75.0)  # LCS 3 of 4
    assert rouge2(["a b c d"], [rec("x y", "a b c d")]) == pytest.approx(100.0)  # best reference
    assert rouge2(["a"], [rec("a")]) == 0.0  # no bigrams
    assert rouge2(["a b", "x y"], [rec("a b"), rec("a b")]) == pytest.approx(50.0)  # averaged


def test_rouge_tokenizers():
    assert rouge2(["A b"], [rec("a b")]) == 0.0  # whitespace: case-sensitive
    assert rouge2(["A b"], [rec("a b")], tokenizer="default") == pytest.approx(100.0)
    with pytest.raises(ValueError):
        rouge2(["a"], [rec("a")], tokenizer="bad")


def test_self_bleu():
    assert self_bleu([["a b c", "a b c", "a b c"], ["x y", "x y"]]) == pytest.approx(100.0)
    # "a b" vs "b a": unigrams 2/2, bigrams 0/1 smoothed to 1/2 -> sqrt(1/2); same both ways
    assert self_bleu([["a b", "b a"]]) == pytest.approx(100 * math.sqrt(0.5))
    assert self_bleu([["a b c d", "e f g h"]]) < self_bleu([["a b c d", "a b c e"]]) < 100
    assert self_bleu([["only one"], ["a b", "a b"]]) == pytest.approx(100.0)  # singletons skipped
    with pytest.raises(ValueError):
        self_bleu([["one"]])
