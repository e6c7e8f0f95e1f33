"""A site's state cannot be reset silently (issue 23, item 7), and ``spend`` states every release (item 8).

Each reset an operator can make by mistake is refused, with one line naming the fix: no
state-dir, a relative one, an uninitialised one, an older copy restored (below the high-water
mark kept outside the folder), a ledger and backup deleted, an empty ledger without a backup, a
symlinked ledger or backup. The ClientApp refuses before any step; ``spend`` and ``join`` too.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from clients.app import app
from clients.site import main as site_main
from fedllm.accounting import epsilon_for
from fedllm.ledger import LedgerError, PrivacyLedger
from fedllm.site_state import (
    MARKER,
    SECRET,
    StateError,
    init_state,
    open_state,
    raise_high_water,
    remember_policy,
)

from .conftest import init_site
from .replies import delivered

PLAN = {"delta": 1e-5, "accountant": "rdp"}


def _book(ledger: PrivacyLedger, key: str, steps: int) -> None:
    history = [[1.0, 0.01, steps]]
    ledger.record(key, history, PLAN, epsilon_for(history, 1e-5, "rdp"))


def _message(kind: str = "train") -> Message:
    """A message the site refuses before reading it (no model is needed)."""
    config = ConfigRecord({"labels": json.dumps(["a", "b"]), "num-rounds": 1, "server-round": 1})
    return delivered(RecordDict({"arrays": ArrayRecord(), "config": config}), kind)


def _refused_by_the_site(node_config: dict) -> None:
    """The real ClientApp answers a fixed code and trains nothing."""
    context = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})
    for kind in ("train", "evaluate"):
        reply = app(_message(kind), context)
        assert reply.has_error() and reply.error.reason == "site-ledger-error"


def _one_line(err: BaseException) -> str:
    message = str(err)
    assert "\n" not in message
    return message


@pytest.fixture
def state(tmp_path):
    """An initialised site with 8 steps booked and its mark raised (as after a round)."""
    site = open_state(init_site(tmp_path / "state"))
    _book(site.ledger, "run-a", 8)
    raise_high_water(site)
    return site


def test_init_makes_a_private_folder_with_marker_secret_and_a_mark_outside(tmp_path, high_water_dir):
    site, created = init_state(tmp_path / "state")
    assert created and site.folder == tmp_path / "state"
    assert stat.S_IMODE(site.folder.stat().st_mode) == 0o700
    for name in (MARKER, SECRET):
        assert stat.S_IMODE((site.folder / name).stat().st_mode) == 0o600
    marker = json.loads((site.folder / MARKER).read_text())
    assert len(marker["state-id"]) == 32 and marker["created"].endswith("Z")
    assert site.mark == high_water_dir / f"{marker['state-id']}.json" and site.mark.exists()
    assert not str(site.mark).startswith(str(site.folder))
    secret = (site.folder / SECRET).read_bytes()
    again, created = init_state(tmp_path / "state")  # idempotent: nothing changes
    assert not created and again.state_id == site.state_id
    assert (site.folder / SECRET).read_bytes() == secret


@pytest.mark.parametrize(
    ("node_config", "says"),
    [
        ({}, "no state-dir"),
        ({"state-dir": "site-state"}, "is relative"),
        ({"state-dir": "UNINIT"}, "not an initialised site state folder"),
    ],
    ids=["missing", "relative", "uninitialised"],
)
def test_a_site_without_an_initialised_absolute_state_dir_refuses_to_train(tmp_path, node_config, says):
    data = tmp_path / "site.csv"
    data.write_text("text,label\nhello,a\n")
    if node_config.get("state-dir") == "UNINIT":
        node_config = {"state-dir": str(tmp_path / "empty")}
        (tmp_path / "empty").mkdir()
    _refused_by_the_site({"data-file": str(data), **node_config})
    with pytest.raises(StateError) as caught:
        open_state(node_config.get("state-dir"))
    message = _one_line(caught.value)
    assert says in message and "python -m clients.site init --state-dir" in message
    assert not (tmp_path / "empty" / SECRET).exists(), "a refused site creates no secret"
    assert not (tmp_path / "empty" / "privacy_ledger.json").exists()


def test_a_restored_older_state_is_refused_until_the_newest_is_back_or_the_operator_rebases(
    state, tmp_path, capsys
):
    backup = tmp_path / "backup"
    shutil.copytree(state.folder, backup)  # the operator backs up the folder ...
    _book(state.ledger, "run-a", 12)  # ... the site trains on ...
    _book(state.ledger, "run-b", 4)
    raise_high_water(state)
    newest = tmp_path / "newest"
    shutil.copytree(state.folder, newest)
    shutil.rmtree(state.folder)
    shutil.copytree(backup, state.folder)  # ... and the old backup is restored

    with pytest.raises(StateError) as caught:
        raise_high_water(state)
    message = _one_line(caught.value)
    assert "older than the high-water mark" in message
    assert "'run-a': the mark saw 12, the ledger holds 8" in message
    assert "restore the newest copy" in message and "python -m clients.site rebase" in message
    _refused_by_the_site({"data-file": str(tmp_path / "x.csv"), "state-dir": str(state.folder)})
    with pytest.raises(SystemExit) as code:
        site_main(["spend", "--state-dir", str(state.folder)])
    assert code.value.code == 2 and "older than the high-water mark" in capsys.readouterr().err

    shutil.rmtree(state.folder)
    shutil.copytree(newest, state.folder)  # the fix: the newest copy
    assert raise_high_water(state) == {"run-a": 12, "run-b": 4}
    shutil.rmtree(state.folder)
    shutil.copytree(backup, state.folder)  # or the operator's explicit override
    with pytest.raises(SystemExit) as code:
        site_main(["rebase", "--state-dir", str(state.folder)])
    assert code.value.code == 0 and "re-basing over" in capsys.readouterr().out
    assert raise_high_water(state) == {"run-a": 8}


def test_a_deleted_ledger_and_backup_are_refused_when_the_mark_saw_spend(state):
    for path in state.folder.glob("privacy_ledger.json*"):
        path.unlink()
    assert state.ledger.runs == {}  # the ledger alone cannot tell this from a fresh site
    with pytest.raises(StateError, match="'run-a': the mark saw 8, the ledger lacks it"):
        raise_high_water(state)


def test_a_ledger_with_spend_but_no_mark_is_refused(state):
    state.mark.unlink()  # a state moved to another machine, or another high-water-dir
    with pytest.raises(StateError) as caught:
        raise_high_water(state)
    assert "no high-water mark for a state with spend" in _one_line(caught.value)


def test_an_empty_ledger_without_backup_is_refused(tmp_path):
    site = open_state(init_site(tmp_path / "state"))
    site.ledger.path.write_text(json.dumps({"version": 1, "runs": {}}))
    with pytest.raises(LedgerError) as caught:
        _ = site.ledger.runs
    assert "holds no runs and has no backup" in _one_line(caught.value)
    _refused_by_the_site({"data-file": str(tmp_path / "x.csv"), "state-dir": str(site.folder)})


@pytest.mark.parametrize("name", ["privacy_ledger.json", "privacy_ledger.json.bak"])
def test_a_symlinked_ledger_or_backup_is_refused_and_never_replaced(state, tmp_path, name):
    target = tmp_path / "elsewhere.json"
    link = state.folder / name
    shutil.copy(link, target)
    link.unlink()
    link.symlink_to(target)
    with pytest.raises(LedgerError) as caught:
        _ = state.ledger.runs
    assert "is a symbolic link" in _one_line(caught.value)
    with pytest.raises(LedgerError, match="symbolic link"):
        _book(state.ledger, "run-a", 9)
    assert link.is_symlink() and os.readlink(link) == str(target), "the link must stay as it was"


def test_init_refuses_a_second_state_beside_a_mark_with_spend_unless_told(state, tmp_path):
    # the state volume was lost; the high-water volume was not: a fresh init would reset the books
    with pytest.raises(StateError) as caught:
        init_state(tmp_path / "fresh")
    assert f"state {state.state_id} with spend" in _one_line(caught.value)
    assert not (tmp_path / "fresh").exists()
    assert init_state(tmp_path / "fresh", new_site=True)[1]


def test_init_adopts_a_state_folder_from_before_init_keeping_its_secret_and_spend(tmp_path):
    folder = tmp_path / "state"
    folder.mkdir()
    (folder / SECRET).write_bytes(b"s" * 32)
    _book(PrivacyLedger(folder / "privacy_ledger.json"), "run-old", 5)
    site, created = init_state(folder)
    assert created and (folder / SECRET).read_bytes() == b"s" * 32
    assert json.loads(site.mark.read_text())["runs"] == {"run-old": 5}  # the mark starts at the books


def test_join_refuses_an_uninitialised_state_dir_in_one_line(tmp_path, capsys):
    data = tmp_path / "site.csv"
    data.write_text("text,label\nhello,a\nworld,b\n")
    with socket.create_server(("127.0.0.1", 0)) as server:  # a SuperLink port that answers
        port = server.getsockname()[1]
        argv = ["join", "--superlink", f"127.0.0.1:{port}", "--insecure", "--data-file", str(data)]
        with pytest.raises(SystemExit) as code:
            site_main([*argv, "--state-dir", str(tmp_path / "state")])
    err = capsys.readouterr().err
    assert code.value.code == 2 and err.count("\n") == 1, err
    assert "not an initialised site state folder" in err and "clients.site init --state-dir" in err
    assert not (tmp_path / "state").exists()


def test_spend_composes_at_the_sites_max_delta_unless_told(tmp_path, capsys):
    site = open_state(init_site(tmp_path / "state"))
    _book(site.ledger, "run-a", 100)
    remember_policy(site, {"max_delta": 1e-6})  # as join and every round store it

    def spend(*flags: str) -> str:
        with pytest.raises(SystemExit) as code:
            site_main(["spend", "--state-dir", str(site.folder), *flags])
        out = capsys.readouterr().out
        assert code.value.code == 0, out
        return out

    assert "δ = 1e-06)" in spend() and "the site's max-delta" in spend()
    assert "δ = 1e-05)" in spend("--delta", "1e-5")
    history = [[1.0, 0.01, 100]]
    for delta, out in ((1e-6, spend()), (1e-5, spend("--delta", "1e-5"))):
        printed = float(out.split("ε = ")[1].split(",")[0])
        assert printed == pytest.approx(epsilon_for(history, delta, "prv"), abs=0.006)


def test_spend_lists_a_run_without_dp_as_infinite_and_evaluation_answers(state, capsys):
    state.ledger.record_release("run-b", "no-dp", round=1)
    state.ledger.record_release("run-b", "no-dp", round=2)
    state.ledger.record_release("run-a", "evaluation", round=1)
    with pytest.raises(SystemExit) as code:
        site_main(["spend", "--state-dir", str(state.folder)])
    out = capsys.readouterr().out
    assert code.value.code == 0, out
    assert "NO differential privacy guarantee: lifetime ε = ∞" in out and "(run-b)" in out
    assert "1 exact evaluation answer(s)" in out
    rows = {tuple(line.split()) for line in out.splitlines()}
    assert ("run-b", "no-dp", "2", "inf") in rows and ("run-a", "evaluation", "1", "-") in rows
    assert raise_high_water(state) == {"run-a": 8, "run-a#evaluation": 1, "run-b#no-dp": 2}


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        ({"kind": "no-dp", "count": 0, "history": []}, "'count' is not an integer >= 1"),
        ({"kind": "leak", "count": 1, "history": []}, "'kind' 'leak'"),
        ({"kind": "no-dp", "count": 1, "history": [[1.0, 0.01, 1]]}, "holds DP-SGD history"),
    ],
)
def test_a_malformed_release_record_is_refused(tmp_path, entry, says):
    ledger = PrivacyLedger(Path(init_site(tmp_path / "state")) / "privacy_ledger.json")
    doc = json.dumps({"version": 1, "runs": {"r#no-dp": entry}})
    ledger.path.write_text(doc)
    ledger.backup.write_text(doc)
    with pytest.raises(LedgerError, match=says):
        _ = ledger.runs
