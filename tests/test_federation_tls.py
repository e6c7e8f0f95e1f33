"""The containers' entry points as local processes: TLS, SuperNode authentication, restarts.

SuperLink with TLS and ``--enable-supernode-auth``; sites started with ``python -m clients.site
join`` (the site image's entry point) with their own keys and data shards.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fedllm.ledger import PrivacyLedger
from fedllm.shards import write_shards
from server.credentials import make_ca_and_server, make_site_key
from simulations.superlink import FlowerCLI, free_port, start_superlink, venv_bin

from .processes import join_args, join_sites, run_quick, stop_all, wait_until

pytestmark = pytest.mark.slow


class Federation:
    """SuperLink + sites as processes; ``stop`` ends them all, ``start`` brings them back."""

    def __init__(self, tmp, certs, shards, cli):
        self.tmp, self.certs, self.shards, self.cli = tmp, certs, shards, cli
        self.port = free_port()
        self.procs = []

    def start(self, sites):
        link = start_superlink(
            self.tmp / "superlink",
            self.port,
            self.cli.env,
            self.tmp,
            certificates=self.certs,
            supernode_auth=True,
        )
        self.procs.append(link)
        self.cli.write_connection(f"127.0.0.1:{self.port}", str(self.certs / "ca.crt"))
        self.procs += join_sites(self.port, self.certs, sites, self.tmp, self.cli.env)

    def stop(self):
        stop_all(self.procs)
        self.procs = []


def test_tls_auth_federation_refusals_and_restart(tiny_checkpoint, tmp_path):
    certs = tmp_path / "certs"
    certs.mkdir()
    make_ca_and_server(certs, ["localhost"])
    for i in range(1, 6):
        make_site_key(certs, f"site-{i}")
    shards = write_shards("drug-reviews", 3, "natural", "condition", 1.0, 42, tmp_path / "shards")
    bad = tmp_path / "shards" / "bad-labels.csv"
    bad.write_text("text,label\n" + "".join(f"review {i} was fine,delighted\n" for i in range(20)))

    cli = FlowerCLI(tmp_path / "cli", "tls")
    fed = Federation(tmp_path, certs, shards, cli)
    sites = [("site-1", shards[0]), ("site-2", shards[1]), ("site-3", shards[2]), ("site-4", bad)]
    config = {
        "model": str(tiny_checkpoint),
        "num-server-rounds": 2,
        "min-train-nodes": 3,
        "min-available-nodes": 4,
        "max-steps": 2,
        "max-length": 32,
        "batch-size": 16,
        "run-dir": str(tmp_path / "runs"),
        "run-name": "first",
    }
    try:
        fed.start([])
        for i in range(1, 5):  # the operator registers four sites; site-5 is not registered
            answer = cli.call("supernode", "register", str(certs / f"site-{i}.pub"), "tls")
            assert answer.get("success"), answer
        fed.stop()
        fed.start(sites)  # registrations live in the SuperLink's database
        env = {**cli.env, "FLWR_HOME": str(tmp_path / "probe")}

        probes = tmp_path / "probes"
        code, out = run_quick(
            join_args(fed.port, certs, "site-5", shards[0], probes / "s5", activation_retries=0),
            env,
            probes / "unregistered.log",
        )
        assert code != 0 and "key is not registered" in out, out[-3000:]

        no_ca = [
            venv_bin("flower-supernode"), "--superlink", f"127.0.0.1:{fed.port}", "--max-retries", "0",
            "--auth-supernode-private-key", str(certs / "site-1"), "--port", str(free_port()),
        ]  # fmt: skip
        code, out = run_quick(no_ca, env, probes / "no-ca.log")
        assert code != 0 and "CERTIFICATE_VERIFY_FAILED" in out, out[-3000:]

        first = cli.run(config, timeout=900)
        assert first.ok, f"{first}\n{cli.log(first.run_id)[-3000:]}"

        fed.stop()  # restart everything: the run dir and each site's privacy state survive
        fed.start(sites)
        # the SuperLink keeps a crashed site's old session online for up to a minute: submit only
        # once every site has re-activated, or the run samples stale sessions ("Node Unavailable")
        logs = [tmp_path / name / "site.log" for name, _ in sites]
        wait_until(
            "every site to re-activate",
            lambda: all(
                p.exists() and p.read_text(errors="replace").count("SuperNode ID:") >= 2 for p in logs
            ),
            timeout=240,
        )
        second = cli.run({**config, "num-server-rounds": 1, "run-name": "second"}, timeout=900)
        assert second.ok, f"{second}\n{cli.log(second.run_id)[-3000:]}"
    finally:
        fed.stop()

    rows = [json.loads(x) for x in (tmp_path / "runs" / "first" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:  # the bad site is reported, the federation goes on with the others
        assert row["train-replies"] == 3
        assert len(row["train-failures"]) == 1
        # a fixed code: the file name and the unknown label stay in the site's own log
        assert row["train-failures"][0]["reason"] == "site-data-error"
    assert (tmp_path / "runs" / "first" / "final-adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "runs" / "second" / "result.json").exists()

    for name in ("site-1", "site-2", "site-3"):
        ledger = PrivacyLedger(tmp_path / name / "state" / "privacy_ledger.json")
        assert {first.run_id, second.run_id} <= set(ledger.runs)
        assert sum(h[2] for h in ledger.runs[first.run_id]["history"]) == 4  # 2 rounds x 2 steps
        spend = subprocess.run(
            [sys.executable, "-m", "clients.site", "spend", "--state-dir", str(tmp_path / name / "state")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "lifetime over 2 runs" in spend and "example-level differential privacy" in spend
        assert any(line.split()[:1] == [str(first.run_id)] for line in spend.splitlines())
