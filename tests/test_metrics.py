"""Generic metrics against hand-computed values (sacrebleu and rouge-score as the engines)."""

import math

import pytest

from gkd.metrics import (
    METRICS,
    NoReferenceError,
    bleu,
    bleu_score,
    chrf,
    chrf_score,
    exact_match,
    exact_match_score,
    extract_final_answer,
    extract_gsm8k_answer,
    final_answer,
    final_answer_score,
    get_metric,
    gsm8k_answer,
    gsm8k_answer_score,
    prompt_text_of,
    references_of,
    rouge1,
    rouge1_score,
    rouge2,
    rouge2_score,
    rougeL,
    rougeL_score,
    rougeLsum,
    rougeLsum_score,
    self_bleu,
)


def rec(completion: str, *references: str) -> dict:
    return {"prompt": "p", "completion": completion, "references": list(references)}


def test_registry():
    assert set(METRICS) == {
        "exact_match",
        "final_answer",
        "bleu",
        "rouge1",
        "rouge2",
        "rougeL",
        "rougeLsum",
        "chrf",
        "gsm8k_answer",
    }
    assert get_metric("bleu") is bleu
    with pytest.raises(ValueError, match="valid metrics: bleu, chrf, exact_match"):
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
            (rouge1, rouge1_score),
            (rouge2, rouge2_score),
            (rougeL, rougeL_score),
            (rougeLsum, rougeLsum_score),
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


# real text: punctuation glued to words, capitals, a contraction
REAL = [
    ("The cat sat on the mat, didn't it?", "the cat sat on the mat didn't it"),
    ("Paris is the capital of France.", "Paris is France's capital."),
    ("Well... I think so!\nYes, I do.", "Well, I think so.\nYes I do!"),
]


class _Split:
    """rouge-score tokenizer splitting on whitespace only (what gkd's whitespace mode means)."""

    def tokenize(self, text):
        return text.split()


def _expected_bleu(tokenize, preds, refs):
    from sacrebleu.metrics import BLEU

    return BLEU(tokenize=tokenize).corpus_score(preds, [refs]).score


def _expected_rouge(rouge_type, tokenizer, preds, refs):
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer([rouge_type], tokenizer=tokenizer)
    return 100 * sum(scorer.score(r, p)[rouge_type].fmeasure for r, p in zip(refs, preds)) / len(preds)


def test_standard_and_whitespace_tokenisation_on_real_text():
    refs, preds = [r for r, _ in REAL], [p for _, p in REAL]
    records = [rec(r) for r in refs]
    standard, whitespace = _expected_bleu("13a", preds, refs), _expected_bleu("none", preds, refs)
    assert standard != pytest.approx(whitespace)  # the two modes really differ here
    assert bleu(preds, records, tokenize="standard") == pytest.approx(standard)
    assert bleu(preds, records, tokenize="13a") == pytest.approx(standard)  # sacrebleu's own name
    assert bleu(preds, records, tokenize="whitespace") == pytest.approx(whitespace)
    assert bleu(preds, records) == pytest.approx(whitespace)  # the functions' default: the tasks' mode
    for fn, rouge_type in (
        (rouge1, "rouge1"),
        (rouge2, "rouge2"),
        (rougeL, "rougeL"),
        (rougeLsum, "rougeLsum"),
    ):
        std = _expected_rouge(rouge_type, None, preds, refs)  # rouge-score's default tokenizer
        ws = _expected_rouge(rouge_type, _Split(), preds, refs)
        assert std != pytest.approx(ws), rouge_type
        assert fn(preds, records, tokenize="standard") == pytest.approx(std), rouge_type
        assert fn(preds, records, tokenizer="default") == pytest.approx(std), rouge_type  # the older keyword
        assert fn(preds, records, tokenize="whitespace") == pytest.approx(ws), rouge_type
        assert fn(preds, records) == pytest.approx(ws), rouge_type


def test_sentence_forms_follow_the_tokenisation():
    from sacrebleu.metrics import BLEU

    ref, pred = REAL[0]
    for mode, name in (("standard", "13a"), ("whitespace", "none")):
        expected = BLEU(tokenize=name, effective_order=True).sentence_score(pred, [ref]).score / 100
        assert bleu_score(rec(ref), pred, tokenize=mode) == pytest.approx(expected)
        assert rouge1_score(rec(ref), pred, tokenize=mode) == pytest.approx(
            rouge1([pred], [rec(ref)], tokenize=mode) / 100
        )
    assert bleu_score(rec(ref), pred, tokenize="standard") != pytest.approx(bleu_score(rec(ref), pred))
    samples = [["Yes, I do.", "Yes I do!", "yes, i do"]]
    assert self_bleu(samples, tokenize="standard") != pytest.approx(self_bleu(samples, tokenize="whitespace"))


def test_rougeLsum_splits_sentences_on_newlines():
    assert rougeLsum(["a b c d"], [rec("a b c d")]) == pytest.approx(rougeL(["a b c d"], [rec("a b c d")]))
    # rougeL: LCS over the whole text ("a b" then "c d" in the other order: 2 of 4); rougeLsum: per sentence
    assert rougeL(["c d\na b"], [rec("a b\nc d")]) == pytest.approx(50.0)
    assert rougeLsum(["c d\na b"], [rec("a b\nc d")]) == pytest.approx(100.0)


def test_unknown_tokenisation_is_an_error():
    with pytest.raises(ValueError, match="use 'standard' or 'whitespace'"):
        rouge1(["a"], [rec("a")], tokenize="13a")
    with pytest.raises(ValueError, match="not both"):
        rouge1(["a"], [rec("a")], tokenize="standard", tokenizer="whitespace")
    with pytest.raises(Exception, match="bad"):
        bleu(["a"], [rec("a")], tokenize="bad")


# --------------------------------------------------------------------------------------------------- paper metrics


def test_rouge_use_stemmer_hand_computed():
    # standard tokens: pred [the, cats, were, running], ref [the, cat, was, running]
    # unstemmed: unigrams shared {the, running} = 2/4 each way -> F 50; no bigram shared -> 0
    # stemmed (Porter, tokens > 3 chars): pred [the, cat, were, run], ref [the, cat, was, run]
    #   unigrams {the, cat, run} = 3/4 -> 75; bigrams (the cat) 1 of 3 each way -> 100/3
    r = rec("the cat was running")
    pred = ["the cats were running"]
    assert rouge1(pred, [r], "standard") == pytest.approx(50.0)
    assert rouge1(pred, [r], "standard", use_stemmer=True) == pytest.approx(75.0)
    assert rouge2(pred, [r], "standard") == pytest.approx(0.0)
    assert rouge2(pred, [r], "standard", use_stemmer=True) == pytest.approx(100 / 3)
    # whitespace mode stems with the same rule, and keeps case
    assert rouge1(pred, [r], "whitespace", use_stemmer=True) == pytest.approx(75.0)
    assert rouge1(["The cats"], [rec("the cat")], "whitespace", use_stemmer=True) == pytest.approx(50.0)
    assert rouge2_score(r, pred[0], "standard", use_stemmer=True) == pytest.approx(1 / 3)
    # rougeL: LCS the..cat..run = 3 of 4 stemmed, the..running = 2 of 4 unstemmed
    assert rougeL(pred, [r], "standard", use_stemmer=True) == pytest.approx(75.0)
    assert rougeL(pred, [r], "standard") == pytest.approx(50.0)


def test_stemmed_names_in_the_vocabulary():
    from gkd.scoring import get_scorer, resolve_scorer

    r = rec("the cat was running")
    assert resolve_scorer("rouge2_stemmed")([r], ["the cats were running"]) == {
        "rouge2_stemmed": pytest.approx(100 / 3)
    }
    assert get_scorer("rouge1_stemmed").example(r, "the cats were running") == pytest.approx(0.75)


def test_chrf_hand_computed():
    # "ab" vs "abc": character 1-grams P 2/2, R 2/3; 2-grams P 1/1 ("ab"), R 1/2 (ab, bc); no longer n-grams in the
    # hypothesis, so the averages run over orders 1-2: P = 1, R = 7/12; chrF2 = 5PR / (4P + R) = (35/12)/(55/12) = 7/11
    assert chrf(["ab"], [rec("abc")]) == pytest.approx(700 / 11)
    assert chrf_score(rec("abc"), "ab") == pytest.approx(7 / 11)
    assert chrf(["abc"], [rec("xyz", "abc")]) == pytest.approx(100.0)  # best reference
    with pytest.raises(NoReferenceError):
        chrf(["a"], [{"prompt": "p"}])


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"),
        ("#### $1,200.", "1200"),
        ("#### 9 0", "90"),  # the arithmetic task's one digit per token
        ("3 + 4 = 7. The answer is $1,200.", "1200"),
        ("So the final answer is: -3.5, not 9", "-3.5"),
        ("the answer is 8 #### 9", "9"),  # #### wins
        ("5 apples and 7 pears", "7"),  # last number
        ("no number here", None),
    ],
)
def test_extract_gsm8k_answer(text, answer):
    assert extract_gsm8k_answer(text) == answer


def test_gsm8k_answer_hand_computed():
    records = [rec("She has 3 + 4 = 7.\n#### 7"), rec("#### 1,000"), rec("#### 12"), rec("#### 5")]
    preds = ["3 plus 4 is 7. The answer is 7.0", "1000", "#### 13", "I do not know"]
    # 7.0 = 7 (numeric), 1000 = 1,000, 13 != 12, no number -> 2 of 4
    assert gsm8k_answer(preds, records) == pytest.approx(50.0)
    assert gsm8k_answer_score(records[0], preds[0]) == 1.0
    assert gsm8k_answer_score(records[2], preds[2]) == 0.0
