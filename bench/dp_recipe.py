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
import itertools
import json
import math
import sys
import time

import numpy as np
import torch

from fedllm.config import settings_from
from simulations.inprocess import federate


def federated_point(
    config: dict,
    epsilon: float,
    seed: int,
    sites: int,
    rounds: int,
    scheme: dict,
    training_sites: int = 0,
    score_on: str = "validation",
) -> dict:
    """One federation, every site every round: the server's accuracy and macro-F1 at the end, on
    its ``score_on`` part of the held-out data (``validation`` to choose, ``test`` to report)."""
    settings = settings_from({**config, "target-epsilon": epsilon, "seed": seed})
    start = time.perf_counter()

    def progress(line: str) -> None:
        print(f"  eps {epsilon:g} seed {seed}: {line} [{time.perf_counter() - start:.0f} s]", file=sys.stderr)

    run = federate(settings, sites, rounds, scheme, progress=progress, training_sites=training_sites)
    scores = run.scores_on(score_on)
    return {
        "accuracy": scores["accuracy"],
        "macro_f1": scores["macro_f1"],
        "epsilon": max(run.epsilons),
    }


def main() -> None:
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
    parser.add_argument("--grid", default="{}", help='settings to vary, JSON: {"lr": [3, 5]}')
    parser.add_argument(
        "--score-on",
        choices=("validation", "test"),
        default="validation",
        help="the server's held-out part scored: validation to choose settings, test to report",
    )
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    scheme = {
        "scheme": args.partitioning,
        "alpha": args.dirichlet_alpha,
        "column": args.partition_column,
    }
    base = {"dataset": args.dataset, "max-steps": 3, **json.loads(args.set)}
    grid = json.loads(args.grid)
    epsilons = [float(e) for e in args.epsilons.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    trained = f", the first {args.training_sites} training" if args.training_sites else ""
    print(
        f"{args.dataset}: {args.sites} sites{trained}, {args.rounds} rounds, {base}; seeds {seeds}; "
        f"scored on {args.score_on}"
    )
    for values in itertools.product(*grid.values()) if grid else [()]:
        config = {**base, **dict(zip(grid, values, strict=True))}
        start = time.perf_counter()
        cells = []
        for epsilon in epsilons:
            runs = [
                federated_point(
                    config, epsilon, s, args.sites, args.rounds, scheme, args.training_sites, args.score_on
                )
                for s in seeds
            ]
            acc = np.mean([r["accuracy"] for r in runs])
            f1 = np.mean([r["macro_f1"] for r in runs])
            eps = max(r["epsilon"] for r in runs)
            label = "inf" if math.isinf(epsilon) else f"{epsilon:g}"
            cells.append(f"eps {label}: {acc:.3f}/{f1:.3f}" + (f" (spent {eps:.2f})" if eps else ""))
        seconds = (time.perf_counter() - start) / (len(epsilons) * len(seeds))
        changed = {k: config[k] for k in grid}
        print(f"{json.dumps(changed)}  " + "  ".join(cells) + f"  [{seconds:.0f} s/point]", flush=True)


if __name__ == "__main__":
    main()
