"""What a sweep is asked to do: its keys, presets, command line, and the checks before training.

A sweep's keys are the fine-tune settings (``fedllm.config.Settings``, the same names as in
Flower's run config) and the sweep's own (``SweepOptions``); each key is a flag (``--sites 20``)
and a TOML key (``sites = 20``). They are merged in this order, the later winning: the preset
(``simulations/presets/<name>.toml``), ``--config`` (a TOML file, read as the presets are),
``--set KEY=VALUE``, flags.
"""

from __future__ import annotations

import argparse
import json
import tomllib
from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

from fedllm.config import SETTING_TYPES, Settings, settings_from
from fedllm.settings_reader import SettingsError, key, parse_bool, read, rule_of

PRESET_DIR = Path(__file__).with_name("presets")
# fine-tune settings that each point sets itself (its budget and seed); a fixed noise is refused
SET_BY_SWEEP = ("target-epsilon", "seed", "noise-multiplier")
# keys a resumed sweep may change: they only add or drop points, or say where the sites train
EXTENDABLE = {"out", "seeds", "epsilons", "no-centralized", "cpus-per-site", "gpus-per-site"}
# a sweep's words where a setting's own help says less than a sweep needs
_SETTING_HELP = {
    "epochs": "whole local epochs per round",
    "max-steps": "local steps per round instead of whole epochs (0 = epochs); the centralized "
    "baseline always trains whole epochs",
}
_PARTITIONINGS = ("iid", "dirichlet", "natural")
_METAVARS = {"int": "N", "float": "X", "bool": "true|false", "str": "TEXT"}


def _key(name: str) -> str:
    return name.replace("_", "-")


def _flag(value: str) -> bool:
    """argparse's reader of a boolean flag value (strict: true or false)."""
    try:
        return parse_bool(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a boolean; use true or false") from None


def numbers(value: Any, kind: type = float) -> list:
    """``"1,3,inf"`` or a TOML list -> numbers."""
    items = value if isinstance(value, list) else str(value).split(",")
    return [kind(x) for x in items if str(x).strip()]


def _number_list(kind: type) -> Callable[[Any], Any]:
    """A parser that checks ``"1,3,inf"`` or a TOML list and keeps it as written."""

    def parse(value: Any) -> Any:
        try:
            numbers(value, kind)
        except (TypeError, ValueError):
            raise ValueError(
                "is not a list of numbers; write them comma-separated or as a TOML list"
            ) from None
        return value

    return parse


@dataclass(frozen=True)
class SweepOptions:
    """The sweep's own keys (hyphenated outside); a key not given keeps the default here."""

    sites: int = key(help="number of virtual sites", low=1, fix="use 1 or more")
    rounds: int = key(help="federated rounds", low=1, fix="use 1 or more")
    epsilons: str | list[float] = key(
        help="comma-separated target epsilons per site, 'inf' = no DP", parse=_number_list(float)
    )
    seeds: str | list[int] = key(
        help="comma-separated seeds (each setting is repeated per seed)", parse=_number_list(int)
    )
    sites_per_round: int = key(
        0,
        "sites sampled each round (0 = every site), capped at --sites: --sites 4 on a "
        "preset that samples 5 samples all 4",
        low=0,
        fix="use 0 (every site) or more",
    )
    central_epochs: int = key(1, "epochs of the centralized baseline")
    partitioning: str = key("iid", "how the sites' shards are drawn", choices=_PARTITIONINGS)
    dirichlet_alpha: float = key(1.0, "Dirichlet concentration")
    partition_column: str = key("", "the column naming each natural shard")
    no_centralized: bool = key(False, "skip the centralized baseline")
    site_eval: bool = key(
        False,
        "also score the global adapter on every sampled site's local test split each "
        "round (off: the results use the server's held-out test split only, and rounds are "
        "~15%% faster)",
    )
    cpus_per_site: int = key(
        2, "CPUs reserved for each site's ClientApp: Ray trains cores / this many sites at once"
    )
    gpus_per_site: float = key(0.0, "GPU share per site (0.25 puts four sites on a GPU)")

    @classmethod
    def from_config(cls, config: dict) -> SweepOptions:
        """The sweep's keys in a merged config, typed and checked; one line naming a bad key."""
        try:
            return read(cls, config, "sweep", missing="give it as a flag (--KEY) or write it in --config")
        except SettingsError as err:
            raise SystemExit(str(err)) from None

    @property
    def per_round(self) -> int:
        """Sites sampled each round: ``sites-per-round`` capped at ``sites`` (0 = every site)."""
        return min(self.sites_per_round or self.sites, self.sites)

    @property
    def epsilon_list(self) -> list[float]:
        """The target epsilons as numbers."""
        return numbers(self.epsilons)

    @property
    def seed_list(self) -> list[int]:
        """The seeds as numbers."""
        return numbers(self.seeds, int)


SWEEP_KEYS = {_key(f.name) for f in fields(SweepOptions)} | {"preset"}


def read_toml(path: Path, what: str) -> dict:
    """A preset or ``--config`` file as one flat table; one line naming the file when it is bad."""
    try:
        return tomllib.loads(Path(path).read_text())
    except OSError as err:
        raise SystemExit(f"{what} {path}: cannot read it ({err.strerror})") from None
    except tomllib.TOMLDecodeError as err:
        raise SystemExit(f"{what} {path}: not TOML ({err}); fix the file") from None


PRESETS: dict[str, dict] = {p.stem: read_toml(p, "preset") for p in sorted(PRESET_DIR.glob("*.toml"))}


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """The command line of ``python -m simulations.run``: the sweep's keys, then every fine-tune
    setting that a point does not set itself (``SET_BY_SWEEP``)."""
    parser = argparse.ArgumentParser(
        prog="python -m simulations.run",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--preset", default="default", choices=sorted(PRESETS), help="simulations/presets/<name>.toml")
    add("--config", type=Path, metavar="FILE", help="TOML file with the same keys as these flags")
    add("--out", default=None, metavar="DIR", help="output folder (default runs/sweep-<preset>)")
    add("--set", action="append", default=[], metavar="KEY=VALUE", help="any fine-tune setting")
    sweep = parser.add_argument_group("sweep (default: the preset's value, else the one named)")
    for f in fields(SweepOptions):
        flag, kind = "--" + _key(f.name), str(f.type)
        default = "" if f.default is MISSING else f" (default {f.default!r})"
        if kind == "bool":
            sweep.add_argument(flag, action="store_true", default=None, help=f.metadata["help"])
            continue
        sweep.add_argument(
            flag,
            type={"int": int, "float": float}.get(kind),
            choices=rule_of(f).choices or None,
            metavar=None if rule_of(f).choices else _METAVARS.get(kind, "LIST"),
            help=f.metadata["help"] + default,
        )
    tune = parser.add_argument_group("fine-tune settings (default: the preset's value, else fedllm.config's)")
    for f in fields(Settings):
        key, kind = _key(f.name), SETTING_TYPES[_key(f.name)]
        if key in SET_BY_SWEEP:
            continue
        tune.add_argument(
            *(["--local-steps", "--max-steps"] if key == "max-steps" else ["--" + key]),
            dest=f.name,
            type=_flag if kind is bool else kind,
            metavar=_METAVARS[kind.__name__],
            help=f"{_SETTING_HELP.get(key, f.metadata['help'])} (default {f.default!r})",
        )
    return parser


def parse_args(argv: list[str] | None, description: str | None = None) -> dict:
    """Preset, then TOML config, then ``--set``, then flags; one flat dict of hyphenated keys."""
    args = vars(build_parser(description).parse_args(argv))
    preset = args.pop("preset")
    config = {"preset": preset, **PRESETS[preset]}
    path = args.pop("config")
    if path:
        config.update(read_toml(path, "--config"))
    for item in args.pop("set"):
        key, _, value = item.partition("=")
        config[key.strip()] = value.strip()
    config.update({_key(k): v for k, v in args.items() if v is not None})
    return config


def sweep_settings(config: dict) -> Settings:
    """The fine-tune settings of a merged config (its sweep keys ignored), validated."""
    try:
        return settings_from(
            {k: v for k, v in config.items() if k not in SWEEP_KEYS and k != "out"}, source="sweep"
        )
    except SettingsError as err:
        raise SystemExit(str(err)) from None


def check_config(config: dict, saved: Path) -> None:
    """Refuse unknown keys, a fixed noise multiplier, and resuming a sweep with other settings."""
    unknown = sorted(set(config) - set(SETTING_TYPES) - SWEEP_KEYS - {"out"})
    if unknown:
        raise SystemExit(f"unknown sweep keys {unknown}: see python -m simulations.run --help")
    if sweep_settings(config).noise_multiplier > 0:
        raise SystemExit("a sweep sets the noise from each target epsilon: drop noise-multiplier")
    keep_or_refuse(config, saved, EXTENDABLE, "a sweep")


def keep_or_refuse(config: dict, saved: Path, extendable: set[str], what: str) -> None:
    """Resuming: refuse when ``saved`` (a JSON config) differs from ``config`` outside the
    ``extendable`` keys, naming those keys; otherwise save ``config`` there."""
    if saved.exists():
        old = json.loads(saved.read_text())
        changed = sorted(
            k for k in set(old) | set(config) if k not in extendable and old.get(k) != config.get(k)
        )
        if changed:
            raise SystemExit(
                f"{saved.parent} holds {what} with other settings ({', '.join(changed)}): its finished "
                "points would not match; use another --out (nothing was changed)"
            )
    saved.write_text(json.dumps(config, indent=2, default=str))
