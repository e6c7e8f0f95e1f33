"""Split a data set into one file per site, so each site only ever sees its own shard.

    python -m fedllm.shards --dataset drug-reviews --sites 3 --partitioning natural \\
        --partition-column condition --out shards/

Writes ``site-1.csv`` ... ``site-N.csv`` (columns ``text``, ``label`` and the data's other
columns) from the cleaned training split, and prints each site's size and label counts.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedllm.config import settings_from
from fedllm.data import load_splits, partition


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
    parser.add_argument("--dataset", default="drug-reviews")
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--partitioning", default="natural", choices=["iid", "dirichlet", "natural"])
    parser.add_argument("--partition-column", default="condition")
    parser.add_argument("--dirichlet-alpha", type=float, default=1.0)
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
