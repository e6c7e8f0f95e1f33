"""``python -m clients.site init | rebase | spend``: a site's state folder and its books.

- ``init --state-dir DIR``: create the state folder (0700) with its marker and secret, and its
  high-water mark outside it (``fedllm.site_state``); an initialised folder is left unchanged.
- ``rebase --state-dir DIR``: the operator's override when an older state is knowingly kept:
  the high-water mark is set to the ledger as it is (spend the ledger lost is forgotten).
- ``spend --state-dir DIR``: the site's lifetime statement at its ``max-delta`` (from the
  marker, unless ``--delta``), the DP runs, and every release outside DP (``no-dp`` runs, ε = ∞;
  ``evaluation`` answers).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from clients.policy import DEFAULT_MAX_DELTA
from fedllm.ledger import is_release, run_epsilon
from fedllm.site_state import (
    SiteState,
    StateError,
    check_high_water,
    init_state,
    open_state,
    rebase_high_water,
)
from fedllm.statement import lifetime_statement, not_covered_by


def init(args: argparse.Namespace) -> int:
    """Initialise a state folder (or say it already is); print where its high-water mark lives."""
    state, created = init_state(Path(args.state_dir).absolute(), args.high_water_dir, args.new_site)
    verb = "initialised" if created else "already initialised (nothing changed)"
    print(
        f"site state {state.folder}: {verb}; state id {state.state_id}, created {state.created}; "
        f"high-water mark {state.mark} (keep it outside backups of the state folder)"
    )
    return 0


def rebase(args: argparse.Namespace) -> int:
    """Set the high-water mark to the ledger as it is, saying what it forgets."""
    state = open_state(Path(args.state_dir).absolute(), args.high_water_dir)
    try:
        check_high_water(state)
    except StateError as err:
        print(f"re-basing over: {err}")
    measures = rebase_high_water(state)
    print(f"high-water mark {state.mark} re-based to {state.ledger.path}: {len(measures)} entr(y/ies)")
    return 0


def site_delta(state: SiteState, given: float | None) -> tuple[float, str]:
    """The δ ``spend`` composes at, and where it came from."""
    if given is not None:
        return given, "--delta"
    if isinstance(state.policy.get("max_delta"), int | float):
        return float(state.policy["max_delta"]), "the site's max-delta"
    return DEFAULT_MAX_DELTA, "the default max-delta: the site's own is not on record yet"


def _table(rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def _run_row(key: str, run: dict) -> tuple[str, ...]:
    plan = run["plan"]
    last, planned = run.get("round", "?"), run.get("num-rounds")
    target = plan.get("target_epsilon")
    return (
        key,
        f"{run_epsilon(run):.3f}",
        f"{target:g}" if isinstance(target, int | float) else "?",
        f"{plan['delta']:g}",
        str(sum(int(h[2]) for h in run["history"])),
        f"{last}/{planned}" if planned is not None else str(last),
        str(run.get("data-fingerprint", "-")),
    )


def spend(args: argparse.Namespace) -> int:
    """Print the lifetime statement, each DP run alone, then every release outside DP."""
    state = open_state(Path(args.state_dir).absolute(), args.high_water_dir)
    check_high_water(state)
    entries = state.ledger.runs
    delta, source = site_delta(state, args.delta)
    print(lifetime_statement(state.ledger, delta, args.mechanism, not_covered_by(entries)))
    print(f"(composed at δ = {delta:g}: {source})")
    runs = {k: e for k, e in entries.items() if not is_release(e)}
    if runs:
        header = ("run", "epsilon", "target", "delta", "steps", "round", "data")
        print("\nper run (epsilon of that run alone, recomputed from its history at its own delta):")
        print("\n".join(_table([header, *(_run_row(k, r) for k, r in sorted(runs.items()))])))
    if reserved := _reservations(runs):
        print("\nreserved against the cap (runs started, not finished; an abandoned one: `release`):")
        print("\n".join(reserved))
    releases = [(k.rsplit("#", 1)[0], e) for k, e in sorted(entries.items()) if is_release(e)]
    if releases:
        rows: list[tuple[str, ...]] = [("run", "release", "count", "epsilon")]
        rows += [(k, e["kind"], str(e["count"]), "inf" if e["kind"] == "no-dp" else "-") for k, e in releases]
        print("\nreleases outside DP (no-dp: updates without noise, epsilon inf; evaluation: exact scores):")
        print("\n".join(_table(rows)))
    return 0


def release(args: argparse.Namespace) -> int:
    """Release an abandoned run's reservation (``PrivacyLedger.release_reservation``)."""
    state = open_state(Path(args.state_dir).absolute(), args.high_water_dir)
    check_high_water(state)
    steps = state.ledger.release_reservation(args.run)
    print(
        f"run {args.run}: released the reservation of {steps} planned steps it had not taken; "
        "what it spent stays booked (a resumed run reserves again or is refused)"
    )
    return 0


def _reservations(runs: dict) -> list[str]:
    """One line per run holding a reservation (a started run's plan still to come)."""
    return [
        f"{key}: {sum(int(h[2]) for h in run['reserved'])} planned steps not yet taken"
        for key, run in sorted(runs.items())
        if run.get("reserved")
    ]


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """The ``init``, ``rebase``, ``release`` and ``spend`` subcommands."""
    i = sub.add_parser("init", help="create this site's state folder (once, before the first join)")
    i.add_argument("--state-dir", required=True, help="the site's state folder (made absolute)")
    _high_water_flag(i)
    i.add_argument(
        "--new-site",
        action="store_true",
        help="initialise even though the high-water folder tracks another state with spend",
    )
    r = sub.add_parser("rebase", help="operator override: accept the ledger as it is (forgets lost spend)")
    r.add_argument("--state-dir", required=True)
    _high_water_flag(r)
    rel = sub.add_parser("release", help="release an abandoned run's reservation of its unspent plan")
    rel.add_argument("--state-dir", required=True)
    rel.add_argument("--run", required=True, help="the run key `spend` lists")
    _high_water_flag(rel)
    s = sub.add_parser("spend", help="print this site's privacy spend and every release")
    s.add_argument("--state-dir", required=True)
    _high_water_flag(s)
    s.add_argument(
        "--delta", type=parse_delta, default=None, help="compose at this delta (default: max-delta)"
    )
    s.add_argument("--mechanism", default="prv", choices=["prv", "rdp"], help="Opacus accountant")


def _high_water_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--high-water-dir",
        default=None,
        help="folder of the high-water mark, outside the state folder (init default: "
        "$FEDLLM_HIGH_WATER_DIR, else ~/.local/state/fedllm/high-water; later: the marker's)",
    )


def parse_delta(text: str) -> float:
    """A δ: a number strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a delta strictly between 0 and 1, e.g. 1e-5")
    return value


COMMANDS = {"init": init, "rebase": rebase, "release": release, "spend": spend}
