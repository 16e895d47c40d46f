"""A teacher with another tokenizer (gkd.xtok): exactness against the same-tokenizer path, and gkd distill end to end.

Tiny word-level tokenizers (gkd.tasks.base.build_word_tokenizer) and models built from configs; nothing downloaded.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from tiny import TINY, base_config, make_model

from gkd.align import token_surfaces
from gkd.cli import main
from gkd.data import Example, collate
from gkd.divergences import DIVERGENCES, get_divergence
from gkd.forward import score_positions
from gkd.models import build_model
from gkd.objective import Objective
from gkd.tasks.base import build_word_tokenizer
from gkd.teacher import Teacher
from gkd.xtok import AlignedTeacher, student_text, vocab_pair

WORDS = [f"w{i}" for i in range(20)]


def permuted_pair():
    """A student tokenizer, a teacher tokenizer with the same words under other ids, a teacher model for the
    student's ids and the same model with its embedding (tied head) rows moved to the teacher's ids."""
    student_tok = build_word_tokenizer(WORDS)
    shuffled = WORDS[:]
    random.Random(0).shuffle(shuffled)
    teacher_tok = build_word_tokenizer(shuffled)
    teacher = make_model("llama_teacher", student_tok, seed=1)
    moved = copy.deepcopy(teacher)
    s_vocab, t_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
    perm = torch.tensor([s_vocab[w] for w, _ in sorted(t_vocab.items(), key=lambda kv: kv[1])])
    with torch.no_grad():
        emb = moved.get_input_embeddings().weight
        emb.copy_(teacher.get_input_embeddings().weight[perm])
    return student_tok, teacher_tok, teacher, moved


def batch_of(tok, on_policy: bool):
    rng = random.Random(1)
    examples = []
    for i in range(4):
        prompt = tok(" ".join(rng.choice(WORDS) for _ in range(3)))["input_ids"]
        completion = tok(" ".join(rng.choice(WORDS) for _ in range(2 + i)))["input_ids"] + [tok.eos_token_id]
        record = {"prompt": tok.decode(prompt)}
        examples.append(Example(prompt, completion, record))
    return dataclasses.replace(collate(examples, tok.pad_token_id), on_policy=on_policy)


def loss_and_grad(student, objective, teacher, batch):
    student.zero_grad()
    p_s = score_positions(
        student, batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask
    )
    loss = objective.loss(batch, p_s, teacher.view(batch), float(batch.num_tokens()))
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in student.parameters() if p.grad is not None]


def test_token_surfaces_of_a_word_tokenizer():
    tok = build_word_tokenizer(WORDS)
    surfaces = token_surfaces(tok)
    assert surfaces[: len(tok.all_special_ids)] == [None] * len(tok.all_special_ids)
    assert surfaces[tok.convert_tokens_to_ids("w3")] == "w3"


def test_student_text_spans_are_the_words():
    tok = build_word_tokenizer(WORDS)
    pair = vocab_pair(tok, tok)
    ids = tok("w1 w12 w3")["input_ids"] + [tok.eos_token_id]
    text, spans, sentinels = student_text(tok, ids, pair)
    assert [text[a:b] for a, b in spans[:3]] == ["w1", "w12", "w3"]
    assert len(sentinels) == 1 and sentinels[0][2] == tok.eos_token_id


@pytest.mark.parametrize("on_policy", [False, True])
@pytest.mark.parametrize("divergence", sorted(DIVERGENCES))
def test_permuted_vocabulary_equals_same_tokenizer(divergence, on_policy):
    if divergence == "nll":
        pytest.skip("nll reads no teacher")
    student_tok, teacher_tok, teacher, moved = permuted_pair()
    student = make_model("llama_student", student_tok, seed=2)
    objective = Objective.from_config(base_config(divergence=divergence))
    batch = batch_of(student_tok, on_policy)
    same = Teacher(teacher, len(student_tok))
    aligned = AlignedTeacher(moved, student_tok, teacher_tok, len(student_tok), temperature=1.0)
    assert aligned.pair.coverage().describe()
    ref_loss, ref_grads = loss_and_grad(student, objective, same, batch)
    loss, grads = loss_and_grad(student, objective, aligned, batch)
    assert torch.allclose(loss, ref_loss, atol=1e-6, rtol=1e-6)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# gkd distill with a character-level teacher and a word-level student
# ---------------------------------------------------------------------------------------------------------------
LETTER_WORDS = ["a", "b", "c", "ab", "ba", "abc", "cab", "bb", "ca", "cc"]


def char_tokenizer(letters: str, path: str, template: bool = True):
    """A character-level tokenizer (spaces split words and are not tokens), saved to ``path``."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from gkd.tasks.base import CHAT_TEMPLATE, SPECIAL_TOKENS

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in letters:
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS[2]))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex("."), "isolated")]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=SPECIAL_TOKENS[0],
        eos_token=SPECIAL_TOKENS[1],
        unk_token=SPECIAL_TOKENS[2],
        clean_up_tokenization_spaces=False,
    )
    if template:
        tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    return tok


def char_teacher_world(tmp_path, chat: bool = False):
    """A word-level student folder, a character-level teacher folder and 32 records; returns the base config."""
    student_tok = build_word_tokenizer(LETTER_WORDS, str(tmp_path / "student"))
    build_model(TINY["llama_student"], student_tok, seed=0).save_pretrained(tmp_path / "student")
    teacher_tok = char_tokenizer("abc", str(tmp_path / "teacher"), template=not chat)  # chat: none to use
    build_model(TINY["llama_teacher"], teacher_tok, seed=1).save_pretrained(tmp_path / "teacher")
    rng = random.Random(0)
    lines = []
    for _ in range(32):
        prompt = " ".join(rng.choice(LETTER_WORDS) for _ in range(3))
        completion = " ".join(rng.choice(LETTER_WORDS) for _ in range(4))
        if chat:
            record = {
                "messages": [
                    {"role": "user", "content": prompt},
                    {"role": "assistant", "content": completion},
                ]
            }
        else:
            record = {"prompt": prompt, "completion": completion}
        lines.append(json.dumps(record) + "\n")
    (tmp_path / "train.jsonl").write_text("".join(lines))
    return {
        "model_name_or_path": str(tmp_path / "student"),
        "teacher_model_name_or_path": str(tmp_path / "teacher"),
        "dataset": str(tmp_path / "train.jsonl"),
        "output_dir": str(tmp_path / "run"),
        "per_device_train_batch_size": 8,
        "max_new_tokens": 6,
        "logging_steps": 1,
        "save_steps": 0,
        "progress": False,
    }


def test_gkd_distill_with_a_character_level_teacher(tmp_path, capsys):
    config = char_teacher_world(tmp_path)
    config.update(max_steps=24, learning_rate=1e-2, lmbda=0.0)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    assert main(["distill", "--config", str(tmp_path / "run.yaml")]) == 0
    out = capsys.readouterr()
    said = [
        line for line in (out.out + out.err).splitlines() if "projected onto the student's vocabulary" in line
    ]
    assert len(said) == 1 and "tokenizer alignment" in said[0]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 24 and all(x == x for x in losses)
    assert sum(losses[-4:]) < sum(losses[:4])
    # on-policy steps run too
    config.update(lmbda=1.0, max_steps=2, output_dir=str(tmp_path / "run2"))
    (tmp_path / "run2.yaml").write_text(yaml.safe_dump(config))
    assert main(["distill", "--config", str(tmp_path / "run2.yaml")]) == 0


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_extra_teacher_tokens_are_one_tail_bucket(divergence):
    """The teacher's vocabulary is the student's plus tokens no student token starts: the loss is
    (1 - τ) D(P(· | shared) || Q) with τ the extra tokens' mass, checked against a float64 reference."""
    student_tok = build_word_tokenizer(WORDS)
    teacher_tok = build_word_tokenizer([*WORDS, "zq0", "zq1", "zq2"])
    teacher = make_model("llama_teacher", teacher_tok, seed=1)
    student = make_model("llama_student", student_tok, seed=2)
    batch = batch_of(student_tok, on_policy=True)
    objective = Objective.from_config(base_config(divergence=divergence))
    aligned = AlignedTeacher(teacher, student_tok, teacher_tok, len(student_tok), temperature=1.0)
    n = float(batch.num_tokens())
    p_s = score_positions(
        student, batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask
    )
    got = objective.loss(batch, p_s, aligned.view(batch), n)
    with torch.no_grad():
        logq = torch.log_softmax(p_s.full_logits().double(), -1)
        t_out = score_positions(
            teacher, batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask
        )
        logp_all = torch.log_softmax(t_out.full_logits().double(), -1)
        v = len(student_tok)
        shared = torch.logsumexp(logp_all[:, :v], -1, keepdim=True)  # log(1 - τ)
        logp = logp_all[:, :v] - shared
        bound = get_divergence(divergence)
        params = {k: x for k, x in bound.params.items() if k != "temperature"}
        d = bound.spec.fn(logq, logp, temperature=1.0, **params)
        want = (shared.squeeze(-1).exp() * d).sum() / n
    assert float(logp_all[:, v:].exp().sum()) > 1e-3  # the extra tokens do hold mass
    assert abs(float(got.detach()) - float(want)) < 1e-5


@pytest.mark.parametrize(
    ("extra", "chat", "message"),
    [
        ({"teacher_cache": "topk"}, False, "teacher_cache: topk with a teacher whose tokenizer differs"),
        (
            {"teacher_kl_estimator": "sampled", "divergence": "reverse_kl"},
            False,
            "teacher_kl_estimator: exact",
        ),
        ({}, True, "has no chat template for these chat prompts; set teacher_chat_template"),
    ],
    ids=["topk-cache", "sampled", "no-chat-template"],
)
def test_what_the_aligned_path_does_not_do_is_refused_in_one_line(tmp_path, extra, chat, message):
    from userland import run_cli

    config = {**char_teacher_world(tmp_path, chat=chat), "max_steps": 1, **extra}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    result = run_cli(["distill", "--config", str(tmp_path / "run.yaml")])
    assert result.code == 2, result.err
    assert len(result.error_lines) == 1 and message in result.error_lines[0]


def test_permuted_vocabulary_logs_the_same_diagnostics():
    from collections import defaultdict

    student_tok, teacher_tok, teacher, moved = permuted_pair()
    student = make_model("llama_student", student_tok, seed=2)
    objective = Objective.from_config(base_config(divergence="jsd"))
    batch = batch_of(student_tok, on_policy=True)
    got = {}
    for name, t in (
        ("same", Teacher(teacher, len(student_tok))),
        ("aligned", AlignedTeacher(moved, student_tok, teacher_tok, len(student_tok))),
    ):
        stats = defaultdict(list)
        p_s = score_positions(
            student, batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask
        )
        objective.loss(batch, p_s, t.view(batch), float(batch.num_tokens()), stats=stats)
        got[name] = {k: torch.cat(v) for k, v in stats.items()}
    for key in ("forward_kl", "reverse_kl", "entropy", "student_logp", "top1_agree"):
        assert torch.allclose(got["aligned"][key], got["same"][key], atol=1e-5), key


def test_seqkd_with_a_character_level_teacher(tmp_path):
    """The teacher writes its targets in characters, once (cached); the student trains on them in its words."""
    config = {**char_teacher_world(tmp_path), "seq_kd": True, "lmbda": 0.0, "max_steps": 2}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    assert main(["distill", "--config", str(tmp_path / "run.yaml")]) == 0
    caches = list((tmp_path / "run").glob("seqkd-*.jsonl"))
    assert len(caches) == 1
    teacher_targets = [json.loads(line) for line in caches[0].read_text().splitlines()]
    assert len(teacher_targets) == 32 and all(max(t) < 6 for t in teacher_targets)  # the teacher's 6 ids


def test_two_routed_teachers_one_with_another_tokenizer(tmp_path, capsys):
    """``teachers:`` mixing a same-tokenizer teacher and a character-level one: each is loaded through the
    single-teacher path (the second aligned), records are routed by their ``teacher`` field, and each teacher's loss
    is logged; without a reward the two add up to the step's loss."""
    config = char_teacher_world(tmp_path)
    same = tmp_path / "same"
    student_tok = build_word_tokenizer(LETTER_WORDS, str(same))
    build_model(TINY["llama_teacher"], student_tok, seed=2).save_pretrained(same)
    records = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    routed = [{**r, "teacher": "words" if i % 2 else "chars"} for i, r in enumerate(records)]
    (tmp_path / "routed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in routed))
    config.pop("teacher_model_name_or_path")
    config.update(
        dataset=str(tmp_path / "routed.jsonl"),
        teachers=[
            {"name": "words", "model_name_or_path": str(same)},
            {"name": "chars", "model_name_or_path": str(tmp_path / "teacher")},
        ],
        max_steps=3,
        lmbda=0.5,
    )
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    assert main(["distill", "--config", str(tmp_path / "run.yaml")]) == 0
    out = capsys.readouterr()
    said = [s for s in (out.out + out.err).splitlines() if "projected onto the student's vocabulary" in s]
    assert len(said) == 1  # only the character-level teacher is aligned
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 3
    for r in steps:
        parts = [r["teacher/words/loss"], r["teacher/chars/loss"]]
        assert all(p > 0 for p in parts)
        assert sum(parts) == pytest.approx(r["loss"], rel=1e-5)


@pytest.mark.slow
def test_a_character_level_teacher_under_two_processes(tmp_path):
    """The aligned teacher under DDP (2 CPU processes): both ranks take the same λ decisions and the same
    all-reduced gradient norms, and the run finishes."""
    from launch import two_processes

    config = char_teacher_world(tmp_path)
    out = tmp_path / "dist"
    out.mkdir()
    args = [f"{k}={config[k]}" for k in ("model_name_or_path", "teacher_model_name_or_path", "dataset")]
    worker = Path(__file__).with_name("dist_worker.py")
    proc = two_processes(worker, tmp_path, out, "train", *args, "max_steps=4", port=29571)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((out / f"train-rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["flags"] == r1["flags"] and len(r0["flags"]) == 4
    assert r0["norms"] == pytest.approx(r1["norms"], rel=1e-6)
    assert all(n == n and n > 0 for n in r0["norms"])
