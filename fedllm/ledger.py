"""A site's privacy ledger that never forgets: every DP-SGD step the site took, on its own disk.

``{"version": 1, "runs": {run_key: {"history": [[sigma, q, steps], ...], "plan": {...}, "epsilon":
float, ...}}}``, with ``<name>.bak`` (a copy of the last write) and ``<name>.lock`` beside it.

- ``record`` holds an exclusive ``flock``, re-reads under it and merges (other runs as on disk; a
  run keeps whichever history has more steps), then writes ledger and backup each through a unique
  fsynced temp file and a rename, and fsyncs the folder. Readers hold a shared lock.
- Every read validates both files, including consistency: a run's stored epsilon may exceed the
  epsilon recomputed from its history (its plan's delta and accountant) by at most 1% + 1e-6.
  Recomputations are cached per (history, delta, accountant): a write pays for one at most.
- Forgetting is refused, never repaired: a missing ledger whose backup exists, a ledger holding
  less spend than its backup, an empty ledger without a backup (fedllm never writes one), and a
  ledger or backup that is a symbolic link (a write would replace the link, not its target).
  No ledger and no backup looks like a fresh site here; ``fedllm.site_state``'s high-water mark,
  kept outside the state folder, catches a deleted or restored-older ledger of an initialised site.
- Release records (``kind``: ``no-dp`` for train replies sent without DP, ε = ∞; ``evaluation``
  for exact scores on the local test split) sit beside the runs under ``<run key>#<kind>`` with a
  ``count`` and an empty history (``record_release``): every release is on the books.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import math
import numbers
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TypeGuard

from fedllm.accounting import PrivacyPlan, compact, epsilon_for
from fedllm.files import write_durably

VERSION = 1
RELEASE_KINDS = ("no-dp", "evaluation")  # release records: not DP (no-dp is epsilon = infinity)
ACCOUNTANTS = ("prv", "rdp", "gdp")


class LedgerError(ValueError):
    """The ledger cannot be trusted; the one-line message names the file, the fault and the fix."""


def _fault(path: Path, problem: str, fix: str | None = None) -> LedgerError:
    """A ``LedgerError`` whose message is one line: ``<file>: <what is wrong>; <the fix>``."""
    if fix is None:
        backup = path.with_name(path.name + ".bak")
        source = backup.name if backup.exists() else "a backup of the state folder"
        fix = f"restore it from {source}; never delete it: the spend it records is real"
    return LedgerError(" ".join(f"{path}: {problem}; {fix}".split()))


def _finite(value: object) -> TypeGuard[float]:
    """A real, finite number (not a bool)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _item_problem(item: object) -> str | None:
    """Why a history item is not ``[sigma, q, steps]``, or None when it is."""
    if not (isinstance(item, list) and len(item) == 3 and all(_finite(v) for v in item)):
        return "is not a list of 3 finite numbers [sigma, q, steps]"
    sigma, q, steps = item
    if sigma <= 0:
        return "has a noise multiplier sigma <= 0"
    if not 0 < q <= 1:
        return "has a sampling rate q outside (0, 1]"
    if not isinstance(steps, numbers.Integral) or steps < 0:
        return "has steps that are not a non-negative integer"
    return None


@functools.lru_cache(maxsize=8192)
def _recompute(history: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    return epsilon_for([list(h) for h in history], delta, accountant)


def run_epsilon(entry: Mapping) -> float:
    """Epsilon of one validated run entry, recomputed from its history at its plan's delta."""
    history = tuple(tuple(h) for h in entry["history"])
    return _recompute(history, float(entry["plan"]["delta"]), str(entry["plan"]["accountant"]))


def total_steps(entry: Mapping) -> int:
    """DP-SGD steps in one validated run entry."""
    return sum(int(h[2]) for h in entry["history"])


def is_release(entry: Mapping) -> bool:
    """A release record (``kind`` in ``RELEASE_KINDS``), not a DP run."""
    return "kind" in entry


def entry_measure(entry: Mapping) -> int:
    """How much an entry has spent: DP-SGD steps of a run, the ``count`` of a release record."""
    return int(entry["count"]) if is_release(entry) else total_steps(entry)


def _release_problem(entry: dict) -> str | None:
    """Why a release record is invalid, or None when it is sound."""
    if entry["kind"] not in RELEASE_KINDS:
        return f"'kind' {entry['kind']!r} is not one of {RELEASE_KINDS}"
    count = entry.get("count")
    if not (isinstance(count, int) and not isinstance(count, bool) and count >= 1):
        return "'count' is not an integer >= 1"
    if entry.get("history", []) != []:
        return "a release record holds DP-SGD history"
    return None


def _entry_problem(entry: object) -> str | None:
    """Why a run entry is invalid or inconsistent, or None when it is sound."""
    if not isinstance(entry, dict):
        return f"is a {type(entry).__name__}, not an object"
    if is_release(entry):
        return _release_problem(entry)
    history = entry.get("history")
    if not isinstance(history, list):
        return "'history' is missing or not a list"
    for i, item in enumerate(history):
        if problem := _item_problem(item):
            return f"history item {i} {problem}"
    epsilon, plan = entry.get("epsilon"), entry.get("plan")
    if not _finite(epsilon) or epsilon < 0:
        return "'epsilon' is not a finite non-negative number"
    if not isinstance(plan, dict):
        return "'plan' is missing or not an object"
    delta, accountant = plan.get("delta"), plan.get("accountant")
    if not (_finite(delta) and 0 < delta < 1) or accountant not in ACCOUNTANTS:
        return f"the plan lacks a delta in (0, 1) or an accountant in {ACCOUNTANTS}"
    public_n = entry.get("public-n")
    if public_n is not None and not (isinstance(public_n, numbers.Integral) and int(public_n) >= 1):
        return "'public-n' (the DP count) is not a positive whole number"
    reserved = entry.get("reserved", [])
    if not isinstance(reserved, list) or any(_item_problem(h) for h in reserved):
        return "'reserved' is not a list of [sigma, q, steps] items"
    gaps = entry.get("not-covered", [])
    if not (isinstance(gaps, list) and all(isinstance(s, str) for s in gaps)):
        return "'not-covered' is not a list of strings"
    if epsilon <= 1e-6:
        return None  # nothing to check: a recomputed epsilon is never negative
    try:
        recomputed = run_epsilon(entry)
    except (ValueError, ArithmeticError, RuntimeError) as err:
        return f"its epsilon cannot be recomputed from its history ({err})"
    if epsilon > recomputed * 1.01 + 1e-6:
        return (
            f"stored epsilon {epsilon:.4g} is above the {recomputed:.4g} its history accounts "
            "for (steps lowered or history emptied)"
        )
    return None


def validate(doc: object, path: Path, fix: str | None = None) -> dict[str, dict]:
    """The runs of a parsed ledger document; ``LedgerError`` (one line) for any fault."""
    if not isinstance(doc, dict):
        raise _fault(path, f"top level is a JSON {type(doc).__name__}, not an object", fix)
    if doc.get("version", VERSION) != VERSION:
        raise _fault(
            path,
            f"version {doc['version']!r} is not {VERSION}",
            "read it with the fedllm release that wrote it",
        )
    runs = doc.get("runs")
    if not isinstance(runs, dict):
        raise _fault(path, "'runs' is missing or not an object", fix)
    for key, entry in runs.items():
        if problem := _entry_problem(entry):
            raise _fault(path, f"run {key!r}: {problem}", fix)
    return runs


class PrivacyLedger:
    """A site's privacy spend per run, kept on the site's own disk (never sent anywhere)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.backup = self.path.with_name(self.path.name + ".bak")
        self.lock = self.path.with_name(self.path.name + ".lock")

    @contextlib.contextmanager
    def _locked(self, mode: int, lock: Path | None = None) -> Iterator[None]:
        lock = lock or self.lock
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        except OSError as err:
            raise _fault(
                lock,
                f"cannot open the lock file ({err.strerror})",
                "run as the site's user, with the state folder writable",
            ) from err
        try:
            fcntl.flock(fd, mode)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _read(self, path: Path, fix: str | None = None) -> dict[str, dict] | None:
        refuse_link(path)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as err:
            raise _fault(path, f"cannot be read ({err.strerror})", "fix its permissions") from err
        try:
            doc = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            raise _fault(path, f"is not UTF-8 JSON ({err})", fix) from err
        return validate(doc, path, fix)

    def _load(self) -> dict[str, dict]:
        """Validated runs, refusing any sign of forgotten spend; the caller holds the lock."""
        runs = self._read(self.path)
        backup = self._read(self.backup, f"if {self.path.name} is intact, copy it over {self.backup.name}")
        if runs is None:
            if backup is not None:
                raise _fault(self.path, f"is missing but its backup {self.backup.name} exists")
            return {}
        refuse_empty_without_backup(self.path, runs, backup)
        for key, entry in (backup or {}).items():
            if key not in runs or total_steps(runs[key]) < total_steps(entry):
                what = "lacks run" if key not in runs else "has fewer steps in run"
                raise _fault(
                    self.path, f"holds less spend than its backup {self.backup.name} ({what} {key!r})"
                )
        return runs

    @property
    def runs(self) -> dict[str, dict]:
        """All runs, validated, re-read from disk on every access."""
        if not self.path.parent.is_dir():
            return {}
        with self._locked(fcntl.LOCK_SH):
            return self._load()

    def history(self, run_key: str) -> list[list]:
        """Accountant history of one run ([] if this site has not trained in it)."""
        return [list(h) for h in self.runs.get(str(run_key), {}).get("history", [])]

    def all_history(self) -> list[list]:
        """Every run's history entries, concatenated: the site's lifetime of DP-SGD steps."""
        return [list(h) for run in self.runs.values() for h in run["history"]]

    def committed_history(self, exclude: str | None = None) -> list[list]:
        """Every run's spent steps *and* its reserved plan (all runs but ``exclude``).

        What a lifetime check composes: a run reserves its whole remaining plan when it starts
        (``record(..., reserved=...)``), so a second run checked while the first is training
        counts the first's future steps too.
        """
        return [
            list(h)
            for key, run in self.runs.items()
            if key != exclude
            for h in [*run["history"], *run.get("reserved", [])]
        ]

    @contextlib.contextmanager
    def budget_lock(self) -> Iterator[None]:
        """The site-wide budget lock (``budget.lock`` beside the ledger), held from a run's
        lifetime check to its booking, so no two runs' checks interleave."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self._locked(fcntl.LOCK_EX, self.path.with_name("budget.lock")):
            yield

    def lifetime_epsilon(self, delta: float, mechanism: str = "prv") -> float:
        """Epsilon of all runs composed (the same data answered every run)."""
        return epsilon_for(self.all_history(), delta, mechanism)

    def record(
        self, run_key: str, history: list, plan: Mapping | PrivacyPlan, epsilon: float, **extra: object
    ) -> None:
        """Merge one run's history into the ledger, durably and under an exclusive lock.

        ``extra`` keys are stored with ``-`` for ``_`` (``not_covered=`` -> ``"not-covered"``,
        ``data_fingerprint=`` -> ``"data-fingerprint"``). Raises ``LedgerError`` (nothing written)
        when the new entry is invalid or the ledger on disk fails validation.
        """
        key = str(run_key)
        extra = {name.replace("_", "-"): value for name, value in extra.items()}
        items = [list(h) if isinstance(h, list | tuple) else h for h in history]
        plan_dict = plan.to_dict() if isinstance(plan, PrivacyPlan) else dict(plan)
        well_formed = all(_item_problem(h) is None for h in items)
        entry = {
            **extra,
            "history": compact(items) if well_formed else items,
            "plan": plan_dict,
            "epsilon": float(epsilon) if _finite(epsilon) else epsilon,
        }
        validate({"runs": {key: entry}}, self.path, "nothing was recorded; fix the caller")
        folder = self.path.parent
        missing = [p for p in (folder, *folder.parents) if not p.exists()]
        for part in reversed(missing):
            part.mkdir(mode=0o700, exist_ok=True)
        with self._locked(fcntl.LOCK_EX):
            runs = self._load()
            if key not in runs or total_steps(entry) >= total_steps(runs[key]):
                runs[key] = entry  # a history only grows: an older, shorter one never wins
            data = json.dumps({"version": VERSION, "runs": runs}, indent=1).encode("utf-8")
            write_durably(self.path, data)
            write_durably(self.backup, data)
            fd = os.open(folder, os.O_RDONLY)  # make the two renames durable
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def record_release(self, run_key: str, kind: str, **extra: object) -> int:
        """Count one more release of ``kind`` in run ``run_key`` (durably, under the lock); the new count.

        ``extra`` keys are stored with ``-`` for ``_``, as in ``record``.
        """
        key = f"{run_key}#{kind}"
        extra = {name.replace("_", "-"): value for name, value in extra.items()}
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self._locked(fcntl.LOCK_EX):
            runs = self._load()
            count = int(runs.get(key, {}).get("count", 0)) + 1
            entry = {**extra, "kind": kind, "count": count, "history": []}
            validate({"runs": {key: entry}}, self.path, "nothing was recorded; fix the caller")
            runs[key] = entry
            self._write_runs(runs)
        return count

    def release_reservation(self, run_key: str) -> int:
        """Drop run ``run_key``'s reservation (its plan's steps not yet taken); the steps released.

        For a run the server abandoned: its reservation otherwise counts against the lifetime cap
        forever. Sound at any time: what the run spent stays booked, and if it comes back its next
        round's lifetime check reserves the rest again (or refuses it). ``LedgerError`` for an
        unknown run key.
        """
        with self.budget_lock(), self._locked(fcntl.LOCK_EX):
            runs = self._load()
            if run_key not in runs or is_release(runs[run_key]):
                raise _fault(self.path, f"holds no run {run_key!r}", "name a run that `spend` lists")
            released = sum(int(h[2]) for h in runs[run_key].get("reserved", []))
            runs[run_key] = {**runs[run_key], "reserved": []}
            self._write_runs(runs)
        return released

    def _write_runs(self, runs: Mapping[str, dict]) -> None:
        """Ledger and backup, each durably, then the folder; the caller holds the exclusive lock."""
        data = json.dumps({"version": VERSION, "runs": dict(runs)}, indent=1).encode("utf-8")
        write_durably(self.path, data)
        write_durably(self.backup, data)
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def refuse_link(path: Path) -> None:
    """A ledger or backup that is a symbolic link is refused: a write would replace the link."""
    if path.is_symlink():
        raise _fault(
            path,
            f"is a symbolic link (to {os.readlink(path)})",
            "replace it with the file it points to (cp --remove-destination TARGET LINK); "
            "fedllm writes ledgers only as plain files",
        )


def refuse_empty_without_backup(path: Path, runs: Mapping, backup: Mapping | None) -> None:
    """fedllm never writes a ledger without runs, nor one without its backup: such a file is a reset."""
    if not runs and backup is None:
        raise _fault(path, "holds no runs and has no backup (fedllm never writes such a ledger: reset?)")
