"""The sweep refuses settings it cannot honour, before any training."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from simulations.run import build_parser, check_config, parse_args


def test_unknown_keys_and_fixed_noise_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="unknown sweep keys"):
        check_config(parse_args(["--set", "lora-rank=4"]), tmp_path / "a.json")
    with pytest.raises(SystemExit, match="noise-multiplier"):
        check_config(parse_args(["--set", "noise-multiplier=1.0"]), tmp_path / "b.json")


def test_resuming_with_other_settings_is_refused_but_more_seeds_are_fine(tmp_path):
    saved = tmp_path / "sweep-config.json"
    check_config(parse_args(["--rounds", "3"]), saved)
    check_config(parse_args(["--rounds", "3", "--seeds", "0,1,2", "--epsilons", "1,8,inf"]), saved)
    check_config(parse_args(["--rounds", "3", "--gpus-per-site", "0.25", "--cpus-per-site", "1"]), saved)
    with pytest.raises(SystemExit, match="rounds"):
        check_config(parse_args(["--rounds", "5"]), saved)
    assert json.loads(saved.read_text())["rounds"] == 3  # nothing was changed


def test_every_flag_the_readme_documents_for_sweeps_is_accepted():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Privacy sweeps", 1)[1].split("\n## ", 1)[0]
    code = section.split("```bash", 1)[1].split("```", 1)[0]  # the sweep commands
    inline = " ".join(s for s in re.findall(r"`([^`\n]+)`", section) if s.startswith("--"))
    documented = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*[a-z]", code + " " + inline))
    known = set(build_parser()._option_string_actions)
    assert documented, "the README's sweep section names no flags"
    assert sorted(documented - known) == []
    config = parse_args(["--cpus-per-site", "1", "--gpus-per-site", "0.25"])
    assert (config["cpus-per-site"], config["gpus-per-site"]) == (1, 0.25)
