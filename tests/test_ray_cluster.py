"""The multi-machine path: the Simulation Engine joins a Ray cluster that was started before it.

A one-node cluster on 127.0.0.1 stands in for the machines of a real one: the harness is pointed
at it with ``RAY_ADDRESS`` exactly as the README says, and the sites' ClientApps must run in
*that* cluster's workers (their output lands in the cluster's own session logs), not in a
private Ray instance.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from simulations.superlink import SimulationLink, free_port, start_process, stop_process, wait_for_port

pytestmark = pytest.mark.slow


@pytest.fixture
def ray_cluster(monkeypatch, tmp_path):
    """A Ray head node of our own, stopped as one process group (``ray stop`` would end every
    Ray instance on the machine, a sweep running beside the tests included)."""
    temp_dir = Path(f"/tmp/fedllm-ray-{os.getpid()}")  # Ray's socket paths must stay short
    port = free_port()
    head = start_process(
        [
            str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={port}",
            "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}",
        ],
        tmp_path / "ray-head.log",
        dict(os.environ),
        tmp_path,
    )  # fmt: skip
    try:
        wait_for_port(port, head, f"Ray head (log: {tmp_path / 'ray-head.log'})", timeout=120)
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
        yield temp_dir
    finally:
        stop_process(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_simulation_runs_its_sites_in_an_existing_ray_cluster(ray_cluster, tiny_checkpoint, tmp_path):
    run_config = {
        "model": str(tiny_checkpoint),
        "dataset": "drug-reviews",
        "partitioning": "iid",
        "num-server-rounds": 1,
        "max-length": 32,
        "batch-size": 16,
        "max-steps": 1,
        "target-epsilon": 8.0,
        "min-train-nodes": 2,
        "min-evaluate-nodes": 2,
        "min-available-nodes": 2,
        "run-dir": str(tmp_path / "runs"),
        "run-name": "on-cluster",
    }
    with SimulationLink(tmp_path / "flwr") as link:
        outcome = link.simulate(run_config, num_supernodes=2, cpus_per_site=1, timeout=600)
        assert outcome.ok, link.log(outcome.run_id)
    assert json.loads((tmp_path / "runs" / "on-cluster" / "result.json").read_text())["rounds"] == 1
    worker_logs = list(ray_cluster.glob("session_*/logs/worker-*.out"))
    site_lines = [
        line
        for log in worker_logs
        for line in log.read_text(errors="replace").splitlines()
        if "[site " in line
    ]
    assert len(site_lines) >= 2, f"no ClientApp output in the cluster's worker logs ({len(worker_logs)} logs)"
