"""The site enforces its own guarantee: lifetime budget, DP required, δ cap, only DP outputs leave.

Every test drives the real ClientApp (``clients.app.app``, mods included) as a SuperNode would,
with a deployed site's node config (its data file, its state folder, its policy).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from clients.app import app
from clients.books import STATE_KEY
from clients.policy import DP_REPLY_KEYS
from clients.site import main as site_main
from fedllm.accounting import count_entry
from fedllm.adapters import adapter_to_record
from fedllm.config import settings_from
from fedllm.ledger import PrivacyLedger, total_steps
from fedllm.model import build_model

from .conftest import LABELS, init_site
from .replies import delivered

COUNT_NOISE = 4.0


@pytest.fixture
def site(tmp_path, frame):
    data = tmp_path / "ward-7-private.csv"
    frame.to_csv(data, index=False)
    return {"data-file": str(data), "state-dir": init_site(tmp_path / "state")}


@pytest.fixture
def run_config(tiny_checkpoint):
    return {
        "model": str(tiny_checkpoint),
        "max-length": 32,
        "batch-size": 16,
        "max-steps": 2,
        "lr": 0.05,
        "target-epsilon": 7.0,
        # the DP count's noise, in rows: small beside this ~47-row site, so the plan made from n̂
        # (the head's step cap) takes the same steps whatever n̂ is drawn
        "count-noise": COUNT_NOISE,
    }


def _message(run_config: dict, kind: str = "train", server_round: int = 1) -> Message:
    model = build_model(settings_from(run_config).resolved(), LABELS, torch.device("cpu"))
    arrays = adapter_to_record(model)
    config = ConfigRecord({"labels": json.dumps(LABELS), "num-rounds": 1, "server-round": server_round})
    return delivered(RecordDict({"arrays": arrays, "config": config}), kind)


def _context(node_config: dict, run_config: dict, run_id: int = 1) -> Context:
    return Context(
        run_id=run_id, node_id=7, node_config=node_config, state=RecordDict(), run_config=run_config
    )


def _ask(node_config: dict, run_config: dict, run_id: int = 1, kind: str = "train", context=None) -> Message:
    context = context or _context(node_config, run_config, run_id)
    return app(_message(run_config, kind), context)


def _ledger_path(site: dict) -> Path:
    return Path(site["state-dir"]) / "privacy_ledger.json"


def test_lifetime_budget_is_composed_across_runs_and_a_refused_run_takes_no_step(site, run_config):
    first = _ask(site, run_config, run_id=1)
    assert not first.has_error(), first.error
    assert first.content["metrics"]["epsilon"] <= 7.0 + 1e-6
    before = _ledger_path(site).read_bytes()

    # another run id (a new federation, or the same one resubmitted) starts no fresh budget:
    # 7 + 7 composed is above the site's default lifetime cap of 8
    for run_id in (2, 3):
        second = _ask(site, run_config, run_id=run_id)
        assert second.has_error() and second.error.reason == "site-refused-lifetime-budget"
    # the refusal follows from the run's DP count n̂ (its plan is made from it): that count is
    # booked, one Gaussian of sensitivity 1, and no DP-SGD step is
    runs = PrivacyLedger(_ledger_path(site)).runs
    assert json.loads(before)["runs"]["1"] == runs["1"]
    for refused in ("2", "3"):
        assert runs[refused]["history"] == [count_entry(COUNT_NOISE)] and runs[refused]["reserved"] == []

    # a site that sets a larger lifetime cap lets the second run train, and both are on its books
    wider = _ask({**site, "max-epsilon": 20.0}, run_config, run_id=2)
    assert not wider.has_error(), wider.error
    runs = PrivacyLedger(_ledger_path(site)).runs
    assert set(runs) == {"1", "2", "3"} and total_steps(runs["2"]) == 1 + 2


def test_a_run_without_dp_is_refused_unless_the_site_opts_out(site, run_config, capsys):
    no_dp = {**run_config, "target-epsilon": float("inf")}
    # the run config cannot speak for a real site: virtual-site keys are ignored there
    refused = _ask(site, {**no_dp, "sim-site-allow-no-dp": True})
    assert refused.has_error() and refused.error.reason == "site-requires-dp"
    assert not _ledger_path(site).exists()
    allowed = _ask({**site, "allow-no-dp": True}, no_dp)
    assert not allowed.has_error(), allowed.error
    # the release is on the books as epsilon = infinity, and spend says so plainly
    assert PrivacyLedger(_ledger_path(site)).runs == {
        "1#no-dp": {"kind": "no-dp", "count": 1, "history": [], "round": 1}
    }
    with pytest.raises(SystemExit) as code:
        site_main(["spend", "--state-dir", site["state-dir"]])
    out = capsys.readouterr().out
    assert code.value.code == 0 and "lifetime ε = ∞" in out, out
    assert ("1", "no-dp", "1", "inf") in {tuple(line.split()) for line in out.splitlines()}


def test_a_delta_above_the_site_cap_is_refused(site, run_config):
    # 4.5e-3 is below 1/n for this site, yet far above the site's default cap of 1e-5
    refused = _ask(site, {**run_config, "delta": 4.5e-3})
    assert refused.has_error() and refused.error.reason == "site-refused-delta"
    assert not _ledger_path(site).exists()
    allowed = _ask({**site, "max-delta": 5e-3}, {**run_config, "delta": 4.5e-3})
    assert not allowed.has_error(), allowed.error


def test_a_deleted_ledger_is_refused_while_context_state_shows_spend(site, run_config):
    context = _context(site, run_config)
    assert not _ask(site, run_config, context=context).has_error()
    assert STATE_KEY in context.state
    for path in _ledger_path(site).parent.glob("privacy_ledger.json*"):
        path.unlink()  # ledger and its backup gone: only the running SuperNode remembers
    again = app(_message(run_config, server_round=2), context)
    assert again.has_error() and again.error.reason == "site-ledger-error"


def test_under_dp_the_reply_holds_only_the_dp_keys_unless_the_site_opts_in(site, run_config):
    reply = _ask(site, run_config)
    assert set(reply.content["metrics"]) <= set(DP_REPLY_KEYS)
    assert {"num-examples", "epsilon", "delta", "steps", "sample-rate", "noise-multiplier"} <= set(
        reply.content["metrics"]
    )
    opted = _ask({**site, "release-train-metrics": True, "max-epsilon": 30.0}, run_config, run_id=2)
    assert {"train-loss", "train-seconds"} <= set(opted.content["metrics"])


def test_evaluation_on_local_data_is_refused_unless_the_site_opts_in(site, run_config):
    refused = _ask(site, run_config, kind="evaluate")
    assert refused.has_error() and refused.error.reason == "site-refused-evaluation"
    assert not _ledger_path(site).exists(), "a refused evaluation releases nothing and books nothing"
    for answers in (1, 2):
        scored = _ask({**site, "release-evaluation": True}, run_config, kind="evaluate")
        assert not scored.has_error(), scored.error
        assert scored.content["metrics"]["num-examples"] > 0
        # every answer is booked as a release of this run (its count grows)
        assert PrivacyLedger(_ledger_path(site)).runs["1#evaluation"]["count"] == answers


def test_failure_text_at_the_server_holds_no_path_or_column_name(tmp_path, site, run_config, frame):
    bad = tmp_path / "ward-7-private.csv"
    frame.rename(columns={"label": "diagnosis-code"}).to_csv(bad, index=False)
    reply = _ask(site, run_config)
    assert reply.has_error()
    assert reply.error.reason == "site-declined"
