"""fedllm.settings_reader: one reader, one error line, for every settings class."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest

from clients.policy import SIM_PREFIX, SitePolicy
from fedllm.config import settings_from
from fedllm.settings_reader import SettingsError, check, defaults, help_of, key, parse_bool, read
from server.settings import ServerSettings


@dataclass(frozen=True)
class Example:
    """A class declared as the project's are."""

    rounds: int = key(help="how many", low=1, fix="run at least 1")
    mode: str = key("a", "which", choices=("a", "b"))
    rate: float = key(0.5, "a share", low=0, high=1, high_open=True, special=(-1,))
    on: bool = key(False, "a switch")
    hidden: str = key("x", "not a key", read=False)

    def cross_checks(self) -> list[tuple[bool, str, str]]:
        return [(self.mode == "a" or self.on, "mode", "mode b needs on = true")]


def test_values_are_read_as_their_declared_types_and_undeclared_keys_are_ignored():
    got = read(Example, {"rounds": "3", "rate": "-1", "on": "Yes", "other-app-key": 1, "hidden": "y"}, "t")
    assert got == Example(rounds=3, rate=-1.0, on=True)  # -1: a declared special value
    assert read(Example, {"p-rounds": 2.0}, "t", prefix="p-").rounds == 2
    assert defaults(Example) == {"mode": "a", "rate": 0.5, "on": False}
    assert help_of(Example)["rounds"] == "how many" and "hidden" not in help_of(Example)


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({}, "t: key 'rounds' is not set; set it"),
        ({"rounds": 2.5}, "t: key 'rounds' = 2.5 is not a whole number; use one, e.g. 3"),
        ({"rounds": True}, "t: key 'rounds' = True is true, not a number; use a whole number"),
        ({"rounds": 0}, "t: key 'rounds' = 0 is out of range; run at least 1"),
        ({"rounds": 1, "mode": "c"}, "t: key 'mode' = 'c' is not one of its choices; use 'a' or 'b'"),
        ({"rounds": 1, "rate": 1}, "t: key 'rate' = 1.0 is out of range; use a value >= 0 and < 1"),
        ({"rounds": 1, "rate": "nan"}, "t: key 'rate' = nan is out of range; use a value >= 0 and < 1"),
        ({"rounds": 1, "on": "ture"}, "t: key 'on' = 'ture' is not a boolean; use true or false"),
        (
            {"rounds": 1, "mode": "b"},
            "t: key 'mode' = 'b' does not fit the other settings; mode b needs on = true",
        ),
    ],
)
def test_a_bad_value_is_one_line_naming_the_source_the_key_and_the_fix(given, message):
    with pytest.raises(SettingsError) as err:
        read(Example, given, "t")
    assert str(err.value) == message


def test_a_class_built_in_code_is_checked_by_the_same_rules():
    assert check(Example(rounds=1), "code") == Example(rounds=1)
    with pytest.raises(SettingsError, match="^code: key 'rate' = inf is out of range"):
        check(Example(rounds=1, rate=math.inf), "code")


def test_booleans_are_strict():
    assert [parse_bool(v) for v in (True, 0, 1, "true", " FALSE ", "on", "no")] == [
        True, False, True, True, False, True, False,
    ]  # fmt: skip
    for bad in ("ture", "", "2", 2, 0.5, None):
        with pytest.raises(ValueError, match="is not a boolean; use true or false"):
            parse_bool(bad)


@pytest.mark.parametrize(
    ("read_config", "name"),
    [
        (lambda rc: settings_from(rc, source="run config"), "class-weighting"),
        (ServerSettings.from_run_config, "server-eval"),
        (lambda rc: SitePolicy.from_config(rc), "allow-no-dp"),
        (lambda rc: SitePolicy.from_config(rc, SIM_PREFIX), SIM_PREFIX + "release-evaluation"),
    ],
)
def test_a_misspelt_boolean_is_refused_in_one_format_by_every_reader(read_config, name):
    """'ture' was read as false by the site policy while server-eval refused it: one reader now."""
    with pytest.raises(
        ValueError, match=rf"^[a-z ]+: key '{name}' = 'ture' is not a boolean; use true or false$"
    ):
        read_config({name: "ture"})
    assert getattr(read_config({name: "TRUE"}), name.removeprefix(SIM_PREFIX).replace("-", "_")) is True
