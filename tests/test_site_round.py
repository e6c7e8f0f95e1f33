"""fedllm/site_round.py: what one site's round reports, the same for every driver."""

from __future__ import annotations

import math

from fedllm.accounting import PrivacyPlan
from fedllm.contract import TRAIN_REPLY_KEYS
from fedllm.site_round import reported_count, train_metrics
from fedllm.train import TrainResult

RESULT = TrainResult(steps=3, examples_seen=90, mean_loss=0.5, seconds=1.0, epsilon=2.0, noise_multiplier=1.1)


def test_a_dp_site_reports_its_dp_count_and_its_plan_never_its_n():
    plan = PrivacyPlan(1.1, 0.5, 1e-5, 24, 8.0, "prv", public_n=97)
    metrics = train_metrics(RESULT, plan, 100, 4096, 1.5)
    assert set(metrics) == set(TRAIN_REPLY_KEYS)  # the policy filters what leaves (clients/policy.py)
    assert metrics["num-examples"] == 97 == reported_count(plan, 100)
    assert (metrics["epsilon"], metrics["delta"], metrics["sample-rate"]) == (2.0, 1e-5, 0.5)
    assert (metrics["steps"], metrics["update-bytes"], metrics["train-seconds"]) == (3, 4096, 1.5)


def test_a_site_without_dp_reports_its_n_and_an_infinite_epsilon():
    metrics = train_metrics(RESULT, None, 100, 4096, 1.5)
    assert metrics["num-examples"] == 100
    assert math.isinf(metrics["epsilon"]) and metrics["delta"] == 0.0 and metrics["sample-rate"] == 1.0
    # a plan made without a DP count (the audit's noise-free plan) weighs by n
    assert reported_count(PrivacyPlan(0.0, 0.5, 1e-5, 24, math.inf, "rdp"), 100) == 100
