"""A site's own rules: where they are read from, and what they refuse (no model needed)."""

from __future__ import annotations

import pytest

from clients.policy import SitePolicy, SitePolicyError, failure_code
from fedllm.accounting import epsilon_for, plan_privacy
from fedllm.config import Settings
from fedllm.data import DataError


def test_a_real_site_reads_its_policy_from_its_node_config_only(make_context):
    widen = {"sim-site-max-epsilon": 100.0, "sim-site-allow-no-dp": True, "max-epsilon": 100.0}
    policy = SitePolicy.from_context(make_context({"data-file": "x.csv", "max-epsilon": 3.0}, widen))
    assert policy.max_epsilon == 3.0 and not policy.allow_no_dp
    defaults = SitePolicy.from_context(make_context({"data-file": "x.csv"}, widen))
    assert (defaults.max_epsilon, defaults.max_delta, defaults.allow_no_dp) == (8.0, 1e-5, False)


def test_a_virtual_site_reads_the_runs_sim_site_keys(make_context):
    run = {"sim-site-max-epsilon": 3.0, "sim-site-allow-no-dp": "true", "max-epsilon": 100.0}
    policy = SitePolicy.from_context(make_context({"partition-id": 0, "num-partitions": 3}, run))
    assert policy.max_epsilon == 3.0 and policy.allow_no_dp


def test_the_lifetime_check_composes_everything_committed():
    policy = SitePolicy(max_epsilon=8.0)
    plan = plan_privacy(Settings(target_epsilon=6.0, max_steps=5).resolved(), 500, planned_rounds=3)
    whole = [(plan.noise_multiplier, plan.sample_rate, plan.planned_steps)]
    assert policy.check_lifetime(whole) == pytest.approx(epsilon_for(whole, 1e-5), rel=1e-6)
    with pytest.raises(SitePolicyError, match="lifetime epsilon") as refused:
        policy.check_lifetime(whole * 3)  # two earlier runs (spent or reserved) and this one
    assert refused.value.code == "site-refused-lifetime-budget"


def test_no_dp_a_wide_delta_and_ghost_clipping_are_refused_from_the_run_config_alone():
    policy = SitePolicy()
    with pytest.raises(SitePolicyError) as no_dp:
        policy.check_run(Settings(target_epsilon=float("inf")))
    assert no_dp.value.code == "site-requires-dp"
    with pytest.raises(SitePolicyError) as delta:
        policy.check_run(Settings(target_epsilon=8.0, delta=4.5e-3))
    assert delta.value.code == "site-refused-delta"
    with pytest.raises(SitePolicyError) as ghost:
        policy.check_run(Settings(target_epsilon=8.0, grad_sample_mode="ghost"))
    assert ghost.value.code == "site-refused-setting"
    SitePolicy(allow_no_dp=True).check_run(Settings(target_epsilon=float("inf")))
    SitePolicy(allow_no_dp=True).check_run(Settings(target_epsilon=float("inf"), grad_sample_mode="ghost"))
    policy.check_run(Settings(target_epsilon=8.0))  # delta 0: 1e-5, whatever the site's n
    policy.check_run(Settings(target_epsilon=8.0, grad_sample_mode="functorch"))


def test_a_delta_not_below_one_over_the_dp_count_is_refused():
    SitePolicy.check_count(1e-3, 999)
    with pytest.raises(SitePolicyError) as refused:
        SitePolicy.check_count(1e-3, 1000)
    assert refused.value.code == "site-refused-delta"


def test_a_dp_reply_keeps_only_the_dp_keys():
    metrics = {"num-examples": 10, "epsilon": 1.0, "train-loss": 0.5, "train-seconds": 3.0, "accuracy": 1.0}
    assert set(SitePolicy().reply_metrics(metrics, private=True)) == {"num-examples", "epsilon"}
    opted = SitePolicy(release_train_metrics=True).reply_metrics(metrics, private=True)
    assert set(opted) == {"num-examples", "epsilon", "train-loss", "train-seconds"}
    assert SitePolicy().reply_metrics(metrics, private=False) == metrics


def test_failures_reach_the_server_as_fixed_codes():
    # anything that could depend on the data is one code, whatever it was
    assert failure_code(DataError("/srv/ward-7.csv: no column 'review'")) == "site-declined"
    assert failure_code(KeyError("row 17")) == "site-declined"
    assert failure_code(SitePolicyError("site-requires-dp", "text")) == "site-requires-dp"


def test_an_impossible_policy_is_one_clear_line():
    with pytest.raises(ValueError, match="max-delta"):
        SitePolicy.from_config({"max-delta": 2.0})
