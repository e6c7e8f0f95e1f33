"""FedAvg under secure aggregation: the server learns the round's sum, never one site's update.

``SecAggFedAvg`` is ``AdapterFedAvg`` (sampling, round numbers, resume, evaluation, the round
record) with another train round: ``configure_train`` samples the sites as FedAvg does, then
runs the key stages of ``server.secagg.SecAggRound`` on the grid it is given and returns the
masked-vector messages, which Flower's ``Strategy.start`` sends with its train timeout;
``aggregate_train`` sums the masked vectors, runs the unmask stage on the same grid, and reads the
weighted mean Δ and the summed metrics from the sum (fedllm.secagg.decode). The new global
adapter is the old one plus that mean.

No reply is validated one by one (nothing of one site is visible); what still holds: each site
clips Δ to ±c and weighs at most ``secagg-max-weight`` (its own code), the sum is checked
(no slot above K·Q, the site count equal to the vectors received, the mean finite), and a round
that fails any check, or loses too many sites, keeps the global adapter (``global-unchanged``).
The robust aggregators that need single updates (median, trimmed-mean, krum, bulyan) are
refused; ``cosine``'s per-site clipping, weight cap and direction evidence do not apply.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid

from fedllm.config import ResolvedSettings
from fedllm.secagg import METRIC_SLOTS, SecAggError, SecAggSettings, decode, flatten, unflatten
from server.robust import RobustSettings
from server.secagg import SecAggRound
from server.strategy import AdapterFedAvg

NEEDS_SINGLE_UPDATES = ("median", "trimmed-mean", "krum", "bulyan")


class SecAggFedAvg(AdapterFedAvg):
    """``AdapterFedAvg`` whose train round is a SecAgg+ round (module docstring)."""

    def __init__(
        self, secagg: SecAggSettings, settings: ResolvedSettings, robust: RobustSettings | None = None, **kw
    ) -> None:
        robust = robust or RobustSettings()
        if robust.aggregator in NEEDS_SINGLE_UPDATES:
            raise ValueError(
                f"run config aggregator={robust.aggregator!r} needs each site's update, which "
                "aggregation=secagg+ hides from the server: use aggregator=fedavg (or cosine) with secagg+"
            )
        super().__init__(robust=robust, **kw)
        self.secagg = secagg
        self.clip = secagg.clip(settings)
        self._protocol: SecAggRound | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample as FedAvg; run setup and share-keys; the masked-vector messages (or none)."""
        plain = list(super().configure_train(server_round, arrays, config, grid))
        real_round = server_round + self.round_offset
        record = self.rounds.setdefault(real_round, {"aggregation": "secagg+"})
        self._protocol = None
        if not plain:
            return []
        nodes = [m.metadata.dst_node_id for m in plain]
        length = sum(int(v.size) for v in self._current().values()) + len(METRIC_SLOTS)
        try:
            plan = self.secagg.shares_and_threshold(len(nodes))
            timeout = self.secagg.secagg_timeout
            protocol = SecAggRound(grid, real_round, nodes, plan, timeout=timeout, length=length)
            self._protocol = protocol
            protocol.setup()
            protocol.share_keys()
        except SecAggError as err:
            self._abort(record, err)
            return []
        return protocol.train_messages(plain[0].content)

    def _current(self) -> dict[str, np.ndarray]:
        """The global adapter of the round (``configure_train`` keeps it before anything else)."""
        if self._global is None:
            raise SecAggError("no global adapter: configure_train keeps it first")
        return self._global

    def _abort(self, record: dict, err: Exception) -> None:
        if self._protocol is not None:
            record["secagg"] = self._protocol.summary()
            record["bytes-received"] = self._protocol.uploaded
        record["global-unchanged"] = str(err)
        self._protocol = None
        log(WARNING, "%s; the global adapter is kept", err)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Sum the masked vectors, unmask the sum, add its weighted mean Δ to the global adapter."""
        server_round += self.round_offset
        record = self.rounds.setdefault(server_round, {"aggregation": "secagg+"})
        protocol, replies = self._protocol, list(replies)
        if protocol is None:  # aborted in configure_train (its reason is recorded)
            record.setdefault("global-unchanged", "no secure round was configured")
            return None, None
        try:
            protocol.collect(replies)
            total = protocol.unmask()
            aggregate = decode(total, len(protocol.masked), self.clip)
            glob = self._current()
            shapes = {k: v.shape for k, v in glob.items()}
            updated = unflatten(flatten(glob, list(glob)) + aggregate.mean_delta, shapes)
            if not all(np.isfinite(v).all() for v in updated.values()):
                raise SecAggError("the aggregate is not finite")
        except SecAggError as err:
            self._abort(record, err)
            return None, None
        record["secagg"] = protocol.summary()
        record["bytes-received"] = protocol.uploaded
        record["train-replies"] = len(protocol.masked)
        record["train-failures"] = [{"node": f["node"], "reason": f["reason"]} for f in protocol.failures]
        self._global = updated
        self._protocol = None
        metrics = MetricRecord({k: float(v) for k, v in aggregate.train_metrics().items()})
        record["train"] = dict(metrics)
        log(INFO, "round %s: secure sum of %s sites", server_round, len(protocol.masked))
        return self.global_arrays, metrics
