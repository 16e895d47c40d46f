"""RL + GKD: detached, masked advantages; α = 1 is plain GKD; constant rewards give no policy gradient; the
reverse-KL-as-reward estimator agrees with the exact reverse-KL gradient on a tiny model."""

from __future__ import annotations

import pytest
import torch
from conftest import base_config, make_model
from tiny import micro_batch_loss

from gkd.data import Batch, collate, tokenize_records
from gkd.models import score_positions
from gkd.rl import compute_advantages, compute_rewards, discounted_returns, load_reward
from gkd.step import student_samples
from gkd.trainer import GKDTrainer


def _trainer(tokenizer, records, tmp_path, reward_fn=None, **cfg):
    student = make_model("llama_student", tokenizer, seed=1)
    teacher = make_model("llama_teacher", tokenizer, seed=0)
    config = base_config(output_dir=str(tmp_path / "out"), lmbda=1.0, **cfg)
    t = GKDTrainer(
        config,
        student=student,
        teacher=teacher,
        tokenizer=tokenizer,
        train_records=records,
        reward_fn=reward_fn,
    )
    t.setup()
    return t


def _grads(t: GKDTrainer, batch: Batch, adv: torch.Tensor | None) -> torch.Tensor:
    t.optimizer.zero_grad(set_to_none=True)
    micro_batch_loss(t.run, batch, float(batch.num_tokens()), advantages=adv).backward()
    return torch.cat([p.grad.flatten() for p in t.student.parameters() if p.grad is not None])


@pytest.mark.parametrize("mode", ["group", "rloo"])
def test_constant_rewards_give_zero_advantages(mode):
    adv = compute_advantages(torch.full((12,), 0.7), group_size=4, mode=mode)
    assert torch.equal(adv, torch.zeros(12))


def test_advantages_group_and_rloo_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 1.0])
    g = compute_advantages(r, group_size=3, mode="group")
    expected = torch.tensor([2 / 3, -1 / 3, -1 / 3]) / torch.tensor([1.0, 0.0, 0.0]).std(unbiased=False)
    torch.testing.assert_close(g[:3], expected, rtol=1e-4, atol=1e-5)
    loo = compute_advantages(r, group_size=3, mode="rloo")
    torch.testing.assert_close(loo, torch.tensor([1.0, -0.5, -0.5, -1.0, 2.0, -1.0]))
    assert not g.requires_grad


def test_advantages_are_detached_even_from_a_graph():
    r = torch.tensor([1.0, 2.0, 4.0, 0.0], requires_grad=True) * 2
    assert not compute_advantages(r, 2, "group").requires_grad


def test_policy_gradient_ignores_padding_and_post_eos_tokens(tokenizer, records, tmp_path):
    """Changing ids at masked completion positions does not change the RL + GKD gradient."""
    t = _trainer(tokenizer, records, tmp_path, alpha=0.3, reward="exact_match", divergence="jsd", beta=0.9)
    data = tokenize_records(records[:4], tokenizer, max_prompt_length=64, max_completion_length=16)
    batch = collate(data.examples, tokenizer.pad_token_id)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    g1 = _grads(t, batch, adv)
    noisy = batch.completion_ids.clone()
    noisy[~batch.completion_mask] = 5
    g2 = _grads(
        t, Batch(batch.prompt_ids, batch.prompt_mask, noisy, batch.completion_mask, batch.records), adv
    )
    torch.testing.assert_close(g1, g2)


def test_alpha_one_equals_plain_on_policy_gkd(tokenizer, records, tmp_path):
    """With α = 1 the reward is logged but the update is exactly the on-policy GKD update."""
    plain = _trainer(tokenizer, records, tmp_path / "plain", divergence="jsd", beta=0.9)
    rl = _trainer(
        tokenizer, records, tmp_path / "rl", divergence="jsd", beta=0.9, alpha=1.0, reward="exact_match"
    )
    for _ in range(2):
        a, b = plain.train_step(), rl.train_step()
        assert "reward_mean" in b and "reward_mean" not in a
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    for p, q in zip(plain.student.parameters(), rl.student.parameters()):
        torch.testing.assert_close(p, q)


def test_constant_reward_leaves_only_the_scaled_distillation_gradient(tokenizer, records, tmp_path):
    t = _trainer(tokenizer, records, tmp_path, alpha=0.25, reward="exact_match", divergence="reverse_kl")
    batch = student_samples(t.run, t.stream.next())
    zero_adv = compute_advantages(torch.ones(batch.size), 1, "group")
    g_rl = _grads(t, batch, zero_adv)
    plain = _trainer(tokenizer, records, tmp_path / "p", divergence="reverse_kl")
    plain.student.load_state_dict(t.student.state_dict())
    g_gkd = _grads(plain, batch, None)
    torch.testing.assert_close(g_rl, 0.25 * g_gkd, rtol=1e-5, atol=1e-8)


def test_rewards_reach_metrics_and_group_samples(tokenizer, records, tmp_path):
    seen = {}

    def reward(prompts, completions, recs):
        seen["n"] = len(completions)
        return [float(len(c.split())) for c in completions]

    t = _trainer(
        tokenizer,
        records,
        tmp_path,
        alpha=0.5,
        reward="my:len",
        reward_fn=reward,
        num_generations=4,
        advantage="rloo",
        divergence="jsd",
        beta=0.9,
    )
    rec = t.train_step()
    assert seen["n"] == 8  # per_device_train_batch_size counts completions (TRL): 2 prompts x 4 samples
    for key in ("reward_mean", "reward_std", "advantage_mean", "advantage_std"):
        assert key in rec
    assert rec["advantage_mean"] == pytest.approx(0.0, abs=1e-5)


def test_builtin_rewards_score_per_completion():
    rec = {"prompt": "Q a B C d :", "completion": "b c", "references": ["b c", "c b"]}
    assert compute_rewards(
        load_reward("set_match"), "set_match", ["p"] * 2, ["c b", "b b"], [rec] * 2
    ).tolist() == [1.0, 0.0]
    assert compute_rewards(load_reward("faithfulness"), "faithfulness", ["p"], ["b z"], [rec]).tolist() == [
        0.5
    ]
    assert compute_rewards(load_reward("exact_match"), "exact_match", ["p"], ["c b"], [rec]).tolist() == [1.0]
    assert 0.0 <= float(compute_rewards(load_reward("rouge2"), "rouge2", ["p"], ["b c"], [rec])[0]) <= 1.0


def test_builtin_rewards_are_the_metrics_per_example():
    """Rewards reuse the metrics: same scale (metric / 100), same tokenisation, on every record format."""
    from gkd.metrics import final_answer, rouge2

    rec = {"prompt": "p", "completion": "The cat sat on the mat"}
    pred = "the cat sat on a mat"
    got = compute_rewards(
        load_reward("rouge2"), "rouge2", ["p"], [pred], [rec]
    )  # real text: rouge-score's tokenizer
    assert (
        float(got[0]) == pytest.approx(rouge2([pred], [rec], tokenize="standard") / 100) == pytest.approx(0.6)
    )
    spaces = compute_rewards(load_reward("rouge2", tokenize="whitespace"), "rouge2", ["p"], [pred], [rec])
    assert (
        float(spaces[0])
        == pytest.approx(rouge2([pred], [rec], tokenize="whitespace") / 100)
        == pytest.approx(0.4)
    )
    chain = "4 7 + 1 8 = 6 5 ; 6 5 + 2 5 = 9 0 ; #### 9 0"
    msgs = {
        "messages": [
            {"role": "user", "content": "4 7 + 1 8 + 2 5 ="},
            {"role": "assistant", "content": chain},
        ]
    }
    preds = ["1 8 + 2 5 = 4 3 ; 4 3 + 4 7 = 9 0 ; #### 9 0", "#### 9 1"]
    values = compute_rewards(load_reward("final_answer"), "final_answer", ["p"] * 2, preds, [msgs] * 2)
    assert values.tolist() == [1.0, 0.0] == [final_answer([p], [msgs]) / 100 for p in preds]
    assert compute_rewards(
        load_reward("chain_valid"), "chain_valid", ["p"] * 2, preds, [msgs] * 2
    ).tolist() == [
        1.0,
        0.0,
    ]
    summ = {"messages": [{"role": "user", "content": "Q a B C d :"}, {"role": "assistant", "content": "b c"}]}
    assert compute_rewards(load_reward("item_f1"), "item_f1", ["p"], ["b"], [summ]).tolist() == [
        pytest.approx(2 / 3)
    ]


def test_unknown_reward_names_suggest_the_closest():
    from gkd.errors import ConfigError

    with pytest.raises(ConfigError, match="did you mean 'faithfulness'"):
        load_reward("faithfullness")


def test_discounted_returns():
    per_tok = torch.tensor([[1.0, 2.0, 3.0, 9.0]])
    mask = torch.tensor([[True, True, True, False]])
    torch.testing.assert_close(
        discounted_returns(per_tok, mask, 0.5), torch.tensor([[1 + 1 + 0.75, 2 + 1.5, 3.0, 0.0]])
    )
    torch.testing.assert_close(discounted_returns(per_tok, mask, 0.0), torch.tensor([[1.0, 2.0, 3.0, 0.0]]))


def test_sampled_reverse_kl_reward_matches_the_exact_gradient_on_average(tokenizer, records, tmp_path):
    """E_y~p_S[ sg(log q(y) - log p(y)) ∇ log q(y) ] = ∇ KL(q || p), checked on the tiny model's own samples.

    Both losses use the same student samples; their gradients are compared over many samples, with a tolerance of a
    few standard errors estimated from independent groups of samples.
    """
    torch.manual_seed(0)
    exact = _trainer(tokenizer, records, tmp_path / "e", divergence="reverse_kl", max_new_tokens=2)
    sampled = _trainer(
        tokenizer,
        records,
        tmp_path / "s",
        divergence="reverse_kl",
        teacher_kl_estimator="sampled",
        max_new_tokens=2,
    )
    sampled.student.load_state_dict(exact.student.state_dict())
    data = tokenize_records(records[:1], tokenizer, max_prompt_length=64, max_completion_length=4)
    groups = 20
    diffs, exact_grads = [], []
    for k in range(groups):
        batch = collate(data.examples * 256, tokenizer.pad_token_id)
        exact.run.rollout_gen.manual_seed(1000 + k)
        roll = student_samples(exact.run, batch)
        ge = _grads(exact, roll, None)
        gs = _grads(sampled, roll, None)
        diffs.append(gs - ge)
        exact_grads.append(ge)
    d = torch.stack(diffs)
    mean, se = d.mean(0), d.std(0) / groups**0.5
    scale = torch.stack(exact_grads).mean(0).abs()
    z = (mean.abs() / (se + 1e-3 * scale.max())).max()
    assert z < 5.0, f"max |z| = {z:.2f}"
    # and the estimator is not trivially equal: single groups differ from the exact gradient
    assert d.abs().max() > 1e-6


def test_rl_runs_log_the_kl_to_the_initial_student(tokenizer, records, tmp_path):
    t = _trainer(
        tokenizer,
        records,
        tmp_path,
        alpha=0.5,
        reward="exact_match",
        divergence="jsd",
        beta=0.9,
        learning_rate=5e-2,
    )
    first = t.train_step()
    assert first["kl_to_initial"] == pytest.approx(0.0, abs=1e-6)  # step 1 scores the initial weights
    later = [t.train_step() for _ in range(3)]
    assert later[-1]["kl_to_initial"] > 0.0
    assert "gen_len" in later[-1] and "reverse_kl" in later[-1]


def test_rlef_star_trains_without_a_teacher(tokenizer, records, tmp_path):
    """alpha = 0 with kl_to_initial: policy gradient regularised toward the initial student, no teacher needed."""
    student = make_model("llama_student", tokenizer, seed=1)
    cfg = base_config(
        output_dir=str(tmp_path / "out"),
        lmbda=1.0,
        alpha=0.0,
        reward="exact_match",
        kl_to_initial=0.1,
        divergence="reverse_kl",
    )
    t = GKDTrainer(cfg, student=student, tokenizer=tokenizer, train_records=records)
    t.setup()
    assert t.teacher is None and t.run.reference is not None
    rec = t.train_step()
    assert "reward_mean" in rec and rec["kl_to_initial"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("fused", [True, False], ids=["hidden states + head", "logits"])
def test_discounted_returns_from_the_scored_outputs_equal_a_second_full_logits_pass(
    tokenizer, records, tmp_path, fused
):
    """The discounted reverse-KL returns come from the scores the step already has (no second forward pass of
    either model); they equal the earlier way of forming them, one more full-logits forward of the student and of
    the teacher."""
    t = _trainer(
        tokenizer,
        records,
        tmp_path,
        divergence="reverse_kl",
        teacher_kl_estimator="sampled",
        rkl_discount=0.9,
    )
    run = t.run
    batch = student_samples(run, run.stream.next())
    inputs = (batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask)
    with torch.no_grad():
        p_s = score_positions(t.student, *inputs, vocab=run.vocab, fused=fused)
        p_t = run.teacher.view(batch)
        got = run.objective.discounted_rkl_returns(batch, p_s, p_t)
        # the earlier path: full logits of both models at the valid positions
        s_logits = score_positions(t.student, *inputs, vocab=run.vocab, fused=False).logits
        t_logits = score_positions(run.teacher.model, *inputs, vocab=run.vocab, fused=False).logits
    valid = batch.completion_mask
    y = batch.completion_ids[valid]
    lq = torch.log_softmax(s_logits.float(), -1).gather(-1, y[:, None]).squeeze(-1)
    lp = torch.log_softmax(t_logits.float(), -1).gather(-1, y[:, None]).squeeze(-1)
    per_token = torch.zeros(valid.shape)
    per_token[valid] = lp - lq
    expected = discounted_returns(per_token, valid, 0.9)[valid]
    assert got.shape == expected.shape and expected.abs().sum() > 0
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
