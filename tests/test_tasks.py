"""Built-in synthetic tasks: determinism, split hygiene, tokenizer, task-specific metrics."""

import math
import random

import pytest

from gkd.tasks import TASKS, get_task
from gkd.tasks.arithmetic import all_chains, chain_valid_score, parse_prompt, step_accuracy
from gkd.tasks.base import split_of, strip_special
from gkd.tasks.instructions import INSTRUCTIONS, instruction_of, selected_items
from gkd.tasks.summarization import (
    duplicate_score,
    faithfulness_score,
    item_f1_score,
    rouge2_canonical,
    rouge2_canonical_score,
    salient_items,
    set_match_score,
)
from gkd.tasks.translation import NOUNS, agreement_score

NAMES = sorted(TASKS)
PLURAL_NOUNS = {pl for _, pl in NOUNS}


@pytest.fixture(scope="module", params=NAMES)
def task(request):
    return get_task(request.param)


@pytest.fixture(scope="module")
def tokenizers():
    return {name: get_task(name).build_tokenizer() for name in NAMES}


# --------------------------------------------------------------------------------------------------- registry


def test_registry():
    assert set(TASKS) == {"summarization", "arithmetic", "translation", "instructions"}
    assert get_task("summarization", paraphrase_prob=0.5).paraphrase_prob == 0.5
    with pytest.raises(ValueError, match="valid tasks: arithmetic, instructions, summarization, translation"):
        get_task("nope")


def test_interface(task):
    assert task.metrics[0] == task.metric
    for cfg in (task.teacher_model_config(), task.student_model_config()):
        assert cfg["architecture"] == "llama" and cfg["vocab_size"] == task.vocab_size
        assert cfg["hidden_size"] % cfg["num_attention_heads"] == 0
        assert cfg["max_position_embeddings"] > task.max_prompt_tokens + task.max_completion_tokens
    assert task.student_model_config()["hidden_size"] < task.teacher_model_config()["hidden_size"]


# --------------------------------------------------------------------------------------------------- generation


def test_deterministic_per_split_and_seed(task):
    a = task.generate("train", 50, seed=0)
    assert a == task.generate("train", 50, seed=0)
    assert a != task.generate("train", 50, seed=1)
    assert a != task.generate("validation", 50, seed=0)
    assert all(set(r) == {"prompt", "completion", "references"} for r in a)


def test_splits_disjoint(task):
    keys = {}
    for split in ("train", "validation", "test"):
        recs = task.generate(split, 300, seed=3)
        assert len({r["prompt"] for r in recs}) == 300  # unique within a split
        assert all(split_of(task.split_key(r["prompt"])) == split for r in recs)
        keys[split] = {task.split_key(r["prompt"]) for r in recs}
    assert not keys["train"] & keys["test"]
    assert not keys["train"] & keys["validation"]
    assert not keys["validation"] & keys["test"]
    with pytest.raises(ValueError):
        task.generate("dev", 1, seed=0)


def test_references_and_lengths(task, tokenizers):
    tok = tokenizers[task.name]
    for r in task.generate("test", 200, seed=0):
        refs = r["references"]
        assert refs[0] == r["completion"] and len(set(refs)) == len(refs) <= task.max_references
        assert len(tok(r["prompt"])["input_ids"]) <= task.max_prompt_tokens
        for ref in refs:
            ids = tok(ref)["input_ids"]
            assert len(ids) <= task.max_completion_tokens
            assert tok.unk_token_id not in ids
        assert tok.unk_token_id not in tok(r["prompt"])["input_ids"]


def test_gold_scores_perfectly(task):
    recs = task.generate("test", 100, seed=0)
    for preds in ([r["completion"] for r in recs], [r["references"][-1] for r in recs]):
        scores = task.score(recs, preds)
        assert list(scores) == task.metrics
        for name, value in scores.items():
            assert value == pytest.approx(0.0 if name == "dup_rate" else 100.0), name


def test_targets_are_multimodal(task):
    """Several distinct valid targets for one prompt: the teacher has a real distribution to distil."""
    prompt = next(r["prompt"] for r in task.generate("train", 20, seed=0) if len(r["references"]) > 2)
    rng = random.Random(0)
    assert len({task.sample_completion(prompt, rng) for _ in range(30)}) > 2


# --------------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_and_save_load(task, tmp_path):
    from transformers import AutoTokenizer

    tok = task.build_tokenizer(str(tmp_path))
    assert len(tok) == task.vocab_size
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.bos_token is None
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    for r in task.generate("validation", 20, seed=1):
        text = r["prompt"] + " " + r["completion"]
        ids = tok(text, add_special_tokens=True)["input_ids"]
        assert ids == loaded(text)["input_ids"]
        assert len(ids) == len(text.split())  # one word, one id, nothing appended
        assert tok.decode(ids) == text == loaded.decode(ids)
        assert tok.decode([*ids, tok.eos_token_id, tok.pad_token_id], skip_special_tokens=True) == text
    assert tok("zzz-not-a-word")["input_ids"] == [tok.unk_token_id]


def test_chat_template(task, tokenizers):
    tok = tokenizers[task.name]
    r = task.generate("test", 1, seed=0)[0]
    msgs = [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]
    assert tok.apply_chat_template(msgs, tokenize=False) == r["prompt"] + " " + r["completion"]
    assert tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True) == r["prompt"]
    out = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    n_prompt = len(tok(r["prompt"])["input_ids"])
    assert out["input_ids"] == tok(r["prompt"])["input_ids"] + tok(r["completion"])["input_ids"]
    assert out["assistant_masks"] == [0] * n_prompt + [1] * (len(out["input_ids"]) - n_prompt)


def test_strip_special():
    assert strip_special("a b <eos> c <pad>") == "a b"
    assert strip_special("<pad> a b") == "a b"


# --------------------------------------------------------------------------------------------------- summarization


def test_salient_set_format():
    task = get_task("summarization")
    for r in task.generate("train", 200, seed=0):
        toks = r["prompt"].split()
        assert toks[0] == "Q" and toks[-1] == ":" and len(toks) == 18
        items = [t.lower() for t in toks[1:-1]]
        assert len(set(items)) == 16
        salient = salient_items(r["prompt"])
        assert 2 <= len(salient) <= 6
        assert sorted(r["completion"].split()) == sorted(salient)
    # a salient q is written "Q" like the prefix: parsed by position
    assert salient_items("Q a Q b C :") == ["q", "c"]


def test_salient_set_orders_are_random_per_record():
    task = get_task("summarization")
    recs = [r for r in task.generate("train", 300, seed=0) if len(r["completion"].split()) >= 4]
    in_prompt_order = [r["completion"].split() == salient_items(r["prompt"]) for r in recs]
    in_sorted_order = [r["completion"].split() == sorted(salient_items(r["prompt"])) for r in recs]
    assert sum(in_prompt_order) < len(recs) / 4 and sum(in_sorted_order) < len(recs) / 4


SALIENT = {"prompt": "Q z q x S B h k f D m p A C l y j :", "completion": "s b d a c"}


@pytest.mark.parametrize(
    "pred, match, f1, faithful",
    [
        ("d a c s b", 1.0, 1.0, 1.0),
        ("a~ b c~ d s", 1.0, 1.0, 1.0),  # paraphrases are canonicalised
        ("d a c s", 0.0, 8 / 9, 1.0),  # one missing: tp 4, |pred| 4, |gold| 5
        ("d a c s b b", 0.0, 10 / 11, 1.0),  # repeat is a false positive
        ("d a c s z", 0.0, 0.8, 1.0),  # distractor z: in the input, so faithful
        ("d a c e g", 0.0, 0.6, 0.6),  # e and g are not in the input: hallucinated
        ("d a c s b Q", 0.0, 10 / 11, 5 / 6),  # a non-item token
        ("", 0.0, 0.0, 0.0),  # empty summary: faithfulness 0 by definition
    ],
)
def test_salient_set_per_example(pred, match, f1, faithful):
    assert set_match_score(SALIENT, pred) == match
    assert item_f1_score(SALIENT, pred) == pytest.approx(f1)
    assert faithfulness_score(SALIENT, pred) == pytest.approx(faithful)


def test_salient_set_corpus_metrics():
    task = get_task("summarization")
    rec = {**SALIENT, "references": ["s b d a c", "a b c d s"]}
    scores = task.score([rec] * 4, ["a b c d s", "a b c d s s", "a b c d", "a b c d s <eos> x"])
    assert scores["set_match"] == 50.0
    assert scores["dup_rate"] == 25.0
    assert scores["item_f1"] == pytest.approx(100 * (1 + 10 / 11 + 8 / 9 + 1) / 4)
    assert scores["faithfulness"] == 100.0
    # ROUGE-2 vs best reference "a b c d s": 4/4 bigrams, then P 4/5 R 4/4, then P 3/3 R 3/4
    assert scores["rouge2"] == pytest.approx(100 * (1 + 8 / 9 + 6 / 7 + 1) / 4)


def test_paraphrases():
    task = get_task("summarization", paraphrase_prob=1.0)
    assert "a~" in task.vocabulary() and "a~" not in get_task("summarization").vocabulary()
    recs = task.generate("test", 20, seed=0)
    assert all(tok.endswith("~") for r in recs for tok in r["completion"].split())
    plain = [" ".join(t[:-1] for t in r["completion"].split()) for r in recs]
    scores = task.score(recs, plain)
    assert scores["set_match"] == 100.0 and scores["rouge2"] == pytest.approx(100.0)
    tok = task.build_tokenizer()
    assert all(tok.unk_token_id not in tok(r["completion"])["input_ids"] for r in recs)


# --------------------------------------------------------------------------------------------------- arithmetic


def test_arithmetic_chains():
    terms = parse_prompt("4 7 + 1 8 + 2 5 =")
    assert terms == [47, 18, 25]
    chains = all_chains(terms)
    assert len(chains) == 12 and "4 7 + 1 8 = 6 5 ; 6 5 + 2 5 = 9 0 ; #### 9 0" in chains
    assert "1 8 + 2 5 = 4 3 ; 4 7 + 4 3 = 9 0 ; #### 9 0" in chains
    assert len(all_chains([5, 5, 7])) == 6  # repeated terms give fewer distinct chains
    task = get_task("arithmetic")
    recs = task.generate("test", 100, seed=0)
    assert all(sorted(r["references"]) == all_chains(parse_prompt(r["prompt"])) for r in recs)
    assert task.split_key("4 7 + 1 8 + 2 5 =") == task.split_key("2 5 + 4 7 + 1 8 =")


def test_arithmetic_chain_checks():
    rec = {"prompt": "4 7 + 1 8 + 2 5 =", "completion": "4 7 + 1 8 = 6 5 ; 6 5 + 2 5 = 9 0 ; #### 9 0"}
    good = "2 5 + 1 8 = 4 3 ; 4 7 + 4 3 = 9 0 ; #### 9 0"
    wrong_sum = "4 7 + 1 8 = 6 4 ; 6 4 + 2 5 = 8 9 ; #### 8 9"  # step 1 wrong, step 2 right given step 1
    lucky = "4 7 + 1 8 = 6 5 ; 6 5 + 2 6 = 9 0 ; #### 9 0"  # right answer, illegal term in step 2
    reused = "4 7 + 4 7 = 9 4 ; 9 4 + 2 5 = 1 1 9 ; #### 1 1 9"  # a term used twice
    for pred, valid in [
        (good, 1.0),
        (wrong_sum, 0.0),
        (lucky, 0.0),
        (reused, 0.0),
        (good + " 1", 0.0),
        ("", 0.0),
    ]:
        assert chain_valid_score(rec, pred) == valid, pred
    task = get_task("arithmetic")
    preds = [good, wrong_sum, lucky, reused]
    scores = task.score([rec] * 4, preds)
    assert scores == {"final_answer": 50.0, "chain_valid": 25.0}
    assert step_accuracy([rec] * 4, preds) == [50.0, 75.0]


def test_arithmetic_valid_iff_a_listed_chain():
    """chain_valid (a parser) agrees with membership in the enumerated chains, also on corrupted chains."""
    task = get_task("arithmetic")
    rng = random.Random(0)
    for r in task.generate("validation", 50, seed=0):
        chains = set(all_chains(parse_prompt(r["prompt"])))
        toks = r["completion"].split()
        i = rng.randrange(len(toks))
        corrupted = [*toks[:i], rng.choice(task.vocabulary()), *toks[i + 1 :]]
        for pred in (r["completion"], " ".join(corrupted), " ".join(toks[:-1])):
            assert chain_valid_score(r, pred) == float(pred in chains)


def test_arithmetic_sizes():
    task = get_task("arithmetic", n_terms=4, digits=1)
    recs = task.generate("train", 100, seed=0)
    assert all(len(parse_prompt(r["prompt"])) == 4 for r in recs)
    assert task.score(recs, [r["completion"] for r in recs])["chain_valid"] == 100.0
    assert get_task("arithmetic").max_completion_tokens == 25
    with pytest.raises(ValueError, match="too small"):
        get_task("arithmetic", n_terms=2, digits=1).generate("test", 100, seed=0)


# --------------------------------------------------------------------------------------------------- translation


def test_translation_grammar():
    task = get_task("translation")
    lengths = set()
    for r in task.generate("train", 300, seed=0):
        src = r["prompt"].split()[:-1]
        lengths.add(len(src))
        subj, _verb, _obj, _pp = task.parse(r["prompt"])
        for ref in r["references"]:
            assert ref.split()[-1] == {"sg": "-a", "pl": "-en"}[subj[1]]  # agreement with the subject
            assert ref.count("-ri") == sum(w in PLURAL_NOUNS for w in src)
    assert min(lengths) == 5 and max(lengths) == 12


def test_translation_lexicon_is_fixed_and_has_synonyms():
    a, b = get_task("translation"), get_task("translation")
    assert a.lexicon == b.lexicon != get_task("translation", lexicon_seed=1).lexicon
    assert all(2 <= len(words) <= 3 for words in a.lexicon.values())


def test_translation_agreement_metric():
    task = get_task("translation")
    r = task.generate("test", 1, seed=0)[0]
    toks = r["completion"].split()
    flipped = " ".join([*toks[:-1], "-en" if toks[-1] == "-a" else "-a"])
    scores = task.score([r, r], [r["completion"], flipped])
    assert scores["agreement"] == 50.0 and scores["exact_match"] == 50.0
    assert 0.0 < scores["bleu"] < 100.0


# --------------------------------------------------------------------------------------------------- record formats


def _formats(r: dict) -> dict[str, dict]:
    """One task record in every record format gkd accepts, with the same prompt text and targets."""
    system = {"role": "system", "content": "be brief"}
    user = {"role": "user", "content": r["prompt"]}
    assistant = {"role": "assistant", "content": r["completion"]}
    refs = r.get("references", [r["completion"]])
    return {
        "prompt_completion": r,
        "messages": {"messages": [system, user, assistant], "references": refs},
        "conversational": {"prompt": [system, user], "completion": [assistant], "references": refs},
        "prompt_only_with_references": {"prompt": r["prompt"], "references": refs},
    }


def test_task_score_is_the_same_on_every_record_format(task):
    recs = task.generate("test", 40, seed=2)
    rng = random.Random(0)
    preds = [
        rng.choice([r["completion"], r["references"][-1], " ".join(r["completion"].split()[:-1])])
        for r in recs
    ]
    expected = task.score(recs, preds)
    assert 0.0 < expected[task.metric] < 100.0  # a mix of right and wrong predictions
    for fmt in ("messages", "conversational", "prompt_only_with_references"):
        assert task.score([_formats(r)[fmt] for r in recs], preds) == expected, fmt


def test_per_example_task_scorers_on_every_record_format():
    for fmt, record in _formats({**SALIENT, "references": ["s b d a c", "a b c d s"]}).items():
        assert set_match_score(record, "a~ b c d s") == 1.0, fmt
        assert item_f1_score(record, "d a c s") == pytest.approx(8 / 9), fmt
        assert faithfulness_score(record, "d a c e g") == pytest.approx(0.6), fmt
        assert duplicate_score(record, "d a d") == 1.0 and duplicate_score(record, "d a") == 0.0, fmt
        assert rouge2_canonical_score(record, "a b c d") == pytest.approx(
            rouge2_canonical(["a b c d"], [record]) / 100
        )
    arith = {"prompt": "4 7 + 1 8 + 2 5 =", "completion": "4 7 + 1 8 = 6 5 ; 6 5 + 2 5 = 9 0 ; #### 9 0"}
    good = "2 5 + 1 8 = 4 3 ; 4 7 + 4 3 = 9 0 ; #### 9 0"
    for fmt, record in _formats(arith).items():
        assert chain_valid_score(record, good) == 1.0, fmt
        assert chain_valid_score(record, good.replace("4 3 ;", "4 4 ;")) == 0.0, fmt
        assert step_accuracy([record], [good]) == [100.0, 100.0], fmt
    trans = get_task("translation").generate("test", 1, seed=0)[0]
    for fmt, record in _formats(trans).items():
        assert agreement_score(record, trans["references"][-1]) == 1.0, fmt
        assert agreement_score(record, trans["completion"] + " x") == 0.0, fmt


def test_task_metrics_without_targets():
    """Prompt-based metrics work on prompt-only records; target-based ones say the record has no reference."""
    bare = {"prompt": SALIENT["prompt"]}
    assert set_match_score(bare, "s b d a c") == 1.0
    assert set_match_score({"messages": [{"role": "user", "content": SALIENT["prompt"]}]}, "s b d a c") == 1.0
    with pytest.raises(ValueError, match="has no reference"):
        rouge2_canonical_score(bare, "s b d a c")
    with pytest.raises(ValueError, match="record 0 has no reference"):
        get_task("translation").score([{"prompt": "the dog saw a cat :"}], ["x"])
    with pytest.raises(ValueError, match="has no reference"):
        agreement_score({"prompt": "the dog saw a cat :"}, "x -a")


# --------------------------------------------------------------------------------------------------- instructions


def test_instructions_select_by_case_and_half():
    prompt = "upper late : b Q z K m d R a :"
    assert selected_items(prompt) == ["q", "r"]
    assert selected_items("lower : b Q z K m d R a :") == ["b", "z", "m", "d", "a"]
    assert selected_items("early : b Q z K m d R a :") == ["b", "k", "m", "d", "a"]
    assert selected_items("lower early : b Q z K m d R a :") == ["b", "m", "d", "a"]
    with pytest.raises(ValueError, match="unknown instruction 'upper upper'"):
        selected_items("upper upper : a :")
    task = get_task("instructions")
    record = {"prompt": prompt, "references": ["q r"]}
    scores = task.score([record, {"prompt": "lower : b Q :", "references": ["b"]}], ["r q", "b b"])
    assert scores["set_match"] == 50.0 and scores["held_out"] == 100.0 and scores["held_in"] == 0.0
    assert scores["held_out_f1"] == 100.0 and scores["item_f1"] == pytest.approx(50 + 50 * 2 / 3)


def test_instructions_hold_out_instructions_from_the_training_mixture():
    task = get_task("instructions")
    assert set(task.held_out) == {"upper late", "lower early"} and len(task.mixture) == 6
    for split in ("train", "validation"):
        assert {instruction_of(r) for r in task.generate(split, 600, seed=0)} == set(task.mixture)
    test = task.generate("test", 1000, seed=0)
    held = sum(instruction_of(r) in task.held_out for r in test)
    assert 430 < held < 570  # held_out_share 0.5
    assert {instruction_of(r) for r in test} == set(INSTRUCTIONS)
    assert all(r["completion"] for r in test)  # an instruction always selects something
    # the full mixture (what the experiment trains its teacher on) draws every instruction for training
    full = get_task("instructions", held_out=[])
    assert {instruction_of(r) for r in full.generate("train", 600, seed=0)} == set(INSTRUCTIONS)
    assert math.isnan(
        full.score(test[:50], [r["completion"] for r in test[:50]])["held_out"]
    )  # none held out
    with pytest.raises(ValueError, match="unknown held-out instruction"):
        get_task("instructions", held_out=["upper lower"])
    with pytest.raises(ValueError, match="mixture would be empty"):
        get_task("instructions", held_out=list(INSTRUCTIONS))
