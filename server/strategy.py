"""FedAvg over LoRA adapters, recording what each round received (bytes, per-site epsilon)."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

SITE_KEYS = ("num-examples", "steps", "epsilon", "delta", "noise-multiplier", "sample-rate")


def aggregate_train_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Weighted means (Flower's default) plus epsilon max and mean over the sites."""
    metrics = aggregate_metricrecords(records, weight_key)
    eps = [float(r["metrics"]["epsilon"]) for r in records if "epsilon" in r["metrics"]]
    if eps:
        metrics["epsilon-max"] = max(eps)
        metrics["epsilon-mean"] = sum(eps) / len(eps)
        del metrics["epsilon"]  # a weighted mean of epsilons means nothing
    return metrics


class AdapterFedAvg(FedAvg):
    """Flower's FedAvg, plus a per-round record of replies, failures, bytes and site epsilons."""

    def __init__(self, **kwargs):
        kwargs.setdefault("train_metrics_aggr_fn", aggregate_train_metrics)
        super().__init__(**kwargs)
        self.rounds: dict[int, dict] = {}

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg's aggregation, after noting bytes received and each site's epsilon."""
        replies = list(replies)
        ok = [m for m in replies if not m.has_error()]
        record = self.rounds.setdefault(server_round, {})
        record["train-replies"] = len(ok)
        record["train-failures"] = [
            {"node": m.metadata.src_node_id, "reason": str(m.error.reason)} for m in replies if m.has_error()
        ]
        record["bytes-received"] = sum(m.content["arrays"].count_bytes() for m in ok)
        record["sites"] = {
            str(m.metadata.src_node_id): {
                key: float(m.content["metrics"][key]) for key in SITE_KEYS if key in m.content["metrics"]
            }
            for m in ok
        }
        arrays, metrics = super().aggregate_train(server_round, replies)
        record["train"] = dict(metrics) if metrics else {}
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """FedAvg's weighted evaluation metrics, kept for the run log."""
        metrics = super().aggregate_evaluate(server_round, list(replies))
        self.rounds.setdefault(server_round, {})["evaluate"] = dict(metrics) if metrics else {}
        return metrics

    def round_summary(self, server_round: int) -> dict:
        """What this round received and aggregated (empty for round 0)."""
        return self.rounds.get(server_round, {})
