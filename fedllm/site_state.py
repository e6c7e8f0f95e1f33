"""A site's state folder that cannot be reset silently: an explicit init, a marker, a high-water mark.

``python -m clients.site init --state-dir DIR`` (``init_state``) creates ``DIR`` (0700) with

- ``fedllm-state.json``, the marker: a random ``state-id``, the creation time, the folder of the
  high-water mark (``high-water-dir``) and, once the site joins or answers, its ``policy``;
- ``site-secret``, the key of the site's train/test split (32 random bytes, 0600).

A real site trains only from an initialised, absolute state folder (``open_state``); anything
else is refused with one line naming ``init``. Restoring an *older* copy of the folder is caught
by the **high-water mark** ``<high-water-dir>/<state-id>.json``, kept outside the folder: for every
ledger entry the most spend ever seen (DP-SGD steps of a run, or the count of a release record).
It is raised after every message the ClientApp handles (so after every ledger write) and checked
before each; a ledger below it (an entry missing, or fewer steps) is refused, as is spend in a
ledger whose mark is missing. ``rebase_high_water`` is the operator's explicit override. This
guards against operator mistakes (a restored backup, an unmounted volume, a second copy), not
against a server, and not against an operator who deletes the mark and the state together.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from fedllm.files import write_durably
from fedllm.ledger import LedgerError, PrivacyLedger, entry_measure

MARKER = "fedllm-state.json"
SECRET = "site-secret"
LEDGER = "privacy_ledger.json"
HIGH_WATER_ENV = "FEDLLM_HIGH_WATER_DIR"
VERSION = 1
INIT = "python -m clients.site init --state-dir"
REBASE = "python -m clients.site rebase --state-dir"


class StateError(LedgerError):
    """The state folder cannot be trusted or is not initialised; one line naming the fix."""


def default_high_water_dir() -> Path:
    """``$FEDLLM_HIGH_WATER_DIR``, else ``~/.local/state/fedllm/high-water``."""
    configured = os.environ.get(HIGH_WATER_ENV)
    return Path(configured) if configured else Path.home() / ".local" / "state" / "fedllm" / "high-water"


@dataclass(frozen=True)
class SiteState:
    """An initialised state folder, as its marker describes it."""

    folder: Path
    state_id: str
    created: str
    high_water_dir: Path
    policy: dict = field(default_factory=dict)

    @property
    def marker(self) -> Path:
        """The marker file."""
        return self.folder / MARKER

    @property
    def ledger(self) -> PrivacyLedger:
        """The site's privacy ledger."""
        return PrivacyLedger(self.folder / LEDGER)

    @property
    def mark(self) -> Path:
        """The high-water mark of this state (outside the folder)."""
        return self.high_water_dir / f"{self.state_id}.json"

    def to_json(self) -> bytes:
        """The marker's bytes."""
        doc = {
            "version": VERSION,
            "state-id": self.state_id,
            "created": self.created,
            "high-water-dir": str(self.high_water_dir),
            "policy": self.policy,
        }
        return json.dumps(doc, indent=1, sort_keys=True).encode("utf-8")


def _read_marker(folder: Path) -> SiteState:
    """The marker of ``folder``; ``StateError`` when it is missing, linked or malformed."""
    path = folder / MARKER
    if path.is_symlink():
        raise StateError(f"{path}: is a symbolic link; replace it with the file it points to")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StateError(
            f"{folder}: not an initialised site state folder (no {MARKER}); run `{INIT} {folder}` once "
            "for a new site, or mount/restore this site's own state folder (a fresh one forgets its spend)"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StateError(f"{path}: unreadable marker ({err}); restore it from the newest backup") from err
    fields = ("state-id", "created", "high-water-dir")
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), str) and doc[k] for k in fields):
        raise StateError(f"{path}: the marker lacks {', '.join(fields)}; restore it from the newest backup")
    policy = doc["policy"] if isinstance(doc.get("policy"), dict) else {}
    return SiteState(folder, doc["state-id"], doc["created"], Path(doc["high-water-dir"]), policy)


def _write_marker(state: SiteState) -> None:
    write_durably(state.marker, state.to_json())
    os.chmod(state.marker, 0o600)


def open_state(folder: str | Path | None, high_water_dir: str | Path | None = None) -> SiteState:
    """An initialised, absolute state folder with its secret; ``StateError`` (one line) otherwise.

    ``high_water_dir`` (node config ``high-water-dir``) overrides the marker's.
    """
    if not folder:
        raise StateError(
            f"this site has no state-dir in its node config; run `{INIT} /ABSOLUTE/DIR` and set it"
        )
    path = Path(str(folder))
    if not path.is_absolute():
        raise StateError(
            f"state-dir {str(folder)!r} is relative (it would move with the working directory); "
            f"give the absolute path of a folder initialised with `{INIT} /ABSOLUTE/DIR`"
        )
    state = _read_marker(path)
    secret = path / SECRET
    if secret.is_symlink() or not secret.is_file() or secret.stat().st_size < 16:
        raise StateError(
            f"{secret}: missing, linked or too short; restore the state folder from its newest backup"
        )
    if high_water_dir:
        state = replace(state, high_water_dir=Path(str(high_water_dir)))
    return state


def init_state(
    folder: str | Path, high_water_dir: str | Path | None = None, new_site: bool = False
) -> tuple[SiteState, bool]:
    """Initialise ``folder`` (or adopt a pre-marker one); (state, created). Already initialised: unchanged.

    Refuses when the high-water folder already tracks another state with spend, unless
    ``new_site`` (that state's folder is probably the one to mount or restore).
    """
    path = Path(folder).absolute()
    if (path / MARKER).exists() or (path / MARKER).is_symlink():
        return _read_marker(path), False
    hw = Path(high_water_dir or default_high_water_dir()).absolute()
    spent = [p.stem for p in sorted(hw.glob("*.json")) if _mark_runs(p)]
    if spent and not new_site:
        raise StateError(
            f"{hw}: already holds the high-water mark of state {spent[0]} with spend; mount or restore "
            "that site's state folder instead, or pass --new-site if this is another site"
        )
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_uid == os.geteuid():  # a mount point owned by another uid keeps its mode
        os.chmod(path, 0o700)
    secret = path / SECRET
    if not secret.exists():  # a folder from before init keeps its secret: its split stays the same
        with os.fdopen(os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as handle:
            handle.write(os.urandom(32))
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    state = SiteState(path, secrets.token_hex(16), created, hw)
    _write_marker(state)
    rebase_high_water(state)  # a pre-marker folder's ledger is the site's spend so far
    return state, True


def remember_policy(state: SiteState, policy: Mapping) -> SiteState:
    """Store the site's policy in its marker (read by ``spend`` for its δ) when it changed."""
    policy = dict(policy)
    if policy == state.policy:
        return state
    updated = replace(state, policy=policy)
    on_disk = _read_marker(state.folder)  # keep the marker's own high-water-dir, not an override
    _write_marker(replace(on_disk, policy=policy))
    return updated


def ledger_measures(runs: Mapping[str, Mapping]) -> dict[str, int]:
    """The spend of every ledger entry: steps of a DP run, the count of a release record."""
    return {key: entry_measure(entry) for key, entry in runs.items()}


def _mark_runs(path: Path) -> dict[str, int]:
    """The measures a mark file holds ({} when it has none)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    runs = doc.get("runs") if isinstance(doc, dict) else None
    return (
        {str(k): int(v) for k, v in runs.items() if isinstance(v, int) and v > 0}
        if isinstance(runs, dict)
        else {}
    )


def _rebase_fix(state: SiteState) -> str:
    """The override, for a mark that cannot be used."""
    return f"if {state.folder} is the newest copy of the site's state, run `{REBASE} {state.folder}`"


def _read_mark(state: SiteState) -> dict | None:
    """The mark document, or None when there is none; ``StateError`` when it is unreadable."""
    try:
        doc = json.loads(state.mark.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StateError(f"{state.mark}: unreadable high-water mark ({err}); {_rebase_fix(state)}") from err
    if not isinstance(doc, dict) or not isinstance(doc.get("runs"), dict):
        raise StateError(f"{state.mark}: not a high-water mark; {_rebase_fix(state)}")
    return doc


def _below(mark: Mapping[str, int], measures: Mapping[str, int]) -> str | None:
    """The first entry where the ledger holds less than the mark, described; None if none."""
    for key, most in sorted(mark.items()):
        if measures.get(key, 0) < int(most):
            held = "lacks it" if key not in measures else f"holds {measures[key]}"
            return f"entry {key!r}: the mark saw {most}, the ledger {held}"
    return None


def check_high_water(state: SiteState) -> dict[str, int]:
    """The ledger's measures, refusing a ledger older than the mark (or spend with no mark)."""
    mark = _read_mark(state)  # the mark first: a ledger read after it can only be larger
    measures = ledger_measures(state.ledger.runs)
    fix = (
        f"restore the newest copy of {state.folder} (ledger and .bak); if this older state is "
        f"knowingly the site's state, `{REBASE} {state.folder}` re-bases the mark (lost spend is forgotten)"
    )
    if mark is None:
        if any(measures.values()):
            raise StateError(
                f"{state.mark}: no high-water mark for a state with spend (moved, or another "
                f"high-water-dir?); point high-water-dir at its mark, or if {state.folder} is the "
                f"newest copy, run `{REBASE} {state.folder}`"
            )
        return measures
    if problem := _below(mark["runs"], measures):
        raise StateError(
            f"{state.folder / LEDGER}: older than the high-water mark {state.mark} ({problem}); {fix}"
        )
    return measures


@contextlib.contextmanager
def _mark_lock(state: SiteState) -> Iterator[None]:
    state.high_water_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(
        state.high_water_dir / f"{state.state_id}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600
    )
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_mark(state: SiteState, runs: Mapping[str, int], writes: int) -> None:
    doc = {
        "state-id": state.state_id,
        "state-dir": str(state.folder),
        "runs": dict(sorted(runs.items())),
        "writes": writes,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_durably(state.mark, json.dumps(doc, indent=1).encode("utf-8"))


def raise_high_water(state: SiteState) -> dict[str, int]:
    """Check the ledger against the mark, then raise the mark to it; return the measures."""
    with _mark_lock(state):
        measures = check_high_water(state)
        mark = _read_mark(state) or {"runs": {}, "writes": 0}
        merged = {**mark["runs"], **{k: max(v, int(mark["runs"].get(k, 0))) for k, v in measures.items()}}
        if merged != mark["runs"] or not state.mark.exists():
            _write_mark(state, merged, int(mark.get("writes", 0)) + 1)
        return measures


def rebase_high_water(state: SiteState) -> dict[str, int]:
    """The operator's override: set the mark to what the ledger holds now (validated)."""
    with _mark_lock(state):
        measures = ledger_measures(state.ledger.runs)
        mark = _read_mark_quietly(state)
        _write_mark(state, measures, int(mark.get("writes", 0)) + 1)
        return measures


def _read_mark_quietly(state: SiteState) -> dict:
    """The mark, or an empty one when it is missing or unreadable (for ``rebase`` only)."""
    with contextlib.suppress(StateError):
        return _read_mark(state) or {}
    return {}
