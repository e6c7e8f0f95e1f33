"""The containers' entry points as local processes: TLS, SuperNode authentication, two runs.

SuperLink with TLS and ``--enable-supernode-auth`` (``simulations.superlink.superlink_command``);
sites started with ``python -m clients.site join`` (the site image's entry point) with their own
keys and data shards. The federation is started once: the operator registers the keys over TLS,
the sites join, an unregistered key is refused in one line before its SuperNode starts,
a site whose data file went missing after it joined is reported with the one code a site gives
for every failure that could depend on its data (`site-declined`) while the others train (a row
whose label the run does not list is no failure: it trains with a zero gradient), and a second
run composes with the
first in every site's privacy ledger. What a site checks before joining (wrong CA, wrong address)
is in ``tests/test_site_check.py``.
"""

from __future__ import annotations

import json

import pytest

from clients.site import main as site_main
from fedllm.ledger import PrivacyLedger
from fedllm.shards import write_shards
from server.credentials import make_ca_and_server, make_site_key
from simulations.superlink import FlowerCLI, free_port, start_process, start_superlink, stop_process

from .conftest import init_site
from .processes import join_args, join_sites, stop_all, wait_until

pytestmark = pytest.mark.slow


def test_tls_auth_federation_refuses_unregistered_key_and_composes_two_runs(
    tiny_checkpoint, tmp_path, capsys
):
    certs = tmp_path / "certs"
    certs.mkdir()
    make_ca_and_server(certs, ["localhost"])
    for i in range(1, 6):
        make_site_key(certs, f"site-{i}")
    shards = write_shards("drug-reviews", 3, "natural", "condition", 1.0, 42, tmp_path / "shards")
    bad = tmp_path / "shards" / "gone-after-join.csv"
    bad.write_text("text,label\n" + "".join(f"review {i} was fine,delighted\n" for i in range(20)))

    cli = FlowerCLI(tmp_path / "cli", "tls")
    port = free_port()
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
    procs = []
    probe = None
    try:
        link = start_superlink(
            tmp_path / "superlink", port, cli.env, tmp_path, certificates=certs, supernode_auth=True
        )
        procs.append(link)
        cli.write_connection(f"127.0.0.1:{port}", str(certs / "ca.crt"))  # the operator's CLI: TLS
        for i in range(1, 5):  # the operator registers four sites; site-5 is not registered
            answer = cli.call("supernode", "register", str(certs / f"site-{i}.pub"), "tls")
            assert answer.get("success"), answer
        procs += join_sites(port, certs, sites, tmp_path, cli.env)
        # site-4 passed its join check (its SuperNode is starting), then its data file goes away
        wait_until("site-4's join check", lambda: "starting: " in _log(tmp_path / "site-4"), procs=procs)
        bad.unlink()

        # site-5's key is not registered: join says so before starting a SuperNode (exit 2), with no
        # rejoin loop (that is for a registered key whose crashed session is still held online)
        probe_log = tmp_path / "site-5" / "site.log"
        init_site(tmp_path / "site-5" / "state")
        args = join_args(
            port, certs, "site-5", shards[0], tmp_path / "site-5" / "state", activation_retries=1
        )
        probe = start_process(args, probe_log, {**cli.env, "FLWR_HOME": str(tmp_path / "site-5")}, tmp_path)

        first = cli.run(config, timeout=900)
        assert first.ok, f"{first}\n{cli.log(first.run_id)[-3000:]}"
        second = cli.run({**config, "num-server-rounds": 1, "run-name": "second"}, timeout=900)
        assert second.ok, f"{second}\n{cli.log(second.run_id)[-3000:]}"

        code = probe.wait(timeout=120)
        out = probe_log.read_text(errors="replace")
        assert code == 2 and "key is not registered" in out, out[-3000:]
        assert "activation refused" not in out and "starting: " not in out, out[-3000:]
    finally:
        stop_process(probe, timeout=5)
        stop_all(procs)

    rows = [json.loads(x) for x in (tmp_path / "runs" / "first" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:  # the bad site is reported, the federation goes on with the others
        assert row["train-replies"] == 3
        assert len(row["train-failures"]) == 1
        # a fixed code: the file name and the error stay in the site's own log
        assert row["train-failures"][0]["reason"] == "site-declined"
    assert (tmp_path / "runs" / "first" / "final-adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "runs" / "second" / "result.json").exists()

    for name in ("site-1", "site-2", "site-3"):
        ledger = PrivacyLedger(tmp_path / name / "state" / "privacy_ledger.json")
        assert {first.run_id, second.run_id} <= set(ledger.runs)
        assert (
            sum(h[2] for h in ledger.runs[first.run_id]["history"]) == 1 + 4
        )  # DP count, 2 rounds x 2 steps
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_code:
            site_main(["spend", "--state-dir", str(tmp_path / name / "state")])
        spend = capsys.readouterr().out
        assert exit_code.value.code == 0, spend
        assert "lifetime over 2 runs" in spend and "example-level differential privacy" in spend
        assert any(line.split()[:1] == [str(first.run_id)] for line in spend.splitlines())


def _log(site_home) -> str:
    log = site_home / "site.log"
    return log.read_text(errors="replace") if log.exists() else ""
