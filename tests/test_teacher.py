"""The teacher: frozen scoring, SeqKD targets generated once and cached, and the offline top-k cache."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY

import gkd.teacher as teacher_mod
from gkd.data import collate, tokenize_records
from gkd.divergences import get_divergence, log_probs
from gkd.evaluation import generate_ids
from gkd.losses import LossTerms, logits_loss, topk_tail
from gkd.models import build_model, score_positions
from gkd.teacher import Teacher, TopKCache, build_topk_cache, seqkd_dataset


def _dataset(tokenizer, records, n=6):
    return tokenize_records(records[:n], tokenizer, max_prompt_length=64, max_completion_length=16)


def _reference_logits(model, batch):
    """Logits predicting each valid completion token from a plain forward of each unpadded row (row-major)."""
    rows = []
    for i in range(batch.size):
        prompt = batch.prompt_ids[i][batch.prompt_mask[i]]
        completion = batch.completion_ids[i][batch.completion_mask[i]]
        logits = model(torch.cat([prompt, completion])[None]).logits[0]
        rows.append(logits[len(prompt) - 1 : len(prompt) - 1 + len(completion)])  # position t predicts t + 1
    return torch.cat(rows)


# ---------------------------------------------------------------------------------------------------------------
# scoring
# ---------------------------------------------------------------------------------------------------------------
def test_teacher_is_frozen_and_scores_like_its_own_forward(tokenizer, records, llama_pair):
    _, model = llama_pair
    model.train()
    teacher = Teacher(model, vocab=len(tokenizer))
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    batch = collate(_dataset(tokenizer, records, 4).examples, tokenizer.pad_token_id)
    out = teacher.score(batch)
    assert not out.hidden.requires_grad and out.hidden.grad_fn is None
    with torch.no_grad():
        ref = _reference_logits(model, batch)
    torch.testing.assert_close(out.head.logits(out.hidden), ref, atol=1e-5, rtol=1e-4)

    plain = Teacher(model, vocab=len(tokenizer), fused=False).score(batch)
    assert plain.hidden is None and plain.logits.grad_fn is None
    torch.testing.assert_close(plain.logits, ref, atol=1e-5, rtol=1e-4)


def test_teacher_with_a_padded_head_scores_the_tokenizer_entries(tokenizer, records):
    vocab = len(tokenizer)
    model = build_model({**TINY["llama_teacher"], "vocab_size": vocab + 8}, tokenizer, seed=0)
    batch = collate(_dataset(tokenizer, records, 2).examples, tokenizer.pad_token_id)
    out = Teacher(model, vocab=vocab, fused=False).score(batch)
    assert out.logits.shape == (batch.num_tokens(), vocab)
    with torch.no_grad():
        torch.testing.assert_close(
            out.logits, _reference_logits(model, batch)[:, :vocab], atol=1e-5, rtol=1e-4
        )


# ---------------------------------------------------------------------------------------------------------------
# SeqKD: teacher-written targets, generated once
# ---------------------------------------------------------------------------------------------------------------
SEQKD = {"teacher_name": "tiny", "max_new_tokens": 6, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": 3}


def test_seqkd_targets_are_teacher_samples_cached_on_disk(tokenizer, records, llama_pair, tmp_path):
    _, model = llama_pair
    data = _dataset(tokenizer, records, 4)
    logs = []
    out = seqkd_dataset(model, tokenizer, data, cache_dir=tmp_path, batch_size=3, log=logs.append, **SEQKD)
    assert len(logs) == 1 and "4 prompts" in logs[0]
    eos = tokenizer.eos_token_id
    # the same settings through generate_ids give the same samples; each target ends with EOS unless it is cut
    samples = generate_ids(
        model,
        tokenizer,
        data,
        max_new_tokens=6,
        greedy=False,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        batch_size=3,
        seed=3,
    )
    assert [e.completion for e in out.examples] == [[*s, eos][:6] for s in samples]
    assert all(c[-1] == eos or len(c) == 6 for c in (e.completion for e in out.examples))
    # prompts and records are the dataset's; only the targets change
    assert [e.prompt for e in out.examples] == [e.prompt for e in data.examples]
    assert [e.record for e in out.examples] == [e.record for e in data.examples]
    (path,) = tmp_path.glob("seqkd-*.jsonl")
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        e.completion for e in out.examples
    ]
    assert not list(tmp_path.glob("*.tmp-*"))


def test_seqkd_generates_once_per_fingerprint(tokenizer, records, llama_pair, tmp_path, monkeypatch):
    _, model = llama_pair
    data = _dataset(tokenizer, records, 4)
    calls = []

    def fake_generate(model, tokenizer, dataset, **kw):
        calls.append(kw)
        return [[10 + len(calls), 11] for _ in dataset.examples]

    monkeypatch.setattr(teacher_mod, "generate_ids", fake_generate)

    def run(**over):
        return seqkd_dataset(
            model, tokenizer, data, cache_dir=tmp_path / "c", log=lambda _: None, **{**SEQKD, **over}
        )

    first = run()
    assert len(calls) == 1
    assert calls[0]["seed"] == 3 and calls[0]["max_new_tokens"] == 6 and calls[0]["greedy"] is False
    assert first.examples[0].completion == [11, 11, tokenizer.eos_token_id]
    assert run().examples == first.examples and len(calls) == 1  # read from the cache
    # any setting in the fingerprint gives a new cache file
    assert run(temperature=0.7).examples[0].completion[0] == 12 and len(calls) == 2
    run(teacher_name="other")
    run(seed=4)
    assert len(calls) == 4 and len(list((tmp_path / "c").glob("seqkd-*.jsonl"))) == 4
    # other prompts are another fingerprint too
    seqkd_dataset(
        model,
        tokenizer,
        _dataset(tokenizer, records[4:], 4),
        cache_dir=tmp_path / "c",
        log=lambda _: None,
        **SEQKD,
    )
    assert len(calls) == 5
    # a cache file of the wrong length (e.g. an interrupted write) is regenerated
    path = next(
        p
        for p in (tmp_path / "c").glob("seqkd-*.jsonl")
        if json.loads(p.read_text().splitlines()[0])[0] == 11
    )
    path.write_text("[5, 1]\n")
    assert run().examples[0].completion == [16, 11, tokenizer.eos_token_id] and len(calls) == 6
    assert len(path.read_text().splitlines()) == 4


def test_seqkd_cuts_targets_at_max_new_tokens(tokenizer, records, llama_pair, tmp_path, monkeypatch):
    _, model = llama_pair
    monkeypatch.setattr(teacher_mod, "generate_ids", lambda m, t, d, **kw: [[7, 8, 9]] * len(d))
    data = _dataset(tokenizer, records, 2)
    out = seqkd_dataset(
        model, tokenizer, data, cache_dir=tmp_path, log=lambda _: None, **{**SEQKD, "max_new_tokens": 3}
    )
    assert [e.completion for e in out.examples] == [[7, 8, 9], [7, 8, 9]]  # no room left for the EOS


def test_seqkd_cache_key_is_pinned_and_the_same_for_every_local_backend(
    tokenizer, records, tmp_path, monkeypatch
):
    """The key is pinned: changing it invalidates every user's SeqKD cache, so it must be a deliberate change (it
    was, once: to gkd.io.fingerprint, the one fingerprint helper)."""
    monkeypatch.setattr(teacher_mod, "generate_ids", lambda m, t, d, **kw: [[7]] * len(d))
    data = _dataset(tokenizer, records, 4)
    for backend in ("auto", "fast", "generate", "vllm"):
        folder = tmp_path / backend
        seqkd_dataset(None, tokenizer, data, cache_dir=folder, backend=backend, log=lambda _: None, **SEQKD)
        assert [p.name for p in folder.iterdir()] == ["seqkd-507f5b122a33b653.jsonl"], backend


def test_seqkd_with_rollout_backend_vllm_samples_the_teacher_in_process(
    tokenizer, records, llama_pair, tmp_path
):
    """The run's vLLM engine holds the student: SeqKD samples the teacher with the local auto sampler, no crash."""
    _, model = llama_pair
    data = _dataset(tokenizer, records, 4)
    logs = []
    out = seqkd_dataset(
        model,
        tokenizer,
        data,
        cache_dir=tmp_path / "v",
        batch_size=3,
        backend="vllm",
        log=logs.append,
        **SEQKD,
    )
    ref = seqkd_dataset(
        model,
        tokenizer,
        data,
        cache_dir=tmp_path / "a",
        batch_size=3,
        backend="auto",
        log=lambda _: None,
        **SEQKD,
    )
    assert out.examples == ref.examples
    assert len(logs) == 2 and "in-process" in logs[1]


def test_seqkd_samples_through_the_given_sampler(tokenizer, records, llama_pair, tmp_path):
    from gkd.sampling import get_sampler

    _, model = llama_pair
    data = _dataset(tokenizer, records, 4)
    kw = {"cache_dir": tmp_path, "batch_size": 3, "log": lambda _: None, **SEQKD}
    by_generate = seqkd_dataset(model, tokenizer, data, sampler=get_sampler("generate"), **kw)
    samples = generate_ids(
        model, tokenizer, data, max_new_tokens=6, greedy=False, batch_size=3, seed=3, backend="generate"
    )
    eos = tokenizer.eos_token_id
    assert [e.completion for e in by_generate.examples] == [[*s, eos][:6] for s in samples]


# ---------------------------------------------------------------------------------------------------------------
# the offline top-k cache
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def frozen(tokenizer, llama_pair):
    return Teacher(llama_pair[1], vocab=len(tokenizer))


def _full_log_probs(teacher, data, tokenizer, temperature):
    """Full log-softmax of the teacher at every completion position, one example at a time (row-major)."""
    rows = []
    for e in data.examples:
        out = teacher.score(collate([e], tokenizer.pad_token_id))
        rows.append(log_probs(out.head.logits(out.hidden), temperature))
    return torch.cat(rows)


def test_topk_cache_holds_the_top_k_of_the_full_log_softmax(tokenizer, records, frozen, tmp_path):
    data = _dataset(tokenizer, records, 5)
    cache = build_topk_cache(
        frozen,
        data,
        k=4,
        temperature=2.0,
        pad_id=tokenizer.pad_token_id,
        cache_dir=tmp_path,
        teacher_name="t",
        batch_size=2,
        log=lambda _: None,
    )
    lengths = [len(e.completion) for e in data.examples]
    assert cache.offsets.tolist() == [sum(lengths[:i]) for i in range(len(lengths) + 1)]
    full = _full_log_probs(frozen, data, tokenizer, 2.0)
    top = full.topk(4, dim=-1)
    assert cache.ids.shape == cache.logprobs.shape == (sum(lengths), 4)
    torch.testing.assert_close(cache.logprobs, top.values, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full.gather(-1, cache.ids.long()), top.values, atol=1e-5, rtol=1e-5)

    # lookup returns the rows of a batch's examples in the loss's row-major order
    batch = collate([data.examples[i] for i in (3, 0)], tokenizer.pad_token_id, indices=[3, 0])
    looked = cache.lookup(batch.indices, batch.completion_mask)
    rows = torch.cat([torch.arange(cache.offsets[i], cache.offsets[i + 1]) for i in (3, 0)])
    assert looked.ids.dtype == torch.long and torch.equal(looked.ids, cache.ids[rows].long())
    torch.testing.assert_close(looked.logprobs, top.values[rows], atol=1e-5, rtol=1e-5)

    # the tail bucket holds the remaining mass: log(1 - sum of the top-k probabilities)
    _, lp = topk_tail(torch.zeros(len(rows), len(tokenizer)), looked)
    tail = torch.log1p(-top.values[rows].exp().sum(-1))
    torch.testing.assert_close(lp[:, -1], tail, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(len(rows)))


def test_topk_cache_is_built_once_and_reloaded(tokenizer, records, frozen, tmp_path, monkeypatch):
    data = _dataset(tokenizer, records, 3)
    kw = {"pad_id": tokenizer.pad_token_id, "cache_dir": tmp_path, "teacher_name": "t", "log": lambda _: None}
    cache = build_topk_cache(frozen, data, k=3, temperature=1.0, **kw)
    (path,) = tmp_path.glob("teacher-top3-*.safetensors")

    def no_scoring(batch):
        raise AssertionError("the teacher ran again")

    monkeypatch.setattr(frozen, "score", no_scoring)
    again = build_topk_cache(frozen, data, k=3, temperature=1.0, **kw)
    for a, b in ((cache.ids, again.ids), (cache.logprobs, again.logprobs), (cache.offsets, again.offsets)):
        assert torch.equal(a, b)
    assert torch.equal(TopKCache.load(path).logprobs, cache.logprobs)
    # another temperature is another cache
    with pytest.raises(AssertionError, match="the teacher ran again"):
        build_topk_cache(frozen, data, k=3, temperature=2.0, **kw)


@pytest.mark.parametrize("name", ["forward_kl", "jsd"])
def test_topk_cache_with_k_equal_to_the_vocab_gives_the_exact_divergence(
    name, tokenizer, records, llama_pair, tmp_path
):
    student, model = llama_pair
    teacher = Teacher(model, vocab=len(tokenizer), fused=False)
    data = _dataset(tokenizer, records, 3)
    cache = build_topk_cache(
        teacher,
        data,
        k=10_000,
        temperature=1.5,
        pad_id=tokenizer.pad_token_id,
        cache_dir=tmp_path,
        teacher_name="t",
        log=lambda _: None,
    )
    assert cache.ids.shape[1] == len(tokenizer)  # k is capped at the vocabulary
    batch = collate(data.examples, tokenizer.pad_token_id, indices=[0, 1, 2])
    args = (batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask)
    with torch.no_grad():
        zs = score_positions(student, *args, fused=False).logits
    terms = LossTerms(divergence=torch.ones(zs.shape[0]))
    div = get_divergence(name)
    exact = logits_loss(
        zs, terms, divergence=div, teacher_logits=teacher.score(batch).logits, temperature=1.5
    )
    cached = logits_loss(
        zs,
        terms,
        divergence=div,
        teacher_topk=cache.lookup(batch.indices, batch.completion_mask),
        temperature=1.5,
    )
    assert float(exact) > 0
    torch.testing.assert_close(cached, exact, atol=1e-4, rtol=1e-4)
