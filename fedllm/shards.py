"""Split a data set into one file per site, so each site only ever sees its own shard.

    python -m fedllm.shards --dataset drug-reviews --sites 3 --partitioning natural \\
        --partition-column condition --out shards/

Writes ``site-1.csv`` ... ``site-N.csv`` (columns ``text``, ``label`` and the data's other
columns) from the cleaned training split, and prints each site's size and label counts.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

from fedllm.config import settings_from
from fedllm.data import load_splits, partition

SCHEMES = ("iid", "dirichlet", "natural")


@dataclass(frozen=True)
class ShardSettings:
    """How a training split is divided over sites: ``iid``; ``dirichlet`` over the labels
    (concentration ``dirichlet-alpha``); ``natural`` by ``partition-column`` (each value at one site).

    The one source of these keys' defaults: this CLI's flags, and a simulation's run config
    (clients/app.py splits the training split over the virtual sites with them; pyproject.toml's
    table declares them again, checked by tests/test_config.py).
    """

    partitioning: str = "natural"
    dirichlet_alpha: float = 1.0
    partition_column: str = "condition"

    @classmethod
    def from_run_config(cls, rc: dict) -> ShardSettings:
        """The three keys of a run config (missing ones keep the defaults); a bad value raises one
        line naming the key and the fix."""
        default = cls()
        scheme = str(rc.get("partitioning", default.partitioning)).strip().lower()
        if scheme not in SCHEMES:
            raise ValueError(f"run config partitioning={scheme!r}: use {' | '.join(SCHEMES)}")
        raw = rc.get("dirichlet-alpha", default.dirichlet_alpha)
        try:
            alpha = math.nan if isinstance(raw, bool) else float(raw)
        except ValueError:
            alpha = math.nan
        if not (math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"run config dirichlet-alpha={raw!r}: use a positive number (default 1.0)")
        column = str(rc.get("partition-column", default.partition_column))
        if scheme == "natural" and not column.strip():
            raise ValueError(
                f"run config partition-column={column!r}: the natural split needs the column that names each "
                "site's share; set partition-column (e.g. condition) or another partitioning"
            )
        return cls(scheme, alpha, column)


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
    parser.add_argument("--partitioning", default=default.partitioning, choices=SCHEMES)
    parser.add_argument("--partition-column", default=default.partition_column)
    parser.add_argument("--dirichlet-alpha", type=float, default=default.dirichlet_alpha)
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
