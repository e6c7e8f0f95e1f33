"""The site's privacy ledger never forgets: concurrent writers, corruption, deletion, ``spend``."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from fedllm.accounting import epsilon_for
from fedllm.files import fingerprint_file
from fedllm.ledger import LedgerError, PrivacyLedger, run_epsilon
from fedllm.statement import lifetime_statement, not_covered_by

from .conftest import init_site

ROOT = Path(__file__).resolve().parents[1]
RDP = {"delta": 1e-5, "accountant": "rdp", "target_epsilon": 8.0, "noise_multiplier": 1.0}
ONE_STEP = [[1.0, 0.01, 1]]
SHARED_EVERY = 4  # the shared run grows every 4th write of each process


def _shared_steps(proc: int, i: int) -> int:
    """Process 0 books odd step counts, process 1 even ones: the largest is 2 * count."""
    return 2 * i + proc + 1


def _eps(history: list, plan: dict = RDP) -> float:
    return run_epsilon({"history": history, "plan": plan})


def _writer(path: str, proc: int, count: int, start, epsilons: dict) -> None:
    ledger = PrivacyLedger(path)
    start.wait()
    for i in range(count):
        ledger.record(f"p{proc}-{i}", ONE_STEP, RDP, epsilons[1])
        if i % SHARED_EVERY == 0 or i == count - 1:
            steps = _shared_steps(proc, i)
            ledger.record("shared", [[1.0, 0.01, steps]], RDP, epsilons[steps], round=i)


def test_two_processes_writing_at_once_lose_nothing(tmp_path):
    count = 200
    path = tmp_path / "state" / "privacy_ledger.json"
    wanted = {1} | {
        _shared_steps(p, i) for p in (0, 1) for i in range(count) if i % SHARED_EVERY == 0 or i == count - 1
    }
    # computed (and cached) before the fork: the writers' validations then need no new accounting
    epsilons = {steps: _eps([[1.0, 0.01, steps]]) for steps in wanted}
    context = multiprocessing.get_context("fork")
    start = context.Barrier(2)
    procs = [context.Process(target=_writer, args=(str(path), p, count, start, epsilons)) for p in (0, 1)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
    assert [proc.exitcode for proc in procs] == [0, 0]

    doc = json.loads(path.read_text())  # valid JSON, and the backup is the same write
    assert doc == json.loads(path.with_name("privacy_ledger.json.bak").read_text())
    runs = PrivacyLedger(path).runs
    assert {f"p{p}-{i}" for p in (0, 1) for i in range(count)} <= set(runs)
    assert len(runs) == 2 * count + 1
    assert runs["shared"]["history"] == [[1.0, 0.01, 2 * count]], "the longest history must win"
    assert not list(path.parent.glob("*.tmp")), "no temp file may be left behind"


def test_a_history_only_grows_and_files_are_private(tmp_path):
    path = tmp_path / "a" / "b" / "privacy_ledger.json"
    ledger = PrivacyLedger(path)
    ledger.record("1", [[1.0, 0.01, 5], (1.0, 0.01, 5)], RDP, _eps([[1.0, 0.01, 10]]), data_fingerprint="x")
    ledger.record("1", [[1.0, 0.01, 4]], RDP, _eps([[1.0, 0.01, 4]]))  # a stale writer
    assert ledger.history("1") == [[1.0, 0.01, 10]]  # compacted, never shrunk
    assert ledger.runs["1"]["data-fingerprint"] == "x"
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o700
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    for name in ("privacy_ledger.json", "privacy_ledger.json.bak", "privacy_ledger.json.lock"):
        assert stat.S_IMODE((path.parent / name).stat().st_mode) == 0o600
    with pytest.raises(LedgerError, match="nothing was recorded"):
        ledger.record("2", [[1.0, 2.0, 3]], RDP, 1.0)  # q > 1: refused before writing
    assert set(ledger.runs) == {"1"}


def _entry(doc: dict) -> dict:
    return doc["runs"]["1"]


def _set(field: str, value: object) -> Callable[[dict], object]:
    def mutate(doc: dict) -> dict:
        _entry(doc)[field] = value
        return doc

    return mutate


CORRUPTIONS: dict[str, Callable[[dict], object]] = {
    "invalid JSON": lambda doc: b'{"version": 1, "runs": {"1": ',
    "not UTF-8": lambda doc: b"\xff\xfe\x00{",
    "list top level": lambda doc: [doc],
    "version from the future": lambda doc: {**doc, "version": 2},
    "runs missing": lambda doc: {"version": 1},
    "runs a list": lambda doc: {"version": 1, "runs": [_entry(doc)]},
    "entry a string": lambda doc: {"version": 1, "runs": {"1": "spent"}},
    "history missing": lambda doc: {"version": 1, "runs": {"1": {"plan": RDP, "epsilon": 0.5}}},
    "history a dict": _set("history", {"sigma": 1.0, "q": 0.01, "steps": 100}),
    "history item of 2 numbers": _set("history", [[1.0, 0.01]]),
    "history item a string": _set("history", ["1.0, 0.01, 100"]),
    "negative steps": _set("history", [[1.0, 0.01, -100]]),
    "fractional steps": _set("history", [[1.0, 0.01, 100.5]]),
    "sigma zero": _set("history", [[0.0, 0.01, 100]]),
    "q above 1": _set("history", [[1.0, 1.5, 100]]),
    "NaN epsilon": _set("epsilon", float("nan")),
    "negative epsilon": _set("epsilon", -1.0),
    "epsilon a string": _set("epsilon", "0.9"),
    "plan a string": _set("plan", "rdp"),
    "plan without delta": _set("plan", {"accountant": "rdp"}),
    "not-covered not a list": _set("not-covered", "nothing"),
    "steps edited to 0 while epsilon stays": _set("history", [[1.0, 0.01, 0]]),
    "history emptied while epsilon stays": _set("history", []),
}


@pytest.fixture
def spent(tmp_path) -> PrivacyLedger:
    ledger = PrivacyLedger(Path(init_site(tmp_path / "state")) / "privacy_ledger.json")
    history = [[1.0, 0.01, 100]]
    ledger.record("1", history, RDP, epsilon_for(history, 1e-5, "rdp"), round=1)
    return ledger


def _assert_refused(ledger: PrivacyLedger, *needles: str) -> str:
    with pytest.raises(LedgerError) as caught:
        _ = ledger.runs
    message = str(caught.value)
    assert "\n" not in message and str(ledger.path) in message
    assert "restore" in message or "fedllm release" in message, message  # it says the fix
    for needle in needles:
        assert needle in message, message
    return message


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_each_corruption_is_refused_in_one_line_naming_the_file(spent, kind):
    doc = json.loads(spent.path.read_text())
    assert _eps(_entry(doc)["history"]) == pytest.approx(_entry(doc)["epsilon"])
    spent.backup.unlink()  # only the ledger's own validation can catch it
    corrupt = CORRUPTIONS[kind](doc)
    spent.path.write_bytes(corrupt if isinstance(corrupt, bytes) else json.dumps(corrupt).encode())
    before = spent.path.read_bytes()
    _assert_refused(spent)
    with pytest.raises(LedgerError):
        spent.record("2", ONE_STEP, RDP, 0.0)
    assert spent.path.read_bytes() == before, "a write must never replace a corrupt ledger"


def _lowered(doc: dict) -> dict:
    """Steps lowered and epsilon lowered to match: consistent, yet less than the backup holds."""
    _entry(doc)["history"] = [[1.0, 0.01, 10]]
    _entry(doc)["epsilon"] = _eps([[1.0, 0.01, 10]])
    return doc


@pytest.mark.parametrize(
    "edit",
    [
        lambda doc: {"version": 1, "runs": {}},
        lambda doc: {"version": 1, "runs": {"2": _entry(doc)}},
        _lowered,
    ],
    ids=["runs emptied", "run renamed away", "steps and epsilon lowered together"],
)
def test_a_ledger_holding_less_than_its_backup_is_refused(spent, edit):
    spent.path.write_text(json.dumps(edit(json.loads(spent.path.read_text()))))
    _assert_refused(spent, "less spend than its backup")


def test_a_deleted_ledger_with_its_backup_present_is_refused(spent):
    spent.path.unlink()
    _assert_refused(spent, "is missing", "privacy_ledger.json.bak")
    with pytest.raises(LedgerError, match="is missing"):
        spent.record("2", ONE_STEP, RDP, 0.0)
    assert not spent.path.exists()


def test_a_fresh_site_has_an_empty_ledger(tmp_path):
    ledger = PrivacyLedger(tmp_path / "never-created" / "privacy_ledger.json")
    assert ledger.runs == {} and ledger.history("1") == [] and ledger.all_history() == []
    assert ledger.lifetime_epsilon(1e-5) == 0.0
    assert not (tmp_path / "never-created").exists(), "reading must not create the state folder"
    assert "No DP training was recorded" in lifetime_statement(ledger, 1e-5, "prv", [])


def test_fingerprint_covers_bytes_and_folder_layout(tmp_path):
    data = tmp_path / "site.csv"
    data.write_text("text,label\nhello,positive\n")
    first = fingerprint_file(data)
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", first) and fingerprint_file(data) == first
    data.write_text("text,label\nhello,negative\n")
    assert fingerprint_file(data) != first
    folder = tmp_path / "hf"
    (folder / "train").mkdir(parents=True)
    (folder / "train" / "data.arrow").write_bytes(b"abc")
    before = fingerprint_file(folder)
    (folder / "train" / "data.arrow").rename(folder / "train" / "other.arrow")
    assert fingerprint_file(folder) != before


RUNS = {
    "11": [[1.1, 0.01, 300]],
    "12": [[1.0, 0.02, 200], [1.3, 0.02, 100]],
    "13": [[1.2, 0.01, 500]],
}


def _spend(state_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "clients.site", "spend", "--state-dir", str(state_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        encoding="utf-8",
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
        timeout=120,
    )


def test_spend_states_the_lifetime_guarantee_and_each_run(tmp_path):
    ledger = PrivacyLedger(Path(init_site(tmp_path / "state")) / "privacy_ledger.json")
    plan = {**RDP, "accountant": "prv"}
    own = {key: epsilon_for(history, 1e-5, "prv") for key, history in RUNS.items()}
    for key, history in RUNS.items():
        ledger.record(key, history, plan, own[key], round=3, num_rounds=3, data_fingerprint=f"sha256:{key}")
    lifetime = epsilon_for([h for history in RUNS.values() for h in history], 1e-5, "prv")
    assert lifetime > max(own.values())

    done = _spend(ledger.path.parent)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    printed = re.search(r"protected by \(ε = ([0-9.]+), δ = 1e-05\)", out)
    assert printed, out
    assert float(printed.group(1)) == pytest.approx(lifetime, abs=0.006)
    assert "lifetime over 3 runs" in out and "Not covered: which rounds the site took part in" in out
    for key in RUNS:
        row = re.search(rf"^{key}\s+([0-9.]+)\s+8\s+1e-05\s+(\d+)\s+3/3\s+sha256:{key}$", out, re.M)
        assert row, out
        assert float(row.group(1)) == pytest.approx(own[key], abs=6e-4)
        assert float(row.group(1)) < float(printed.group(1))
        assert int(row.group(2)) == sum(h[2] for h in RUNS[key])


def test_spend_on_a_corrupt_ledger_prints_one_line_and_fails(spent):
    doc = json.loads(spent.path.read_text())
    _entry(doc)["history"] = [[1.0, 0.01, 0]]  # steps edited to 0; the epsilon stays
    spent.path.write_text(json.dumps(doc))
    done = _spend(spent.path.parent)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert str(spent.path) in lines[0] and "restore it from privacy_ledger.json.bak" in lines[0]


def test_not_covered_is_the_union_over_runs(tmp_path):
    ledger = PrivacyLedger(tmp_path / "privacy_ledger.json")
    ledger.record("1", ONE_STEP, RDP, 0.0, not_covered=["label counts"])
    ledger.record("2", ONE_STEP, RDP, 0.0, not_covered=["label counts", "evaluation accuracy"])
    gaps = not_covered_by(ledger.runs)
    assert gaps == ["label counts", "evaluation accuracy"]
    assert "Not covered: label counts; evaluation accuracy." in lifetime_statement(ledger, 1e-5, "rdp", gaps)
