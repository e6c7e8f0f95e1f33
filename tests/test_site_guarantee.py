"""The site enforces its own guarantee: lifetime budget, DP required, δ cap, only DP outputs leave.

Every test drives the real ClientApp (``clients.app.app``, mods included) as a SuperNode would,
with a deployed site's node config (its data file, its state folder, its policy).
"""

from __future__ import annotations

import json

import pytest

from clients.app import app
from clients.books import STATE_KEY
from clients.policy import DP_REPLY_KEYS
from clients.site import main as site_main
from fedllm.accounting import count_entry
from fedllm.ledger import PrivacyLedger, total_steps

from .sites import COUNT_NOISE, ask, ledger_path, message


def test_lifetime_budget_is_composed_across_runs_and_a_refused_run_takes_no_step(site, run_config):
    first = ask(site, run_config, run_id=1)
    assert not first.has_error(), first.error
    assert first.content["metrics"]["epsilon"] <= 7.0 + 1e-6
    before = ledger_path(site).read_bytes()

    # another run id (a new federation, or the same one resubmitted) starts no fresh budget:
    # 7 + 7 composed is above the site's default lifetime cap of 8
    for run_id in (2, 3):
        second = ask(site, run_config, run_id=run_id)
        assert second.has_error() and second.error.reason == "site-refused-lifetime-budget"
    # the refusal follows from the run's DP count n̂ (its plan is made from it): that count is
    # booked, one Gaussian of sensitivity 1, and no DP-SGD step is
    runs = PrivacyLedger(ledger_path(site)).runs
    assert json.loads(before)["runs"]["1"] == runs["1"]
    for refused in ("2", "3"):
        assert runs[refused]["history"] == [count_entry(COUNT_NOISE)] and runs[refused]["reserved"] == []

    # a site that sets a larger lifetime cap lets the second run train, and both are on its books
    wider = ask({**site, "max-epsilon": 20.0}, run_config, run_id=2)
    assert not wider.has_error(), wider.error
    runs = PrivacyLedger(ledger_path(site)).runs
    assert set(runs) == {"1", "2", "3"} and total_steps(runs["2"]) == 1 + 2


def test_a_run_without_dp_is_refused_unless_the_site_opts_out(site, run_config, capsys):
    no_dp = {**run_config, "target-epsilon": float("inf")}
    # the run config cannot speak for a real site: virtual-site keys are ignored there
    refused = ask(site, {**no_dp, "sim-site-allow-no-dp": True})
    assert refused.has_error() and refused.error.reason == "site-requires-dp"
    assert not ledger_path(site).exists()
    allowed = ask({**site, "allow-no-dp": True}, no_dp)
    assert not allowed.has_error(), allowed.error
    # the release is on the books as epsilon = infinity, and spend says so plainly
    assert PrivacyLedger(ledger_path(site)).runs == {
        "1#no-dp": {"kind": "no-dp", "count": 1, "history": [], "round": 1}
    }
    with pytest.raises(SystemExit) as code:
        site_main(["spend", "--state-dir", site["state-dir"]])
    out = capsys.readouterr().out
    assert code.value.code == 0 and "lifetime ε = ∞" in out, out
    assert ("1", "no-dp", "1", "inf") in {tuple(line.split()) for line in out.splitlines()}


def test_a_delta_above_the_site_cap_is_refused(site, run_config):
    # 4.5e-3 is below 1/n for this site, yet far above the site's default cap of 1e-5
    refused = ask(site, {**run_config, "delta": 4.5e-3})
    assert refused.has_error() and refused.error.reason == "site-refused-delta"
    assert not ledger_path(site).exists()
    allowed = ask({**site, "max-delta": 5e-3}, {**run_config, "delta": 4.5e-3})
    assert not allowed.has_error(), allowed.error


def test_a_deleted_ledger_is_refused_while_context_state_shows_spend(site, run_config, make_context):
    context = make_context(site, run_config)
    assert not ask(site, run_config, context=context).has_error()
    assert STATE_KEY in context.state
    for path in ledger_path(site).parent.glob("privacy_ledger.json*"):
        path.unlink()  # ledger and its backup gone: only the running SuperNode remembers
    again = app(message(run_config, server_round=2), context)
    assert again.has_error() and again.error.reason == "site-ledger-error"


def test_under_dp_the_reply_holds_only_the_dp_keys_unless_the_site_opts_in(site, run_config):
    reply = ask(site, run_config)
    assert set(reply.content["metrics"]) <= set(DP_REPLY_KEYS)
    assert {"num-examples", "epsilon", "delta", "steps", "sample-rate", "noise-multiplier"} <= set(
        reply.content["metrics"]
    )
    opted = ask({**site, "release-train-metrics": True, "max-epsilon": 30.0}, run_config, run_id=2)
    assert {"train-loss", "train-seconds"} <= set(opted.content["metrics"])


def test_evaluation_on_local_data_is_refused_unless_the_site_opts_in(site, run_config):
    refused = ask(site, run_config, kind="evaluate")
    assert refused.has_error() and refused.error.reason == "site-refused-evaluation"
    assert not ledger_path(site).exists(), "a refused evaluation releases nothing and books nothing"
    for answers in (1, 2):
        scored = ask({**site, "release-evaluation": True}, run_config, kind="evaluate")
        assert not scored.has_error(), scored.error
        assert scored.content["metrics"]["num-examples"] > 0
        # every answer is booked as a release of this run (its count grows)
        assert PrivacyLedger(ledger_path(site)).runs["1#evaluation"]["count"] == answers


def test_failure_text_at_the_server_holds_no_path_or_column_name(tmp_path, site, run_config, frame, capsys):
    # the site's own data file, its label column renamed to a name the site would not disclose
    frame.rename(columns={"label": "diagnosis-code"}).to_csv(site["data-file"], index=False)
    reply = ask(site, run_config)
    assert reply.has_error()
    assert reply.error.reason == "site-declined"
    # the failure's text names the file and the column, in the site's own log only
    log = capsys.readouterr().out
    assert "site-declined" in log and "diagnosis-code" in log and "ward-7-private.csv" in log, log
    sent = f"{reply.error!r} {reply.metadata!r}"
    assert "diagnosis-code" not in sent and "ward-7" not in sent and str(tmp_path) not in sent, sent
