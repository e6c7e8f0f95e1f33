"""A miniature privacy sweep through the real Simulation Engine, and its resumption."""

from __future__ import annotations

import csv
import json
import math
import time

import pytest

from simulations.run import parse_args, run_sweep
from simulations.sweep import RESULT_COLUMNS

pytestmark = pytest.mark.slow


def test_miniature_sweep_writes_table_and_plots_and_resumes(tiny_checkpoint, tmp_path):
    argv = [
        "--model",
        str(tiny_checkpoint),
        "--dataset",
        "drug-reviews",
        "--sites",
        "3",
        "--sites-per-round",
        "3",
        "--rounds",
        "1",
        "--epsilons",
        "3,inf",
        "--seeds",
        "0",
        "--partitioning",
        "iid",
        "--max-length",
        "32",
        "--batch-size",
        "16",
        "--local-steps",
        "2",
        "--out",
        str(tmp_path / "sweep"),
    ]
    out = run_sweep(parse_args(argv))
    with (out / "results.csv").open() as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == RESULT_COLUMNS
        rows = list(reader)
    assert {r["point"] for r in rows} == {
        "centralized-epsinf-seed0",
        "federated-epsinf-seed0",
        "federated-eps3-seed0",
    }
    for name in ("accuracy_vs_round.png", "accuracy_vs_epsilon.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| federated | 3 |" in (out / "summary.md").read_text()

    # every site spent at most its target
    log = out / "points" / "federated-eps3-seed0" / "metrics.jsonl"
    sites = [s for line in log.read_text().splitlines() for s in json.loads(line).get("sites", {}).values()]
    assert len(sites) == 3
    assert all(0 < s["epsilon"] <= 3.0 + 1e-6 for s in sites)
    assert all(s["steps"] == 2 for s in sites)  # --local-steps caps each site's round
    # ... but not the centralized baseline, which trains a whole epoch
    central = json.loads((out / "points" / "centralized-epsinf-seed0" / "result.json").read_text())
    assert central["steps"] > 2
    private = next(r for r in rows if r["point"] == "federated-eps3-seed0")
    assert float(private["epsilon_max"]) <= 3.0 + 1e-6
    assert math.isinf(float(next(r for r in rows if r["point"] == "federated-epsinf-seed0")["epsilon_max"]))

    # rerunning the finished command trains nothing and is quick
    before = {p.name: p.stat().st_mtime for p in (out / "points").iterdir()}
    start = time.perf_counter()
    run_sweep(parse_args(argv))
    assert time.perf_counter() - start < 20
    assert {p.name: p.stat().st_mtime for p in (out / "points").iterdir()} == before
