"""The statistics every study report uses (t-based intervals of paired differences), the undo variant of the
summarization task (the regime of the demo), and the method phase's schedule and learning-rate selection."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from scipy import stats

from gkd.experiments.study import (
    Recipe,
    StudySettings,
    excludes_zero,
    fmt_ci,
    job_config,
    paired_ci,
    selection_score,
    t_interval,
)
from gkd.tasks import get_task
from gkd.tasks.summarization import UNDO, best_continuation, canonical_items, set_match_score

# --------------------------------------------------------------------------------------------------- statistics


def test_t_interval_matches_a_hand_computed_case():
    # values 1, 2, 3, 4, 5: mean 3, SD sqrt(2.5), SE sqrt(0.5); t(0.975, 4) = 2.776445
    ci = t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    se = 0.5**0.5
    assert ci["mean"] == 3.0 and ci["se"] == pytest.approx(se)
    assert ci["lo"] == pytest.approx(3.0 - 2.776445 * se, abs=1e-5)
    assert ci["hi"] == pytest.approx(3.0 + 2.776445 * se, abs=1e-5)
    assert ci["p"] == pytest.approx(stats.ttest_1samp([1, 2, 3, 4, 5], 0.0).pvalue)
    assert excludes_zero(ci) and ci["n"] == 5


def test_paired_ci_is_the_paired_t_test():
    rng = random.Random(0)
    a = [rng.gauss(1.0, 1.0) for _ in range(5)]
    b = [x - rng.gauss(0.3, 0.5) for x in a]
    ci = paired_ci(a, b)
    assert ci["p"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert ci["mean"] == pytest.approx(sum(x - y for x, y in zip(a, b)) / 5)


def test_three_seeds_at_two_se_is_not_significant():
    # the science review's point: with n = 3, a mean of 2 SE has p ≈ 0.18 and its 95 % interval includes 0
    a = 2 / 3**0.5  # values a-1, a, a+1: SD 1, SE 1/sqrt(3), so mean / SE = 2
    two_se = t_interval([a - 1, a, a + 1])
    assert two_se["mean"] / two_se["se"] == pytest.approx(2.0)
    assert not excludes_zero(two_se) and two_se["p"] == pytest.approx(2 * stats.t.sf(2.0, 2))
    assert 0.18 < two_se["p"] < 0.19


def test_degenerate_intervals_and_formatting():
    assert t_interval([2.0])["lo"] == t_interval([2.0])["hi"] == 2.0 and not excludes_zero(t_interval([2.0]))
    assert t_interval([0.0, 0.0])["p"] == 1.0
    with pytest.raises(ValueError, match="as many values"):
        paired_ci([1.0], [1.0, 2.0])
    assert fmt_ci({"mean": 1.25, "se": 0.5, "lo": -0.1, "hi": 2.6}) == "+1.2 ± 0.5 [-0.1, +2.6]"


# --------------------------------------------------------------------------------------------------- undo task


def test_the_undo_token_takes_the_previous_item_back_in_every_metric():
    assert canonical_items("d x < a c") == ["d", "a", "c"]
    assert canonical_items("< a a < b") == ["a", "b"]  # a leading undo deletes nothing
    assert canonical_items("a b < <") == []
    record = {"prompt": "Q z A x B y :", "completion": "a b"}
    assert set_match_score(record, "a x < b") == 1.0
    assert set_match_score(record, "a x b") == 0.0
    assert set_match_score(record, "a b <") == 0.0


def test_noisy_records_finish_any_partial_answer_the_best_way():
    task = get_task("summarization", undo=True, noisy_prefix_prob=1.0)
    clean = get_task("summarization", undo=True)
    records = task.generate("train", 300, 0)
    n_undo = 0
    for noisy, plain in zip(records, clean.generate("train", 300, 0)):
        assert noisy["prompt"].startswith(plain["prompt"])  # the same clean records underneath
        written = noisy["prompt"][len(plain["prompt"]) :].split()
        completion = noisy["completion"].split()
        # the partial answer then the completion is exactly the salient set: the completion steers back
        assert set_match_score(plain, " ".join([*written, *completion])) == 1.0
        # and it undoes no more than it must: every undo comes first, and only while a mistake is still listed
        k = sum(t == UNDO for t in completion)
        assert completion[:k] == [UNDO] * k and UNDO not in completion[k:]
        if k:
            n_undo += 1
            assert set_match_score(plain, " ".join([*written, *[UNDO] * (k - 1), *completion[k:]])) == 0.0
    assert n_undo > 100  # most noisy answers hold a mistake to take back
    assert UNDO in task.vocabulary() and UNDO not in get_task("summarization").vocabulary()
    with pytest.raises(ValueError, match="needs undo"):
        get_task("summarization", noisy_prefix_prob=0.5)


def test_best_continuation_hand_cases():
    prompt = "Q z A x B y C :"
    rng = random.Random(0)
    assert sorted(best_continuation(prompt, [], rng)) == ["a", "b", "c"]
    assert best_continuation(prompt, ["a", "x"], rng)[0] == UNDO and set(
        best_continuation(prompt, ["a", "x"], rng)[1:]
    ) == {"b", "c"}
    assert best_continuation(prompt, ["a", "a", "b"], rng)[:2] == [UNDO, UNDO]  # back to the repeat
    assert sorted(best_continuation(prompt, ["a", "x", "<", "b"], rng)) == ["c"]  # a mistake already undone
    assert sorted(best_continuation(prompt, ["a", "b", "<"], rng)) == [
        "b",
        "c",
    ]  # a right item undone: list it again


def test_half_noisy_data_keeps_the_clean_records_and_mixes_in_the_noisy_ones():
    task = get_task("summarization", undo=True, noisy_prefix_prob=0.5)
    records = task.generate("train", 400, 0)
    noisy = sum(r["completion"].startswith(UNDO) for r in records)
    assert 150 < noisy < 250


# --------------------------------------------------------------------------------------------------- method phase


def test_the_method_phase_decays_to_zero_and_takes_the_chosen_rate():
    s = StudySettings(method_steps=300, method_lr=1e-3)
    cfg = job_config(Recipe("on_policy_reverse_kl"), 0, Path("out"), s)
    assert cfg["lr_scheduler_type"] == "linear" and cfg["warmup_steps"] == 20
    assert cfg["learning_rate"] == 1e-3
    assert job_config(Recipe("on_policy_reverse_kl"), 0, Path("out"), s, 3e-4)["learning_rate"] == 3e-4
    # a recipe that sets its own rate keeps it
    fixed = Recipe("on_policy_reverse_kl", {"learning_rate": 5e-4})
    assert job_config(fixed, 0, Path("out"), s, 3e-3)["learning_rate"] == 5e-4


def test_the_schedule_ends_at_zero():
    import torch

    from gkd.build import lr_scheduler
    from gkd.config import config_from_dict, training_plan

    cfg = config_from_dict(job_config(Recipe("sft"), 0, Path("out"), StudySettings(method_steps=100)))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.learning_rate)
    sched = lr_scheduler(opt, cfg, training_plan(cfg, 10_000))
    lrs = []
    for _ in range(cfg.max_steps):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert max(lrs) == pytest.approx(cfg.learning_rate, rel=0.05) and lrs[-1] == 0.0


def test_selection_score_is_the_mean_of_greedy_and_sampled():
    assert selection_score({"greedy": {"m": 80.0}, "sample": {"m": 60.0}}, "m") == 70.0
