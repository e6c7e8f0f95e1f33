"""Train replies as the SuperLink hands them to the ServerApp, for the benches that drive
``AdapterFedAvg.aggregate_train`` directly (``bench/faults.py``, ``bench/poisoning.py``)."""

from __future__ import annotations

import time

from flwr.app import Error, Message, Metadata, RecordDict


def train_reply(node: int, content: RecordDict | None = None, error: str = "") -> Message:
    """A train reply from ``node``: ``content``, or an error reply with ``error`` as its reason."""
    meta = Metadata(
        run_id=1,
        message_id=f"train-{node}-{time.time_ns()}",
        src_node_id=node,
        dst_node_id=1,
        reply_to_message_id="",
        group_id="",
        created_at=time.time(),
        ttl=3600.0,
        message_type="train",
    )
    if error:
        return Message(error=Error(code=0, reason=error), metadata=meta)
    return Message(content, metadata=meta)
