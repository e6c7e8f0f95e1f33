"""The DP recipe study: each lever at ε ∈ {1, 3, 8} at the real per-site data sizes, fast.

    python bench/dp_recipe.py --dataset bbc-news --sites 5 --partitioning dirichlet \\
        --grid '{"sample-rate": [0.5, 1.0], "lr": [3, 5, 10]}' --seeds 0,1,2

FedAvg in one process with the library's own pieces (``simulations.inprocess.federate``: the
sites' shards and local splits, the one training loop with the privacy plan of each site, the
adapter wire and weighted averaging as Flower's FedAvg does it) — without the Flower runtime,
so a point with the ``head`` trainable takes seconds. ``--partitioning iid --training-sites 1``
trains one site alone: a centralized run at one site's data size, to compare the levers fast.
Prints each finished round on stderr, then one line per setting: mean accuracy / macro-F1 over
the seeds at every ε, and seconds per point. Scores are on the server's validation split
(``--score-on validation``, the default: choose settings there); ``--score-on test`` only to
report a choice already made.
Use it to search; confirm the winner with ``python -m simulations.run`` (real Flower runs).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fedllm.config import settings_from
from simulations.inprocess import federate, site_scores

SITE_KINDS = ("global", "personalized")


def federated_point(
    config: dict,
    epsilon: float,
    seed: int,
    sites: int,
    rounds: int,
    scheme: dict,
    training_sites: int = 0,
    score_on: str = "validation",
    site_tau: float | None = None,
) -> dict:
    """One federation, every site every round: the server's accuracy and macro-F1 at the end, on
    its ``score_on`` part of the held-out data (``validation`` to choose, ``test`` to report).
    ``site_tau``: also each site's local macro-F1, global and with its own prior at that tau
    (``simulations.inprocess.site_scores``), averaged over the sites."""
    settings = settings_from({**config, "target-epsilon": epsilon, "seed": seed})
    start = time.perf_counter()

    def progress(line: str) -> None:
        print(f"  eps {epsilon:g} seed {seed}: {line} [{time.perf_counter() - start:.0f} s]", file=sys.stderr)

    run = federate(settings, sites, rounds, scheme, progress=progress, training_sites=training_sites)
    scores = run.scores_on(score_on)
    local = site_scores(run, site_tau) if site_tau is not None else []
    return {
        "accuracy": scores["accuracy"],
        "macro_f1": scores["macro_f1"],
        "epsilon": max(run.epsilons),
        **{
            f"site_{kind}_f1": float(np.mean([r[kind]["macro_f1"] for r in local])) if local else math.nan
            for kind in SITE_KINDS
        },
    }


CSV_COLUMNS = [
    "setting",
    "score_on",
    "target_epsilon",
    "seeds",
    "accuracy",
    "macro_f1",
    "accuracies",
    "epsilon_spent",
]


def parse_args() -> argparse.Namespace:
    """The search's command line."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default="bbc-news")
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--partitioning", default="dirichlet")
    parser.add_argument("--dirichlet-alpha", type=float, default=1.0)
    parser.add_argument("--partition-column", default="")
    parser.add_argument("--epsilons", default="1,3,8,inf")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--set", default="{}", help='fixed settings, JSON: {"max-steps": 3}')
    parser.add_argument(
        "--training-sites",
        type=int,
        default=0,
        help="only the first K sites train (0 = all); --partitioning iid --training-sites 1: one site's size",
    )
    parser.add_argument(
        "--grid",
        default="{}",
        help='settings to vary, JSON: every combination of {"lr": [3, 5]}, or a list [{"lr": 3}, ...]',
    )
    parser.add_argument(
        "--score-on",
        choices=("validation", "test"),
        default="validation",
        help="the server's held-out part scored: validation to choose settings, test to report",
    )
    parser.add_argument(
        "--site-tau",
        type=float,
        default=None,
        help="also score every site's local test split, global and with its own DP prior at this tau",
    )
    parser.add_argument("--csv", default="", help="also append one row per setting and ε to this CSV")
    return parser.parse_args()


def grid_rows(grid: dict | list) -> list[dict]:
    """The settings to try: a list as given, or every combination of a dict of lists."""
    if isinstance(grid, list):
        return grid or [{}]
    return [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]


def append_csv(path: str, rows: list[dict]) -> None:
    """Append ``rows`` to the CSV at ``path`` (header first when it is new)."""
    target = Path(path)
    new = not target.exists()
    with target.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def main() -> None:
    """Each setting at every ε and seed: one line of means, and CSV rows with ``--csv``."""
    args = parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    scheme = {"scheme": args.partitioning, "alpha": args.dirichlet_alpha, "column": args.partition_column}
    base = {"dataset": args.dataset, "max-steps": 3, **json.loads(args.set)}
    epsilons = [float(e) for e in args.epsilons.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    trained = f", the first {args.training_sites} training" if args.training_sites else ""
    print(
        f"{args.dataset}: {args.sites} sites{trained}, {args.rounds} rounds, {base}; seeds {seeds}; "
        f"scored on {args.score_on}"
    )
    for row in grid_rows(json.loads(args.grid)):
        config, start, cells, lines = {**base, **row}, time.perf_counter(), [], []
        for epsilon in epsilons:
            runs = [
                federated_point(
                    config,
                    epsilon,
                    s,
                    args.sites,
                    args.rounds,
                    scheme,
                    args.training_sites,
                    args.score_on,
                    args.site_tau,
                )
                for s in seeds
            ]
            acc, f1 = np.mean([r["accuracy"] for r in runs]), np.mean([r["macro_f1"] for r in runs])
            eps = max(r["epsilon"] for r in runs)
            label = "inf" if math.isinf(epsilon) else f"{epsilon:g}"
            cells.append(f"eps {label}: {acc:.3f}/{f1:.3f}" + (f" (spent {eps:.2f})" if eps else ""))
            if args.site_tau is not None:
                site_g, site_p = (np.mean([r[f"site_{k}_f1"] for r in runs]) for k in SITE_KINDS)
                cells.append(f"sites F1 global {site_g:.3f} personalized {site_p:.3f}")
            lines.append(
                dict(setting=json.dumps(row), score_on=args.score_on, target_epsilon=label,
                     seeds=args.seeds, accuracy=round(acc, 4), macro_f1=round(f1, 4),
                     accuracies=" ".join(f"{r['accuracy']:.4f}" for r in runs), epsilon_spent=round(eps, 3))
            )  # fmt: skip
        seconds = (time.perf_counter() - start) / (len(epsilons) * len(seeds))
        print(f"{json.dumps(row)}  " + "  ".join(cells) + f"  [{seconds:.0f} s/point]", flush=True)
        if args.csv:
            append_csv(args.csv, lines)


if __name__ == "__main__":
    main()
