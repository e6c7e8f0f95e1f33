"""A site with ``--pin-app`` trains only for runs of that app, as the operator's run config says.

Issue 22, part 8: in Flower 1.42 an authenticated site can push a ``train`` message to another
site under a run id of its choice and a run key of its choice. The pinned site refuses a run of
any other app (``site-refused-app``), a run key that is not the run's own id outside a resumed
run, and a round count that is not the run config's (``site-refused-run``), before it reads its
data or books anything.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.cli.install import install_from_fab

import clients.pin as pin
from clients.app import app
from clients.site import SiteConfigError, main, node_config_of, supernode_command

from .replies import delivered

ROOT = Path(__file__).resolve().parent.parent
PINNED = "ab" * 32
OTHER = "cd" * 32


@pytest.fixture(scope="module")
def fab(tmp_path_factory) -> Path:
    """This checkout's Flower app bundle, as ``flwr build`` makes it."""
    out = tmp_path_factory.mktemp("fab")
    flwr = Path(sys.executable).parent / "flwr"
    subprocess.run([str(flwr), "build", "--app", str(ROOT)], cwd=out, check=True, capture_output=True)
    [bundle] = out.glob("*.fab")
    return bundle


def test_the_digest_of_a_fab_is_the_digest_of_the_app_flower_installs_from_it(fab, tmp_path, capsys):
    installed = install_from_fab(fab.read_bytes(), install_dir=tmp_path, skip_prompt=True)
    (installed / "clients" / "__pycache__").mkdir()
    (installed / "clients" / "__pycache__" / "app.cpython-311.pyc").write_bytes(b"compiled")
    assert pin.digest_of(fab) == pin.digest_of(installed) == pin.running_app_digest(installed)
    (installed / "clients" / "app.py").write_text("# another app\n")
    assert pin.digest_of(installed) != pin.digest_of(fab)
    capsys.readouterr()  # Flower's install message
    with pytest.raises(SystemExit) as done:
        main(["app-digest", str(fab)])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == pin.digest_of(fab)


def _site(tmp_path: Path, run_config: dict | None = None, **node) -> Context:
    """A real site's context (its data file does not exist: reading it would fail the round)."""
    node_config = {"data-file": str(tmp_path / "never-read.csv"), "state-dir": str(tmp_path), **node}
    run = {"num-server-rounds": 3, **(run_config or {})}
    return Context(run_id=42, node_id=7, node_config=node_config, state=RecordDict(), run_config=run)


def _train(run_key: str = "42", num_rounds: int = 3, kind: str = "train") -> Message:
    config = ConfigRecord({"run-key": run_key, "num-rounds": num_rounds, "server-round": 1, "labels": "[]"})
    return delivered(RecordDict({"config": config}), kind, run_id=42)


@pytest.fixture
def running(monkeypatch):
    """The app running is the pinned one."""
    monkeypatch.setattr(pin, "running_app_digest", lambda: PINNED)


def _outcome(msg: Message, context: Context) -> str:
    """'passed' when the mod hands the message on, else the refusal's code."""
    try:
        pin.pinned_app(msg, context, lambda m, c: "passed")
    except pin.SitePolicyError as err:
        return err.code
    return "passed"


@pytest.mark.usefixtures("running")
def test_a_pinned_site_refuses_another_app_before_reading_anything(tmp_path):
    reply = app(_train(), _site(tmp_path, **{"pin-app": OTHER}))
    assert reply.has_error() and reply.error.reason == "site-refused-app"
    assert list(tmp_path.iterdir()) == []  # no ledger, no secret, no kept reply: nothing touched
    assert _outcome(_train(), _site(tmp_path, **{"pin-app": PINNED})) == "passed"
    assert _outcome(_train(kind="evaluate"), _site(tmp_path, **{"pin-app": PINNED.upper()})) == "passed"


@pytest.mark.usefixtures("running")
def test_a_pinned_site_refuses_a_run_key_or_round_count_the_run_config_does_not_give(tmp_path):
    pinned = {"pin-app": PINNED}
    assert _outcome(_train(run_key="attacker-key"), _site(tmp_path, **pinned)) == "site-refused-run"
    assert _outcome(_train(num_rounds=1000), _site(tmp_path, **pinned)) == "site-refused-run"
    # a resumed run keeps its first run's key: the operator's run config says so
    resumed = _site(tmp_path, {"resume": "bbc-robust"}, **pinned)
    assert _outcome(_train(run_key="17"), resumed) == "passed"
    assert _outcome(_train(run_key="17", kind="evaluate"), _site(tmp_path, **pinned)) == "site-refused-run"


def test_without_a_pin_and_for_virtual_sites_nothing_changes(tmp_path):
    assert _outcome(_train(run_key="any"), _site(tmp_path)) == "passed"
    virtual = Context(
        run_id=42,
        node_id=7,
        node_config={"partition-id": 0, "num-partitions": 2, "pin-app": OTHER},
        state=RecordDict(),
        run_config={},
    )
    assert _outcome(_train(run_key="any"), virtual) == "passed"


def _join_args(tmp_path: Path, pin_app: str | None):
    return argparse.Namespace(
        superlink="127.0.0.1:9092",
        root_certificates=None,
        auth_key=None,
        data_file=str(tmp_path / "site.csv"),
        text_column="text",
        label_column="label",
        state_dir=str(tmp_path / "state"),
        high_water_dir=None,
        max_epsilon=8.0,
        max_delta=1e-5,
        test_fraction=0.2,
        allow_no_dp=False,
        release_train_metrics=False,
        release_evaluation=False,
        port=9094,
        max_retries=0,
        pin_app=pin_app,
    )


def test_join_puts_the_pin_in_the_node_config_and_refuses_a_malformed_one(tmp_path):
    assert node_config_of(_join_args(tmp_path, PINNED.upper()))["pin-app"] == PINNED
    assert f'pin-app="{PINNED}"' in " ".join(supernode_command(_join_args(tmp_path, PINNED)))
    assert "pin-app" not in node_config_of(_join_args(tmp_path, None))
    with pytest.raises(SiteConfigError, match="--pin-app 'sha256:12'"):
        node_config_of(_join_args(tmp_path, "sha256:12"))
