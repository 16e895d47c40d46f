"""Packed forwards (gkd.packing, ``packed_forward``) and token-budget micro-batches (``max_tokens_per_batch``).

Packed forwards run the batch's real tokens only, several sequences to a row; every test here holds them to the
padded path: the same outputs, and through the step's public pieces the same loss, gradients and logged statistics
(1e-5), for every divergence and the causal families of the suite."""

from __future__ import annotations

import random
from collections import defaultdict

import pytest
import torch
from conftest import TINY, base_config
from test_families import FAMILIES
from tiny import micro_batch_loss

from gkd.data import pad_left, pad_right, select_rows, token_groups
from gkd.divergences import DIVERGENCES
from gkd.errors import ConfigError
from gkd.forward import packed_forward_on, score_positions, set_packed_forward
from gkd.models import build_model
from gkd.objective import Objective
from gkd.packing import pack_inputs, packing_probe, packing_unsupported_reason
from gkd.step import gkd_step, student_samples
from gkd.trainer import GKDTrainer, TrainingInterrupted

CAUSAL = [f for f in FAMILIES if f != "t5"]
TOL = {"rtol": 1e-5, "atol": 1e-5}


def ragged(records: list[dict], n: int = 48, seed: int = 0) -> list[dict]:
    """Records with prompts cut to random lengths (1 to 18 words) and completions of 1 to 6 words: ragged data."""
    rng = random.Random(seed)
    out = []
    for r in records[:n]:
        words = r["prompt"].split()
        prompt = " ".join(words[-rng.randint(1, len(words)) :])
        out.append({"prompt": prompt, "completion": " ".join(r["prompt"].split()[1 : 1 + rng.randint(1, 6)])})
    return out


def ragged_batch(vocab: int, seed: int = 0):
    """A padded batch of 6 ragged sequences, one without completion tokens."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab, (k,), generator=g).tolist() for k in (5, 17, 2, 9, 30, 11)]
    comps = [torch.randint(3, vocab, (k,), generator=g).tolist() for k in (4, 1, 12, 0, 7, 20)]
    return (*pad_left(prompts, 0), *pad_right(comps, 0))


def kernels(family: str) -> list[str]:
    return ["eager"] if family == "gemma2" else ["sdpa", "eager"]  # sdpa refuses Gemma 2's attention softcap


# --- the layout -----------------------------------------------------------------------------------------------


def test_pack_inputs_lays_each_sequence_once_with_restarting_positions(tokenizer):
    p, pm, c, cm = ragged_batch(len(tokenizer))
    packed = pack_inputs(p, pm, c, cm)
    lengths = (pm.sum(1) + cm.sum(1) - 1)[cm.sum(1) > 0]  # the row without a completion is left out
    assert packed.real_tokens == int(lengths.sum())
    assert packed.input_ids.shape[1] == int(lengths.max())  # rows as wide as the longest sequence
    assert packed.input_ids.numel() < p.shape[0] * (p.shape[1] + c.shape[1] - 1)  # fewer tokens than padded
    assert packed.gather.numel() == int(cm.sum())
    # every sequence starts at position 0: as many starts as sequences, plus one per row with a filler tail
    starts = int((packed.position_ids == 0).sum())
    assert len(lengths) <= starts <= len(lengths) + packed.input_ids.shape[0]
    # the output read for completion token j is that of the token before it (the previous completion token, or the
    # prompt's last), at position prompt length - 1 + j of its sequence
    row_i, col_j = cm.nonzero(as_tuple=True)
    before = torch.where(col_j > 0, c[row_i, (col_j - 1).clamp(min=0)], p[row_i, -1])
    assert torch.equal(packed.input_ids.reshape(-1)[packed.gather], before)
    assert torch.equal(packed.position_ids.reshape(-1)[packed.gather], pm.sum(1)[row_i] - 1 + col_j)
    rows = pack_inputs(p, pm, c, cm, one_row=True)
    assert rows.input_ids.shape == (1, packed.real_tokens)


def test_pack_inputs_leaves_layouts_it_cannot_pack_to_the_padded_path(tokenizer):
    p, pm, c, cm = ragged_batch(len(tokenizer))
    holes = cm.clone()
    holes[0, 1] = False  # not a prefix
    assert pack_inputs(p, pm, c, holes) is None
    assert pack_inputs(p, pm, c, torch.zeros_like(cm)) is None  # nothing to score
    right_padded = pm.flip(1)
    assert pack_inputs(p, right_padded, c, cm) is None


# --- the forward ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", CAUSAL)
def test_packed_forward_equals_the_padded_forward(family, tokenizer):
    """Hidden states (fused head) and logits at the valid completion positions, per family and attention kernel."""
    p, pm, c, cm = ragged_batch(len(tokenizer))
    for kernel in kernels(family):
        model = build_model({**FAMILIES[family]}, tokenizer, seed=0).eval()
        model.config._attn_implementation = kernel
        assert set_packed_forward(model, "auto") is None and packed_forward_on(model)
        for fused in (True, False):
            padded = score_positions(model, p, pm, c, cm, vocab=len(tokenizer), fused=fused, packed=False)
            packed = score_positions(model, p, pm, c, cm, vocab=len(tokenizer), fused=fused)
            for a, b in ((padded.hidden, packed.hidden), (padded.logits, packed.logits)):
                assert (a is None) == (b is None)
                if a is not None:
                    assert a.shape[0] == int(cm.sum())
                    torch.testing.assert_close(b, a, **TOL)


def test_packed_forward_auto_keeps_models_that_cannot_pack_padded(tokenizer):
    t5 = build_model(dict(TINY["t5"]), tokenizer, seed=0)
    assert "encoder-decoder" in set_packed_forward(t5, "auto") and not packed_forward_on(t5)
    with pytest.raises(ConfigError, match="packed_forward: true, but encoder-decoder"):
        set_packed_forward(t5, True)
    llama = build_model(dict(TINY["llama_student"]), tokenizer, seed=0)
    llama.config._attn_implementation = "paged|sdpa"
    assert "attention kernel" in packing_unsupported_reason(llama)
    assert set_packed_forward(llama, False) == "packed_forward: false" and not packed_forward_on(llama)


def test_the_probe_sees_a_model_whose_attention_crosses_sequences(tokenizer, monkeypatch):
    """Modelling code shipped with a checkpoint is probed: two packed sequences must give their separate outputs."""
    from transformers import masking_utils

    model = build_model(dict(TINY["llama_student"]), tokenizer, seed=0)
    assert packing_probe(model) is None
    monkeypatch.setattr(
        masking_utils, "find_packed_sequence_indices", lambda position_ids: None
    )  # no block mask
    assert "change with its neighbour" in packing_probe(model)
    assert "change with its neighbour" in set_packed_forward(model, "auto", probe=True)
    assert not packed_forward_on(model)
    with pytest.raises(ConfigError, match="packed_forward: true, but a packed sequence's outputs change"):
        set_packed_forward(model, True, probe=True)


# --- the step: loss, gradients and statistics ----------------------------------------------------------------


def _trainer(family, tokenizer, records, tmp_path, name, **cfg):
    spec = FAMILIES[family]
    wider = {k: v * 2 if k in ("hidden_size", "n_embd") else v for k, v in spec.items()}
    student = build_model(dict(spec), tokenizer, seed=1)
    teacher = None if cfg.get("divergence") == "nll" else build_model(wider, tokenizer, seed=0)
    lines: list[str] = []
    config = base_config(
        output_dir=str(tmp_path / name), max_new_tokens=6, per_device_train_batch_size=6, **cfg
    )
    t = GKDTrainer(
        config, student=student, teacher=teacher, tokenizer=tokenizer, train_records=records, log=lines.append
    )
    t.setup()
    return t, lines


def _flat(stats) -> dict[str, torch.Tensor]:
    return {
        k: torch.cat([torch.as_tensor(x, dtype=torch.float64).detach().reshape(-1) for x in v])
        for k, v in stats.items()
    }


def _loss_grads_stats(run, batch, packed: bool):
    for model in (run.student, run.teacher.model):
        set_packed_forward(model, "auto" if packed else False)
    run.student.zero_grad(set_to_none=True)
    stats: dict[str, list] = defaultdict(list)
    loss = micro_batch_loss(run, batch, float(run.objective.count(batch)), stats=stats)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in run.student.named_parameters() if p.grad is not None}
    return loss.detach(), grads, _flat(stats)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma2", "gpt2"])
def test_micro_batch_loss_gradients_and_stats_equal_padded_for_every_divergence(
    family, tokenizer, records, tmp_path
):
    t, lines = _trainer(family, tokenizer, ragged(records), tmp_path, family, lmbda=1.0)
    assert any(line.startswith("forwards: packed") for line in lines)
    run = t.run
    batch = student_samples(run, run.stream.next())  # the student's own ragged samples
    assert pack_inputs(batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask)
    for name in DIVERGENCES:
        run.objective = Objective.from_config(base_config(divergence=name, beta=0.3))
        loss_p, grads_p, stats_p = _loss_grads_stats(run, batch, packed=False)
        loss_k, grads_k, stats_k = _loss_grads_stats(run, batch, packed=True)
        torch.testing.assert_close(loss_k, loss_p, **TOL)
        assert grads_p and grads_p.keys() == grads_k.keys()
        for key in grads_p:
            torch.testing.assert_close(grads_k[key], grads_p[key], **TOL, msg=f"{name} {key}")
        assert stats_p and stats_p.keys() == stats_k.keys()
        for key in stats_p:
            torch.testing.assert_close(stats_k[key], stats_p[key], **TOL)


def _same_step(a, b, tmp_path):
    """One gkd_step of two runs built alike, one packed and one padded: the same record and the same weights."""
    ra, rb = gkd_step(a.run, 0), gkd_step(b.run, 0)
    assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5, abs=1e-6)
    assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-5, abs=1e-6)
    assert ra["completion_tokens"] == rb["completion_tokens"]
    sa, sb = _flat(ra["stats"]), _flat(rb["stats"])
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], **TOL)
    for (n, pa), (_, pb) in zip(a.run.student.named_parameters(), b.run.student.named_parameters()):
        torch.testing.assert_close(pa, pb, **TOL, msg=n)
    return ra


@pytest.mark.parametrize(
    "case",
    [
        dict(lmbda=1.0, divergence="jsd", beta=0.9, alpha=0.5, reward="exact_match", kl_to_initial=0.1),
        dict(lmbda=1.0, divergence="reverse_kl", lora={"r": 4}),
        dict(lmbda=0.0, divergence="forward_kl", gradient_accumulation_steps=2),
    ],
    ids=["rl+kl_to_initial", "lora", "accumulation"],
)
def test_gkd_step_packed_equals_padded(case, tokenizer, records, tmp_path):
    data = ragged(records)
    packed, lines = _trainer("llama", tokenizer, data, tmp_path, "packed", **case)
    padded, _ = _trainer("llama", tokenizer, data, tmp_path, "padded", packed_forward=False, **case)
    assert packed_forward_on(packed.run.student) and not packed_forward_on(padded.run.student)
    if case.get("kl_to_initial"):
        assert "reference" in next(line for line in lines if line.startswith("forwards: packed"))
    rec = _same_step(packed, padded, tmp_path)
    assert rec["loss"] != 0.0


def test_the_teachers_own_prompt_is_scored_packed(tokenizer, records, tmp_path):
    data = [
        {**r, "hint": r["prompt"]} for r in ragged(records, seed=1)
    ]  # a teacher prompt longer than the student's
    case = dict(lmbda=0.0, divergence="jsd", teacher_prompt_field="hint")
    packed, _ = _trainer("qwen2", tokenizer, data, tmp_path, "packed", **case)
    padded, _ = _trainer("qwen2", tokenizer, data, tmp_path, "padded", packed_forward=False, **case)
    batch = packed.run.stream.next()
    assert (
        batch.teacher_prompt_ids is not None and batch.teacher_prompt_ids.shape[1] > batch.prompt_ids.shape[1]
    )
    padded.run.stream.next()
    _same_step(packed, padded, tmp_path)


def test_a_seq2seq_student_stays_padded_and_the_log_says_why(tokenizer, records, tmp_path):
    def setup(mode):
        lines: list[str] = []
        cfg = base_config(output_dir=str(tmp_path / str(mode)), packed_forward=mode, divergence="nll")
        t5 = build_model(dict(TINY["t5"]), tokenizer, seed=0)
        GKDTrainer(cfg, student=t5, tokenizer=tokenizer, train_records=records[:16], log=lines.append).setup()
        return lines

    lines = setup("auto")
    assert "forwards: the student runs padded (encoder-decoder model" in "\n".join(lines)
    assert not any(line.startswith("forwards: packed") for line in lines)
    with pytest.raises(ConfigError, match="packed_forward: true, but encoder-decoder model"):
        setup(True)


# --- token-budget micro-batches ------------------------------------------------------------------------------


def _cost(batch, packed: bool) -> int:
    if packed:
        return int(batch.prompt_mask.sum() + batch.completion_mask.sum())
    return batch.size * (batch.prompt_ids.shape[1] + batch.completion_ids.shape[1])


def _rows(batch, r):
    p = batch.prompt_ids[r][batch.prompt_mask[r]].tolist()
    c = batch.completion_ids[r][batch.completion_mask[r]].tolist()
    t = batch.teacher_prompt()[0][r][batch.teacher_prompt()[1][r]].tolist()
    return p, c, t, batch.records[r], None if batch.indices is None else batch.indices[r]


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_token_groups_fill_micro_batches_by_tokens_and_keep_every_row_once(
    packed, tokenizer, records, tmp_path
):
    data = [{**r, "hint": "Q"} if i % 2 else r for i, r in enumerate(ragged(records, seed=2))]
    t, _ = _trainer("llama", tokenizer, data, tmp_path, "groups", teacher_prompt_field=None)
    run = t.run
    batches = [run.stream.next() for _ in range(3)]
    want = sorted(str(_rows(b, r)) for b in batches for r in range(b.size))
    for budget in (1, 30, 60, 10_000):
        groups = token_groups(batches, budget, packed=packed)
        picks = [pick for group in groups for pick in group]
        assert sorted(picks) == sorted((b, r) for b in range(3) for r in range(batches[b].size))
        regrouped = [select_rows(batches, group, tokenizer.pad_token_id) for group in groups]
        assert sorted(str(_rows(b, r)) for b in regrouped for r in range(b.size)) == want
        for b in regrouped:
            assert b.size == 1 or _cost(b, packed) <= budget
        if budget == 1:
            assert len(groups) == sum(b.size for b in batches)  # every row alone
        if budget == 10_000:
            assert len(groups) == 1


def _recorded_forward(run):
    """Wrap the run's student forward to record each micro-batch it is handed."""
    seen, real = [], run.student_forward

    def forward(prompt_ids, prompt_mask, completion_ids, completion_mask):
        seen.append((prompt_ids.shape, completion_ids.shape, int(prompt_mask.sum() + completion_mask.sum())))
        return real(prompt_ids, prompt_mask, completion_ids, completion_mask)

    run.student_forward = forward
    return seen


def _same_records(a: dict, b: dict) -> None:
    assert a["on_policy"] == b["on_policy"] and a["lmbda"] == b["lmbda"]
    assert a["completion_tokens"] == b["completion_tokens"] and a["sequences"] == b["sequences"]
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5, abs=1e-6)
    sa, sb = _flat(a["stats"]), _flat(b["stats"])
    assert sa.keys() == sb.keys()
    for key in sa:  # the same values, in another order (the log reports their mean)
        torch.testing.assert_close(sa[key].sort().values, sb[key].sort().values, **TOL)
    if a["rl"]:
        for key in ("reward", "advantage"):
            torch.testing.assert_close(torch.cat(a["rl"][key]), torch.cat(b["rl"][key]))


@pytest.mark.parametrize(
    "case",
    [
        dict(lmbda=0.5, divergence="jsd", beta=0.5, gradient_accumulation_steps=2),
        dict(lmbda=1.0, divergence="reverse_kl", packed_forward=False),
        dict(lmbda=1.0, divergence="jsd", beta=0.9, alpha=0.5, reward="exact_match", kl_to_initial=0.1),
        dict(lmbda=0.0, divergence="forward_kl", reduction="sequence", gradient_accumulation_steps=3),
    ],
    ids=["lambda+accumulation", "on-policy padded", "rl", "sequence-reduction"],
)
def test_steps_by_token_budget_equal_steps_by_sequence_count(case, tokenizer, records, tmp_path):
    """λ's coin, the step's denominator (counted after the rollout), gradient accumulation and the RL advantages:
    a run by token budget takes the same steps as one by sequence count, in smaller micro-batches."""
    data = ragged(records)
    budget, _ = _trainer("llama", tokenizer, data, tmp_path, "budget", max_tokens_per_batch=40, **case)
    plain, _ = _trainer("llama", tokenizer, data, tmp_path, "plain", **case)
    seen = _recorded_forward(budget.run)
    packed = packed_forward_on(budget.run.student)
    for step in range(3):
        _same_records(gkd_step(budget.run, step), gkd_step(plain.run, step))
    accumulation = case.get("gradient_accumulation_steps", 1)
    assert len(seen) > 3 * accumulation  # more, smaller micro-batches than the sequence count gives
    for prompt_shape, completion_shape, real in seen:
        cost = real if packed else prompt_shape[0] * (prompt_shape[1] + completion_shape[1])
        assert prompt_shape[0] == 1 or cost <= 40
    for (n, pa), (_, pb) in zip(budget.run.student.named_parameters(), plain.run.student.named_parameters()):
        torch.testing.assert_close(pa, pb, **TOL, msg=n)


def test_a_run_by_token_budget_resumes_exactly(tokenizer, records, tmp_path):
    """Micro-batches by token count change nothing a checkpoint holds: the stream draws the same batches, so a run
    stopped after step 2 and resumed takes step 3 and 4 as the uninterrupted run does."""
    import json

    data = ragged(records)
    case = dict(lmbda=0.5, divergence="jsd", max_tokens_per_batch=40, max_steps=4, save_steps=2)
    full, _ = _trainer("llama", tokenizer, data, tmp_path, "full", **case)
    full.train()
    part, _ = _trainer("llama", tokenizer, data, tmp_path, "part", **case)
    real_step = part.train_step

    def step_then_stop():
        if part.step == 2:
            raise KeyboardInterrupt  # as if Ctrl-C arrived during step 3
        return real_step()

    part.train_step = step_then_stop
    with pytest.raises(TrainingInterrupted):
        part.train()
    resumed, _ = _trainer("llama", tokenizer, data, tmp_path, "part", **case, resume_from_checkpoint="latest")
    resumed.train()

    def losses(name):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x)["loss"] for x in lines if '"loss"' in x]

    assert losses("part") == pytest.approx(losses("full"), rel=1e-6)
    for (n, pa), (_, pb) in zip(full.run.student.named_parameters(), resumed.run.student.named_parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=n)


def test_max_tokens_per_batch_is_checked_before_any_model_loads():
    with pytest.raises(ConfigError, match="'max_tokens_per_batch' must be a positive integer"):
        base_config(max_tokens_per_batch=0)
    with pytest.raises(ConfigError, match="'max_tokens_per_batch' cannot be used with fsdp"):
        base_config(max_tokens_per_batch=512, fsdp=True)
