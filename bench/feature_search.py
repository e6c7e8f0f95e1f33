"""What the cached-feature searches share (bench/imbalance_search.py, bench/projection_search.py):
their command line, the features pickle made once and reused, and the CSV of their rows."""

from __future__ import annotations

import argparse
import csv
import pickle
from collections.abc import Callable
from pathlib import Path


def _numbers(kind: type) -> Callable[[str], list]:
    return lambda text: [kind(part) for part in text.split(",")]


def search_parser(description: str | None, grid: str) -> argparse.ArgumentParser:
    """The options every search takes: ``--cache``, ``--csv``, ``--seeds`` and ``--epsilons`` (as
    lists), ``--draws``, ``--grid`` (JSON, default ``grid``); a search adds its own."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cache", type=Path, required=True, help="features pickle (made if missing)")
    parser.add_argument("--csv", type=Path, required=True)
    parser.add_argument("--seeds", type=_numbers(int), default="0,1,2")
    parser.add_argument("--draws", type=int, default=4, help="noise draws per seed")
    parser.add_argument("--epsilons", type=_numbers(float), default="1,3,8")
    parser.add_argument("--grid", default=grid)
    return parser


def cached_features(path: Path, extract: Callable[[], dict]) -> dict:
    """The features pickled at ``path``; ``extract()`` made and written there first when missing."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps(extract()))
    return pickle.loads(path.read_bytes())


def write_rows(path: Path, rows: list[dict], append: bool = False) -> None:
    """The search's rows as CSV at ``path``: rewritten, or appended (a header only to a new file)."""
    new = not (append and path.exists())
    with path.open("a" if append else "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)
