"""Every train reply is validated before it is averaged; a bad one is dropped with its reason.

The strategy is driven as ``Strategy.start`` drives it (configure_train, then aggregate_train on
the replies), with replies built as the SuperLink delivers them.
"""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

from fedllm.adapters import adapter_from_record, adapter_to_record
from fedllm.model import build_model
from server.robust import RobustSettings
from server.strategy import AdapterFedAvg
from server.validation import ReplyError, check_arrays

from .conftest import DEVICE, LABELS
from .replies import (
    ScriptedGrid,
    as_dict,
    distance,
    dp_metrics,
    error_reply,
    global_adapter,
    honest,
    reply,
    server_identity,  # noqa: F401 - the fixture below
    start_round,
)

GOOD = {1: 100, 2: 140, 3: 80, 4: 120}  # node -> num-examples
BAD = 9
PLAIN = RobustSettings().without_bounds()  # so the good replies' mean is exact
pytestmark = pytest.mark.usefixtures("server_identity")


def _with(arrays: dict, name: str, value) -> dict:
    return {**arrays, name: value}


def _garbage() -> Array:
    return Array(dtype="float32", shape=(3,), stype="numpy.ndarray", data=b"not an npy payload")


# (what is wrong, the reply's arrays from (global, honest adapter), its metrics, reason contains)
MALFORMED = {
    "missing key": (lambda g, a: {k: v for k, v in a.items() if k != "head.bias"}, None, "missing"),
    "extra key": (lambda g, a: _with(a, "extra", np.zeros(2, np.float32)), None, "unexpected"),
    "wrong shape": (lambda g, a: _with(a, "head.bias", np.zeros(4, np.float32)), None, "shape"),
    "scalar array": (lambda g, a: _with(a, "head.bias", np.float32(0.5)), None, "shape"),
    "(1, N) array": (lambda g, a: _with(a, "head.bias", a["head.bias"][None, :]), None, "shape"),
    "int64": (lambda g, a: _with(a, "head.bias", np.ones(3, np.int64)), None, "dtype"),
    "bool": (lambda g, a: _with(a, "head.bias", np.ones(3, bool)), None, "dtype"),
    "float16": (lambda g, a: _with(a, "head.bias", a["head.bias"].astype(np.float16)), None, "dtype"),
    "float64": (lambda g, a: _with(a, "head.bias", a["head.bias"].astype(np.float64)), None, "dtype"),
    "complex": (lambda g, a: _with(a, "head.bias", a["head.bias"].astype(np.complex64)), None, "dtype"),
    "NaN array": (lambda g, a: _with(a, "head.bias", np.full(3, np.nan, np.float32)), None, "NaN or inf"),
    "Inf array": (lambda g, a: _with(a, "encoder.lora_B", a["encoder.lora_B"] * np.inf), None, "NaN or inf"),
    "NaN metric": (None, dp_metrics(epsilon=math.nan), "'epsilon' is NaN"),
    "Inf metric": (None, dp_metrics(steps=math.inf), "'steps' is infinite"),
    "-Inf epsilon": (None, dp_metrics(epsilon=-math.inf), "'epsilon' is infinite"),
    "list metric": (None, dp_metrics(epsilon=[1.0, 2.0]), "'epsilon' is a list"),
    "negative epsilon": (None, dp_metrics(epsilon=-1.0), "'epsilon' is -1"),
    "delta >= 1": (None, dp_metrics(**{"delta": 1.5}), "'delta' is 1.5"),
    "sample-rate 0": (None, dp_metrics(**{"sample-rate": 0.0}), "'sample-rate' is 0"),
    "num-examples 0": (None, dp_metrics(0), "'num-examples' is 0"),
    "num-examples negative": (None, dp_metrics(-5), "'num-examples' is -5"),
    "num-examples 1e12": (None, dp_metrics(1e12), "max-num-examples"),
    "num-examples NaN": (None, dp_metrics(math.nan), "'num-examples' is NaN"),
    "num-examples fractional": (None, dp_metrics(2.5), "positive whole number"),
    "num-examples missing": (None, {k: v for k, v in dp_metrics().items() if k != "num-examples"}, "missing"),
    "num-examples list": (None, dp_metrics([100]), "'num-examples' is a list"),
    "num-examples against delta": (None, dp_metrics(200_000), "1/delta"),
}


def _good_replies(g: dict) -> list:
    return [reply(n, honest(g, n), dp_metrics(size)) for n, size in GOOD.items()]


def _mean_of_good(g: dict) -> dict:
    total = sum(GOOD.values())
    adapters = [honest(g, n) for n in GOOD]
    return {k: sum(size / total * a[k] for size, a in zip(GOOD.values(), adapters, strict=True)) for k in g}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_reply_is_dropped_with_its_reason_and_the_round_uses_the_rest(case):
    make_arrays, metrics, reason = MALFORMED[case]
    g = global_adapter()
    arrays = (make_arrays or (lambda g, a: a))(g, honest(g, BAD))
    strategy = AdapterFedAvg(robust=PLAIN)
    start_round(strategy, g, [*GOOD, BAD])
    bad = reply(BAD, arrays, metrics if metrics is not None else dp_metrics(110))
    aggregate, train_metrics = strategy.aggregate_train(1, [*_good_replies(g), bad])

    record = strategy.round_summary(1)
    assert record["dropped"] == [BAD]
    [failure] = record["train-failures"]
    assert failure["node"] == BAD and reason in failure["reason"], failure
    assert "\n" not in failure["reason"]
    assert record["train-replies"] == len(GOOD)
    result = as_dict(aggregate)
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in result.values())
    expected = _mean_of_good(g)
    assert all(np.allclose(result[k], expected[k], atol=1e-6) for k in g), case
    assert train_metrics["epsilon-max"] == 2.5


@pytest.mark.parametrize(
    "records, reason",
    [
        ({"metrics": MetricRecord(dp_metrics())}, "one ArrayRecord"),
        ({"arrays": ArrayRecord({"head.bias": _garbage()}), "metrics": MetricRecord(dp_metrics())}, "names"),
        (
            {"arrays": ArrayRecord(), "more": ArrayRecord(), "metrics": MetricRecord(dp_metrics())},
            "ArrayRecord",
        ),
        ({"arrays": ArrayRecord(), "config": ConfigRecord()}, "one MetricRecord"),
    ],
)
def test_a_reply_with_other_records_is_dropped(records, reason):
    g = global_adapter()
    strategy = AdapterFedAvg()
    start_round(strategy, g, [*GOOD, BAD])
    aggregate, _ = strategy.aggregate_train(1, [*_good_replies(g), reply(BAD, {}, records=records)])
    [failure] = strategy.round_summary(1)["train-failures"]
    assert failure["node"] == BAD and reason in failure["reason"]
    assert aggregate is not None


def test_an_undecodable_array_payload_is_dropped():
    g = global_adapter()
    strategy = AdapterFedAvg()
    start_round(strategy, g, [*GOOD, BAD])
    arrays = {k: Array(v) for k, v in honest(g, BAD).items()}
    arrays["head.bias"] = _garbage()
    bad = reply(BAD, {}, records={"arrays": ArrayRecord(arrays), "metrics": MetricRecord(dp_metrics())})
    strategy.aggregate_train(1, [*_good_replies(g), bad])
    [failure] = strategy.round_summary(1)["train-failures"]
    assert "'head.bias' cannot be read" in failure["reason"]


OVERSIZED = 20_000_000  # values: an 80 MB payload under the name of a 3-value bias


@pytest.mark.parametrize("declared", ["its real shape", "the expected shape"])
def test_an_oversized_array_is_refused_before_it_is_decoded(monkeypatch, declared):
    """Issue 22 (3): the declaration and the payload's length are checked before ``numpy()``."""
    g = global_adapter()
    arrays = {k: Array(v) for k, v in honest(g, BAD).items()}
    big = Array(np.zeros(OVERSIZED, np.float32))
    if declared == "the expected shape":
        big = Array(dtype="float32", shape=(3,), stype="numpy.ndarray", data=big.data)
    arrays["head.bias"] = big
    decoded = []
    real_numpy = Array.numpy
    monkeypatch.setattr(Array, "numpy", lambda self: decoded.append(self is big) or real_numpy(self))
    spec = {k: tuple(v.shape) for k, v in g.items()}
    tracemalloc.start()
    try:
        with pytest.raises(ReplyError, match="'head.bias' (has shape|cannot be read)") as refused:
            check_arrays(ArrayRecord(arrays), spec)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert not any(decoded), "the oversized array was decoded"
    assert peak < 1_000_000, f"checking the reply allocated {peak} bytes"
    assert str(4 * OVERSIZED + 128) in str(refused.value) or str((OVERSIZED,)) in str(refused.value)


def test_sites_releasing_different_metrics_and_a_site_without_dp_are_all_averaged():
    g = global_adapter()
    strategy = AdapterFedAvg(robust=PLAIN)
    start_round(strategy, g, [1, 2, 3])
    replies = [
        reply(1, honest(g, 1), dp_metrics(100)),
        reply(2, honest(g, 2), dp_metrics(100, **{"train-loss": 0.7, "train-seconds": 1.5})),
        # a site that opted out of DP reports epsilon inf and delta 0 (clients/app.py)
        reply(3, honest(g, 3), dp_metrics(100, epsilon=math.inf, delta=0.0, **{"noise-multiplier": 0.0})),
    ]
    _, metrics = strategy.aggregate_train(1, replies)
    record = strategy.round_summary(1)
    assert record["train-replies"] == 3 and record["train-failures"] == []
    assert "train-loss" not in metrics  # only what every site released is averaged
    assert metrics["epsilon-max"] == math.inf and metrics["steps"] == 3


def test_site_errors_are_recorded_and_the_round_goes_on():
    g = global_adapter()
    strategy = AdapterFedAvg()
    start_round(strategy, g, [*GOOD, BAD])
    aggregate, _ = strategy.aggregate_train(1, [*_good_replies(g), error_reply(BAD, "site-declined")])
    record = strategy.round_summary(1)
    assert record["train-failures"] == [{"node": BAD, "reason": "site-declined"}]
    assert record["dropped"] == [] and aggregate is not None


def test_when_no_reply_is_valid_the_global_adapter_stays_and_the_round_says_so():
    g = global_adapter()
    strategy = AdapterFedAvg()
    start_round(strategy, g, [1, 2])
    nan = _with(honest(g, 1), "head.bias", np.full(3, np.nan, np.float32))
    arrays, metrics = strategy.aggregate_train(1, [reply(1, nan), reply(2, honest(g, 2), dp_metrics(0))])
    assert arrays is None and metrics is None
    record = strategy.round_summary(1)
    assert record["global-unchanged"] == "no valid train reply"
    assert [f["node"] for f in record["train-failures"]] == [1, 2]
    assert all(np.array_equal(v, g[k]) for k, v in as_dict(strategy.global_arrays).items())


def test_a_non_finite_aggregate_is_never_used():
    g = global_adapter()
    # finite float32 replies whose float32 mean overflows (3 x 3e38 > float32 max)
    strategy = AdapterFedAvg(robust=RobustSettings(aggregator="trimmed-mean"))
    start_round(strategy, g, [1, 2, 3, 4, 5])
    huge = {k: np.full_like(v, 3e38) for k, v in g.items()}
    arrays, _ = strategy.aggregate_train(1, [reply(n, huge) for n in range(1, 6)])
    assert arrays is None
    assert strategy.round_summary(1)["global-unchanged"] == "the aggregate is not finite"
    assert all(np.array_equal(v, g[k]) for k, v in as_dict(strategy.global_arrays).items())


def test_evaluation_replies_with_bad_metrics_are_dropped():
    strategy = AdapterFedAvg()
    good = {"num-examples": 50, "loss": 0.5, "accuracy": 0.8, "macro-f1": 0.7}
    replies = [
        reply(1, {}, records={"metrics": MetricRecord(good)}),
        reply(2, {}, records={"metrics": MetricRecord({**good, "accuracy": [1.0]})}),
        reply(3, {}, records={"metrics": MetricRecord({**good, "loss": math.nan})}),
        reply(4, {}, records={"metrics": MetricRecord({**good, "num-examples": -1})}),
    ]
    metrics = strategy.aggregate_evaluate(1, replies)
    assert dict(metrics) == {"loss": 0.5, "accuracy": 0.8, "macro-f1": 0.7}
    assert [f["node"] for f in strategy.round_summary(1)["evaluate-failures"]] == [2, 3, 4]


def test_the_server_loop_survives_a_hostile_site_and_every_global_loads_into_the_model(settings, tiny_config):
    """Strategy.start with a real adapter: each round's global is what evaluate_fn loads."""
    model = build_model(settings.resolved(), LABELS, DEVICE, tiny_config)
    initial = adapter_to_record(model)
    attacks = {
        1: lambda g: _with(g, next(iter(g)), np.full_like(next(iter(g.values())), np.nan)),
        2: lambda g: {k: v.astype(np.float64) for k, v in g.items()},
        3: lambda g: {k: (v - 1e6 * (honest(g, 9)[k] - v)).astype(np.float32) for k, v in g.items()},
    }

    def answer(node: int, server_round: int, arrays: ArrayRecord):
        g = as_dict(arrays)
        if node == BAD:
            return reply(BAD, attacks[server_round](g), dp_metrics(100))
        return reply(node, honest(g, node + 10 * server_round, scale=0.01), dp_metrics(GOOD[node]))

    loaded = []

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> None:
        adapter_from_record(model, arrays)  # raises on any name, shape, dtype or NaN problem
        loaded.append(as_dict(adapter_to_record(model)))

    strategy = AdapterFedAvg(min_available_nodes=5, min_train_nodes=5, fraction_evaluate=0.0)
    grid = ScriptedGrid([*GOOD, BAD], answer)
    strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=3,
        evaluate_fn=evaluate_fn,
    )

    assert len(loaded) == 4
    for server_round in (1, 2, 3):
        record = strategy.round_summary(server_round)
        assert record["train-replies"] >= 4
        step = distance(loaded[server_round], loaded[server_round - 1])
        assert step <= record["norm-bound"] + 1e-5  # the ×1e6 flip of round 3 is clipped
    assert strategy.round_summary(1)["dropped"] == [BAD] == strategy.round_summary(2)["dropped"]
    assert BAD in {c["node"] for c in strategy.round_summary(3)["clipped"]}
