"""A site's own rules: its epsilon cap, whatever the run config asks."""

from __future__ import annotations

import pytest
from flwr.app import Context, RecordDict

from clients.app import check_site_policy
from fedllm.config import Settings
from fedllm.privacy import BudgetExhaustedError, plan_privacy


def _context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def test_site_cap_refuses_larger_budgets_and_no_dp():
    site = _context({"max-epsilon": 3.0})
    check_site_policy(site, plan_privacy(Settings(target_epsilon=3.0), 500))
    with pytest.raises(BudgetExhaustedError, match="at most 3"):
        check_site_policy(site, plan_privacy(Settings(target_epsilon=8.0), 500))
    with pytest.raises(BudgetExhaustedError, match="requires DP"):
        check_site_policy(site, None)
    check_site_policy(_context({}), None)  # no cap: the run decides
