"""SecAgg+ end to end: Flower's Simulation Engine, and a real SuperLink with three SuperNodes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedllm.ledger import PrivacyLedger
from fedllm.shards import write_shards
from simulations.superlink import SimulationLink

from .processes import deployment, supernode_logs

pytestmark = pytest.mark.slow

SECURE = {
    "aggregation": "secagg+",
    "aggregator": "fedavg",
    "num-server-rounds": 2,
    "min-train-nodes": 3,
    "min-available-nodes": 3,
    "max-steps": 2,
    "max-length": 32,
    "batch-size": 16,
    "target-epsilon": 8.0,
    "secagg-timeout": 300.0,
}


def _rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _check_secure_rounds(run_dir) -> None:
    """Two secure rounds of 3 sites, each moving the global adapter; nothing per site logged."""
    rows = _rows(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert "global-unchanged" not in row, row
        assert row["train-replies"] == 3 and len(row["secagg"]["masked"]) == 3
        assert "sites" not in row and row["train"]["sites"] == 3
        assert 0 < row["train"]["epsilon-mean"] <= 8.0
    adapters = [load_file(str(run_dir / f"round-{i:03d}" / "adapter_model.safetensors")) for i in range(3)]
    for before, after in zip(adapters, adapters[1:], strict=False):
        assert any(not np.array_equal(before[k], after[k]) for k in before)


def test_secagg_in_the_simulation_engine(tiny_checkpoint, tmp_path):
    config = {**SECURE, "model": str(tiny_checkpoint), "run-dir": str(tmp_path / "runs"), "run-name": "sim"}
    with SimulationLink(tmp_path / "flwr") as link:
        outcome = link.simulate(config, num_supernodes=3, cpus_per_site=1, timeout=900)
        assert outcome.ok, f"{outcome}\n{link.log(outcome.run_id)[-4000:]}"
    _check_secure_rounds(tmp_path / "runs" / "sim")


def test_secagg_with_a_superlink_and_three_supernodes(tiny_checkpoint, tmp_path):
    shards = write_shards("drug-reviews", 3, "natural", "condition", 1.0, 42, tmp_path / "shards")
    config = {
        **SECURE,
        "model": str(tiny_checkpoint),
        "pooling": "cls",
        "run-dir": str(tmp_path / "runs"),
        "run-name": "deploy",
    }
    with deployment(tmp_path, shards) as cli:
        outcome = cli.run(config, timeout=900)
        assert outcome.ok, f"{outcome}\n{cli.log(outcome.run_id)[-3000:]}\n{supernode_logs(tmp_path, 2000)}"
    site_logs = supernode_logs(tmp_path)
    run_dir = tmp_path / "runs" / "deploy"
    _check_secure_rounds(run_dir)
    assert site_logs.count("coordinates clipped to") >= 6  # each site logs it, the server never sees it
    for i in range(1, 4):  # the spend is booked at each site as in a plain run
        ledger = PrivacyLedger(tmp_path / f"site-{i}" / "state" / "privacy_ledger.json")
        assert sum(h[2] for h in ledger.runs[outcome.run_id]["history"]) == 1 + 4  # n̂, 2 rounds x 2 steps
    for row in _rows(run_dir)[1:]:
        print(
            f"deployment round {row['round']}: stage seconds {row['secagg']['stage-seconds']}, "
            f"uploaded {row['bytes-received']} B, wall {row['wall-seconds']} s"
        )
