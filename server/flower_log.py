"""Flower's own log lines and SuperLink-made replies, made to agree with fedllm's records.

- **Round numbers on resume.** ``Strategy.start`` logs ``[ROUND i/n]`` counting the rounds of
  this start; a run resumed after round k (server/resume.py) runs rounds k+1..N, and its lines
  said ``[ROUND 1/2]`` where fedllm said ``round 7``. ``real_round_numbers(k, N)`` rewrites those
  records to ``[ROUND k+i/N]`` while the block runs.
- **Which site a reply is about.** When a site stops answering mid-round the SuperLink itself
  makes the error reply, with ``src_node_id`` = its own id (1), so the round's record said
  ``node 1``. ``reply_node(reply, sent)`` names the node the instruction was sent to instead.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from flwr.app import Message
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.logger import FLOWER_LOGGER

ROUND_LINE = "[ROUND %s/%s]"


class _RealRounds(logging.Filter):
    """Shift the round in Flower's ``[ROUND i/n]`` records by ``offset``; ``n`` becomes ``total``."""

    def __init__(self, offset: int, total: int) -> None:
        super().__init__()
        self.offset, self.total = offset, total

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == ROUND_LINE and isinstance(record.args, tuple) and len(record.args) == 2:
            record.args = (int(str(record.args[0])) + self.offset, self.total)
        return True


@contextmanager
def real_round_numbers(offset: int, total: int) -> Iterator[None]:
    """Within the block Flower's round lines carry the run's real round numbers."""
    if not offset:
        yield
        return
    shift = _RealRounds(offset, total)
    FLOWER_LOGGER.addFilter(shift)
    try:
        yield
    finally:
        FLOWER_LOGGER.removeFilter(shift)


def destinations(sent: Iterable[Message]) -> dict[str, int]:
    """Message id -> destination node of the instructions sent (ids are set when pushed)."""
    return {m.metadata.message_id: m.metadata.dst_node_id for m in sent if m.metadata.message_id}


def reply_node(reply: Message, sent: dict[str, int]) -> int:
    """The node a reply is about: its sender, or, for a reply the SuperLink made (a site that
    stopped answering), the node the instruction was sent to."""
    node = reply.metadata.src_node_id
    if node == SUPERLINK_NODE_ID:
        return sent.get(reply.metadata.reply_to_message_id, node)
    return node
