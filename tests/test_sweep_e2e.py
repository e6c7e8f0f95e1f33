"""A miniature privacy sweep through the real Simulation Engine, and its resumption."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib

import pytest

from simulations.run import parse_args, run_sweep
from simulations.superlink import descendants, is_alive, processes_with_env
from simulations.sweep import RESULT_COLUMNS

from .rescore import rescore

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
    # the non-private and the private point train the head on one split: the second read the
    # features the first kept (a file for each data set encoded: the sites', the server's
    # splits; none written again after the first point finished)
    kept = list((out / "features").glob("*.safetensors"))
    first = (out / "points" / "federated-epsinf-seed0" / "result.json").stat().st_mtime
    assert kept and all(f.stat().st_mtime <= first for f in kept), kept
    for name in ("accuracy_vs_round.png", "accuracy_vs_epsilon.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (out / "summary.md").read_text()
    assert "| federated, DP linear probe | head | 3 |" in summary  # the private default trains the head
    assert "Wall time summed over the 3 finished points" in summary and "This invocation" in summary
    assert "Partial" not in summary

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

    # the table reports what each point's saved adapter scores on the held-out test split
    for name, adapter in (("centralized-epsinf-seed0", "adapter"), ("federated-eps3-seed0", "final-adapter")):
        scores, row = rescore(out / "points" / name / adapter), next(r for r in rows if r["point"] == name)
        assert float(row["accuracy"]) == scores["accuracy"], name
        assert float(row["macro_f1"]) == scores["macro_f1"], name
        assert float(row["loss"]) == pytest.approx(scores["loss"], rel=1e-5), name

    # rerunning the finished command trains nothing and writes the same table
    before = {p.name: p.stat().st_mtime for p in (out / "points").iterdir()}
    table = (out / "results.csv").read_text()
    run_sweep(parse_args(argv))
    assert {p.name: p.stat().st_mtime for p in (out / "points").iterdir()} == before
    assert (out / "results.csv").read_text() == table
    # ... and keeps the measured point times in the summary, adding no wall time of its own
    summary = (out / "summary.md").read_text()
    assert "Wall time summed over the 3 finished points" in summary
    assert "This invocation" not in summary

    # SIGTERM (kill, a CI timeout) stops a sweep as Ctrl-C does: finished points kept, the
    # interrupted one set aside, no SuperLink or Ray worker left behind
    more = [*argv[: argv.index("--seeds") + 1], "0,1", *argv[argv.index("--seeds") + 2 :]]
    stdout = tmp_path / "resume.out"
    with stdout.open("w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "simulations.run", *more],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )
    running = out / "points" / "federated-epsinf-seed1"
    deadline = time.monotonic() + 300
    while not running.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert running.exists(), stdout.read_text()[-3000:]
    flwr_home = ("FLWR_HOME", str(out / ".flwr"))
    sweep = set(processes_with_env(*flwr_home))
    assert sweep, "the check below would see the SuperLink's processes"
    # with their children: some of Ray's (its agents) run without the sweep's FLWR_HOME
    family = sweep | descendants(sweep)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 130, stdout.read_text()[-3000:]
    assert "interrupted: finished points are kept" in stdout.read_text()
    # the private points of every seed run before the later seeds' (costly) baselines
    assert (out / "points" / "federated-eps3-seed1" / "result.json").exists()
    assert (out / "points" / "centralized-epsinf-seed1" / "result.json").exists()
    assert "Partial: 5 of 6 planned points finished" in (out / "summary.md").read_text()
    assert not (out / "points" / "federated-epsinf-seed1" / "result.json").exists()
    for name, mtime in before.items():
        assert (out / "points" / name).stat().st_mtime == mtime
    address = tomllib.loads((out / ".flwr" / "config.toml").read_text())["superlink"]["sim"]["address"]
    host, port = address.rsplit(":", 1)
    with pytest.raises(OSError):
        socket.create_connection((host, int(port)), timeout=2).close()
    # the SuperLink, its SuperExec and the Ray workers run in sessions of their own; all of them
    # carry the sweep's FLWR_HOME, and the harness ends them before it exits (left alone they went
    # on training the interrupted point for minutes); none may be left
    assert processes_with_env(*flwr_home) == []
    assert [pid for pid in family if is_alive(pid)] == []
