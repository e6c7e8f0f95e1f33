"""The fixed failure codes a site may send the server, in one place.

A site never sends the text of a failure (it may name files, rows or label values): its ClientApp
mod (``clients.policy.failures_as_codes``) answers with one of these codes, and the server
(``server.validation.site_reason``) accepts only these; any other reason is recorded as
``UNKNOWN_REASON``. Every failure that could depend on the site's data is ``DECLINED``.
"""

from __future__ import annotations

DECLINED = "site-declined"
LEDGER_ERROR = "site-ledger-error"
REFUSED_BUDGET = "site-refused-budget"
REQUIRES_DP = "site-requires-dp"
REFUSED_DELTA = "site-refused-delta"
REFUSED_LIFETIME_BUDGET = "site-refused-lifetime-budget"
REFUSED_EVALUATION = "site-refused-evaluation"
REFUSED_APP = "site-refused-app"  # a site pinned to another app (clients/pin.py)
REFUSED_RUN = "site-refused-run"  # a run key or round count the pinned run did not set
REFUSED_SETTING = "site-refused-setting"  # a setting a site cannot keep its guarantee under

SITE_FAILURE_CODES = frozenset(
    {
        DECLINED,
        LEDGER_ERROR,
        REFUSED_BUDGET,
        REQUIRES_DP,
        REFUSED_DELTA,
        REFUSED_LIFETIME_BUDGET,
        REFUSED_EVALUATION,
        REFUSED_APP,
        REFUSED_RUN,
        REFUSED_SETTING,
    }
)
# what the server records for any other reason (a site that is not fedllm's, or forged text)
UNKNOWN_REASON = "unknown-reason"
