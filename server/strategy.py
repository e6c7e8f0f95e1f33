"""FedAvg over LoRA adapters that validates and bounds every reply before it is combined.

Per round the strategy keeps the global adapter it sent (``configure_train``); each train reply
is checked against it (server/validation.py), a bad one becomes a ``train-failures`` entry and
the round goes on with the rest; the valid updates are clipped, their weights capped and the
adapters combined by the configured aggregator (server/robust.py); the result is checked finite
before it is returned (and so evaluated, checkpointed and sent). When nothing usable is left the
global adapter stays as it was and the round record says why (``global-unchanged``).

A resumed run (server/resume.py) starts at a later round: ``start(..., first_round=k + 1)``.
Flower's ``Strategy.start`` numbers its rounds 1, 2, ...; every round number it passes in is
shifted by ``k`` here, so train/evaluate messages (``server-round``), round records and
``evaluate_fn`` (checkpoints, run log) carry the run's real round numbers, and so do Flower's own
``[ROUND i/n]`` log lines (server/flower_log.py). Across rounds the strategy keeps the
global adapter, which the resumed run loads from its last checkpoint, and each site's direction
evidence (``cosine``), which ``restore`` rebuilds from the kept rounds' records.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from logging import INFO, WARNING
from typing import cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from fedllm.contract import EPSILON_MAX, EPSILON_MEAN, RoundRecord, site_entry
from server.direction import DirectionEvidence, direction_weights
from server.flower_log import destinations, reply_node
from server.noise import NOISE_OVERSIZED, NoiseModel, noise_bounds, noise_check
from server.resumable import ResumableStart as ResumableStart  # re-exported: server/client_dp.py
from server.robust import RobustSettings, cap_weights, clip_updates, combine, update_norm
from server.validation import (
    EVALUATE_METRICS,
    ReplyError,
    ValidReply,
    adapter_spec,
    canonical,
    check_metrics,
    check_train_reply,
    clean_reason,
    majority_spec,
    site_reason,
)


def aggregate_train_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Weighted means (Flower's default) plus epsilon max and mean over the sites."""
    metrics = aggregate_metricrecords(records, weight_key)
    replies = [r.metric_records["metrics"] for r in records]
    eps = [float(cast(float, m["epsilon"])) for m in replies if "epsilon" in m]  # a number: validated
    if eps:
        metrics[EPSILON_MAX] = max(eps)
        metrics[EPSILON_MEAN] = sum(eps) / len(eps)
        del metrics["epsilon"]  # a weighted mean of epsilons means nothing
    return metrics


def _metric_records(metrics: list[dict[str, float]], weights: list[float], key: str) -> list[RecordDict]:
    """Checked metrics as Flower records: only keys every reply has, the capped weight as ``key``."""
    common = set.intersection(*(set(m) for m in metrics))
    return [
        RecordDict({"metrics": MetricRecord({**{k: m[k] for k in common}, key: w})})
        for m, w in zip(metrics, weights, strict=True)
    ]


def _finite_by_node(valid: list[ValidReply], values: list[float]) -> dict[str, float]:
    """``{node: value}`` of the finite values, one per valid reply."""
    return {str(r.node): v for r, v in zip(valid, values, strict=True) if math.isfinite(v)}


def _log_bounds(record: RoundRecord, server_round: int) -> None:
    """One line when the round clipped, capped or discounted a site (too-clean is logged apart)."""
    if record["clipped"] or record["capped"] or record.get("discounted"):
        log(
            INFO,
            "round %s: updates clipped %s, weights capped %s, discounted (direction) %s",
            server_round,
            [c["node"] for c in record["clipped"]],
            [c["node"] for c in record["capped"]],
            record.get("discounted", []),
        )


class AdapterFedAvg(ResumableStart, FedAvg):
    """Flower's FedAvg with reply validation, robust aggregation and a per-round record.

    ``noise``: the run's settings and rounds, for the noise check (server/noise.py); None = no
    noise check.
    """

    def __init__(self, robust: RobustSettings | None = None, noise: NoiseModel | None = None, **kwargs):
        kwargs.setdefault("train_metrics_aggr_fn", aggregate_train_metrics)
        super().__init__(**kwargs)
        self.robust = robust or RobustSettings()
        self.noise = noise
        # each round's record: a fedllm.contract.RoundRecord (subclasses write to it as a dict)
        self.rounds: dict[int, dict] = {}
        self._global: dict[str, np.ndarray] | None = None
        self._sent: list[Message] = []  # the round's train instructions (whom a reply is about)
        self.direction = DirectionEvidence()  # the sites' direction record over the run (cosine)

    def restore(self, records: list[RoundRecord]) -> None:
        """Carry the state of the rounds a resumed run keeps: their records (``metrics.jsonl`` rows)."""
        self.direction = DirectionEvidence.from_rounds(records)

    @property
    def global_arrays(self) -> ArrayRecord | None:
        """The current global adapter: the last one sent, or the last accepted aggregate."""
        if self._global is None:
            return None
        return ArrayRecord({k: Array(v) for k, v in self._global.items()})

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's train messages, after keeping ``arrays``: the spec replies are checked against."""
        self.remember_global(arrays)
        self._sent = list(super().configure_train(server_round + self.round_offset, arrays, config, grid))
        return self._sent

    def remember_global(self, arrays: ArrayRecord) -> None:
        """Keep the global adapter of the round being sent (``configure_train`` calls this).

        Replies are validated against it and updates measured from it; an in-process
        federation (bench/poisoning.py) calls it directly instead of sending messages.
        """
        self._global = {k: v.numpy() for k, v in arrays.items()}

    def _fail(self, record: RoundRecord, node: int, reason: str, kind: str = "train") -> None:
        reason = clean_reason(reason)  # one line, bounded: a site chose parts of some reasons
        failures = record["train-failures"] if kind == "train" else record["evaluate-failures"]
        failures.append({"node": node, "reason": reason})
        log(WARNING, "%s reply from node %s dropped: %s", kind, node, reason)

    def _validate(self, record: RoundRecord, replies: list[Message]) -> list[ValidReply]:
        """The replies that pass every check, by node id; the others go to ``train-failures``."""
        record["train-failures"] = []
        record["dropped"] = []
        replies = canonical(replies)
        sent = destinations(self._sent)
        contents = [(reply_node(m, sent), m.content) for m in replies if not m.has_error()]
        for m in replies:
            if m.has_error():
                self._fail(record, reply_node(m, sent), site_reason(m.error.reason, m.error.code))
        record["bytes-received"] = sum(a.count_bytes() for _, c in contents for a in c.array_records.values())
        spec = adapter_spec(self._global) if self._global else majority_spec([c for _, c in contents])
        valid = []
        for node, content in contents:
            try:
                valid.append(check_train_reply(node, content, spec or {}, self.robust.max_num_examples))
            except ReplyError as err:
                self._fail(record, node, str(err))
                record["dropped"].append(node)
        return valid

    def _noise_check(
        self, record: RoundRecord, valid: list[ValidReply], server_round: int
    ) -> list[ValidReply]:
        """The replies without those too clean for the DP they claim (``too-clean`` in the record)."""
        record["too-clean"] = []
        if self.noise is None or self._global is None or self.robust.min_noise_ratio <= 0 or not valid:
            return valid
        record["too-clean"], note = noise_check(
            [r.metrics for r in valid],
            [r.node for r in valid],
            [update_norm(self._global, r.arrays) for r in valid],
            sum(v.size for v in self._global.values()),
            self.noise,
            server_round,
            self.robust.min_noise_ratio,
            self.robust.max_site_weight.resolve([r.num_examples for r in valid]),
        )
        if note:
            record["noise-check-skipped"] = note
            log(WARNING, "round %s: %s", server_round, note)
        for entry in record["too-clean"]:
            log(WARNING, "round %s: node %s left out, %s", server_round, entry["node"], entry["reason"])
        out = {entry["node"] for entry in record["too-clean"]}
        return [r for r in valid if r.node not in out]

    def _noise_bounds(self, record: RoundRecord, valid: list[ValidReply], server_round: int) -> list | None:
        """Each reply's bound from the noise model (server/noise.py ``noise_bounds``), or None."""
        if self.noise is None or self._global is None or self.robust.noise_bound_slack <= 0:
            return None
        bounds = noise_bounds(
            [r.metrics for r in valid],
            [update_norm(self._global, r.arrays) for r in valid],
            sum(v.size for v in self._global.values()),
            self.noise,
            server_round,
            self.robust.noise_bound_slack,
            self.robust.max_site_weight.resolve([r.num_examples for r in valid]),
        )
        record["noise-bounds"] = {str(r.node): b for r, b in zip(valid, bounds, strict=True) if b}
        return bounds

    def _direction(
        self,
        record: RoundRecord,
        global_arrays: dict[str, np.ndarray],
        valid: list[ValidReply],
        adapters: list[dict[str, np.ndarray]],
        weights: list[float],
    ) -> list[float]:
        """``cosine``'s weights: 0 for the oversized and the pointing-away sites (server/direction.py)."""
        # the oversized updates, most oversized (over its own bound) first: those the round's bound
        # cut, and those more than NOISE_OVERSIZED x over their noise bound
        limit = record["norm-bound"] or math.inf
        norms = {
            c["node"]: c["norm"] / c["bound"]
            for c in record["clipped"]
            if c["norm"] > limit or c["norm"] > NOISE_OVERSIZED * c["bound"]
        }
        scored, scores, evidence = direction_weights(
            global_arrays,
            adapters,
            weights,
            [r.node for r in valid],
            self.direction,
            self.robust.num_malicious_sites,
            self.robust.direction_threshold,
            oversized=sorted(
                (i for i, r in enumerate(valid) if r.node in norms), key=lambda i: -norms[valid[i].node]
            ),
        )
        # unrounded: a resumed run rebuilds the evidence from these rows (``restore``)
        record["direction-score"] = _finite_by_node(valid, scores)
        record["direction-evidence"] = _finite_by_node(valid, evidence)
        record["discounted"] = [r.node for r, w, v in zip(valid, weights, scored, strict=True) if v == 0 < w]
        return scored

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate, clip, cap and combine the round's replies; None keeps the global adapter."""
        server_round += self.round_offset
        record = self._record(server_round)
        valid = self._validate(record, list(replies))
        record["train-replies"] = len(valid)
        record["sites"] = {str(r.node): site_entry(r.metrics) for r in valid}
        record["aggregator"] = self.robust.aggregator
        valid = self._noise_check(record, valid, server_round)
        if not valid:
            record["global-unchanged"] = "no valid train reply"
            return None, None
        adapters, weights, scored = self._bound(record, valid, server_round)
        combined, used = self._combine(record, valid, adapters, scored, server_round)
        if combined is None:
            return None, None
        self._global = combined
        _log_bounds(record, server_round)
        metrics = self.train_metrics_aggr_fn(
            _metric_records(
                [valid[i].metrics for i in used], [weights[i] for i in used], self.weighted_by_key
            ),
            self.weighted_by_key,
        )
        record["train"] = dict(metrics)
        return self.global_arrays, metrics

    def _bound(
        self, record: RoundRecord, valid: list[ValidReply], server_round: int
    ) -> tuple[list[dict[str, np.ndarray]], list[float], list[float]]:
        """The valid updates clipped, their weights capped and (``cosine``) scored by direction:
        (adapters, capped weights, the weights the aggregator uses)."""
        adapters, record["norm-bound"], record["clipped"] = clip_updates(
            self._global, valid, self.robust.max_update_norm, self._noise_bounds(record, valid, server_round)
        )
        weights, record["weight-cap"], record["capped"] = cap_weights(valid, self.robust.max_site_weight)
        scored = weights
        if self.robust.aggregator == "cosine" and self._global is not None:
            scored = self._direction(record, self._global, valid, adapters, weights)
        return adapters, weights, scored

    def _combine(
        self,
        record: RoundRecord,
        valid: list[ValidReply],
        adapters: list[dict[str, np.ndarray]],
        scored: list[float],
        server_round: int,
    ) -> tuple[dict[str, np.ndarray] | None, list[int]]:
        """The aggregate (float32, finite) and the indices it was computed from; None and the
        reason in ``global-unchanged`` when the aggregator kept none or the result is not finite."""
        with np.errstate(over="ignore", invalid="ignore"):  # a non-finite result is caught below
            combined, used, why = combine(adapters, scored, self.robust)
        if self.robust.aggregator in ("krum", "bulyan"):
            record["selected"] = [valid[i].node for i in used]
        if combined is None:
            record["global-unchanged"] = why
            return None, used
        combined = {k: np.asarray(v, dtype=np.float32) for k, v in combined.items()}
        if not all(np.isfinite(v).all() for v in combined.values()):
            record["global-unchanged"] = "the aggregate is not finite"
            log(WARNING, "round %s: the aggregate is not finite; the global adapter is kept", server_round)
            return None, used
        return combined, used

    def _check_evaluate(self, m: Message) -> ValidReply:
        """One evaluation reply's checked metrics; raises ``ReplyError`` (its recorded reason)."""
        if m.has_error():
            raise ReplyError(site_reason(m.error.reason, m.error.code))
        if list(m.content.metric_records) != ["metrics"]:
            raise ReplyError("expected one MetricRecord 'metrics'")
        metrics = check_metrics(m.content["metrics"], EVALUATE_METRICS, self.robust.max_num_examples)
        return ValidReply(m.metadata.src_node_id, {}, metrics)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Weighted means of the sites' checked evaluation metrics (bad replies are recorded).

        The weights are the claimed counts capped as in training (``max-site-weight``), so one
        site's count cannot buy the federated score; replies are combined by node id.
        """
        server_round += self.round_offset
        record = self._record(server_round)
        record["evaluate-failures"] = []
        checked = []
        for m in canonical(replies):
            try:
                checked.append(self._check_evaluate(m))
            except ReplyError as err:
                self._fail(record, m.metadata.src_node_id, str(err), "evaluate")
        metrics = None
        if checked:
            weights, record["evaluate-weight-cap"], record["evaluate-capped"] = cap_weights(
                checked, self.robust.max_site_weight
            )
            records = _metric_records([c.metrics for c in checked], weights, self.weighted_by_key)
            metrics = self.evaluate_metrics_aggr_fn(records, self.weighted_by_key)
        record["evaluate"] = dict(metrics) if metrics else {}
        return metrics

    def round_summary(self, server_round: int) -> RoundRecord:
        """What this round received, dropped, clipped, capped and aggregated (empty for round 0)."""
        return cast(RoundRecord, self.rounds.get(server_round, {}))

    def _record(self, server_round: int) -> RoundRecord:
        """Round ``server_round``'s record, started empty (its keys: ``fedllm.contract.RoundRecord``,
        which tests/test_contract.py checks every logged row against)."""
        return cast(RoundRecord, self.rounds.setdefault(server_round, {}))
