"""Mixed precision (``bf16``), gradient checkpointing and the dtype keys, on the CPU.

bf16 autocast runs on the CPU too, so the same code path a GPU user takes is exercised here: forward passes in
bfloat16 with float32 master weights and optimizer state (accelerate), updates far below bfloat16's resolution
still land, checkpointed activations give the same gradients, and rollouts keep their KV cache while the student
trains with gradient checkpointing. fp16 needs a GPU: on the CPU it is one clear error.
"""

from __future__ import annotations

import pytest
import torch
from conftest import base_config, make_model
from tiny import micro_batch_loss

from gkd.config import config_from_dict
from gkd.errors import ConfigError
from gkd.step import student_samples
from gkd.trainer import GKDTrainer


def _checkpointing(model) -> bool:
    flag = getattr(type(model), "is_activation_checkpointing", None)
    return bool(model.is_activation_checkpointing if flag is not None else model.is_gradient_checkpointing)


def _trainer(tokenizer, records, tmp_path, student=None, **cfg):
    student = student or make_model("llama_student", tokenizer, seed=1)
    teacher = make_model("llama_teacher", tokenizer, seed=0)
    t = GKDTrainer(
        base_config(output_dir=str(tmp_path / "out"), **cfg),
        student=student,
        teacher=teacher,
        tokenizer=tokenizer,
        train_records=records,
    )
    t.setup()
    return t


def test_bf16_runs_the_forward_in_bfloat16_and_keeps_float32_master_weights(tokenizer, records, tmp_path):
    t = _trainer(
        tokenizer, records, tmp_path, bf16=True, lmbda=0.0, divergence="forward_kl", learning_rate=1e-6
    )
    seen: list[torch.dtype] = []
    layer = t.student.model.layers[0].mlp.down_proj
    handle = layer.register_forward_hook(lambda m, inp, out: seen.append(out.dtype))
    before = {n: p.detach().clone() for n, p in t.student.named_parameters()}
    record = t.train_step()
    handle.remove()
    assert torch.bfloat16 in seen  # the student's training forward ran under bf16 autocast
    assert all(p.dtype == torch.float32 for p in t.student.parameters())
    assert torch.isfinite(torch.tensor(record["loss"]))
    # an update of ~1e-6 is far below bf16's spacing at these weights (pure bf16 would round it away): it lands
    norm = before["model.norm.weight"]
    assert not torch.equal(t.student.model.norm.weight.detach(), norm)
    assert torch.equal(norm.to(torch.bfloat16), t.student.model.norm.weight.detach().to(torch.bfloat16))


def test_bf16_loss_is_close_to_the_float32_loss(tokenizer, records, tmp_path):
    fp32 = _trainer(tokenizer, records, tmp_path / "a", lmbda=0.0, divergence="jsd", beta=0.5)
    bf16 = _trainer(tokenizer, records, tmp_path / "b", lmbda=0.0, divergence="jsd", beta=0.5, bf16=True)
    batch = fp32.stream.next()
    a = micro_batch_loss(fp32.run, batch, float(batch.num_tokens())).item()
    b = micro_batch_loss(bf16.run, batch, float(batch.num_tokens())).item()
    assert b == pytest.approx(a, rel=0.05)


def test_gradient_checkpointing_gives_the_same_gradients(tokenizer, records, tmp_path):
    plain = _trainer(tokenizer, records, tmp_path / "a", lmbda=0.0, divergence="reverse_kl")
    ckpt = _trainer(
        tokenizer, records, tmp_path / "b", lmbda=0.0, divergence="reverse_kl", gradient_checkpointing=True
    )
    assert _checkpointing(ckpt.student) and not _checkpointing(plain.student)
    batch = plain.stream.next()
    grads = []
    for t in (plain, ckpt):
        micro_batch_loss(t.run, batch, float(batch.num_tokens())).backward()
        grads.append(torch.cat([p.grad.flatten() for p in t.student.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("backend", ["fast", "generate"])
def test_rollouts_keep_their_kv_cache_under_gradient_checkpointing(backend, tokenizer, records, tmp_path):
    """TRL turns the cache off when gradient checkpointing is on (and pays for it); gkd's rollouts decode one new
    token per forward call after the prompt, whichever backend samples."""
    t = _trainer(
        tokenizer,
        records,
        tmp_path,
        lmbda=1.0,
        divergence="reverse_kl",
        gradient_checkpointing=True,
        rollout_backend=backend,
        max_new_tokens=6,
    )
    lengths: list[int] = []
    attn = t.student.model.layers[0].self_attn
    handle = attn.register_forward_hook(lambda m, inp, out: lengths.append(out[0].shape[1]))
    roll = student_samples(t.run, t.stream.next())
    handle.remove()
    assert (
        t.student.training and t.student.is_gradient_checkpointing
    )  # sampling left the training mode as it was
    if backend == "generate":
        assert lengths and lengths[0] > 1 and set(lengths[1:]) <= {1}, lengths
    else:  # the fast loop runs its own KV cache on the weights: the HF modules are not called at all
        assert lengths == []
    assert roll.completion_mask.any()
    t.train_step()  # and the training step still works


def test_fp16_on_the_cpu_is_one_clear_error(tokenizer, records, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ConfigError, match="fp16: true' needs a CUDA GPU"):
        _trainer(tokenizer, records, tmp_path, fp16=True)


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"bf16": True, "fp16": True}, "choose one mixed precision"),
        ({"bf16": True, "student_dtype": "bfloat16"}, "keeps float32 master weights"),
        ({"attn_implementation": "sdpaa"}, "did you mean 'sdpa'"),
        ({"dtype": "bfloat16", "student_dtype": "float32"}, "set the same thing"),
    ],
)
def test_precision_keys_are_checked(data, fragment):
    with pytest.raises(ConfigError, match=fragment):
        config_from_dict(data)


def test_trl_dtype_names_set_the_student_dtype():
    assert config_from_dict({"torch_dtype": "bfloat16"}).student_dtype == "bfloat16"
    assert config_from_dict({"dtype": "auto"}).student_dtype == "auto"
    assert config_from_dict({}).teacher_dtype == "auto"


def test_teacher_dtype_auto_is_float32_on_the_cpu_and_attn_implementation_reaches_from_pretrained(
    model_dir, tmp_path
):
    from gkd.config import GKDConfig

    cfg = GKDConfig(
        model_name_or_path=str(model_dir / "student"),
        teacher_model_name_or_path=str(model_dir / "teacher"),
        dataset=str(model_dir / "train.jsonl"),
        output_dir=str(tmp_path / "out"),
        attn_implementation="eager",
        max_steps=1,
        max_new_tokens=4,
        progress=False,
    )
    t = GKDTrainer(cfg)
    run = t.setup()
    assert next(run.teacher.model.parameters()).dtype == torch.float32
    assert run.student.config._attn_implementation == "eager"
    assert run.teacher.model.config._attn_implementation == "eager"
