"""A run in which no site's update was aggregated fails in one line, with no trained-looking adapter.

The real ServerApp ``main`` runs against a scripted grid whose three sites all refuse (the fixed
codes a site sends, clients/policy.py); server/outcome.py stops the run at that round.
"""

from __future__ import annotations

import json

import pytest
from flwr.app import Error, Message

from server.app import main
from server.outcome import RunFailed

from .replies import ScriptedGrid, as_dict, honest, reply, server_identity  # noqa: F401

pytestmark = pytest.mark.usefixtures("server_identity")


def _refusal(node: int, code: str) -> Message:
    return Message(error=Error(code=0, reason=code), metadata=reply(node, {}).metadata)


def test_every_site_refusing_fails_the_run_in_one_line(server_context, tmp_path):
    codes = {2: "site-declined", 3: "site-declined", 4: "site-refused-lifetime-budget"}
    grid = ScriptedGrid(list(codes), lambda node, rnd, arrays: _refusal(node, codes[node]))
    with pytest.raises(RunFailed) as failed:
        main(grid, server_context(tmp_path / "runs", **{"run-name": "refused"}))
    line = str(failed.value)
    assert "\n" not in line
    assert line.startswith("round 1 of 8: no site's update was aggregated (every site refused or failed")
    assert (
        "site-declined x2" in line
        and "site-refused-lifetime-budget x1" in line
        and "without a final adapter" in line
    )
    run_dir = tmp_path / "runs" / "refused"
    assert not (run_dir / "final-adapter").exists() and not (run_dir / "result.json").exists()
    assert not (run_dir / "round-001").exists()  # the initial adapter is kept as round 0 only
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    assert rows[1]["global-unchanged"] and len(rows[1]["train-failures"]) == 3


def test_a_later_round_that_aggregates_nothing_stops_the_run_resumable(server_context, tmp_path):
    def answer(node: int, rnd: int, arrays) -> Message:  # round 1 trains, round 2 every site refuses
        return reply(node, honest(as_dict(arrays), node)) if rnd == 1 else _refusal(node, "site-declined")

    grid = ScriptedGrid([2, 3, 4], answer)
    context = server_context(tmp_path / "runs", **{"run-name": "late", "trainable": "lora"})
    with pytest.raises(RunFailed, match=r"^round 2 of 8: .*rounds up to 1 are kept"):
        main(grid, context)
    run_dir = tmp_path / "runs" / "late"
    assert (run_dir / "round-001").is_dir() and not (run_dir / "final-adapter").exists()
