"""A run that trained nothing fails: one line saying why, a non-zero status, no final adapter.

A round in which no site's update was aggregated (every site refused or failed, or the
aggregator kept none) leaves the global adapter as it was (``global-unchanged`` in the round's
record). Going on would only repeat the refusals, and a ``final-adapter/`` written at the end
would look trained while it is the initial one. So the ServerApp stops at that round: the round's
row (with its ``train-failures``) is logged, no checkpoint of it, no ``final-adapter/`` and no
``result.json`` are written, and ``RunFailed`` carries one line with the refusal codes, which
Flower records as the run's ``finished:failed`` details (``python -m server.submit`` prints it
and exits 1). The rounds before it stay, so a run stopped after round k can be resumed
(``resume=``) once the cause is fixed.
"""

from __future__ import annotations

from collections import Counter


class RunFailed(RuntimeError):
    """The run stops; the message is one line saying why."""


def _codes(failures: list[dict]) -> str:
    """``site-declined x2, site-policy-refused x1``: each reason (cut short) with its count."""
    counts = Counter(" ".join(str(f.get("reason", "?")).split())[:80] for f in failures)
    return ", ".join(f"{reason} x{n}" for reason, n in counts.most_common())


def untrained_round(server_round: int, num_rounds: int, record: dict) -> str | None:
    """One line saying why round ``server_round`` aggregated no update, or None if it did."""
    if server_round < 1 or "global-unchanged" not in record:
        return None
    failures = record.get("train-failures", [])
    why = str(record["global-unchanged"])
    if failures and not record.get("train-replies"):
        why = f"every site refused or failed: {_codes(failures)}"
    elif failures:
        why += f"; train failures: {_codes(failures)}"
    kept = f"; rounds up to {server_round - 1} are kept (resume= once fixed)" if server_round > 1 else ""
    return (
        f"round {server_round} of {num_rounds}: no site's update was aggregated ({why}); "
        f"the run stops without a final adapter{kept}"
    )
