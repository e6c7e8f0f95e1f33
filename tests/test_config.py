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
from fedllm.secagg import SecAggSettings
from fedllm.settings_reader import help_of
from fedllm.shards import ShardSettings
from server.robust import RobustSettings
from server.settings import ClientDPSettings, ServerSettings

# the classes whose defaults the table holds as they are (a TOML value of the field's type)
PLAIN_SOURCES = {
    "server/settings.py": ServerSettings,
    "fedllm/shards.py": ShardSettings,
    "fedllm/secagg.py": SecAggSettings,
    "server/settings.py (client-level DP)": ClientDPSettings,
}


def test_hyphenated_keys_and_string_values_are_coerced():
    s = settings_from(
        {"lora-r": "16", "target-epsilon": "inf", "class-weighting": "false", "num-server-rounds": 3}
    )
    assert s.lora_r == 16 and math.isinf(s.target_epsilon) and s.class_weighting is False
    assert not s.private
    assert settings_from({"noise-multiplier": 1.2, "target-epsilon": math.inf}).private


def test_invalid_values_name_the_key_and_the_fix():
    with pytest.raises(ValueError, match=r"^settings: key 'pooling' = 'max' .*'mean' or 'cls'$"):
        settings_from({"pooling": "max"})
    with pytest.raises(ValueError, match="^run config: key 'lora-r' = 'eight' is not a whole number"):
        settings_from({"lora-r": "eight"}, source="run config")
    with pytest.raises(ValueError, match="key 'lora-r' = 3.5 is not a whole number"):
        settings_from({"lora-r": 3.5})
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


def _wrong_defaults(table: dict, defaults: dict, source: str) -> list[str]:
    """One line per key of ``defaults`` that ``table`` lacks or holds with another value or type."""
    wrong = []
    for key, want in defaults.items():
        if key not in table:
            wrong.append(f"{key}: not declared; {source} reads it: add {key} = {_toml(want)}")
        elif table[key] != want or type(table[key]) is not type(want):
            wrong.append(
                f"{key} = {_toml(table[key])}, but {source}'s default is {_toml(want)}: "
                f"write {key} = {_toml(want)} (or change the default in {source})"
            )
    return wrong


def test_the_flower_app_config_declares_every_setting_with_its_default():
    """Flower refuses a run whose config has keys the app does not declare ('Invalid run
    configuration'), and a run without overrides trains with the table's values: the table must
    hold fedllm.config's defaults (FEDERATED_DEFAULTS over Settings), key by key."""
    wrong = _wrong_defaults(_flower_table(), flower_defaults(), "fedllm/config.py")
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
    federated = {k.replace("-", "_"): v for k, v in FEDERATED_DEFAULTS.items()}
    assert settings_from(flower_defaults()) == Settings(**federated)


def _key(name: str) -> str:
    return name.replace("_", "-")


def test_the_federation_server_and_shard_keys_hold_their_classes_defaults():
    """server/settings.py's ServerSettings and fedllm/shards.py's ShardSettings are the one source of
    these keys: the table holds each default with its type, and reads back as the defaults."""
    table = _flower_table()
    wrong = [
        line
        for source, cls in PLAIN_SOURCES.items()
        for line in _wrong_defaults(table, {_key(f.name): f.default for f in fields(cls)}, source)
    ]
    assert not wrong, "pyproject.toml [tool.flwr.app.config]:\n" + "\n".join(wrong)
    assert ServerSettings.from_run_config(table) == ServerSettings()
    assert ShardSettings.from_run_config(table) == ShardSettings()


def _owners() -> dict[str, list[str]]:
    """Every run config key the code reads, with the module(s) that own it."""
    owned = [(key, "fedllm/config.py") for key in flower_defaults()]
    owned += [(_key(f.name), "server/robust.py") for f in fields(RobustSettings)]
    owned += [(_key(f.name), source) for source, cls in PLAIN_SOURCES.items() for f in fields(cls)]
    owned += [(SIM_PREFIX + _key(f.name), "clients/policy.py") for f in fields(SitePolicy)]
    owners: dict[str, list[str]] = {}
    for key, source in owned:
        owners.setdefault(key, []).append(source)
    return owners


def test_every_key_in_the_table_has_exactly_one_owner():
    """A declared key no code reads is a setting that does nothing; a key two classes read has two
    defaults that can disagree."""
    owners = _owners()
    wrong = [
        f"{key}: no code reads it (fedllm/config.py, server/settings.py, server/robust.py, "
        "fedllm/shards.py, clients/policy.py); remove it or add it to the class that owns it"
        for key in _flower_table()
        if key not in owners
    ]
    wrong += [
        f"{key}: read by {' and '.join(sources)}; keep one owner"
        for key, sources in owners.items()
        if len(sources) > 1
    ]
    assert not wrong, "pyproject.toml [tool.flwr.app.config]:\n" + "\n".join(wrong)


def test_server_keys_given_as_text_are_read_as_their_types():
    server = ServerSettings.from_run_config(
        {"num-server-rounds": "5", "server-eval": "false", "fraction-train": "0.5", "run-name": " a "}
    )
    assert (server.num_server_rounds, server.server_eval, server.fraction_train) == (5, False, 0.5)
    assert server.run_name == "a" and ServerSettings(labels=" x, ,y ").label_list == ["x", "y"]


@pytest.mark.parametrize(
    ("reader", "key", "value", "fix"),
    [
        (ServerSettings, "num-server-rounds", 0, "at least 1 round"),
        (ServerSettings, "num-server-rounds", 2.5, "a whole number"),
        (ServerSettings, "min-train-nodes", True, "a whole number"),
        (ServerSettings, "fraction-train", 1.5, r"\(0, 1\]"),
        (ServerSettings, "fraction-evaluate", "half", "is not a number"),
        (ServerSettings, "server-eval", "maybe", "true or false"),
        (ServerSettings, "run-name", "../x", "one folder name"),
        (ShardSettings, "partitioning", "random", "'iid', 'dirichlet' or 'natural'"),
        (ShardSettings, "dirichlet-alpha", 0, "positive number"),
        (ShardSettings, "partition-column", " ", "natural split needs the column"),
    ],
)
def test_a_bad_server_or_shard_key_is_one_line_naming_it(reader, key, value, fix):
    with pytest.raises(ValueError, match=f"^run config: key '{key}' = .*{fix}") as err:
        reader.from_run_config({key: value})
    assert "\n" not in str(err.value)


def test_every_declared_key_has_help_and_the_docs_tables_are_generated_from_it():
    from simulations import config_doc

    for _, cls, _, _ in config_doc.TABLES:
        assert all(help_of(cls).values()), f"{cls.__name__}: a declared key without help"
    text = config_doc.DOC.read_text()
    assert config_doc.rewritten(text) == text, "docs/configuration.md: run python -m simulations.config_doc"
    assert "| `server-eval` | true | score each round's global adapter" in text  # a row, as generated
    readme = config_doc.README.read_text()
    assert config_doc.rewritten(readme, config_doc.readme_generated()) == readme, "README: run it too"


def test_the_pyproject_table_restates_no_key_meaning_and_the_cli_help_is_the_declared_help():
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    block = pyproject.read_text().split("[tool.flwr.app.config]")[1].split("\n[")[0]
    commented = [line for line in block.splitlines() if "=" in line and "#" in line.split("=", 1)[1]]
    assert not commented, f"meaning written beside a key (write it in its declared help): {commented}"
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    helps = {a.dest: a.help for a in parser._actions if a.help}
    for key, text in help_of(Settings).items():
        assert helps[key.replace("-", "_")].startswith(text)
