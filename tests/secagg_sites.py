"""Sites that speak SecAgg+ without training: the real site mod over a scripted train handler.

``SecAggGrid`` is the part of a Grid the strategy uses; each message goes to its node's
``clients.app`` mods as a deployed site would run them (``failures_as_codes`` around
``secagg_mod``), with one ``Context`` per node kept across the stages. The train handler is
replaced by one that answers the global adapter plus that site's fixed update Δ and metrics.
``drop`` makes a node silent from a stage on (``setup``, ``share-keys``, ``collect``,
``unmask``), as a lost site is; ``recorded`` keeps every reply the server received (the
recording hook of the tests).
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict

from clients.policy import failures_as_codes
from clients.secagg import RECORD, secagg_mod

STAGES = ("setup", "share-keys", "collect", "unmask")


class SecAggGrid:
    """Routes the strategy's messages to scripted SecAgg+ sites (module docstring)."""

    def __init__(self, updates: dict[int, dict], metrics: dict[int, dict], run_config: dict):
        self.updates, self.metrics = updates, metrics
        self.contexts = {
            nid: Context(1, nid, node_config={}, state=RecordDict(), run_config=dict(run_config))
            for nid in updates
        }
        self.drop: dict[int, str] = {}
        self.fail: set[int] = set()  # nodes whose training raises (a site-declined failure)
        self.recorded: list[tuple[int, str, RecordDict]] = []
        self.sent: list[Message] = []
        self.sent_keys: list[tuple[str, set[str]]] = []  # each stage message's keys, as sent

    def get_node_ids(self) -> list[int]:
        return list(self.updates)

    def _train(self, msg: Message, context: Context) -> Message:
        """The scripted train handler: the global adapter plus this site's Δ, and its metrics."""
        nid = msg.metadata.dst_node_id
        if nid in self.fail:
            raise RuntimeError("the site's data could not be read")
        glob = {k: v.numpy() for k, v in msg.content["arrays"].items()}
        arrays = ArrayRecord({k: Array((glob[k] + self.updates[nid][k]).astype(np.float32)) for k in glob})
        content = RecordDict({"arrays": arrays, "metrics": MetricRecord(self.metrics[nid])})
        return Message(content, reply_to=msg)

    def _silent(self, nid: int, stage: str) -> bool:
        return nid in self.drop and STAGES.index(stage) >= STAGES.index(self.drop[nid])

    def send_and_receive(self, messages, timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            self.sent.append(msg)
            nid = msg.metadata.dst_node_id
            config = msg.content.config_records.get(RECORD)
            stage = str(config["stage"]) if config is not None else "plain"
            self.sent_keys.append((stage, set(config) if config is not None else set()))
            if stage != "plain" and self._silent(nid, stage):
                continue

            def handler(m: Message, c: Context) -> Message:
                return secagg_mod(m, c, self._train)

            reply = failures_as_codes(msg, self.contexts[nid], handler)
            self.recorded.append((nid, stage, reply.content if not reply.has_error() else RecordDict()))
            replies.append(reply)
        return replies
