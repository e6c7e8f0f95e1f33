"""A deployment run with the defaults on the real model: issue 27's evidence that they learn.

    python bench/deploy_defaults.py --dataset drug-reviews --out runs/deploy-defaults-drugs
    python bench/deploy_defaults.py --dataset bbc-news --out runs/deploy-defaults-bbc

A SuperLink and three SuperNodes as local processes (Flower's deployment runtime, as
tests/test_deployment_e2e.py runs them, with the embedded MiniLM), the data set split over the
three sites (drug reviews by condition, BBC News Dirichlet 1.0), one run with nothing but the
defaults and the three sites' minimums; prints the last round's server scores and ε. Heavy: run
it alone on the machine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedllm.contract import EPSILON_MAX, round_records  # noqa: E402
from fedllm.shards import write_shards  # noqa: E402
from simulations.superlink import FlowerCLI, free_port, start_superlink  # noqa: E402
from tests.processes import start_supernodes, stop_all  # noqa: E402

SPLITS = {"drug-reviews": ("natural", "condition"), "bbc-news": ("dirichlet", "")}


def main(argv: list[str] | None = None) -> None:
    """Run the federation once and print its last round."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", choices=sorted(SPLITS), default="drug-reviews")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    out = args.out.resolve()
    partitioning, column = SPLITS[args.dataset]
    shards = write_shards(args.dataset, 3, partitioning, column, 1.0, 42, out / "shards")
    cli = FlowerCLI(out / "cli", "deploy")
    port = free_port()
    cli.write_connection(f"127.0.0.1:{port}")
    config = {"dataset": args.dataset, "min-train-nodes": 3, "min-available-nodes": 3}
    config |= {"run-dir": str(out / "runs"), "run-name": "defaults"}
    procs = []
    try:
        procs.append(start_superlink(out / "superlink", port, cli.env, out))
        procs += start_supernodes(port, shards, out, cli.env)
        outcome = cli.run(config, timeout=7200)
    finally:
        stop_all(procs)
    last = round_records(out / "runs" / "defaults")[-1]
    print(
        f"{args.dataset}: {outcome.status} in {outcome.seconds:.0f} s; round {last['round']}: "
        f"accuracy {last['server']['accuracy']:.4f} macro-F1 {last['server']['macro-f1']:.4f} "
        f"epsilon max {last.get('train', {}).get(EPSILON_MAX)}"
    )


if __name__ == "__main__":
    main()
