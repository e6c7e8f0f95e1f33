"""The run folder stays inside run-dir whatever run-name a submitted run carries; one ServerApp
holds it at a time (server/runlock.py); its config.json is strict JSON."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
from flwr.app import Context, RecordDict

from fedllm.config import settings_from
from fedllm.model import build_model
from server.app import main, make_run_dir, open_run
from server.resume import ResumeError, resume_dir, run_record, write_config
from server.runlock import RunDirInUse, RunLock
from server.settings import ServerSettings


def _context(tmp_path, name: str, run_id: int = 7) -> Context:
    config = {"run-dir": str(tmp_path / "runs"), "run-name": name}
    return Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=config)


def _everything(tmp_path) -> set[str]:
    return {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")}


@pytest.mark.parametrize(
    "name",
    ["../x", "a/../../x", "/abs", "..", ".", "a\\b", "sub/dir", "   ", "a\x00b", "line\nbreak", "tab\there"],
)
def test_a_name_that_is_not_one_plain_folder_is_refused_and_nothing_is_written(tmp_path, name):
    with pytest.raises(ValueError, match="^run config: key 'run-name' = ") as err:
        make_run_dir(_context(tmp_path, name))
    message = str(err.value)
    assert "\n" not in message and "use e.g. run-name=" in message
    assert _everything(tmp_path) == set()


def test_a_plain_name_is_a_folder_inside_run_dir_and_is_never_reused(tmp_path):
    first = make_run_dir(_context(tmp_path, "bbc-robust"))
    assert first == (tmp_path / "runs" / "bbc-robust").resolve() and first.is_dir()
    second = make_run_dir(_context(tmp_path, " bbc-robust ", run_id=8))
    assert second.name == "bbc-robust-run8" and second.parent == first.parent
    default = make_run_dir(_context(tmp_path, ""))  # no name: the start time
    assert default.parent == first.parent and default.name[:2] == "20"


def test_a_symlink_in_run_dir_cannot_lead_outside(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "escape").symlink_to(tmp_path / "outside")  # dangling: resolves outside run-dir
    with pytest.raises(ValueError, match="outside run-dir"):
        make_run_dir(_context(tmp_path, "escape"))
    assert not (tmp_path / "outside").exists()


def test_a_300_character_run_name_is_refused_in_one_line(tmp_path):
    with pytest.raises(ValueError, match="^run config: key 'run-name' = ") as err:
        make_run_dir(_context(tmp_path, "r" * 300))
    assert "\n" not in str(err.value) and "at most 200 bytes" in str(err.value) and len(str(err.value)) < 300
    assert _everything(tmp_path) == set()
    (tmp_path / "runs").mkdir()
    with pytest.raises(ResumeError, match="File name too long") as err:
        resume_dir("r" * 300, (tmp_path / "runs").resolve())
    assert "\n" not in str(err.value)


def _busy_run(tmp_path, name: str = "busy") -> Path:
    run_dir = tmp_path / "runs" / name
    (run_dir / "round-004").mkdir(parents=True)
    write_config(run_dir, run_record({"lr": 0.1}, {"lr": 0.1}, ["a", "b"]), "4242")
    return run_dir.resolve()


def test_a_second_serverapp_on_a_run_folder_stops_in_one_line_before_it_changes_anything(tmp_path):
    run_dir = _busy_run(tmp_path)
    first = RunLock.acquire(run_dir, 7)  # the ServerApp running there (fresh or resumed)
    second = _context(tmp_path, "", run_id=8)
    second.run_config.update({"resume": "busy", "run-name": "busy"})
    with pytest.raises(RunDirInUse) as err:
        main(None, second)  # refused at its first step: no data loaded, nothing pruned
    message = str(err.value)
    assert "\n" not in message and str(run_dir) in message and "run 7" in message and "resume=busy" in message
    assert (run_dir / "round-004").is_dir()
    first.release()
    RunLock.acquire(run_dir, 8).release()  # once the first ends, the resume may go ahead


def test_a_fresh_run_holds_its_folder_until_its_serverapp_ends(tmp_path, tiny_checkpoint):
    rc = {"model": str(tiny_checkpoint), "run-dir": str(tmp_path / "runs"), "run-name": "fresh"}
    context = Context(run_id=7, node_id=0, node_config={}, state=RecordDict(), run_config=rc)
    model = build_model(settings_from(rc).resolved(), ["a", "b"], torch.device("cpu"))
    with ExitStack() as stack:
        run = open_run(context, ServerSettings.from_run_config(rc), {"labels": ["a", "b"]}, model, stack)
        assert run.run_dir.name == "fresh" and _strict(run.run_dir / "config.json")["run-key"] == "7"
        with pytest.raises(RunDirInUse, match="run 7"):
            RunLock.acquire(run.run_dir, 8)
    RunLock.acquire(run.run_dir, 8).release()


def test_a_crashed_serverapp_leaves_no_stale_lock(tmp_path):
    run_dir = _busy_run(tmp_path)
    code = "import sys; from pathlib import Path; from server.runlock import RunLock; "
    code += "lock = RunLock.acquire(Path(sys.argv[1]), 7); print('held', flush=True); input()"
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(run_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirInUse, match=f"run 7, pid {holder.pid}"):
            RunLock.acquire(run_dir, 8)
    finally:
        holder.kill()
        holder.wait(timeout=10)
    RunLock.acquire(run_dir, 8).release()


def _strict(path: Path) -> dict:
    def refuse(token: str):
        raise ValueError(f"not strict JSON: {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_config_json_is_strict_json_with_an_infinite_setting(tmp_path):
    record = run_record({"target-epsilon": math.inf, "lr": 0.1}, {"target_epsilon": math.inf}, ["a"])
    write_config(tmp_path, record, "1")
    stored = _strict(tmp_path / "config.json")
    assert stored["run-config"]["target-epsilon"] == "inf" == record["run-config"]["target-epsilon"]
