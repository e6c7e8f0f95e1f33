"""End to end in Flower's Simulation Engine: the project's own ServerApp and ClientApp."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedllm.accounting import count_entry, epsilon_for
from simulations.superlink import SimulationLink

from .rescore import rescore

pytestmark = pytest.mark.slow


def _adapter(run_dir, name):
    return load_file(str(run_dir / name / "adapter_model.safetensors"))


def test_three_sites_two_rounds_with_dp(tiny_checkpoint, tmp_path):
    config = {
        "model": str(tiny_checkpoint),
        "num-server-rounds": 2,
        "min-train-nodes": 3,
        "min-available-nodes": 3,
        "max-steps": 3,
        "max-length": 32,
        "batch-size": 16,
        "target-epsilon": 8.0,
        "partitioning": "natural",
        "partition-column": "condition",
        "fraction-evaluate": 1.0,
        "sim-site-release-evaluation": True,  # the virtual sites opt into local scoring
        "run-dir": str(tmp_path / "runs"),
        "run-name": "sim",
    }
    with SimulationLink(tmp_path / "flwr") as link:
        outcome = link.simulate(config, num_supernodes=3, timeout=900)
        assert outcome.ok, f"{outcome}\n{link.log(outcome.run_id)[-4000:]}"
    run_dir = tmp_path / "runs" / "sim"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    losses = [r["server"]["loss"] for r in rows]
    assert len(set(losses)) == 3, "the server's test loss must move as the global adapter changes"
    assert all("accuracy" in r["evaluate"] for r in rows[1:])  # site-side evaluation, opted in
    # under DP a site's reply holds the DP keys only: no exact training loss or time
    assert all("train-loss" not in r["train"] and "train-seconds" not in r["train"] for r in rows[1:])
    # the real sites' DP updates carry the noise their plans declare: none is too clean (issue 22)
    assert all(r["too-clean"] == [] and "noise-check-skipped" not in r for r in rows[1:])

    # the global adapter changes every round
    rounds = [_adapter(run_dir, f"round-{i:03d}") for i in range(3)]
    for before, after in zip(rounds, rounds[1:], strict=False):
        assert any(not np.array_equal(before[k], after[k]) for k in before)
    final = _adapter(run_dir, "final-adapter")
    assert all(np.array_equal(final[k], rounds[2][k]) for k in final)
    # the last round's logged server score is the final adapter's, reloaded as a user does
    scores = rescore(run_dir / "final-adapter")
    logged = rows[2]["server"]
    assert scores["accuracy"] == logged["accuracy"] and scores["macro_f1"] == logged["macro-f1"]
    assert scores["loss"] == pytest.approx(logged["loss"], rel=1e-5)

    # each site's epsilon grows and is the accountant's value for the steps it really took, after
    # the run's DP count of n (the default count-noise, 20 rows; docs/privacy.md)
    first, second = rows[1]["sites"], rows[2]["sites"]
    assert len(first) == 3 and set(first) == set(second)
    for node, site in second.items():
        assert site["epsilon"] > first[node]["epsilon"] > 0
        assert site["epsilon"] <= 8.0 + 1e-6
        steps = first[node]["steps"] + site["steps"]
        history = [count_entry(20.0), (site["noise-multiplier"], site["sample-rate"], int(steps))]
        assert site["epsilon"] == pytest.approx(epsilon_for(history, site["delta"], "prv"), rel=1e-6)
    assert rows[2]["train"]["epsilon-max"] == pytest.approx(max(s["epsilon"] for s in second.values()))
    assert (run_dir / "metrics.csv").read_text().startswith("round,")
