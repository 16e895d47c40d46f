"""Every common model family, trained end to end on tiny random configs built from transformers config classes.

Llama, Qwen2 (tied embeddings, q/k/v bias), Qwen3 (q/k norm), Mistral, Gemma 2 (final-logit and attention
softcapping), Phi-3, GPT-2 and T5: on- and off-policy steps with a finite loss, the loss falls on a fixed batch, the
checkpoint reloads with ``from_pretrained``, and each causal family also trains on-policy with a padded head (more
rows than tokenizer entries, as every Qwen2.5 checkpoint has). The run's log says which sampler and loss path the
family takes, and why when it is the slower one.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import TINY, base_config

from gkd.models import build_model, fused_head_unsupported_reason
from gkd.trainer import GKDTrainer

SMALL = {"max_position_embeddings": 128}
FAMILIES = {
    "llama": {**TINY["llama_student"], **SMALL},
    "qwen2": {**TINY["qwen2_student"], **SMALL},
    "qwen3": dict(
        architecture="qwen3",
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        intermediate_size=32,
        tie_word_embeddings=True,
        **SMALL,
    ),
    "mistral": dict(
        architecture="mistral",
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=32,
        sliding_window=None,
        **SMALL,
    ),
    "gemma2": dict(
        architecture="gemma2",
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        intermediate_size=32,
        final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0,
        sliding_window=16,
        **SMALL,
    ),
    "phi3": dict(
        architecture="phi3",
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=32,
        original_max_position_embeddings=128,
        **SMALL,
    ),
    "gpt2": {**TINY["gpt2_student"], "n_positions": 128},
    "t5": dict(TINY["t5"]),
}
CAUSAL = [f for f in FAMILIES if f != "t5"]


def _teacher_spec(spec: dict) -> dict:
    wider = dict(spec)
    for key in ("hidden_size", "n_embd", "d_model"):
        if key in wider:
            wider[key] *= 2
    return wider


def _trainer(family, tokenizer, records, tmp_path, pad_rows=0, **cfg):
    spec = FAMILIES[family]
    extra = {"vocab_size": len(tokenizer) + pad_rows} if pad_rows else {}
    student = build_model({**spec, **extra}, tokenizer, seed=1)
    teacher = build_model({**_teacher_spec(spec), **extra}, tokenizer, seed=0)
    lines: list[str] = []
    config = base_config(
        output_dir=str(tmp_path / family), max_new_tokens=6, per_device_train_batch_size=4, **cfg
    )
    t = GKDTrainer(
        config, student=student, teacher=teacher, tokenizer=tokenizer, train_records=records, log=lines.append
    )
    t.setup()
    return t, lines


class _Fixed:
    def __init__(self, batch) -> None:
        self.batch = batch

    def next(self):
        return self.batch


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_trains_on_and_off_policy_and_reloads(family, tokenizer, records, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    t, lines = _trainer(
        family, tokenizer, records, tmp_path, lmbda=0.5, divergence="jsd", beta=0.5, max_steps=4
    )
    result = t.train()
    assert result.step == 4 and math.isfinite(result.final_loss)
    rows = [json.loads(line) for line in (tmp_path / family / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    cls = AutoModelForSeq2SeqLM if family == "t5" else AutoModelForCausalLM
    reloaded = cls.from_pretrained(tmp_path / family / "checkpoint-4")
    for (n, p), q in zip(t.student.named_parameters(), reloaded.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), msg=n)
    notes = [line for line in lines if line.startswith(("rollouts:", "loss:"))]
    assert any(line.startswith("loss:") for line in notes)
    reason = fused_head_unsupported_reason(t.student)
    assert ("chunked from hidden states" in notes[-1]) == (reason is None)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_loss_falls_on_a_fixed_batch(family, tokenizer, records, tmp_path):
    t, _ = _trainer(
        family, tokenizer, records, tmp_path, lmbda=0.0, divergence="forward_kl", learning_rate=1e-2
    )
    t.run.stream = _Fixed(t.stream.next())
    losses = [t.train_step()["loss"] for _ in range(4)]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("family", CAUSAL)
def test_family_with_a_padded_head_trains_on_policy(family, tokenizer, records, tmp_path):
    """Head rows beyond the tokenizer are never sampled and never compared (the fused path covers them)."""
    t, _ = _trainer(
        family, tokenizer, records, tmp_path, pad_rows=8, lmbda=1.0, divergence="reverse_kl", max_steps=2
    )
    assert t.student.get_output_embeddings().weight.shape[0] == len(tokenizer) + 8
    record = t.train_step()
    assert record["on_policy"] and math.isfinite(record["loss"])
    assert t.train_step()["completion_tokens"] > 0


@pytest.mark.parametrize(
    ("family", "extra"),
    [
        ("gemma2", {}),
        ("llama", {"architecture": "cohere", "logit_scale": 0.5}),
        ("llama", {"architecture": "granite", "logits_scaling": 4.0}),
    ],
)
def test_logit_transforms_stay_on_the_chunked_path_and_match_the_model(family, extra, tokenizer, records):
    """Softcapping (Gemma 2) and scaled heads (Cohere, Granite) are applied by the chunked loss itself, so these
    families never build [positions, vocab] logits; the head's logits equal the model's own forward."""
    from gkd.data import collate, tokenize_records
    from gkd.models import score_positions

    model = build_model({**FAMILIES[family], **extra}, tokenizer, seed=0)
    assert fused_head_unsupported_reason(model) is None
    data = tokenize_records(records[:4], tokenizer, max_prompt_length=64, max_completion_length=8)
    b = collate(data.examples, tokenizer.pad_token_id)
    fused = score_positions(model, b.prompt_ids, b.prompt_mask, b.completion_ids, b.completion_mask)
    plain = score_positions(
        model, b.prompt_ids, b.prompt_mask, b.completion_ids, b.completion_mask, fused=False
    )
    assert fused.hidden is not None and fused.head.transformed
    torch.testing.assert_close(fused.head.logits(fused.hidden), plain.logits, rtol=1e-4, atol=1e-5)


def test_an_unknown_family_carrying_a_transform_attribute_takes_the_full_logits_path(tokenizer):
    """Llama ignores a stray ``logit_scale`` in its config; gkd cannot know which models apply one, so a family it
    does not know keeps to the model's own forward (always correct) and says why."""
    model = build_model({**FAMILIES["llama"], "logit_scale": 0.5}, tokenizer, seed=0)
    reason = fused_head_unsupported_reason(model)
    assert reason is not None and "logit_scale" in reason
