"""GKDConfig: every bad key, type or value is rejected before any model loads, with one line naming it."""

from __future__ import annotations

import pytest

from gkd.config import GKDConfig, config_from_dict, load_config, parse_overrides
from gkd.errors import ConfigError


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"lmbd": 0.5}, "did you mean 'lmbda'"),
        ({"learning_rat": 1e-4}, "did you mean 'learning_rate'"),
        ({"lmbda": "half"}, "'lmbda' must be float"),
        ({"lmbda": 1.5}, "'lmbda' must be in [0, 1]"),
        ({"lmbda": -0.1}, "'lmbda' must be in [0, 1]"),
        ({"beta": 1.2, "jsd_normalize": True}, "'beta' must be in [0, 1]"),
        ({"divergence": "kl"}, "'divergence' must be one of"),
        ({"divergence": "revers_kl"}, "did you mean 'reverse_kl'"),
        ({"learning_rate": 0.0}, "'learning_rate' must be > 0"),
        ({"learning_rate": -1e-4}, "'learning_rate' must be > 0"),
        ({"per_device_train_batch_size": 0}, "'per_device_train_batch_size' must be a positive integer"),
        ({"max_steps": 0}, "'max_steps' must be a positive integer"),
        ({"max_new_tokens": 0}, "'max_new_tokens' must be a positive integer"),
        ({"max_new_tokens": -3}, "'max_new_tokens' must be a positive integer"),
        ({"temperature": 0}, "'temperature' must be > 0"),
        ({"top_p": 0.0}, "'top_p' must be in (0, 1]"),
        ({"reduction": "mean"}, "'reduction' must be one of 'token', 'sequence'"),
        ({"lr_scheduler_type": "step"}, "'lr_scheduler_type' must be one of"),
        ({"lora": {"rank": 8}}, "did you mean 'lora.r'"),
        ({"lora": {"r": 0}}, "'lora.r' must be a positive integer"),
        ({"alpha": 0.5}, "needs a 'reward'"),
        ({"alpha": 0.5, "reward": "rouge2", "lmbda": 0.5}, "set lmbda: 1"),
        ({"skew_alpha": 1.0, "divergence": "skew_forward_kl"}, "skew_alpha must be in [0, 1)"),
        ({"max_steps": True}, "'max_steps' must be int"),
        ({"teacher_kl_estimator": "sampled", "divergence": "jsd"}, "set divergence: reverse_kl"),
    ],
)
def test_bad_values_are_rejected_with_the_key(data: dict, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict(data)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_valid_presets_build() -> None:
    GKDConfig(divergence="nll", lmbda=0.0)
    GKDConfig(divergence="forward_kl", lmbda=0.0)
    GKDConfig(divergence="jsd", beta=0.9, lmbda=1.0)
    GKDConfig(divergence="jsd", beta=0.0, jsd_normalize=True)
    GKDConfig(lmbda=1.0, alpha=0.5, reward="rouge2", num_generations=4)
    cfg = GKDConfig(lora={"r": 4})
    assert cfg.lora is not None and cfg.lora.r == 4


def test_overrides_parse_yaml_values_and_nested_keys() -> None:
    assert parse_overrides(["lmbda=0.5", "seq_kd=true", "lora.r=8", "report_to=[tensorboard]"]) == {
        "lmbda": 0.5,
        "seq_kd": True,
        "lora": {"r": 8},
        "report_to": ["tensorboard"],
    }
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["lmbda"])


def test_yaml_file_and_overrides(tmp_path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("lmbda: 0.25\nbeta: 0.9\nlora:\n  r: 4\n")
    cfg = load_config(path, ["beta=0.1", "lora.alpha=8"])
    assert (cfg.lmbda, cfg.beta, cfg.lora.r, cfg.lora.alpha) == (0.25, 0.1, 4, 8)


def test_missing_and_broken_config_files(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lmbda: [0.5\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)
