"""The sweep refuses settings it cannot honour, before any training."""

from __future__ import annotations

import json

import pytest

from simulations.run import check_config, parse_args


def test_unknown_keys_and_fixed_noise_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="unknown sweep keys"):
        check_config(parse_args(["--set", "lora-rank=4"]), tmp_path / "a.json")
    with pytest.raises(SystemExit, match="noise-multiplier"):
        check_config(parse_args(["--set", "noise-multiplier=1.0"]), tmp_path / "b.json")


def test_resuming_with_other_settings_is_refused_but_more_seeds_are_fine(tmp_path):
    saved = tmp_path / "sweep-config.json"
    check_config(parse_args(["--rounds", "3"]), saved)
    check_config(parse_args(["--rounds", "3", "--seeds", "0,1,2", "--epsilons", "1,8,inf"]), saved)
    with pytest.raises(SystemExit, match="rounds"):
        check_config(parse_args(["--rounds", "5"]), saved)
    assert json.loads(saved.read_text())["rounds"] == 3  # nothing was changed
