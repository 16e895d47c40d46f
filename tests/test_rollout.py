"""gkd.sampling.local and gkd.sampling.fast: the fast sampling loop agrees with ``model.generate`` and samples the right distribution."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from tiny import TINY
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from gkd.sampling import Rollout, SamplingParams
from gkd.sampling.fast import fast_path_unsupported_reason
from gkd.sampling.local import sample_completions
from gkd.sampling.params import next_tokens

VOCAB = 64
PAD = 0
# A large init std makes random models confident and varied, so greedy decoding is a sharp test.
COMMON = {
    "vocab_size": VOCAB,
    "initializer_range": 0.3,
    "pad_token_id": PAD,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
# the sizes of the tests' tiny teachers (Qwen2-style: grouped-query attention), as config-class arguments
DECODER = {k: v for k, v in TINY["qwen2_teacher"].items() if k not in ("architecture", "tie_word_embeddings")}
GPT2 = {k: v for k, v in TINY["gpt2_teacher"].items() if k != "architecture"}


def build(kind: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**DECODER, **COMMON))
    elif kind == "llama_rope_scaled":
        rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0}
        rope |= {"high_freq_factor": 4.0, "original_max_position_embeddings": 16}
        model = LlamaForCausalLM(LlamaConfig(**DECODER, **COMMON, rope_parameters=rope, mlp_bias=True))
    elif kind == "mistral":
        model = MistralForCausalLM(MistralConfig(**DECODER, **COMMON, sliding_window=64))
    elif kind == "qwen2":  # biases on q/k/v
        model = Qwen2ForCausalLM(Qwen2Config(**DECODER, **COMMON, tie_word_embeddings=True))
    elif kind == "qwen3":  # q/k RMSNorm, explicit head_dim
        model = Qwen3ForCausalLM(Qwen3Config(**DECODER, **COMMON, head_dim=16))
    elif kind == "gpt2":
        cfg = GPT2Config(**GPT2, **COMMON)
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(kind)
    return model.eval()


def left_padded_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three prompts of lengths 9, 5 and 2, left-padded to 9."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :7] = 0
    return ids.masked_fill(mask == 0, PAD), mask


def generate_row(model, prompt: torch.Tensor, max_new: int, eos: int | None) -> list[int]:
    """Unpadded single-row greedy reference from Hugging Face generate."""
    row = prompt[None]
    with torch.no_grad():
        out = model.generate(
            row,
            attention_mask=torch.ones_like(row),
            max_new_tokens=max_new,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=PAD,
        )
    return out[0, row.shape[1] :].tolist()


def sample(model, ids, mask, **kw) -> Rollout:
    kw = {"max_new_tokens": 10, "eos_token_ids": [], "pad_token_id": PAD} | kw
    return sample_completions(model, ids, mask, **kw)


@pytest.mark.parametrize("kind", ["llama", "llama_rope_scaled", "mistral", "qwen2", "qwen3", "gpt2"])
def test_fast_greedy_matches_generate_per_unpadded_row(kind):
    model = build(kind)
    assert fast_path_unsupported_reason(model, 32) is None
    ids, mask = left_padded_batch()
    out = sample(model, ids, mask, greedy=True, backend="fast")
    assert out.completion_ids.shape == (3, 10) and out.completion_mask.all()
    for b in range(3):
        assert out.completion_ids[b].tolist() == generate_row(model, ids[b][mask[b].bool()], 10, None)
    assert len(set(out.completion_ids.flatten().tolist())) > 5  # the model is not degenerate


@pytest.mark.parametrize("layout", ["onednn", "copy", "view"])
@pytest.mark.parametrize("kind", ["qwen2", "gpt2"])
def test_every_weight_layout_matches_generate(kind, layout, monkeypatch):
    """The fast path stores weights as oneDNN-packed copies, plain [in, out] copies or views of the modules."""
    import gkd.sampling.fast as fast

    if layout == "onednn" and not fast.onednn_linear_works():
        pytest.skip("oneDNN packed linear ops unavailable in this torch build")
    monkeypatch.setattr(fast, "ONEDNN_OK", layout == "onednn")
    monkeypatch.setattr(fast, "COPY_MAX_BYTES", 0 if layout == "view" else 2**30)
    model = build(kind)
    assert fast.choose_layout([model]) == layout
    ids, mask = left_padded_batch()
    out = sample(model, ids, mask, greedy=True, backend="fast")
    for b in range(3):
        assert out.completion_ids[b].tolist() == generate_row(model, ids[b][mask[b].bool()], 10, None)


def test_bfloat16_model_runs():
    model = build("llama").to(torch.bfloat16)
    ids, mask = left_padded_batch()
    out = sample(model, ids, mask, generator=torch.Generator().manual_seed(0), backend="fast")
    assert out.completion_ids.shape == (3, 10) and out.completion_ids.max() < VOCAB


def test_eos_mid_sequence_masks_the_rest():
    model = build("llama")
    ids, mask = left_padded_batch()
    free = sample(model, ids, mask, greedy=True, backend="fast").completion_ids
    eos = int(free[0, 3])  # row 0 emits this token at step 3 (or earlier)
    first = free[0].tolist().index(eos)
    fast = sample(model, ids, mask, greedy=True, eos_token_ids=[eos, 999], backend="fast")
    slow = sample(model, ids, mask, greedy=True, eos_token_ids=[eos, 999], backend="generate")
    for out in (fast, slow):
        assert out.completion_mask[0].tolist() == [t <= first for t in range(out.completion_ids.shape[1])]
        assert out.completion_ids[0, : first + 1].tolist() == free[0, : first + 1].tolist()
        assert (out.completion_ids[0, first + 1 :] == PAD).all()
        for b in range(3):  # every row: mask is a prefix ending at the first EOS, padding after it
            row, m = out.completion_ids[b].tolist(), out.completion_mask[b].tolist()
            stop = row.index(eos) if eos in row else len(row) - 1
            assert m == [t <= stop for t in range(len(row))]
            assert row[: stop + 1] == free[b, : stop + 1].tolist()
    assert torch.equal(fast.completion_ids, slow.completion_ids)
    assert torch.equal(fast.completion_mask, slow.completion_mask)


def test_columns_are_trimmed_when_every_row_stops_early():
    model = build("llama")
    ids, mask = left_padded_batch()
    free = sample(model, ids, mask, greedy=True, backend="fast").completion_ids
    eos_ids = [int(free[b, 1]) for b in range(3)]  # every row stops by step 1
    for backend in ("fast", "generate"):
        out = sample(model, ids, mask, greedy=True, eos_token_ids=eos_ids, backend=backend)
        assert out.completion_ids.shape[1] == int(out.completion_mask.sum(1).max()) <= 2


@pytest.mark.parametrize("backend", ["fast", "generate"])
def test_generator_makes_samples_reproducible(backend):
    model = build("llama")
    ids, mask = left_padded_batch()

    def draw(seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return sample(model, ids, mask, temperature=1.5, generator=gen, backend=backend).completion_ids

    torch.manual_seed(123)
    a = draw(0)
    state_after = torch.get_rng_state()
    torch.manual_seed(456)  # a different global RNG state must not matter ...
    b = draw(0)
    torch.manual_seed(123)
    assert torch.equal(torch.get_rng_state(), state_after)  # ... and the global RNG is not advanced
    assert torch.equal(a, b)
    assert not torch.equal(a, draw(1))


def expected_probs(model, prompt: torch.Tensor, temperature: float) -> torch.Tensor:
    with torch.no_grad():
        logits = model(prompt[None]).logits[0, -1].double()
    return torch.softmax(logits / temperature, -1)


def chi_square_ok(counts: torch.Tensor, probs: torch.Tensor) -> bool:
    """Pearson chi-square against ``probs``, with a generous bound (far beyond the 1e-6 quantile)."""
    n = counts.sum()
    support = probs > 0
    assert counts[~support].sum() == 0, "sampled a token outside the allowed support"
    expected = n * probs[support]
    stat = ((counts[support] - expected) ** 2 / expected).sum().item()
    df = int(support.sum()) - 1
    return stat < df + 8 * math.sqrt(2 * df) + 15


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 1.0), (0, 0.7)])
def test_one_step_frequencies_match_the_tempered_distribution(top_k, top_p):
    model = build("llama", seed=3)
    temperature, rows = 2.0, 6000
    prompt = torch.tensor([5, 9, 17, 33])
    probs = expected_probs(model, prompt, temperature)
    if top_k:
        probs = torch.where(probs >= probs.topk(top_k).values[-1], probs, 0.0)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = (sorted_p.cumsum(0) - sorted_p) < top_p
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p * keep)
    probs = probs / probs.sum()
    ids = prompt.repeat(rows, 1)
    gen = torch.Generator().manual_seed(0)
    out = sample(
        model,
        ids,
        torch.ones_like(ids),
        max_new_tokens=1,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        generator=gen,
        backend="fast",
    )
    counts = torch.bincount(out.completion_ids[:, 0], minlength=VOCAB).double()
    assert chi_square_ok(counts, probs)


@pytest.mark.parametrize("kind", ["llama", "qwen3", "gpt2"])
@pytest.mark.parametrize("top_k", [0, 8])
def test_dropping_finished_rows_samples_exactly_the_same_tokens(kind, top_k, monkeypatch):
    """Rows that have stopped are dropped from the fast loop's batch; the tokens of the others must not change.

    Each row's random draw is its own (the generator draws for the whole batch whatever is still running), so
    the rollout equals the one that never drops a row, and also the EOS-free rollout cut at each row's first EOS.
    """
    import gkd.sampling.fast as fast

    model = build(kind)
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(3, VOCAB, (6, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[4, :6] = 0
    ids = ids.masked_fill(mask == 0, PAD)
    kw = {"max_new_tokens": 20, "temperature": 1.3, "top_k": top_k, "backend": "fast"}

    def run(eos: list[int], fraction: float) -> Rollout:
        monkeypatch.setattr(fast, "COMPACT_FRACTION", fraction)  # 0: drop rows as soon as one stops; 2: never
        monkeypatch.setattr(fast, "COMPACT_MIN_STEPS_LEFT", 1)
        return sample(model, ids, mask, eos_token_ids=eos, generator=torch.Generator().manual_seed(3), **kw)

    free = run([], 0.0).completion_ids
    eos = [
        int(free[0, 2]),
        int(free[2, 9]),
    ]  # rows stop at different steps (row 0 by step 2, row 2 by step 9)
    dropping, keeping = run(eos, 0.0), run(eos, 2.0)
    lengths = dropping.completion_mask.sum(1)
    assert (
        int(lengths.min()) <= 3 and len(set(lengths.tolist())) > 2
    )  # rows really stopped at different steps
    assert torch.equal(dropping.completion_ids, keeping.completion_ids)
    assert torch.equal(dropping.completion_mask, keeping.completion_mask)
    cut = free[:, : dropping.completion_ids.shape[1]].masked_fill(~dropping.completion_mask, PAD)
    assert torch.equal(dropping.completion_ids, cut)


def test_next_tokens_gives_each_row_its_own_draw_whatever_rows_remain():
    """``next_tokens`` on a subset of a batch's rows picks what those rows would get with the whole batch."""
    logits = torch.randn(8, VOCAB, generator=torch.Generator().manual_seed(0)) * 3
    params = SamplingParams(max_new_tokens=1, eos_token_ids=(), pad_token_id=PAD, top_p=0.9)
    full = next_tokens(logits, params, torch.Generator().manual_seed(1))
    rows = torch.tensor([1, 4, 5])
    part = next_tokens(logits[rows], params, torch.Generator().manual_seed(1), rows=rows, batch_size=8)
    assert torch.equal(part, full[rows])


def test_top_p_excludes_low_probability_tokens():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).repeat(4000, 1)
    params = SamplingParams(max_new_tokens=1, eos_token_ids=(), pad_token_id=PAD, top_p=0.7)
    drawn = next_tokens(probs.log(), params, torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.7; 0.15 and 0.05 are cut
    assert abs((drawn == 0).double().mean().item() - 0.5 / 0.8) < 0.03
    params = dataclasses.replace(params, top_p=0.95)
    assert set(next_tokens(probs.log(), params, torch.Generator().manual_seed(0)).tolist()) == {0, 1, 2}


@pytest.mark.parametrize("backend", ["fast", "generate"])
def test_top_k_one_is_greedy(backend):
    model = build("llama")
    ids, mask = left_padded_batch()
    greedy = sample(model, ids, mask, greedy=True, backend=backend)
    top1 = sample(model, ids, mask, top_k=1, temperature=0.7, generator=torch.Generator(), backend=backend)
    assert torch.equal(greedy.completion_ids, top1.completion_ids)


def test_results_carry_no_autograd_state_and_train_on_them():
    model = build("llama").train()  # no dropout in this config: the fast path accepts train mode
    ids, mask = left_padded_batch()
    out = sample(model, ids, mask, generator=torch.Generator().manual_seed(0), backend="fast")
    assert model.training
    for t in (out.completion_ids, out.completion_mask):
        assert not t.requires_grad and t.grad_fn is None and not t.is_inference()
    # The rollout can be fed straight into a training forward/backward pass.
    full = torch.cat([ids, out.completion_ids], 1)
    loss = model(full, attention_mask=torch.cat([mask, out.completion_mask.long()], 1)).logits.mean()
    loss.backward()
    assert model.lm_head.weight.grad is not None


def test_train_mode_with_dropout_falls_back_and_mode_is_kept():
    model = build("gpt2").train()  # GPT-2 has dropout 0.1 everywhere
    assert "dropout" in fast_path_unsupported_reason(model, 20)
    ids, mask = left_padded_batch()
    out = sample(model, ids, mask, generator=torch.Generator().manual_seed(0))
    assert model.training and out.completion_ids.shape == (3, 10)
    with pytest.raises(ValueError, match="dropout"):
        sample(model, ids, mask, backend="fast")
    model.eval()
    assert fast_path_unsupported_reason(model, 20) is None
    sample(model, ids, mask, backend="fast")
    assert not model.training


def test_seq2seq_uses_generate():
    torch.manual_seed(0)
    cfg = T5Config(
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        dropout_rate=0.0,
        decoder_start_token_id=PAD,
        **(COMMON | {"initializer_factor": 3.0}),
    )
    model = T5ForConditionalGeneration(cfg).eval()
    assert "encoder-decoder" in fast_path_unsupported_reason(model)
    ids, mask = left_padded_batch()
    free = sample(model, ids, mask, greedy=True)
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=None)
    assert torch.equal(
        free.completion_ids, ref[:, 1:]
    )  # the decoder start token is not part of the completion
    eos = int(free.completion_ids[0, 2])
    out = sample(model, ids, mask, greedy=True, eos_token_ids=[eos])
    first = free.completion_ids[0].tolist().index(eos)
    assert out.completion_mask[0].sum() == first + 1 and (out.completion_ids[0, first + 1 :] == PAD).all()
    with pytest.raises(ValueError):
        sample(model, ids, mask, backend="fast")
    gen = torch.Generator().manual_seed(0)
    assert sample(model, ids, mask, generator=gen).completion_ids.shape[0] == 3


def lora_model(kind: str = "llama", **extra):
    peft = pytest.importorskip("peft")
    model = build(kind)
    modules = ["c_attn", "c_fc"] if kind == "gpt2" else ["q_proj", "v_proj", "down_proj"]
    lora = peft.LoraConfig(r=4, target_modules=modules, lora_dropout=0.0, init_lora_weights=False, **extra)
    return peft.get_peft_model(model, lora).eval()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_lora_students_take_the_fast_loop_and_sample_what_the_merged_model_samples(kind):
    """A peft LoRA student keeps the fast loop, reading each adapted layer as its merged weight: sampled tokens
    equal those of the same model merged into plain weights (``merge_and_unload``), seed for seed, and greedy
    decoding equals the peft model's own ``generate``."""
    import copy

    model = lora_model(kind)
    ids, mask = left_padded_batch()
    assert fast_path_unsupported_reason(model, ids.shape[1] + 10) is None
    merged = copy.deepcopy(model).merge_and_unload()
    for seed in range(3):
        ours = sample(model, ids, mask, backend="fast", generator=torch.Generator().manual_seed(seed))
        plain = sample(merged, ids, mask, backend="fast", generator=torch.Generator().manual_seed(seed))
        assert torch.equal(ours.completion_ids, plain.completion_ids)
    greedy = sample(model, ids, mask, greedy=True)
    assert torch.equal(
        greedy.completion_ids, sample(model, ids, mask, greedy=True, backend="generate").completion_ids
    )
    with model.disable_adapter():  # the adapter matters: the base model alone decodes differently
        assert not torch.equal(sample(model, ids, mask, greedy=True).completion_ids, greedy.completion_ids)


@pytest.mark.parametrize("case", ["gemma", "sliding_window", "dora"])
def test_unsupported_models_fall_back_to_generate(case):
    if case == "gemma":  # Llama-shaped modules, different maths (norm offset, embedding scale)
        torch.manual_seed(0)
        model = GemmaForCausalLM(GemmaConfig(**DECODER, **COMMON, head_dim=8)).eval()
    elif case == "sliding_window":
        torch.manual_seed(0)
        model = MistralForCausalLM(MistralConfig(**DECODER, **COMMON, sliding_window=12)).eval()
    else:  # DoRA's magnitude vector is not a merged weight the fast loop reads
        model = lora_model(use_dora=True)
    ids, mask = left_padded_batch()
    assert fast_path_unsupported_reason(model, ids.shape[1] + 10) is not None
    with pytest.raises(ValueError, match="does not support"):
        sample(model, ids, mask, greedy=True, backend="fast")
    auto = sample(model, ids, mask, greedy=True)
    assert torch.equal(
        auto.completion_ids, sample(model, ids, mask, greedy=True, backend="generate").completion_ids
    )
    for b in range(3):  # and it is the model's own (adapter-including) greedy decoding
        assert auto.completion_ids[b].tolist() == generate_row(model, ids[b][mask[b].bool()], 10, None)
    if case == "dora":  # the adapter matters: the base model alone decodes differently
        with model.disable_adapter():
            assert not torch.equal(sample(model, ids, mask, greedy=True).completion_ids, auto.completion_ids)


def test_input_validation():
    model = build("llama")
    ids, mask = left_padded_batch()
    with pytest.raises(ValueError, match="LEFT"):
        sample(model, ids, mask.flip(1))
    with pytest.raises(ValueError, match="backend"):
        sample(model, ids, mask, backend="vllm")
    empty = sample(model, ids, mask, max_new_tokens=0)
    assert empty.completion_ids.shape == (3, 0)


def test_generate_backend_ignores_checkpoint_generation_defaults():
    model = build("llama")
    ids, mask = left_padded_batch()
    ref = sample(model, ids, mask, greedy=True, backend="fast")
    defaults = model.generation_config
    defaults.suppress_tokens = [int(ref.completion_ids[0, 0])]
    defaults.repetition_penalty = 50.0
    defaults.eos_token_id = int(ref.completion_ids[1, 1])
    out = sample(model, ids, mask, greedy=True, backend="generate")
    assert torch.equal(out.completion_ids, ref.completion_ids)
    assert model.generation_config is defaults and defaults.repetition_penalty == 50.0  # restored


# ----------------------------------------------------------------------------------------------------------------
# Padded vocabularies: the LM head has more rows than the tokenizer has tokens (e.g. every Qwen2.5 checkpoint)

REAL = 56  # the tokenizer's length in these tests: head rows REAL..VOCAB-1 are padding


def padded_head(kind: str, pad_bias: float = 100.0, seed: int = 0) -> torch.nn.Module:
    """``kind`` with a biased LM head whose padding rows (ids >= REAL) get ``pad_bias`` added to their logits."""
    model = build(kind, seed) if kind != "t5" else t5_model(seed)
    old = model.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[REAL:] = pad_bias
    model.lm_head = head
    return model.eval()


def t5_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = T5Config(
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        dropout_rate=0.0,
        decoder_start_token_id=PAD,
        tie_word_embeddings=False,
        **(COMMON | {"initializer_factor": 3.0}),
    )
    return T5ForConditionalGeneration(cfg)


def real_prompts() -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = left_padded_batch()
    return ids % REAL, mask


MODES = {
    "greedy": {"greedy": True},
    "sample": {"temperature": 1.0},
    "hot": {"temperature": 3.0},
    "top_k": {"top_k": 5, "temperature": 1.5},
    "top_p": {"top_p": 0.9, "temperature": 1.5},
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize(
    "kind,backend",
    [
        ("llama", "fast"),
        ("llama", "generate"),
        ("qwen2", "fast"),
        ("qwen2", "auto"),
        ("gpt2", "fast"),
        ("gpt2", "generate"),
        ("t5", "generate"),
    ],
)
def test_padding_rows_of_the_head_are_never_sampled(kind, backend, mode):
    model = padded_head(kind)
    ids, mask = real_prompts()
    kw = MODES[mode] | {"backend": backend, "generator": torch.Generator().manual_seed(0)}
    unrestricted = sample(model, ids, mask, **kw).completion_ids
    assert (unrestricted >= REAL).any()  # the bug: padding rows dominate and get sampled
    kw["generator"] = torch.Generator().manual_seed(0)
    out = sample(model, ids, mask, vocab_size=REAL, **kw)
    assert out.completion_ids.shape[1] == 10 and out.completion_ids.max() < REAL


@pytest.mark.parametrize("kind,backend", [("llama", "fast"), ("gpt2", "fast"), ("llama", "generate")])
def test_restricted_greedy_equals_a_model_whose_padding_rows_never_win(kind, backend):
    ids, mask = real_prompts()
    restricted = sample(padded_head(kind), ids, mask, greedy=True, vocab_size=REAL, backend=backend)
    reference = sample(padded_head(kind, pad_bias=-1e4), ids, mask, greedy=True, backend=backend)
    assert torch.equal(restricted.completion_ids, reference.completion_ids)
    assert len(set(restricted.completion_ids.flatten().tolist())) > 5


@pytest.mark.parametrize("backend", ["fast", "generate"])
@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 1.0), (0, 0.7)])
def test_restricted_sampling_follows_the_distribution_over_real_tokens(backend, top_k, top_p):
    model = padded_head("llama", seed=3)
    temperature, rows = 2.0, 6000
    prompt = torch.tensor([5, 9, 17, 33])
    with torch.no_grad():
        logits = model(prompt[None]).logits[0, -1, :REAL].double()
    probs = torch.softmax(logits / temperature, -1)
    if top_k:
        probs = torch.where(probs >= probs.topk(top_k).values[-1], probs, 0.0)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = (sorted_p.cumsum(0) - sorted_p) < top_p
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p * keep)
    probs = probs / probs.sum()
    ids = prompt.repeat(rows, 1)
    out = sample(
        model,
        ids,
        torch.ones_like(ids),
        max_new_tokens=1,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        vocab_size=REAL,
        generator=torch.Generator().manual_seed(0),
        backend=backend,
    )
    assert out.completion_ids.max() < REAL
    assert chi_square_ok(torch.bincount(out.completion_ids[:, 0], minlength=REAL).double(), probs)


def test_vocab_size_without_padding_rows_changes_nothing():
    """Bit-exact rollouts for models whose head matches the tokenizer (published numbers depend on them)."""
    model = build("llama")
    ids, mask = left_padded_batch()
    for backend in ("fast", "generate"):
        for kw in MODES.values():
            a, b = (
                sample(
                    model,
                    ids,
                    mask,
                    backend=backend,
                    generator=torch.Generator().manual_seed(0),
                    **kw,
                    **extra,
                )
                for extra in ({}, {"vocab_size": VOCAB})
            )
            assert torch.equal(a.completion_ids, b.completion_ids)
    with pytest.raises(ValueError, match="vocab_size"):
        sample(model, ids, mask, vocab_size=0)


def test_generate_ids_never_emits_padding_rows(tokenizer, records):
    from gkd.data import tokenize_records
    from gkd.evaluation import generate_ids
    from gkd.models import build_model

    real = len(tokenizer)
    spec = {
        **TINY["qwen2_student"],
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
        "vocab_size": real + 8,
    }
    model = build_model(spec, tokenizer, seed=0).eval()
    head = torch.nn.Linear(16, real + 8, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[real:] = 100.0
    model.lm_head = head
    data = tokenize_records(records[:6], tokenizer, max_prompt_length=64, max_completion_length=8)
    for backend in ("fast", "generate"):
        for greedy in (True, False):
            out = generate_ids(model, tokenizer, data, max_new_tokens=6, greedy=greedy, backend=backend)
            assert len(out) == 6 and all(t < real for row in out for t in row)


# ----------------------------------------------------------------------------------------------------------------
# Which models the fast backend can never run, known from the config alone


def test_fast_backend_config_reason():
    from transformers import Gemma2Config

    from gkd.sampling.fast import fast_backend_config_reason

    for cfg in (LlamaConfig(), Qwen2Config(), Qwen3Config(), MistralConfig(), GPT2Config()):
        assert fast_backend_config_reason(cfg) is None, cfg.model_type
    cases = {
        "encoder-decoder": T5Config(),
        "'gemma' is not one of": GemmaConfig(),
        "softcapping": Gemma2Config(),
        "changes with the sequence length": LlamaConfig(
            rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
        ),
        "cross-attention": GPT2Config(add_cross_attention=True),
    }
    for fragment, cfg in cases.items():
        reason = fast_backend_config_reason(cfg)
        assert reason is not None and fragment in reason, (fragment, reason)
    assert fast_backend_config_reason(None) is not None
    # the model-level check gives the same reason: one list of config-level reasons
    for fragment, cfg in cases.items():
        if fragment != "softcapping":  # no tiny Gemma2 here: building one needs more config
            torch.manual_seed(0)
            small = {"vocab_size": VOCAB} | (
                {"d_model": 16, "d_kv": 8, "d_ff": 32, "num_layers": 1, "num_heads": 2}
                if cfg.model_type == "t5"
                else {"n_embd": 16, "n_layer": 1, "n_head": 2}
                if cfg.model_type == "gpt2"
                else {
                    "hidden_size": 16,
                    "num_hidden_layers": 1,
                    "num_attention_heads": 2,
                    "intermediate_size": 32,
                }
                | ({"head_dim": 8} if cfg.model_type == "gemma" else {})
            )
            for k, v in small.items():
                setattr(cfg, k, v)
            from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

            cls = AutoModelForSeq2SeqLM if cfg.model_type == "t5" else AutoModelForCausalLM
            model = cls.from_config(cfg).eval()
            assert fast_path_unsupported_reason(model) == fast_backend_config_reason(cfg)


def test_fast_backend_on_an_unsupported_model_is_a_one_line_config_error():
    from gkd.errors import ConfigError

    model = t5_model()
    ids, mask = left_padded_batch()
    with pytest.raises(ConfigError) as e:
        sample(model, ids, mask, backend="fast")
    msg = str(e.value)
    assert "\n" not in msg and "rollout_backend: fast" in msg and "encoder-decoder" in msg
    assert "rollout_backend: auto" in msg
