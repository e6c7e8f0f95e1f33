"""The sweep's command line and TOML keys: every documented command and former flag still works,
and the sweep refuses settings it cannot honour, before any training."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from simulations.sweep_config import (
    PRESETS,
    SweepOptions,
    check_config,
    parse_args,
    sweep_settings,
)

ROOT = Path(__file__).resolve().parents[1]


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


def _documented_commands() -> list[tuple[str, list[str]]]:
    """Every ``python -m simulations.run ...`` in README.md and docs/*.md: lines of code blocks
    (comments dropped, continued lines joined) and inline code spans."""
    found = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text()
        blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)
        lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
        prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
        spans = [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose)]
        for command in lines + spans:
            match = re.search(r"python -m simulations\.run\b(.*)", command)
            if match:
                found.append((f"{doc.name}: {command.strip()}", shlex.split(match[1], comments=True)))
    return found


def test_every_documented_sweep_command_parses_and_resolves(tmp_path, monkeypatch, capsys):
    """Each command the docs show parses with the real parser, and its keys resolve to a valid
    sweep (the sweep's own keys and the fine-tune settings), as the sweep checks them."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sweep.toml").write_text("sites = 20\n")  # the docs' --config sweep.toml
    commands = _documented_commands()
    assert any(argv for _, argv in commands), "the docs show no sweep command with flags"
    failed = []
    for i, (where, argv) in enumerate(commands):
        try:
            config = parse_args(argv)
            check_config(config, tmp_path / f"{i}.json")
            SweepOptions.from_config(config)
            sweep_settings(config)
        except (SystemExit, ValueError) as err:
            said = capsys.readouterr().err.strip().splitlines()  # argparse: usage, then the error
            failed.append(f"{where} -> {said[-1] if said else err}")
    assert not failed, "\n".join(failed)


# every flag of the sweep from before its flags were derived from Settings: the key it sets and
# the value (and type: a resumed sweep compares the saved config) it sets there
FORMER_FLAGS = [
    (["--preset", "drugs"], "preset", "drugs"),
    (["--out", "runs/x"], "out", "runs/x"),
    (["--sites", "20"], "sites", 20),
    (["--sites-per-round", "5"], "sites-per-round", 5),
    (["--rounds", "3"], "rounds", 3),
    (["--epochs", "2"], "epochs", 2),
    (["--local-steps", "3"], "max-steps", 3),
    (["--central-epochs", "2"], "central-epochs", 2),
    (["--cpus-per-site", "1"], "cpus-per-site", 1),
    (["--gpus-per-site", "0.25"], "gpus-per-site", 0.25),
    (["--no-centralized"], "no-centralized", True),
    (["--site-eval"], "site-eval", True),
    (["--partitioning", "natural"], "partitioning", "natural"),
    (["--dirichlet-alpha", "0.5"], "dirichlet-alpha", 0.5),
    (["--partition-column", "desk"], "partition-column", "desk"),
    (["--epsilons", "1,inf"], "epsilons", "1,inf"),
    (["--delta", "1e-6"], "delta", 1e-6),
    (["--max-grad-norm", "0.5"], "max-grad-norm", 0.5),
    (["--seeds", "0,1"], "seeds", "0,1"),
    (["--model", "bert"], "model", "bert"),
    (["--dataset", "my.csv"], "dataset", "my.csv"),
    (["--test-file", "test.csv"], "test-file", "test.csv"),
    (["--text-column", "body"], "text-column", "body"),
    (["--label-column", "topic"], "label-column", "topic"),
    (["--max-length", "64"], "max-length", 64),
    (["--batch-size", "16"], "batch-size", 16),
    (["--lr", "0.01"], "lr", 0.01),
    (["--set", "lora-r=4"], "lora-r", "4"),
]


@pytest.mark.parametrize(("argv", "key", "value"), FORMER_FLAGS, ids=[a[0] for a, _, _ in FORMER_FLAGS])
def test_every_former_flag_sets_the_same_key_and_value(argv, key, value):
    config = parse_args(argv)
    assert (config[key], type(config[key])) == (value, type(value))


def test_every_setting_is_a_flag_with_its_type_and_the_preset_fills_the_rest():
    config = parse_args(["--trainable", "lora", "--class-weighting", "false", "--lora-r", "4"])
    assert (config["trainable"], config["class-weighting"], config["lora-r"]) == ("lora", False, 4)
    assert {k: config[k] for k in PRESETS["default"]} == PRESETS["default"]
    with pytest.raises(SystemExit):  # argparse: "invalid true_or_false value: 'maybe'"
        parse_args(["--class-weighting", "maybe"])
    with pytest.raises(SystemExit):  # a point sets its own budget: --epsilons
        parse_args(["--target-epsilon", "3"])


def test_every_preset_is_a_valid_sweep(tmp_path):
    assert sorted(PRESETS) == ["bbc-dirichlet", "bbc-iid", "default", "drugs"]
    for name in PRESETS:
        config = parse_args(["--preset", name])
        check_config(config, tmp_path / f"{name}.json")
        options, settings = SweepOptions.from_config(config), sweep_settings(config)
        assert options.per_round == options.sites and settings.epochs == 1, name


def test_config_files_and_sweep_keys_are_checked_with_one_line(tmp_path):
    config = tmp_path / "sweep.toml"
    config.write_text("sites = 20\nepsilons = [1, 8, inf]\n")
    options = SweepOptions.from_config(parse_args(["--config", str(config), "--rounds", "2"]))
    assert (options.sites, options.rounds, options.epsilon_list) == (20, 2, [1.0, 8.0, float("inf")])
    config.write_text("sites = \n")
    with pytest.raises(SystemExit, match=r"^--config .*sweep.toml: not TOML"):
        parse_args(["--config", str(config)])
    with pytest.raises(SystemExit, match=r"^--config .*missing.toml: cannot read it"):
        parse_args(["--config", str(tmp_path / "missing.toml")])
    with pytest.raises(SystemExit, match=r"^sweep: key 'sites' = 'many' is not a whole number; use one"):
        SweepOptions.from_config(parse_args([]) | {"sites": "many"})
    with pytest.raises(SystemExit, match=r"^sweep: key 'epsilons' = '8,lots' is not a list of numbers"):
        SweepOptions.from_config(parse_args(["--epsilons", "8,lots"]))


def test_sites_per_round_is_capped_at_the_sites():
    def per_round(*argv: str) -> int:
        return SweepOptions.from_config(parse_args(list(argv))).per_round

    assert per_round() == 5  # the default preset: all 5 sites every round
    assert per_round("--sites", "4") == 4  # the preset's 5 capped at --sites
    assert per_round("--sites", "4", "--sites-per-round", "2") == 2
    assert per_round("--sites", "4", "--sites-per-round", "0") == 4
