"""Site replies as the SuperLink delivers them to the ServerApp, and a scripted Grid.

``ScriptedGrid`` answers the strategy's messages from a function instead of real sites, so the
server's own loop (``Strategy.start``: configure_train, aggregate_train, evaluate_fn) runs
unchanged. Outside a Flower runtime, building a message with a destination needs the task
identity the ServerApp runtime sets (flwr.superlink.runtime.run_serverapp); ``server_identity``
sets it for a test.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, Metadata, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from server.strategy import AdapterFedAvg

_ids = itertools.count()
SHAPES = {"encoder.lora_A": (4, 16), "encoder.lora_B": (16, 4), "head.weight": (3, 16), "head.bias": (3,)}


@pytest.fixture
def server_identity(monkeypatch):
    """The ServerApp runtime's task identity, so strategies can build messages."""
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)


def _metadata(node: int) -> Metadata:
    return Metadata(
        run_id=1,
        message_id=f"reply-{node}-{next(_ids)}",
        src_node_id=node,
        dst_node_id=1,
        reply_to_message_id="train-1",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type="train",
    )


def delivered(content: RecordDict, kind: str = "train", run_id: int = 1, node: int = 7) -> Message:
    """A server message as the SuperLink delivers it to site ``node`` (a ClientApp's input;
    ``Message(dst_node_id=...)`` would need a running Flower runtime)."""
    meta = Metadata(
        run_id=run_id,
        message_id=f"{kind}-{time.time_ns()}",
        src_node_id=0,
        dst_node_id=node,
        reply_to_message_id="",
        group_id="",
        created_at=time.time(),
        ttl=3600.0,
        message_type=kind,
    )
    return Message(content, metadata=meta)


def dp_metrics(num_examples: int = 100, **extra) -> dict:
    """What a DP site's reply carries (clients/policy.py's DP_REPLY_KEYS)."""
    return {
        "num-examples": num_examples,
        "steps": 3,
        "epsilon": 2.5,
        "delta": 1e-5,
        "noise-multiplier": 1.1,
        "sample-rate": 0.5,
        "update-bytes": 4096,
        **extra,
    }


def reply(node: int, arrays: dict, metrics: dict | None = None, records: dict | None = None) -> Message:
    """A train reply from ``node``: ``arrays`` (numpy, any dtype) and ``metrics`` as sent."""
    content = records or {
        "arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}),
        "metrics": MetricRecord(dp_metrics() if metrics is None else metrics),
    }
    return Message(RecordDict(content), metadata=_metadata(node))


def error_reply(node: int, reason: str) -> Message:
    """A site's error reply (e.g. clients/policy.py's fixed failure codes)."""
    return Message(error=Error(code=0, reason=reason), metadata=_metadata(node))


def global_adapter(seed: int = 0) -> dict[str, np.ndarray]:
    """A small float32 adapter standing in for the global one."""
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def honest(global_arrays: dict, seed: int, scale: float = 0.1) -> dict[str, np.ndarray]:
    """A site's adapter: the global plus a small random update."""
    rng = np.random.default_rng(1000 + seed)
    return {k: (v + scale * rng.normal(size=v.shape)).astype(np.float32) for k, v in global_arrays.items()}


def distance(a: dict, b: dict) -> float:
    """L2 distance between two adapters over all tensors."""
    return float(np.sqrt(sum(np.sum((np.float64(a[k]) - b[k]) ** 2) for k in a)))


class ScriptedGrid:
    """The part of a Grid that ``Strategy.start`` uses, answering from ``answer(node, round)``."""

    def __init__(self, nodes: list[int], answer: Callable[[int, int, ArrayRecord], Message]):
        self.nodes = nodes
        self.answer = answer

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages, timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            server_round = int(msg.content["config"]["server-round"])
            replies.append(self.answer(msg.metadata.dst_node_id, server_round, msg.content["arrays"]))
        return replies


def start_round(strategy: AdapterFedAvg, arrays: dict, nodes: list[int], server_round: int = 1) -> None:
    """Send ``arrays`` as the global adapter of ``server_round``, as ``Strategy.start`` does."""
    grid = ScriptedGrid(nodes, answer=lambda *_: None)
    record = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    sent = list(strategy.configure_train(server_round, record, ConfigRecord(), grid))
    assert sorted(m.metadata.dst_node_id for m in sent) == sorted(nodes)


def as_dict(record: ArrayRecord) -> dict[str, np.ndarray]:
    """An ArrayRecord as named numpy arrays."""
    return {name: array.numpy() for name, array in record.items()}
