"""A site's lifetime guarantee in plain words, from its ledger (``fedllm.ledger``)."""

from __future__ import annotations

from collections.abc import Mapping

from fedllm.accounting import epsilon_for
from fedllm.ledger import PrivacyLedger, is_release

DEFAULT_NOT_COVERED = [  # what every DP site releases outside DP (clients.policy adds opt-ins)
    "which rounds the site took part in, whether it answered and when (timing of replies)",
]


def not_covered_by(runs: Mapping[str, Mapping]) -> list[str]:
    """The union of the runs' ``not-covered`` lists (first-seen order), else the default."""
    seen = dict.fromkeys(s for run in runs.values() for s in run.get("not-covered", []))
    return list(seen) or list(DEFAULT_NOT_COVERED)


def lifetime_statement(
    ledger: PrivacyLedger, delta: float, mechanism: str = "prv", not_covered: list[str] | None = None
) -> str:
    """The site's lifetime guarantee in plain words, over every run and release in the ledger.

    A train reply sent without DP makes it ε = ∞, said plainly; evaluation answers are listed
    as not covered.
    """
    entries = ledger.runs
    runs = {k: e for k, e in entries.items() if not is_release(e)}
    releases = {k: e for k, e in entries.items() if is_release(e)}
    gaps = [*(not_covered or DEFAULT_NOT_COVERED), *release_gaps(releases)]
    no_dp = sorted(k.rsplit("#", 1)[0] for k, e in releases.items() if e["kind"] == "no-dp")
    if no_dp:
        return (
            f"This site's data has NO differential privacy guarantee: lifetime ε = ∞ (δ = {delta:g}), "
            f"because it sent updates trained without DP in {len(no_dp)} run(s) ({', '.join(no_dp)}). "
            f"Not covered either: {'; '.join(gaps)}."
        )
    if not runs:
        return (
            f"No DP training was recorded at this site ({ledger.path} holds no DP runs): no privacy "
            "budget has been spent, and no guarantee can be stated."
            + (f" Released outside DP: {'; '.join(release_gaps(releases))}." if releases else "")
        )
    epsilon = epsilon_for([h for run in runs.values() for h in run["history"]], delta, mechanism)
    return statement(epsilon, delta, len(runs), mechanism, gaps)


def release_gaps(releases: Mapping[str, Mapping]) -> list[str]:
    """Plain-words lines for the evaluation release records (exact scores, not DP)."""
    answers = [e["count"] for e in releases.values() if e["kind"] == "evaluation"]
    if not answers:
        return []
    return [
        f"{sum(answers)} exact evaluation answer(s) on the local test split in {len(answers)} run(s) "
        "(release-evaluation; the rows of that split have no DP guarantee from them)"
    ]


def statement(
    epsilon: float, delta: float, num_runs: int, mechanism: str = "prv", not_covered: list[str] | None = None
) -> str:
    """The guarantee for a lifetime ε over ``num_runs`` runs, in plain words."""
    count = f"{num_runs} run{'' if num_runs == 1 else 's'}"
    gaps = "; ".join(not_covered or DEFAULT_NOT_COVERED)
    return (
        f"This site's data is protected by (ε = {epsilon:.2f}, δ = {delta:g}) example-level "
        f"differential privacy, lifetime over {count} (every DP-SGD step this site took, composed "
        f"with Opacus' {mechanism.upper()} accountant, each run's DP count of n included; neighbouring "
        f"datasets: this site's data file with one example added or removed). Not covered: {gaps}."
    )
