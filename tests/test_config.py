"""One config for run config, TOML and CLI: coercion and clear errors."""

from __future__ import annotations

import argparse
import math
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

from clients.policy import SIM_PREFIX, SitePolicy
from fedllm.config import (
    FEDERATED_DEFAULTS,
    SETTING_TYPES,
    Settings,
    add_settings_arguments,
    flower_defaults,
    settings_from,
)
from server.robust import RobustSettings


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


def _flower_table() -> dict:
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    return tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"]


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return f'"{value}"' if isinstance(value, str) else repr(value)


def test_the_flower_app_config_declares_every_setting_with_its_default():
    """Flower refuses a run whose config has keys the app does not declare ('Invalid run
    configuration'), and a run without overrides trains with the table's values: the table must
    hold fedllm.config's defaults (FEDERATED_DEFAULTS over Settings), key by key."""
    table = _flower_table()
    wrong = []
    for key, default in flower_defaults().items():
        if key not in table:
            wrong.append(f"{key}: not declared; add {key} = {_toml(default)}")
        elif table[key] != default or type(table[key]) is not type(default):
            wrong.append(
                f"{key} = {_toml(table[key])}, but fedllm/config.py's default is {_toml(default)}: "
                f"write {key} = {_toml(default)} (or change the default in fedllm/config.py)"
            )
    assert not wrong, "pyproject.toml [tool.flwr.app.config]:\n" + "\n".join(wrong)


def test_the_server_and_simulated_site_keys_hold_their_readers_defaults():
    """The robust aggregation keys are RobustSettings' defaults and the sim-site-* keys the
    SitePolicy defaults: a run without overrides behaves as those classes say."""
    table = _flower_table()
    robust, default = RobustSettings.from_run_config(table), RobustSettings()
    wrong = []
    for f in fields(RobustSettings):
        key, want = f.name.replace("_", "-"), getattr(default, f.name)
        if key not in table:
            wrong.append(f"{key}: not declared; server/robust.py reads it (default {want!r}): declare it")
        elif getattr(robust, f.name) != want:
            wrong.append(
                f"{key} = {_toml(table[key])} reads as {getattr(robust, f.name)!r}, but server/robust.py's "
                f"default is {want!r}: declare the default"
            )
    policy = SitePolicy.from_config(table, SIM_PREFIX)
    declared = [f for f in fields(SitePolicy) if SIM_PREFIX + f.name.replace("_", "-") in table]
    wrong += [
        f"{SIM_PREFIX}{f.name.replace('_', '-')}: reads as {getattr(policy, f.name)!r}, clients/policy.py's "
        f"default is {getattr(SitePolicy(), f.name)!r}: declare the default"
        for f in declared
        if getattr(policy, f.name) != getattr(SitePolicy(), f.name)
    ]
    assert not wrong, "pyproject.toml [tool.flwr.app.config]:\n" + "\n".join(wrong)
    assert policy == SitePolicy()
    assert len(declared) == 5  # every limit a site sets in its node config, for the virtual sites


def test_federated_defaults_are_settings():
    assert set(FEDERATED_DEFAULTS) <= set(SETTING_TYPES)
    assert settings_from(flower_defaults()) == Settings(**{k: v for k, v in FEDERATED_DEFAULTS.items()})
