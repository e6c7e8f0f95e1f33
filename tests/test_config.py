"""One config for run config, TOML and CLI: coercion and clear errors."""

from __future__ import annotations

import argparse
import math

import pytest

from fedllm.config import Settings, add_settings_arguments, settings_from


def test_hyphenated_keys_and_string_values_are_coerced():
    s = settings_from(
        {"lora-r": "16", "target-epsilon": "inf", "class-weighting": "false", "num-server-rounds": 3}
    )
    assert s.lora_r == 16 and math.isinf(s.target_epsilon) and s.class_weighting is False
    assert not s.private
    assert settings_from({"noise-multiplier": 1.2, "target-epsilon": math.inf}).private


def test_invalid_values_name_the_key_and_the_fix():
    with pytest.raises(ValueError, match=r"pooling='max'.*'mean' or 'cls'"):
        settings_from({"pooling": "max"})
    with pytest.raises(ValueError, match="setting lora-r: expected int"):
        settings_from({"lora-r": "eight"})
    with pytest.raises(ValueError, match="target-epsilon"):
        settings_from({"target-epsilon": 0})


def test_cli_flags_mirror_the_settings():
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    args = vars(parser.parse_args(["--lora-targets", "query,key", "--max-grad-norm", "0.5"]))
    s = settings_from(args)
    assert s.lora_target_list == ["query", "key"] and s.max_grad_norm == 0.5
    assert s.to_dict()["lora-targets"] == "query,key"
    assert settings_from(s.to_dict()) == s == Settings(lora_targets="query,key", max_grad_norm=0.5)


def test_every_setting_is_declared_in_the_flower_app_config():
    """Flower refuses a run whose config has keys the app does not declare ('Invalid run
    configuration'): a setting missing from pyproject.toml would make every sweep point fail."""
    import tomllib
    from pathlib import Path

    from fedllm.config import Settings

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    declared = set(tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"])
    assert sorted(set(Settings().to_dict()) - declared) == []
