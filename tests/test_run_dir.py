"""The run folder stays inside run-dir whatever run-name a submitted run carries."""

from __future__ import annotations

import pytest
from flwr.app import Context, RecordDict

from server.app import make_run_dir


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
    with pytest.raises(ValueError, match="run config run-name=") as err:
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
