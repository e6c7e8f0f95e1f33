"""The site↔server contract: every key the server sends, a site replies and the server logs.

Both sides import this module and nothing else names these keys (``tests/test_contract.py``
runs a real round and checks every key sent, received and logged against it):

- the **round config** (the ``config`` ConfigRecord of a train or evaluate message):
  ``train_config`` / ``evaluate_config`` build it on the server, ``RoundConfig.read`` parses it at
  a site (Flower's strategy adds ``server-round``);
- the **reply metrics** (the ``metrics`` MetricRecord of a site's reply): ``TrainMetrics`` and
  ``EvaluateMetrics``. Under DP a train reply carries only ``DP_REPLY_KEYS`` (what the server
  needs to weight and account a DP update; nothing here is computed from the examples' contents:
  n, and q and steps derived from it, are listed as not covered) plus ``RELEASED_TRAIN_KEYS`` if
  the site opts in (clients/policy.py); a reply without DP carries every key;
- the **round record** (``RoundRecord``): what a server strategy keeps of each round, which the
  run log writes as one ``metrics.jsonl`` row with ``ROW_KEYS`` added, and which the resume, the
  sweeps and the benches read back.

- the **secure-aggregation stages** (``SecAggKey``): with ``aggregation = "secagg+"`` a round is
  four messages each way (server/secagg.py, clients/secagg.py), each stage one ConfigRecord named
  ``SecAggKey.RECORD`` (and the masked vector an ArrayRecord).

The array payloads are checked by ``fedllm.wire``; the failure codes a site may send are in
``fedllm.failure_codes``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NotRequired, TypedDict, cast

from flwr.app import ConfigRecord

MetricValue = int | float | list[int] | list[float]  # what a Flower MetricRecord holds

# ---------------------------------------------------------------- the round config (server → site)

LABELS = "labels"  # JSON list of the label names, in the model's class order
NUM_ROUNDS = "num-rounds"  # train only: the run's rounds, over which a site plans its privacy
RUN_KEY = "run-key"  # the run's ledger key: the first run id, kept when a crashed run is resumed
SERVER_ROUND = "server-round"  # the run's real round number; Flower's strategy adds it
# with center-features = "validation" only: the head's feature centre (list of floats), the mean
# of the server's validation features; public (the server's own data), never the sites'
FEATURE_CENTER = "feature-center"
TRAIN_CONFIG_KEYS = (LABELS, NUM_ROUNDS, RUN_KEY, SERVER_ROUND)
EVALUATE_CONFIG_KEYS = (LABELS, RUN_KEY, SERVER_ROUND)


def _centre(center: list[float] | None) -> dict:
    return {} if center is None else {FEATURE_CENTER: [float(v) for v in center]}


def train_config(
    labels: list[str], num_rounds: int, run_key: str, center: list[float] | None = None
) -> ConfigRecord:
    """What the server sends with every train message (before Flower adds ``server-round``)."""
    return ConfigRecord(
        {LABELS: json.dumps(labels), NUM_ROUNDS: num_rounds, RUN_KEY: run_key, **_centre(center)}
    )


def evaluate_config(labels: list[str], run_key: str, center: list[float] | None = None) -> ConfigRecord:
    """What the server sends with every evaluate message (before Flower adds ``server-round``)."""
    return ConfigRecord({LABELS: json.dumps(labels), RUN_KEY: run_key, **_centre(center)})


@dataclass(frozen=True)
class RoundConfig:
    """A site's reading of a message's config: the labels and, for a train message, the rounds."""

    labels: list[str]
    server_round: int
    num_rounds: int
    feature_center: list[float] | None = None

    @classmethod
    def read(cls, config: ConfigRecord, train: bool = True) -> RoundConfig:
        """Parse ``config``; a train message must carry ``num-rounds`` and ``server-round``
        (``KeyError`` otherwise); of an evaluate message only ``labels`` (and the feature centre)
        is read (0 for the others)."""
        labels = json.loads(str(config[LABELS]))
        raw = config.get(FEATURE_CENTER)
        center = [float(v) for v in cast(list, raw)] if isinstance(raw, list) else None
        if train:
            return cls(labels, _whole(config[SERVER_ROUND]), _whole(config[NUM_ROUNDS]), center)
        return cls(labels, 0, 0, center)

    def center_for(self, settings: Any) -> list[float] | None:
        """The feature centre this site applies: the one sent where ``center-features`` asks for
        it (``ValueError`` if none came), else None."""
        if settings.center_features == "none":
            return None
        if self.feature_center is None:
            raise ValueError(
                f"run config center-features = {settings.center_features!r} but the round config "
                f"carries no {FEATURE_CENTER}; run a server of this fedllm version"
            )
        return self.feature_center


def _whole(value: object) -> int:
    """A config value as an int (``int(...)`` as the sites always read it)."""
    return int(str(value)) if not isinstance(value, int | float) else int(value)


# ---------------------------------------------------------------- the reply metrics (site → server)

TrainMetrics = TypedDict(
    "TrainMetrics",
    {
        "num-examples": int,  # under DP the site's DP count n̂, never its exact n
        "steps": int,
        "epsilon": float,  # the run's ε so far at this site (inf without DP)
        "delta": float,
        "noise-multiplier": float,
        "sample-rate": float,
        "update-bytes": int,
        "train-loss": NotRequired[float],  # exact: released under DP only if the site opts in
        "train-seconds": NotRequired[float],  # exact: released under DP only if the site opts in
    },
)
TRAIN_REPLY_KEYS: tuple[str, ...] = tuple(TrainMetrics.__annotations__)
DP_REPLY_KEYS: tuple[str, ...] = tuple(k for k in TRAIN_REPLY_KEYS if k in TrainMetrics.__required_keys__)
RELEASED_TRAIN_KEYS: tuple[str, ...] = tuple(k for k in TRAIN_REPLY_KEYS if k not in DP_REPLY_KEYS)

EvaluateMetrics = TypedDict(
    "EvaluateMetrics",
    {
        "num-examples": int,
        "loss": float,
        "accuracy": float,
        "macro-f1": float,
        # with ``imbalance``: scored with the site's own DP label prior added to the logits
        "personal-accuracy": NotRequired[float],
        "personal-macro-f1": NotRequired[float],
    },
)
EVALUATE_REPLY_KEYS: tuple[str, ...] = tuple(EvaluateMetrics.__annotations__)


def metric_values(metrics: TrainMetrics | EvaluateMetrics) -> dict[str, MetricValue]:
    """A reply's metrics as the plain mapping a ``MetricRecord`` takes (every value declared
    above is an int or a float)."""
    return cast("dict[str, MetricValue]", dict(metrics))


# the round's aggregated train metrics (``RoundRecord["train"]``): the weighted means of the reply
# keys but the weight (num-examples) and epsilon, which is summarised by its max and mean instead
EPSILON_MAX, EPSILON_MEAN = "epsilon-max", "epsilon-mean"

# what the round record keeps of each valid train reply (``RoundRecord["sites"]``)
SITE_RECORD_KEYS = ("num-examples", "steps", "epsilon", "delta", "noise-multiplier", "sample-rate")


def site_entry(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a checked train reply's metrics the round record keeps."""
    return {k: metrics[k] for k in SITE_RECORD_KEYS if k in metrics}


# ---------------------------------------------------------------- the round record (server log)


class Failure(TypedDict):
    """A reply the server could not use: its node and the one-line reason it recorded."""

    node: int
    reason: str


RoundRecord = TypedDict(
    "RoundRecord",
    {
        # added by the run log (server/runlog.py) to every row
        "round": int,
        "wall-seconds": float,
        "server": dict[str, float],  # the server's scores: SCORE_KEYS, VALIDATION_PREFIX + SCORE_KEYS
        # train: what arrived and what was dropped
        "train-failures": list[Failure],
        "dropped": list[int],  # nodes whose reply failed a check
        "bytes-received": int,
        "train-replies": int,  # valid replies
        "sites": dict[str, dict[str, float]],  # node → site_entry(metrics)
        "aggregator": str,
        "aggregation": str,  # "secagg+" when only the sum was seen
        # train: the bounds (server/robust.py, server/noise.py, server/direction.py)
        "too-clean": list[dict[str, Any]],  # {"node", "reason", ...}: left out by the noise check
        "noise-check-skipped": str,
        "noise-bounds": dict[str, float],
        "norm-bound": float | None,
        "clipped": list[Any],  # {"node", "norm", "bound"}; client-level DP: node ids
        "weight-cap": float | None,
        "capped": list[dict[str, Any]],  # {"node", "num-examples"}
        "direction-score": dict[str, float],
        "direction-evidence": dict[str, float],
        "discounted": list[int],
        "selected": list[int],  # krum / bulyan
        "stand-ins": list[int],  # client-level DP: nodes replaced by the global adapter
        "global-unchanged": str,  # why the round aggregated nothing
        "train": dict[str, MetricValue],  # the aggregated train metrics
        "client-dp": dict[str, Any],  # client-level DP: the run's (ε, δ) so far, its accountant
        "secagg": dict[str, Any],  # SecAgg+: the protocol's summary
        # evaluate
        "evaluate-failures": list[Failure],
        "evaluate-weight-cap": float | None,
        "evaluate-capped": list[dict[str, Any]],
        "evaluate": dict[str, MetricValue],  # the aggregated evaluate metrics
    },
    total=False,
)
ROUND_RECORD_KEYS: tuple[str, ...] = tuple(RoundRecord.__annotations__)
RUN_LOG = "metrics.jsonl"  # the run log's rows in a run folder, one ``RoundRecord`` a line


def round_records(run_dir: Path) -> list[RoundRecord]:
    """The rows of ``run_dir``'s run log (``RUN_LOG``), in order, as round records."""
    lines = (run_dir / RUN_LOG).read_text().splitlines()
    return [cast(RoundRecord, json.loads(line)) for line in lines if line.strip()]


ROW_KEYS = ("round", "wall-seconds", "server")  # every run-log row has these
SCORE_KEYS = ("loss", "accuracy", "macro-f1")
VALIDATION_PREFIX = "validation-"


# ---------------------------------------------------------------- secure aggregation (SecAgg+ stages)


class SecAggKey:
    """The records and keys of a SecAgg+ round's four stages (fedllm/secagg.py's protocol). Every
    stage the server sends carries ``STAGE`` and ``ROUND`` in its ``RECORD``; a site answers in a
    ``RECORD`` of its own, but in stage 3 (``collect``), where it answers ``MASKED[VECTOR]`` only."""

    RECORD = "secagg"  # the ConfigRecord of a stage message and of a site's answer
    STAGES = ("setup", "share-keys", "collect", "unmask")
    STAGE, ROUND = "stage", "round"
    # setup: the round's shape out; the site's two public keys back
    SITES, NUM_SHARES, THRESHOLD = "sites", "num-shares", "threshold"
    PK1, PK2 = "pk1", "pk2"
    # share-keys: the alive neighbours and their keys out; encrypted share pairs back, by destination
    NIDS, PK1S, PK2S = "nids", "pk1s", "pk2s"
    DSTS, CTXTS = "dsts", "ctxts"
    # collect: the shares forwarded to the site (sources and ciphertexts) with the train content
    SRCS = "srcs"
    MASKED, VECTOR = "masked", "vector"  # the answer: ArrayRecord MASKED holding one array VECTOR
    # unmask: the neighbours that sent a vector and those that dropped; shares back, by owner (NIDS)
    ACTIVE, DEAD, SHARES = "active", "dead", "shares"
