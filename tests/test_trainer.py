"""GKDTrainer: Algorithm 1 on tiny real Hugging Face models."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest
import torch
from conftest import base_config, make_model
from tiny import micro_batch_loss

from gkd.data import Batch, collate, tokenize_records
from gkd.divergences import forward_kl, get_divergence, reduce_divergence
from gkd.models import score_positions
from gkd.sampling import LocalSampler, Rollout
from gkd.step import lmbda_at, student_samples
from gkd.trainer import GKDTrainer


def _trainer(tokenizer, records, student, teacher, tmp_path, **cfg):
    config = base_config(output_dir=str(tmp_path / "out"), **cfg)
    t = GKDTrainer(config, student=student, teacher=teacher, tokenizer=tokenizer, train_records=records)
    t.setup()
    return t


def _loss(t: GKDTrainer, batch: Batch, stats=None) -> torch.Tensor:
    """The trainer's micro-batch loss of ``batch`` normalised by its own token count."""
    return micro_batch_loss(t.run, batch, float(batch.num_tokens()), stats=stats)


class _FixedSampler(LocalSampler):
    """A rollout backend that always returns the completions of one batch (to train on the same samples)."""

    def __init__(self, batch: Batch) -> None:
        super().__init__("auto")
        self.batch = batch

    def sample(self, model, prompt_ids, prompt_mask, params, generator=None) -> Rollout:
        return Rollout(self.batch.completion_ids, self.batch.completion_mask)


class _CountingSampler(LocalSampler):
    def __init__(self, inner) -> None:
        super().__init__("auto")
        self.inner, self.calls = inner, 0

    def sample(self, *args, **kwargs) -> Rollout:
        self.calls += 1
        return self.inner.sample(*args, **kwargs)


class _EchoSampler(LocalSampler):
    """Returns the dataset's own completions as the 'samples' (cheap on-policy steps for coin tests)."""

    def __init__(self) -> None:
        super().__init__("auto")
        self.last: Batch | None = None

    def sample(self, model, prompt_ids, prompt_mask, params, generator=None) -> Rollout:
        return Rollout(self.last.completion_ids, self.last.completion_mask)


class _Remember:
    """A stream that hands each batch to an _EchoSampler too."""

    def __init__(self, stream, echo: _EchoSampler) -> None:
        self.stream, self.echo = stream, echo

    def next(self) -> Batch:
        self.echo.last = self.stream.next()
        return self.echo.last


def _dense_divergence(student, teacher, batch: Batch, name="jsd", **params) -> torch.Tensor:
    s = score_positions(
        student, batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask, fused=False
    )
    with torch.no_grad():
        t = score_positions(
            teacher,
            batch.prompt_ids,
            batch.prompt_mask,
            batch.completion_ids,
            batch.completion_mask,
            fused=False,
        )
    values = get_divergence(name, **params)(s.logits, t.logits)
    return values.mean()


def test_one_on_policy_step_lowers_the_divergence_on_a_fixed_batch(tokenizer, records, llama_pair, tmp_path):
    """After one on-policy step the divergence on those very sequences is lower."""
    student, teacher = llama_pair
    t = _trainer(
        tokenizer,
        records,
        student,
        teacher,
        tmp_path,
        lmbda=1.0,
        divergence="jsd",
        beta=0.5,
        learning_rate=1e-2,
    )
    fixed = student_samples(t.run, t.stream.next())
    before = _dense_divergence(t.student, teacher, fixed, beta=0.5).item()
    t.run.stream = _FixedStream(fixed)
    t.run.sampler = _FixedSampler(fixed)  # keep training on the same sampled batch
    t.train_step()
    after = _dense_divergence(t.student, teacher, fixed, beta=0.5).item()
    assert after < before


class _ListStream:
    def __init__(self, batches: list[Batch]) -> None:
        self.batches = iter(batches)

    def next(self) -> Batch:
        return next(self.batches)


class _FixedStream:
    def __init__(self, batch: Batch) -> None:
        self.batch = batch

    def next(self) -> Batch:
        return self.batch


def test_sampled_ids_carry_no_gradient_and_the_sampler_seed_only_changes_data(
    tokenizer, records, llama_pair, tmp_path
):
    """No gradient flows through sampling: the loss gradient on a rollout equals the gradient on the same ids as data."""
    student, teacher = llama_pair
    t = _trainer(tokenizer, records, student, teacher, tmp_path, lmbda=1.0, divergence="reverse_kl")
    batch = t.stream.next()
    roll = student_samples(t.run, batch)
    assert not roll.completion_ids.requires_grad and not roll.completion_mask.requires_grad
    assert roll.completion_ids.grad_fn is None

    def grads(b: Batch) -> list[torch.Tensor]:
        t.optimizer.zero_grad(set_to_none=True)
        loss = _loss(t, b)
        loss.backward()
        return [p.grad.clone() for p in t.student.parameters() if p.grad is not None]

    as_data = Batch(
        roll.prompt_ids.clone(),
        roll.prompt_mask.clone(),
        roll.completion_ids.clone(),
        roll.completion_mask.clone(),
        roll.records,
    )
    for a, b in zip(grads(roll), grads(as_data)):
        torch.testing.assert_close(a, b)
    # a different sampler seed gives different data, through the same computation
    t.run.rollout_gen.manual_seed(12345)
    other = student_samples(t.run, batch)
    assert not torch.equal(other.completion_ids, roll.completion_ids) or not torch.equal(
        other.completion_mask, roll.completion_mask
    )


def test_masks_exclude_prompt_padding_and_post_eos_tokens(tokenizer, records, llama_pair, tmp_path):
    """Changing tokens at masked positions (prompt padding, completion padding, after EOS) leaves the loss unchanged."""
    student, teacher = llama_pair
    t = _trainer(tokenizer, records, student, teacher, tmp_path, lmbda=0.0, divergence="forward_kl")
    data = tokenize_records(records[:4], tokenizer, max_prompt_length=64, max_completion_length=16)
    batch = collate(data.examples, tokenizer.pad_token_id)
    base = _loss(t, batch).item()
    noisy_c = batch.completion_ids.clone()
    noisy_c[~batch.completion_mask] = 7  # garbage after EOS / in completion padding
    noisy_p = batch.prompt_ids.clone()
    noisy_p[~batch.prompt_mask] = 9  # garbage in prompt left-padding
    changed = Batch(noisy_p, batch.prompt_mask, noisy_c, batch.completion_mask, batch.records)
    assert _loss(t, changed).item() == pytest.approx(base, rel=1e-5)
    # and the loss counts exactly the completion tokens (incl. EOS), never prompt tokens
    stats: dict = defaultdict(list)
    _loss(t, batch, stats)
    assert torch.cat(stats["forward_kl"]).numel() == int(batch.completion_mask.sum())


def test_loss_matches_the_dense_reference(tokenizer, records, llama_pair, tmp_path):
    """The fused chunked loss equals reduce_divergence over dense logits (token and sequence reductions)."""
    student, teacher = llama_pair
    data = tokenize_records(records[:6], tokenizer, max_prompt_length=64, max_completion_length=16)
    batch = collate(data.examples, tokenizer.pad_token_id)
    for reduction in ("token", "sequence"):
        t = _trainer(
            tokenizer,
            records,
            student,
            teacher,
            tmp_path,
            lmbda=0.0,
            divergence="jsd",
            beta=0.9,
            reduction=reduction,
        )
        denom = (
            float(batch.num_tokens())
            if reduction == "token"
            else float((batch.completion_mask.sum(-1) > 0).sum())
        )
        fused = micro_batch_loss(t.run, batch, denom)
        s = score_positions(
            student,
            batch.prompt_ids,
            batch.prompt_mask,
            batch.completion_ids,
            batch.completion_mask,
            fused=False,
        )
        te = score_positions(
            teacher,
            batch.prompt_ids,
            batch.prompt_mask,
            batch.completion_ids,
            batch.completion_mask,
            fused=False,
        )
        values = torch.zeros(batch.completion_mask.shape)
        values[batch.completion_mask] = get_divergence("jsd", beta=0.9)(s.logits, te.logits).detach()
        ref = reduce_divergence(values, batch.completion_mask, reduction)
        assert fused.item() == pytest.approx(float(ref), rel=1e-4)


def test_normalisation_uses_the_tokens_actually_in_the_step_across_accumulation(
    tokenizer, records, llama_pair, tmp_path
):
    """Batch 8 x 1 micro-batch and batch 4 x 2 micro-batches give the same gradient (same data, same count)."""
    _, teacher = llama_pair
    grads = []
    for bs, acc in ((8, 1), (4, 2)):
        s = make_model("llama_student", tokenizer, seed=1)
        t = _trainer(
            tokenizer,
            records,
            s,
            teacher,
            tmp_path / f"{bs}",
            lmbda=0.0,
            divergence="forward_kl",
            per_device_train_batch_size=bs,
            gradient_accumulation_steps=acc,
            max_grad_norm=0.0,
            learning_rate=1.0,
        )
        data = tokenize_records(records[:8], tokenizer, max_prompt_length=64, max_completion_length=16)
        micro = [collate(data.examples[i : i + bs], tokenizer.pad_token_id) for i in range(0, 8, bs)]
        t.run.stream = _ListStream(micro)
        t.optimizer.step = lambda: None  # keep the gradient for inspection
        t.optimizer.zero_grad = lambda set_to_none=True: None
        t.train_step()
        grads.append(torch.cat([p.grad.flatten() for p in t.student.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_on_policy_token_count_is_the_generated_count(tokenizer, records, llama_pair, tmp_path):
    """On-policy steps are normalised by the generated tokens, not the dataset's completion lengths."""
    student, teacher = llama_pair
    t = _trainer(
        tokenizer, records, student, teacher, tmp_path, lmbda=1.0, divergence="forward_kl", max_new_tokens=3
    )
    rec = t.train_step()
    assert rec["on_policy"]
    assert rec["completion_tokens"] <= 8 * 3


@pytest.mark.parametrize("lmbda", [0.0, 1.0])
def test_lambda_zero_never_samples_and_one_always_does(tokenizer, records, llama_pair, tmp_path, lmbda):
    student, teacher = llama_pair
    t = _trainer(tokenizer, records, student, teacher, tmp_path, lmbda=lmbda, divergence="forward_kl")
    t.run.sampler = counting = _CountingSampler(t.run.sampler)
    flags = [t.train_step()["on_policy"] for _ in range(6)]
    assert flags == [lmbda == 1.0] * 6
    assert counting.calls == (6 if lmbda == 1.0 else 0)


def test_lambda_half_mixes_per_step_with_a_seeded_coin(tokenizer, records, llama_pair, tmp_path):
    _, teacher = llama_pair
    runs = []
    for _ in range(2):
        s = make_model("llama_student", tokenizer, seed=1)
        t = _trainer(
            tokenizer, records, s, teacher, tmp_path, lmbda=0.5, divergence="forward_kl", max_new_tokens=2
        )
        t.run.sampler = echo = _EchoSampler()
        t.run.stream = _Remember(t.run.stream, echo)
        runs.append([t.train_step()["on_policy"] for _ in range(40)])
    assert runs[0] == runs[1]  # seeded
    assert 10 <= sum(runs[0]) <= 30


def test_linear_lambda_schedule(tokenizer, records, llama_pair, tmp_path):
    student, teacher = llama_pair
    t = _trainer(
        tokenizer,
        records,
        student,
        teacher,
        tmp_path,
        lmbda=0.8,
        lmbda_schedule="linear",
        lmbda_warmup_steps=4,
    )
    assert [round(lmbda_at(t.cfg, s), 2) for s in (0, 2, 4, 10)] == [0.0, 0.4, 0.8, 0.8]


def test_sft_needs_no_teacher_and_lowers_the_nll(tokenizer, records, tmp_path):
    student = make_model("llama_student", tokenizer, seed=1)
    t = _trainer(tokenizer, records, student, None, tmp_path, divergence="nll", lmbda=0.0, max_steps=30)
    assert t.teacher is None
    first = t.train_step()["loss"]
    for _ in range(25):
        last = t.train_step()["loss"]
    assert last < first


def test_seqkd_targets_are_generated_once_and_cached(tokenizer, records, llama_pair, tmp_path):
    student, teacher = llama_pair
    t = _trainer(
        tokenizer, records[:32], student, teacher, tmp_path, seq_kd=True, lmbda=0.0, divergence="nll"
    )
    cache = list((tmp_path / "out").glob("seqkd-*.jsonl"))
    assert len(cache) == 1
    lines = cache[0].read_text().splitlines()
    assert len(lines) == 32
    first = [e.completion for e in t.run.train_data.examples]
    # a second trainer reads the cache: same targets, and the teacher is not asked to generate again
    import gkd.teacher as teacher_mod

    called = []
    orig = teacher_mod.generate_ids
    teacher_mod.generate_ids = lambda *a, **k: called.append(1) or orig(*a, **k)
    try:
        t2 = _trainer(
            tokenizer,
            records[:32],
            make_model("llama_student", tokenizer, seed=1),
            teacher,
            tmp_path,
            seq_kd=True,
            lmbda=0.0,
            divergence="nll",
        )
    finally:
        teacher_mod.generate_ids = orig
    assert not called
    assert [e.completion for e in t2.run.train_data.examples] == first
    assert all((c and c[-1] == tokenizer.eos_token_id) or len(c) == 8 for c in first)


def test_seq2seq_teacher_and_student(tokenizer, records, tmp_path):
    """T5-style encoder-decoder models (as in the paper) train on- and off-policy."""
    student = make_model("t5", tokenizer, seed=1)
    teacher = make_model("t5", tokenizer, seed=0)
    for lmbda in (0.0, 1.0):
        t = _trainer(
            tokenizer,
            records,
            student,
            teacher,
            tmp_path / str(lmbda),
            lmbda=lmbda,
            divergence="jsd",
            beta=0.9,
            max_steps=2,
        )
        res = t.train()
        assert res.step == 2 and torch.isfinite(torch.tensor(res.final_loss))


def test_lora_student_trains_only_adapters(tokenizer, records, llama_pair, tmp_path):
    student, teacher = llama_pair
    frozen = {n: p.detach().clone() for n, p in student.named_parameters()}
    t = _trainer(
        tokenizer,
        records,
        student,
        teacher,
        tmp_path,
        lmbda=1.0,
        divergence="reverse_kl",
        lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        max_steps=3,
        learning_rate=1e-2,
    )
    trainable = [n for n, p in t.student.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    t.train()
    for n, p in t.student.named_parameters():
        base_name = n.replace("base_model.model.", "").replace(".base_layer", "")
        if "lora_" not in n and base_name in frozen:
            torch.testing.assert_close(p, frozen[base_name])
    ckpt = tmp_path / "out" / "checkpoint-3"
    assert (ckpt / "adapter_config.json").exists()


def test_teacher_in_lower_precision(tokenizer, records, llama_pair, tmp_path):
    student, teacher = llama_pair
    t = _trainer(
        tokenizer,
        records,
        student,
        teacher.to(torch.bfloat16),
        tmp_path,
        lmbda=0.0,
        divergence="forward_kl",
        max_steps=2,
    )
    assert next(t.teacher.model.parameters()).dtype == torch.bfloat16
    assert torch.isfinite(torch.tensor(t.train_step()["loss"]))


def test_metrics_jsonl_and_checkpoints_are_written(tokenizer, records, eval_records, llama_pair, tmp_path):
    student, teacher = llama_pair
    config = base_config(
        output_dir=str(tmp_path / "out"),
        lmbda=0.5,
        divergence="jsd",
        max_steps=6,
        save_steps=3,
        eval_metric="summarization",
        eval_max_samples=8,
    )
    t = GKDTrainer(
        config,
        student=student,
        teacher=teacher,
        tokenizer=tokenizer,
        train_records=records,
        eval_records=eval_records,
    )
    t.train()
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    for key in (
        "loss",
        "forward_kl",
        "reverse_kl",
        "entropy",
        "top1_agree",
        "on_policy",
        "gen_len",
        "tokens_per_s",
        "time_rollout",
        "time_teacher",
        "time_student_forward",
    ):
        assert key in train_rows[-1], key
    assert any("eval/greedy/set_match" in r and "eval/sample/set_match" in r for r in rows)
    assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "checkpoint-6")  # loads anywhere


def test_forward_kl_loss_gradient_is_q_minus_p(tokenizer, records, llama_pair):
    """Sanity: the trainer's forward KL is KL(teacher || student)."""
    s = torch.randn(3, 11, requires_grad=True)
    t = torch.randn(3, 11)
    forward_kl(s, t).sum().backward()
    torch.testing.assert_close(s.grad, torch.softmax(s, -1).detach() - torch.softmax(t, -1))


def test_topk_teacher_cache_is_built_once_and_replaces_the_teacher_on_fixed_batches(
    tokenizer, records, llama_pair, tmp_path
):
    """With k = vocab the cached top-k + tail loss equals the live-teacher loss; the error shrinks as k grows."""
    student, teacher = llama_pair
    live = _trainer(
        tokenizer, records[:64], student, teacher, tmp_path / "live", lmbda=0.0, divergence="jsd", beta=0.5
    )
    full = _trainer(
        tokenizer,
        records[:64],
        student,
        teacher,
        tmp_path / "full",
        lmbda=0.0,
        divergence="jsd",
        beta=0.5,
        teacher_cache="topk",
        teacher_cache_topk=len(tokenizer),
    )
    small = _trainer(
        tokenizer,
        records[:64],
        student,
        teacher,
        tmp_path / "small",
        lmbda=0.0,
        divergence="jsd",
        beta=0.5,
        teacher_cache="topk",
        teacher_cache_topk=8,
    )
    mid = _trainer(
        tokenizer,
        records[:64],
        student,
        teacher,
        tmp_path / "mid",
        lmbda=0.0,
        divergence="jsd",
        beta=0.5,
        teacher_cache="topk",
        teacher_cache_topk=32,
    )
    assert len(list((tmp_path / "full" / "out").glob("teacher-top*.safetensors"))) == 1
    batch = live.stream.next()
    for t in (full, small, mid):
        t.teacher.score = lambda b: (_ for _ in ()).throw(AssertionError("teacher was called"))
    a, b, c, d = (_loss(t, batch).item() for t in (live, full, small, mid))
    assert b == pytest.approx(a, rel=1e-4)
    assert abs(d - a) < abs(c - a)


def test_messages_records_use_the_chat_template_and_the_last_assistant_turn(
    tokenizer, records, llama_pair, tmp_path
):
    """TRL's conversational format: everything before the last assistant turn is the prompt, that turn the target."""
    student, teacher = llama_pair
    chat = [
        {
            "messages": [
                {"role": "user", "content": r["prompt"]},
                {"role": "assistant", "content": r["completion"]},
            ]
        }
        for r in records[:16]
    ]
    t = _trainer(tokenizer, chat, student, teacher, tmp_path, lmbda=0.0, divergence="forward_kl", max_steps=2)
    plain = tokenize_records(records[:16], tokenizer, max_prompt_length=64, max_completion_length=8)
    assert [e.prompt for e in t.run.train_data.examples] == [e.prompt for e in plain.examples]
    assert [e.completion for e in t.run.train_data.examples] == [e.completion for e in plain.examples]
    prompt_only = [{"messages": [{"role": "user", "content": r["prompt"]}]} for r in records[:16]]
    t2 = _trainer(
        tokenizer,
        prompt_only,
        student,
        teacher,
        tmp_path / "po",
        lmbda=1.0,
        divergence="reverse_kl",
        max_steps=2,
    )
    assert not t2.run.train_data.has_targets
    assert t2.train().step == 2
