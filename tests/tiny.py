"""Tiny models built from transformers config classes (never downloaded) and a test run's base config.

``TINY`` is the tests' one table of tiny models (:func:`gkd.models.build_model` specs): a test that needs another
size or context length overrides the entry's keys (``{**TINY["qwen2_student"], "max_position_embeddings": 512}``).

A plain module (no pytest), so ``benchmarks/gpu_check.py`` can build the same runs on a machine without pytest.
"""

from __future__ import annotations

TINY = {
    "llama_teacher": {
        "architecture": "llama",
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "max_position_embeddings": 64,
        "tie_word_embeddings": True,
    },
    "llama_student": {
        "architecture": "llama",
        "hidden_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 32,
        "max_position_embeddings": 64,
        "tie_word_embeddings": True,
    },
    # Qwen2-style (grouped-query attention, q/k/v bias)
    "qwen2_teacher": {
        "architecture": "qwen2",
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 64,
        "tie_word_embeddings": True,
    },
    "qwen2_student": {
        "architecture": "qwen2",
        "hidden_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "intermediate_size": 32,
        "max_position_embeddings": 64,
        "tie_word_embeddings": True,
    },
    # GPT-2: learned absolute positions (a hard context limit), a fused q/k/v projection
    "gpt2_teacher": {"architecture": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64},
    "gpt2_student": {"architecture": "gpt2", "n_embd": 16, "n_layer": 1, "n_head": 2, "n_positions": 64},
    "t5": {
        "architecture": "t5",
        "d_model": 16,
        "d_kv": 8,
        "d_ff": 32,
        "num_layers": 1,
        "num_decoder_layers": 1,
        "num_heads": 2,
        "dropout_rate": 0.0,
    },
}


def make_model(kind: str, tokenizer, seed: int = 0):
    from gkd.models import build_model

    return build_model(TINY[kind], tokenizer, seed=seed)


def base_config(**overrides):
    from gkd.config import GKDConfig

    cfg = {
        "learning_rate": 3e-3,
        "per_device_train_batch_size": 8,
        "max_steps": 4,
        "max_new_tokens": 8,
        "logging_steps": 1,
        "save_steps": 0,
        "progress": False,
        "seed": 0,
    }
    cfg.update(overrides)
    return GKDConfig(**cfg)


def micro_batch_loss(run, batch, denominator: float, *, advantages=None, stats=None):
    """The loss of one micro-batch with a run's components: the three data-flow lines of ``gkd.step.gkd_step``
    (the teacher's view, the student's forward pass, the objective) plus the KL to the initial student, through
    public names only."""
    teacher = run.teacher if run.objective.needs_teacher else None
    p_t = teacher.view(batch) if teacher is not None else None
    p_s = run.student_forward(
        batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask
    )
    loss = run.objective.loss(batch, p_s, p_t, denominator, advantages=advantages, stats=stats)
    if run.reference is not None and run.objective.uses_reference(stats is not None):
        loss = loss + run.objective.kl_to_initial_term(
            batch, p_s, run.reference.view(batch), denominator, stats
        )
    return loss
