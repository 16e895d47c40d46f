"""gkd.sampling: one sampler interface serves the trainer's rollout, evaluation, generation and SeqKD."""

from __future__ import annotations

import importlib.util
import types

import pytest
import torch
from conftest import make_model

from gkd.data import Batch, collate, tokenize_records
from gkd.errors import ConfigError
from gkd.evaluation import evaluate, generate_ids
from gkd.sampling import (
    BACKENDS,
    LOCAL_BACKENDS,
    LocalSampler,
    Rollout,
    Sampler,
    SamplingParams,
    get_sampler,
    local_sampler,
    sample_batch,
)
from gkd.sampling.local import sample_completions
from gkd.teacher import seqkd_dataset

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def _data(tokenizer, records, n=5, seq2seq=False):
    return tokenize_records(
        records[:n], tokenizer, max_prompt_length=64, max_completion_length=12, seq2seq=seq2seq
    )


def _params(tokenizer, **kw) -> SamplingParams:
    base = {
        "max_new_tokens": 6,
        "eos_token_ids": (tokenizer.eos_token_id,),
        "pad_token_id": tokenizer.pad_token_id,
        "vocab_size": len(tokenizer),
    }
    return SamplingParams(**{**base, **kw})


class UniformSampler:
    """A third backend written against the protocol only: uniform random tokens from the generator.

    Greedy decoding gives token 5 everywhere. It records every call, in order, to check when callers sync.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def sync(self, model: torch.nn.Module) -> None:
        self.calls.append(("sync", model))

    def sample(self, model, prompt_ids, prompt_mask, params, generator):
        self.calls.append(("sample", model))
        shape = (prompt_ids.shape[0], params.max_new_tokens)
        if params.greedy:
            ids = torch.full(shape, 5, dtype=torch.long)
        else:
            ids = torch.randint(5, params.vocab_size, shape, generator=generator)
        return Rollout(ids, torch.ones(shape, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------------------------
# the protocol and the local backends
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", LOCAL_BACKENDS)
def test_local_backends_implement_the_protocol_and_equal_sample_completions(backend, tokenizer, records):
    model = make_model("llama_student", tokenizer, seed=1)
    sampler = get_sampler(backend)
    assert isinstance(sampler, LocalSampler) and isinstance(sampler, Sampler) and sampler.backend == backend
    batch = collate(_data(tokenizer, records).examples, tokenizer.pad_token_id)
    params = _params(tokenizer, temperature=0.8, top_k=9, top_p=0.95)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert sampler.sync(model) is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # sync is a no-op in-process
    for greedy in (False, True):
        p = _params(tokenizer, greedy=greedy, temperature=0.8, top_k=9, top_p=0.95)
        got = sampler.sample(model, batch.prompt_ids, batch.prompt_mask, p, torch.Generator().manual_seed(4))
        ref = sample_completions(
            model,
            batch.prompt_ids,
            batch.prompt_mask,
            max_new_tokens=6,
            temperature=0.8,
            top_k=9,
            top_p=0.95,
            greedy=greedy,
            eos_token_ids=[tokenizer.eos_token_id],
            pad_token_id=tokenizer.pad_token_id,
            generator=torch.Generator().manual_seed(4),
            backend=backend,
            vocab_size=len(tokenizer),
        )
        assert isinstance(got, Rollout)
        assert torch.equal(got.completion_ids, ref.completion_ids)
        assert torch.equal(got.completion_mask, ref.completion_mask)
    assert params.eos_token_ids == (tokenizer.eos_token_id,)


def test_the_generate_backend_serves_encoder_decoder_models(tokenizer, records):
    model = make_model("t5", tokenizer)
    batch = collate(_data(tokenizer, records, seq2seq=True).examples, tokenizer.pad_token_id)
    for name in ("auto", "generate"):
        roll = get_sampler(name).sample(
            model, batch.prompt_ids, batch.prompt_mask, _params(tokenizer), torch.Generator().manual_seed(0)
        )
        assert roll.completion_ids.shape[0] == batch.size and roll.completion_ids.shape[1] <= 6
    with pytest.raises(ConfigError, match="rollout_backend: fast does not support"):
        get_sampler("fast").sample(model, batch.prompt_ids, batch.prompt_mask, _params(tokenizer), None)


def test_sampling_params_are_checked_and_frozen(tokenizer):
    p = _params(tokenizer, eos_token_ids=[3, 4])
    assert p.eos_token_ids == (3, 4)
    with pytest.raises(AttributeError):
        p.temperature = 2.0  # type: ignore[misc]
    for bad, match in (
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"vocab_size": 0}, "vocab_size"),
    ):
        with pytest.raises(ValueError, match=match):
            _params(tokenizer, **bad)


def test_unknown_and_unavailable_backends_are_one_line_config_errors():
    for call in (lambda: get_sampler("beam"), lambda: LocalSampler("vllm"), lambda: get_sampler("vllm")):
        with pytest.raises(ConfigError) as e:
            call()
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="must be one of auto, fast, generate, vllm, got 'beam'"):
        get_sampler("beam")
    with pytest.raises(ConfigError, match="takes no options"):
        get_sampler("auto", gpu_memory_utilization=0.5)
    assert BACKENDS == ("auto", "fast", "generate", "vllm")
    # the teacher (or anything an engine of the student does not hold) is sampled in-process
    assert local_sampler("vllm").backend == "auto" and local_sampler("generate").backend == "generate"


@pytest.mark.skipif(HAS_VLLM, reason="checks the error without vllm installed")
def test_vllm_without_vllm_is_a_one_line_config_error(tmp_path):
    with pytest.raises(ConfigError, match="rollout_backend: vllm needs") as e:
        get_sampler("vllm", model_path=str(tmp_path))
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------------------------
# the trainer's rollout: a batch's completions replaced by samples
# ---------------------------------------------------------------------------------------------------------------
def test_sample_batch_returns_detached_on_policy_samples(tokenizer, records):
    model = make_model("llama_student", tokenizer, seed=1).train()  # trainable weights, train mode kept
    data = _data(tokenizer, records, 4)
    batch = collate(data.examples, tokenizer.pad_token_id)
    batch.indices = [0, 1, 2, 3]
    params = _params(tokenizer)
    gen = torch.Generator().manual_seed(11)
    out = sample_batch(get_sampler("auto"), model, batch, params, gen, num_generations=2)
    assert isinstance(out, Batch) and out.on_policy and out.indices is None and model.training
    for t in (out.completion_ids, out.completion_mask):
        assert not t.requires_grad and t.grad_fn is None and not t.is_inference()
    assert out.size == 8 and out.records == [r for r in batch.records for _ in range(2)]
    assert torch.equal(out.prompt_ids, batch.prompt_ids.repeat_interleave(2, 0))
    # exactly what sample_completions gives from the same generator state (the trainer's rollout today)
    ref = sample_completions(
        model,
        out.prompt_ids,
        out.prompt_mask,
        max_new_tokens=6,
        eos_token_ids=[tokenizer.eos_token_id],
        pad_token_id=tokenizer.pad_token_id,
        generator=torch.Generator().manual_seed(11),
        vocab_size=len(tokenizer),
    )
    assert torch.equal(out.completion_ids, ref.completion_ids)
    assert torch.equal(out.completion_mask, ref.completion_mask)
    assert not batch.on_policy and batch.size == 4  # the input batch is left as it was


def test_sample_batch_syncs_the_backend_before_sampling(tokenizer, records):
    model = make_model("llama_student", tokenizer, seed=1)
    batch = collate(_data(tokenizer, records, 3).examples, tokenizer.pad_token_id)
    fake = UniformSampler()
    out = sample_batch(fake, model, batch, _params(tokenizer), torch.Generator().manual_seed(0))
    assert fake.calls == [("sync", model), ("sample", model)]
    assert out.on_policy and out.completion_ids.shape == (3, 6)
    sample_batch(fake, model, batch, _params(tokenizer), None, sync=False)
    assert fake.calls[-1] == ("sample", model) and len(fake.calls) == 3


# ---------------------------------------------------------------------------------------------------------------
# one interface serves every caller
# ---------------------------------------------------------------------------------------------------------------
def test_a_new_backend_serves_evaluation_generation_and_seqkd(tokenizer, records, tmp_path):
    model = make_model("llama_student", tokenizer, seed=1)
    data = _data(tokenizer, records, 5)
    fake = UniformSampler()
    assert isinstance(fake, Sampler)

    ids = generate_ids(
        model, tokenizer, data, max_new_tokens=6, greedy=False, seed=7, batch_size=2, sampler=fake
    )
    gen = torch.Generator().manual_seed(7)
    expected = [
        row.tolist() for n in (2, 2, 1) for row in torch.randint(5, len(tokenizer), (n, 6), generator=gen)
    ]
    assert tokenizer.eos_token_id < 5 and ids == expected  # seeded by generate_ids' generator, batch by batch
    assert fake.calls[0] == ("sync", model) and [c for c, _ in fake.calls[1:]] == ["sample"] * 3

    fake.calls.clear()
    result = evaluate(
        model, tokenizer, data, "exact_match", max_new_tokens=6, seeds=(7, 8), batch_size=2, sampler=fake
    )
    assert set(result) == {"greedy", "sample"} and set(result["sample"]) == {"exact_match", "self_bleu"}
    # sync once, before the first sample; then greedy (3 batches) and two sampled runs (3 batches each)
    assert fake.calls[0] == ("sync", model) and [c for c, _ in fake.calls[1:]] == ["sample"] * 9

    teacher = make_model("llama_teacher", tokenizer)
    fake.calls.clear()
    kw = {
        "cache_dir": tmp_path,
        "teacher_name": "t",
        "max_new_tokens": 6,
        "temperature": 1.0,
        "top_k": 0,
        "top_p": 1.0,
        "seed": 7,
        "batch_size": 2,
        "log": lambda _: None,
    }
    out = seqkd_dataset(teacher, tokenizer, data, sampler=fake, **kw)
    assert [e.completion for e in out.examples] == [[*t, tokenizer.eos_token_id][:6] for t in ids]
    assert fake.calls[0] == ("sync", teacher) and all(m is teacher for _, m in fake.calls)
    # another sampler's targets are cached under another key than the local backends'
    seqkd_dataset(teacher, tokenizer, data, **kw)
    assert len(list(tmp_path.glob("seqkd-*.jsonl"))) == 2


# ---------------------------------------------------------------------------------------------------------------
# the vLLM backend, against a stand-in engine (vLLM itself cannot run here)
# ---------------------------------------------------------------------------------------------------------------
class _FakeLLM:
    """Enough of ``vllm.LLM`` for VLLMSampler: apply_model/load_weights and generate."""

    def __init__(self, outputs):
        self.outputs, self.loaded, self.requests = outputs, [], []

    def apply_model(self, fn):
        fn(types.SimpleNamespace(load_weights=self.loaded.append))

    def generate(self, prompts, params, use_tqdm=False):
        self.requests.append((prompts, params))
        return [
            types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=ids, finish_reason=reason)])
            for ids, reason in self.outputs
        ]


def _fake_vllm_sampler(outputs):
    from gkd.sampling.vllm import VLLMSampler

    # no engine start (it needs vllm and a GPU): a fake engine, and requests built as plain dicts
    fake_vllm = types.SimpleNamespace(SamplingParams=lambda **kw: kw)
    return VLLMSampler.from_engine(_FakeLLM(outputs), "student", vllm=fake_vllm)


def test_vllm_sampler_is_seeded_from_the_generator_and_samples_only_the_synced_model(tokenizer):
    student, teacher = make_model("llama_student", tokenizer, seed=1), make_model("llama_teacher", tokenizer)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    sampler = _fake_vllm_sampler([([7, 8], "length"), ([9], "stop"), ([], "stop")])
    assert isinstance(sampler, Sampler)
    ids = torch.tensor([[pad, 10, 11], [12, 13, 14], [pad, pad, 15]])
    mask = ids != pad
    params = _params(tokenizer, max_new_tokens=2, eos_token_ids=(eos,), vocab_size=None)
    with pytest.raises(ConfigError, match="call sync"):
        sampler.sample(student, ids, mask, params, None)
    sampler.sync(student)
    assert [n for n, _ in sampler.llm.loaded[0]] == list(student.state_dict())
    with pytest.raises(ConfigError, match="teacher"):
        sampler.sample(teacher, ids, mask, params, None)

    gen = torch.Generator().manual_seed(3)
    roll = sampler.sample(student, ids, mask, params, gen)
    prompts, request = sampler.llm.requests[-1]
    assert prompts == [
        {"prompt_token_ids": [10, 11]},
        {"prompt_token_ids": [12, 13, 14]},
        {"prompt_token_ids": [15]},
    ]
    assert request["seed"] == int(
        torch.randint(0, 2**31 - 1, (1,), generator=torch.Generator().manual_seed(3))
    )
    assert request["stop_token_ids"] == [eos] and request["top_k"] == -1 and request["max_tokens"] == 2
    # a stop without its EOS in the output gets the EOS back; rows are right-padded with their mask
    assert roll.completion_ids.tolist() == [[7, 8], [9, eos], [eos, pad]]
    assert roll.completion_mask.tolist() == [[True, True], [True, True], [True, False]]
    # greedy draws nothing from the generator, like the local backends
    state = gen.get_state()
    sampler.sample(student, ids, mask, _params(tokenizer, max_new_tokens=2, greedy=True), gen)
    assert torch.equal(gen.get_state(), state) and sampler.llm.requests[-1][1]["temperature"] == 0.0
    assert sampler.llm.requests[-1][1]["seed"] is None


def test_the_old_import_paths_give_the_same_objects():
    """``gkd.rollout``, ``gkd.rollout_vllm`` and ``gkd.evaluation`` keep the names that moved into the package."""
    import gkd.evaluation
    import gkd.rollout
    import gkd.rollout_vllm
    import gkd.sampling
    import gkd.sampling.fast
    import gkd.sampling.local
    import gkd.sampling.vllm

    for name in gkd.rollout.__all__:
        new = getattr(gkd.sampling.local, name, None) or getattr(gkd.sampling.fast, name)
        assert getattr(gkd.rollout, name) is new, name
    assert gkd.rollout_vllm.VLLMSampler is gkd.sampling.vllm.VLLMSampler is gkd.sampling.VLLMSampler
    assert gkd.evaluation.generate_ids is gkd.sampling.generate_ids
    assert gkd.evaluation.eos_ids is gkd.sampling.eos_ids
