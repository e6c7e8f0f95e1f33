"""The protocol's own cost, without Flower's transport: one SecAgg+ round in-process.

    python bench/secagg_protocol.py [--sites 5] [--trials 3]

The real server strategy (server/secagg_fedavg.py) and the real site mod (clients/secagg.py)
over tests/secagg_sites.py's grid, with the MiniLM head's shapes for BBC's 5 desks (5 × 384 + 5
coordinates) and no training: seconds for the whole round (all sites' and the server's crypto,
one after the other) and bytes uploaded per stage, against the plain adapters' bytes.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.supercore.task_identity import TaskIdentity

from fedllm.config import Settings
from fedllm.contract import RoundRecord
from fedllm.secagg import SecAggSettings
from server.robust import RobustSettings
from server.secagg import content_bytes
from server.secagg_fedavg import SecAggFedAvg
from tests.secagg_sites import SecAggGrid

SHAPES = {"classifier.weight": (5, 384), "classifier.bias": (5,)}
RUN = {"aggregation": "secagg+", "target-epsilon": 8.0}


def one_round(sites: int, seed: int) -> tuple[float, RoundRecord, dict[str, int]]:
    """Seconds, the round record and uploaded bytes per stage of one secure round."""
    rng = np.random.default_rng(seed)
    nodes = [11 * (i + 1) for i in range(sites)]
    glob = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    updates = {n: {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()} for n in nodes}
    metrics = {n: {"num-examples": 280, "steps": 8, "epsilon": 7.9, "noise-multiplier": 1.2} for n in nodes}
    grid = SecAggGrid(updates, metrics, RUN)
    strategy = SecAggFedAvg(
        SecAggSettings.from_run_config(RUN),
        Settings(target_epsilon=8.0).resolved(),
        robust=RobustSettings(aggregator="fedavg"),
        min_available_nodes=sites,
        min_train_nodes=sites,
        fraction_evaluate=0.0,
    )
    start = time.perf_counter()
    initial = ArrayRecord({k: Array(v) for k, v in glob.items()})
    strategy.start(grid, initial, num_rounds=1, train_config=ConfigRecord({"num-rounds": 1}))
    seconds = time.perf_counter() - start
    stages: dict[str, int] = {}
    for _, stage, content in grid.recorded:
        stages[stage] = stages.get(stage, 0) + content_bytes(content)
    return seconds, strategy.round_summary(1), stages


def main(argv: list[str] | None = None) -> None:
    """Print seconds and bytes for a few rounds."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args(argv)
    TaskIdentity._task_id = TaskIdentity._run_id = TaskIdentity._node_id = 1  # as the ServerApp runtime
    zeros = {k: Array(np.zeros(s, np.float32)) for k, s in SHAPES.items()}
    plain = args.sites * ArrayRecord(zeros).count_bytes()  # plain replies' adapters, as the server counts
    for trial in range(args.trials):
        seconds, record, stages = one_round(args.sites, trial)
        print(
            f"round {trial}: {seconds:.2f} s in-process; uploaded {record['bytes-received']:,} B "
            f"({record['bytes-received'] / plain:.3f}x the plain adapters' {plain:,} B); by stage {stages}"
        )


if __name__ == "__main__":
    main()
