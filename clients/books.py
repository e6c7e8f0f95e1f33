"""A site's privacy books for one run: what it spent, what it reserved, its DP count n̂.

A deployed site keeps them in its ledger (``fedllm.ledger``) under the site-wide budget lock; a
virtual site of a simulation in ``context.state`` (one run, no other runs to compose with). The
order a round follows (``clients.handlers``) is what makes every answer before the noise public:

1. the run config against the site's policy (public);
2. under the budget lock: the lifetime check of the count (public: the ledger and ``count-noise``),
   then the data is read, n̂ drawn, the plan made from n̂, the lifetime check of the whole
   remaining plan, and the count, the round's steps and the reservation of the rest booked in
   one durable write — *before* the first noisy step and before anything leaves the site;
3. training. A round that fails after step 2 stays booked.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, Context

from fedllm.accounting import PrivacyPlan
from fedllm.ledger import LedgerError, PrivacyLedger, is_release

STATE_KEY = "fedllm-privacy"


@dataclass
class RunBooks:
    """One run's entry: its history (count included), its DP count n̂, its reserved plan, its DP
    label histogram (``imbalance`` set) and how many count / histogram draws its history books
    (one, unless a draw failed after its booking and was booked again)."""

    history: list = field(default_factory=list)
    public_n: int | None = None
    reserved: list = field(default_factory=list)
    histogram: list | None = None
    draws: int = 1


class SiteBooks:
    """The books of run ``key`` at this site: its ledger (deployed) or ``context.state`` (virtual)."""

    def __init__(self, context: Context, ledger: PrivacyLedger | None, key: str):
        self.context, self.ledger, self.key = context, ledger, key

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """The site-wide budget lock (a virtual site runs one run: it needs none)."""
        if self.ledger is None:
            yield
            return
        with self.ledger.budget_lock():
            yield

    def _in_state(self) -> RunBooks:
        state = self.context.state.config_records.get(STATE_KEY)
        if not state or state.get("run-key", self.key) != self.key:
            return RunBooks()
        histogram = json.loads(str(state.get("label-histogram", "null")))
        draws = int(str(state.get("count-draws", 1)))  # stored as an int
        return RunBooks(
            json.loads(str(state["history"])),
            int(str(state.get("public-n", 0))) or None,
            [],
            histogram,
            draws,
        )

    def this_run(self) -> RunBooks:
        """This run's books. Refuses (``LedgerError``) when ``context.state`` holds spend under
        this run key that the ledger lost (deleted or reset while the SuperNode ran)."""
        in_state = self._in_state()
        if self.ledger is None:
            return in_state
        entry = self.ledger.runs.get(self.key, {})
        books = RunBooks(
            [list(h) for h in entry.get("history", [])],
            entry.get("public-n"),
            entry.get("reserved", []),
            entry.get("label-histogram"),
            int(entry.get("count-draws", 1)),
        )
        if _steps(in_state.history) > _steps(books.history):
            raise LedgerError(
                f"{self.ledger.path}: this run already spent privacy that the ledger no longer holds "
                "(deleted or reset?); restore it from its .bak backup before this site trains again"
            )
        return books

    def others(self) -> list:
        """Every other run's spent and reserved steps (what the lifetime check composes with)."""
        return [] if self.ledger is None else self.ledger.committed_history(exclude=self.key)

    def spent_by_others(self) -> list:
        """Every other run's spent steps (what the lifetime statement composes with)."""
        if self.ledger is None:
            return []
        return [list(h) for k, run in self.ledger.runs.items() if k != self.key for h in run["history"]]

    def other_runs(self) -> int:
        """How many other runs this site's ledger holds."""
        if self.ledger is None:
            return 0
        return len([k for k, e in self.ledger.runs.items() if k != self.key and not is_release(e)])

    def book(self, books: RunBooks, plan: PrivacyPlan, epsilon: float, **extra: object) -> None:
        """Write this run's books durably (before the noise they account for is drawn)."""
        self.context.state[STATE_KEY] = ConfigRecord(
            {
                "run-key": self.key,
                "history": json.dumps(books.history),
                "public-n": int(books.public_n or 0),
                "label-histogram": json.dumps(books.histogram),
                "count-draws": int(books.draws),
            }
        )
        if self.ledger is not None:
            self.ledger.record(
                self.key,
                books.history,
                plan.to_dict(),
                epsilon,
                public_n=books.public_n,
                reserved=books.reserved,
                label_histogram=books.histogram,
                count_draws=books.draws,
                **extra,
            )


def _steps(history: list) -> int:
    return sum(int(h[2]) for h in history)
