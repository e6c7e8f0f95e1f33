"""Hostile sites, round two (issue 22, parts 2, 4, 5, 6): arrival order, forged text, false
numbers and the run log's JSON, through the real ``AdapterFedAvg`` and ``RunLog``."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
from flwr.app import MetricRecord

from clients.policy import SitePolicyError, failure_code
from fedllm.accounting import BudgetExhaustedError
from fedllm.failure_codes import SITE_FAILURE_CODES, UNKNOWN_REASON
from fedllm.ledger import LedgerError
from server.runlog import RunLog
from server.strategy import AdapterFedAvg

from .replies import (
    as_dict,
    dp_metrics,
    error_reply,
    global_adapter,
    honest,
    reply,
    server_identity,  # noqa: F401 - the fixture below
    start_round,
)

pytestmark = pytest.mark.usefixtures("server_identity")
NODES = {11: 100, 7: 140, 23: 80, 5: 120, 42: 110}  # node -> num-examples
FORGED = "site-declined\n\x1b[32mINFO \x1b[0m:      round 3: all sites honest\x1b[0m"


def _strict(line: str) -> dict:
    """``json.loads`` that refuses NaN, Infinity and -Infinity tokens (a strict JSON reader)."""

    def refuse(token: str):
        raise ValueError(f"not strict JSON: {token}")

    return json.loads(line, parse_constant=refuse)


def _train_replies(g: dict) -> list:
    # one site's update is oversized, so clipping and cosine's discount are part of the result
    replies = [
        reply(n, honest(g, n, scale=0.1 if n != 42 else 5.0), dp_metrics(size)) for n, size in NODES.items()
    ]
    return [*replies, error_reply(3, "site-declined"), reply(9, honest(g, 9), dp_metrics(math.nan))]


def _one_round(order) -> tuple[dict, dict]:
    g = global_adapter()
    strategy = AdapterFedAvg()  # the defaults: cosine, auto norm bound and weight cap
    start_round(strategy, g, [*NODES, 3, 9])
    arrays, metrics = strategy.aggregate_train(1, order(_train_replies(g)))
    return as_dict(arrays), {"record": strategy.round_summary(1), "metrics": dict(metrics)}


def test_the_same_replies_in_two_arrival_orders_give_a_bit_identical_global_and_record():
    first, first_record = _one_round(lambda r: r)
    second, second_record = _one_round(lambda r: r[::-1])
    third, _ = _one_round(lambda r: [r[i] for i in (3, 0, 6, 2, 5, 1, 4)])
    for name in first:
        assert first[name].tobytes() == second[name].tobytes() == third[name].tobytes(), name
    assert json.dumps(first_record, sort_keys=True) == json.dumps(second_record, sort_keys=True)
    assert list(first_record["record"]["sites"]) == ["5", "7", "11", "23", "42"]


def _evaluate(strategy: AdapterFedAvg, scores: dict[int, dict]) -> MetricRecord | None:
    replies = [reply(n, {}, records={"metrics": MetricRecord(m)}) for n, m in scores.items()]
    return strategy.aggregate_evaluate(1, replies)


def test_evaluation_is_order_free_and_one_sites_claimed_count_cannot_buy_the_score():
    honest_scores = {
        n: {"num-examples": 100, "loss": 0.9, "accuracy": 0.5, "macro-f1": 0.4} for n in (1, 2, 3, 4)
    }
    liar = {5: {"num-examples": 1_000_000, "loss": 0.0, "accuracy": 1.0, "macro-f1": 1.0}}
    forward = _evaluate(AdapterFedAvg(), {**honest_scores, **liar})
    backward = _evaluate(AdapterFedAvg(), dict(reversed({**honest_scores, **liar}.items())))
    assert dict(forward) == dict(backward)
    # capped at 2 x the median claimed count (200): 0.5 * 400/600 + 1.0 * 200/600
    assert forward["accuracy"] == pytest.approx(2 / 3) and forward["accuracy"] < 0.7


@pytest.mark.parametrize(
    "metrics, says",
    [
        ({"accuracy": -5.0}, "'accuracy' is -5"),
        ({"accuracy": 1e308}, "'accuracy' is 1e+308"),
        ({"macro-f1": 1.5}, "'macro-f1' is 1.5"),
        ({"loss": -0.1}, "'loss' is -0.1"),
        ({"loss": 1e308}, "'loss' is 1e+308"),
        ({"loss": math.inf}, "'loss' is infinite"),
    ],
)
def test_an_out_of_range_evaluation_reply_is_dropped_with_its_reason(metrics, says):
    strategy = AdapterFedAvg()
    good = {"num-examples": 100, "loss": 0.9, "accuracy": 0.5, "macro-f1": 0.4}
    result = _evaluate(strategy, {1: good, 2: good, 3: {**good, **metrics}})
    [failure] = strategy.round_summary(1)["evaluate-failures"]
    assert failure["node"] == 3 and says in failure["reason"], failure
    assert result["accuracy"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    "metrics, says",
    [
        (dp_metrics(epsilon=0.0), "'epsilon' is 0, expected > 0"),
        (dp_metrics(epsilon=math.inf), "'epsilon' is inf for a DP reply"),
        (dp_metrics(steps=2.5), "'steps' is 2.5, expected a whole number"),
        (dp_metrics(steps=-1), "'steps' is -1"),
        (dp_metrics(**{"update-bytes": 10.5}), "'update-bytes' is 10.5"),
        (dp_metrics(**{"train-loss": 1e308}), "'train-loss' is 1e+308"),
        (dp_metrics(**{"train-loss": -2.0}), "'train-loss' is -2"),
        (dp_metrics(**{"train-seconds": 1e300}), "'train-seconds' is 1e+300"),
    ],
)
def test_an_out_of_range_train_reply_is_dropped_with_its_reason(metrics, says):
    g = global_adapter()
    strategy = AdapterFedAvg()
    start_round(strategy, g, [1, 2, 3])
    strategy.aggregate_train(1, [reply(n, honest(g, n)) for n in (1, 2)] + [reply(3, honest(g, 3), metrics)])
    record = strategy.round_summary(1)
    [failure] = record["train-failures"]
    assert failure["node"] == 3 and says in failure["reason"], failure
    assert record["dropped"] == [3] and record["train-replies"] == 2


def test_a_reply_without_dp_may_say_epsilon_inf():
    g = global_adapter()
    strategy = AdapterFedAvg()
    start_round(strategy, g, [1, 2])
    no_dp = {"num-examples": 100, "steps": 3, "epsilon": math.inf, "delta": 0.0, "noise-multiplier": 0.0}
    strategy.aggregate_train(1, [reply(n, honest(g, n), no_dp) for n in (1, 2)])
    assert strategy.round_summary(1)["train-replies"] == 2


def test_only_the_fixed_failure_codes_reach_the_record_and_forged_text_cannot_forge_a_log_line(
    tmp_path, caplog
):
    g = global_adapter()
    strategy = AdapterFedAvg()
    start_round(strategy, g, [1, 2, 3, 4, 5])
    errors = [error_reply(3, code) for code in ("site-declined",)]
    errors += [error_reply(4, FORGED), error_reply(5, "x" * 1_000_000 + "\n" + FORGED)]
    with caplog.at_level(logging.WARNING):
        strategy.aggregate_train(1, [reply(n, honest(g, n)) for n in (1, 2)] + errors)
    reasons = {f["node"]: f["reason"] for f in strategy.round_summary(1)["train-failures"]}
    assert reasons[3] == "site-declined"
    for node in (4, 5):
        assert reasons[node].startswith(UNKNOWN_REASON) and len(reasons[node]) <= 200, reasons[node]
        assert "\n" not in reasons[node] and "\x1b" not in reasons[node]
    for rec in caplog.records:
        assert "\n" not in rec.getMessage() and "\x1b" not in rec.getMessage()
    log = RunLog(tmp_path, {})
    log.round(1, strategy.round_summary(1), {})
    [line] = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(line) < 4000  # the 1 MB reason is not a 1 MB row


def test_a_reason_built_from_a_sites_own_names_is_one_short_line():
    g = global_adapter()
    strategy = AdapterFedAvg()
    start_round(strategy, g, [1, 2, 3])
    forged_name = "y" * 1_000_000 + FORGED
    bad = reply(3, {**honest(g, 3), forged_name: np.zeros(2, np.float32)})
    strategy.aggregate_train(1, [reply(n, honest(g, n)) for n in (1, 2)] + [bad])
    [failure] = strategy.round_summary(1)["train-failures"]
    assert "unexpected" in failure["reason"] and len(failure["reason"]) <= 200
    assert "\n" not in failure["reason"] and "\x1b" not in failure["reason"]


def test_every_code_a_site_sends_is_one_the_server_accepts():
    errors = [
        ValueError("/srv/ward-7.csv"),
        LedgerError("x"),
        BudgetExhaustedError("x"),
        *(SitePolicyError(code, "x") for code in SITE_FAILURE_CODES),
    ]
    assert {failure_code(err) for err in errors} <= SITE_FAILURE_CODES


def test_the_run_log_is_strict_json_whatever_the_values(tmp_path):
    g = global_adapter()
    strategy = AdapterFedAvg()
    start_round(strategy, g, [1, 2, 3, 4, 5, 6])
    replies = [reply(n, honest(g, n)) for n in (1, 2)]
    replies += [
        reply(3, honest(g, 3), dp_metrics(math.nan)),
        reply(4, honest(g, 4), dp_metrics(epsilon=math.nan)),
    ]
    replies += [reply(5, {**honest(g, 5), "head.bias": np.full(3, np.inf, np.float32)})]
    no_dp = {"num-examples": 100, "epsilon": math.inf, "delta": 0.0, "noise-multiplier": 0.0}
    replies += [reply(6, honest(g, 6), no_dp)]
    strategy.aggregate_train(1, replies)
    extra = {"server": {"loss": math.nan}, "numpy": [np.float32("nan"), np.float64("-inf"), np.int64(3)]}
    log = RunLog(tmp_path, {"adapter-bytes": np.int64(10)})
    log.round(0, {}, {"accuracy": 0.5})
    log.round(1, {**strategy.round_summary(1), **extra}, {"loss": math.inf})
    log.finish(tmp_path / "final-adapter")
    rows = [_strict(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["sites"]["6"]["epsilon"] == "inf" and rows[1]["numpy"] == ["nan", "-inf", 3]
    assert rows[1]["server"] == {"loss": "inf"}
    _strict((tmp_path / "result.json").read_text())
    resumed = RunLog(tmp_path, {}, rows)  # a resumed log rewrites the kept rows, strictly too
    assert [_strict(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == resumed.rows
