"""Split a data set into one file per site, so each site only ever sees its own shard.

    python -m fedllm.shards --dataset drug-reviews --sites 3 --partitioning natural \\
        --partition-column condition --out shards/

Writes ``site-1.csv`` ... ``site-N.csv`` (columns ``text``, ``label`` and the data's other
columns) from the cleaned training split, and prints each site's size and label counts.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedllm.config import settings_from
from fedllm.data import load_splits
from fedllm.partition import partition
from fedllm.settings_reader import help_of, key, read

SCHEMES = ("iid", "dirichlet", "natural")


@dataclass(frozen=True)
class ShardSettings:
    """How a training split is divided over sites.

    The one source of these keys' defaults and meanings: this CLI's flags, and a simulation's run
    config (clients/handlers.py splits the training split over the virtual sites with them;
    pyproject.toml's table declares them again, checked by tests/test_config.py).
    """

    partitioning: str = key(
        "natural",
        "how the training split is divided over sites: iid | dirichlet (over the labels) | "
        "natural (by partition-column, each value at one site)",
        choices=SCHEMES,
        parse=lambda value: str(value).strip().lower(),
    )
    dirichlet_alpha: float = key(
        1.0,
        "the Dirichlet concentration of partitioning = dirichlet",
        low=0,
        low_open=True,
        finite=True,
        fix="use a positive number (default 1.0)",
    )
    partition_column: str = key(
        "condition", "the column naming each site's share under partitioning = natural"
    )

    def cross_checks(self) -> list[tuple[bool, str, str]]:
        """The natural split needs a column."""
        fix = (
            "the natural split needs the column that names each site's share; set "
            "partition-column (e.g. condition) or another partitioning"
        )
        return [
            (self.partitioning != "natural" or bool(self.partition_column.strip()), "partition-column", fix)
        ]

    @classmethod
    def from_run_config(cls, rc: Mapping[str, Any]) -> ShardSettings:
        """The three keys of a run config (missing ones keep the defaults); a bad value raises one
        line naming the key and the fix."""
        return read(cls, rc, "run config")


def write_shards(
    dataset: str, sites: int, partitioning: str, column: str, alpha: float, seed: int, out: Path
) -> list[Path]:
    """Partition the training split of ``dataset`` and write one CSV per site."""
    splits = load_splits(settings_from({"dataset": dataset, "seed": seed}))
    parts = partition(splits.train, sites, partitioning, alpha, column, seed)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, part in enumerate(parts, start=1):
        path = out / f"site-{i}.csv"
        part.to_csv(path, index=False)
        paths.append(path)
        counts = ", ".join(f"{k} {v}" for k, v in part["label"].value_counts().sort_index().items())
        print(f"{path}: {len(part)} rows ({counts})")
    return paths


def main(argv: list[str] | None = None) -> None:
    """Command-line entry."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    default = ShardSettings()
    parser.add_argument("--dataset", default="drug-reviews")
    parser.add_argument("--sites", type=int, default=3)
    helps = help_of(ShardSettings)
    parser.add_argument(
        "--partitioning", default=default.partitioning, choices=SCHEMES, help=helps["partitioning"]
    )
    parser.add_argument(
        "--partition-column", default=default.partition_column, help=helps["partition-column"]
    )
    parser.add_argument(
        "--dirichlet-alpha", type=float, default=default.dirichlet_alpha, help=helps["dirichlet-alpha"]
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", type=Path, default=Path("shards"))
    args = parser.parse_args(argv)
    write_shards(
        args.dataset,
        args.sites,
        args.partitioning,
        args.partition_column,
        args.dirichlet_alpha,
        args.seed,
        args.out,
    )


if __name__ == "__main__":
    main()
