"""Flower's own lines and SuperLink-made replies agree with fedllm's records (server/flower_log.py)."""

from __future__ import annotations

import logging

import pytest
from flwr.app import Array, ArrayRecord, Error, Message
from flwr.common.logger import FLOWER_LOGGER

from server.strategy import AdapterFedAvg

from .replies import ScriptedGrid, as_dict, global_adapter, honest, reply, server_identity  # noqa: F401

pytestmark = pytest.mark.usefixtures("server_identity")


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


class PushingGrid(ScriptedGrid):
    """Sets each instruction's message id as the real Grid does when it pushes it."""

    def send_and_receive(self, messages, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = f"ins-to-{msg.metadata.dst_node_id}"
        return super().send_and_receive(messages, timeout)


def _strategy() -> AdapterFedAvg:
    return AdapterFedAvg(min_train_nodes=3, min_available_nodes=3, fraction_evaluate=0.0)


def test_a_resumed_run_logs_flowers_round_lines_with_the_real_numbers():
    grid = ScriptedGrid([2, 3, 4], lambda node, rnd, arrays: reply(node, honest(as_dict(arrays), node)))
    lines = _Lines()
    FLOWER_LOGGER.addHandler(lines)
    try:
        start = ArrayRecord({k: Array(v) for k, v in global_adapter().items()})
        _strategy().start(grid, start, num_rounds=4, first_round=3)
    finally:
        FLOWER_LOGGER.removeHandler(lines)
    rounds = [line for line in lines.lines if line.startswith("[ROUND")]
    assert rounds == ["[ROUND 3/4]", "[ROUND 4/4]"], rounds
    assert not FLOWER_LOGGER.filters  # the rewrite ends with the start


def test_a_site_that_stopped_answering_is_recorded_by_its_node_id():
    def answer(node: int, rnd: int, arrays: ArrayRecord) -> Message:
        if node != 7:
            return reply(node, honest(as_dict(arrays), node))
        gone = Message(error=Error(code=5, reason="Error: Node Unavailable"), metadata=reply(1, {}).metadata)
        gone.metadata.__dict__["_reply_to_message_id"] = "ins-to-7"  # the SuperLink answers for 7
        return gone

    strategy = _strategy()
    start = ArrayRecord({k: Array(v) for k, v in global_adapter().items()})
    strategy.start(PushingGrid([5, 6, 7], answer), start, num_rounds=1)
    failures = strategy.round_summary(1)["train-failures"]
    # by its own node id; the text is not a site's fixed code, so it is kept escaped and marked
    assert failures == [{"node": 7, "reason": "unknown-reason (error code 5: 'Error: Node Unavailable')"}]
