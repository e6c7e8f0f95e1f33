"""Every site reply is checked here before the server averages anything from it.

A train reply must carry exactly one ``arrays`` ArrayRecord with the global adapter's names,
shapes and float32 dtype and only finite values, and one ``metrics`` MetricRecord whose known
keys are finite numbers in range. ``check_train_reply`` returns the parsed reply or raises
``ReplyError`` with a one-line reason; the strategy turns that into a ``train-failures`` entry.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, RecordDict

from fedllm.wire import declared_problem

DEFAULT_MAX_NUM_EXAMPLES = 1_000_000
# what a fedllm site may put in a train reply (clients/policy.py's DP_REPLY_KEYS + opt-ins);
# other keys are ignored: never averaged, never logged
TRAIN_METRICS = (
    "num-examples",
    "steps",
    "epsilon",
    "delta",
    "noise-multiplier",
    "sample-rate",
    "update-bytes",
    "train-loss",
    "train-seconds",
)
EVALUATE_METRICS = ("num-examples", "loss", "accuracy", "macro-f1")

Spec = dict[str, tuple[int, ...]]


class ReplyError(ValueError):
    """A reply the server will not use; the message is the one-line reason it records."""


@dataclass(frozen=True)
class ValidReply:
    """A checked train reply: its node, float32 arrays in the spec's order, its known metrics."""

    node: int
    arrays: dict[str, np.ndarray]
    metrics: dict[str, float]

    @property
    def num_examples(self) -> float:
        """The site's self-reported example count (validated, not trusted: see the weight cap)."""
        return self.metrics["num-examples"]


def adapter_spec(arrays: ArrayRecord | dict[str, np.ndarray]) -> Spec:
    """Names and shapes of the global adapter the server sent (its arrays are float32)."""
    return {name: tuple(int(d) for d in array.shape) for name, array in arrays.items()}


def majority_spec(contents: list[RecordDict]) -> Spec | None:
    """The names and shapes most replies agree on, for ``aggregate_train`` outside ``start()``.

    The server always knows the global adapter it sent (``configure_train`` keeps it); only a
    bare ``aggregate_train`` call (a test, a bench) has no reference and falls back to this.
    """
    specs = Counter()
    for content in contents:
        records = list(content.array_records.values())
        if len(records) == 1:
            specs[tuple(adapter_spec(records[0]).items())] += 1
    return dict(specs.most_common(1)[0][0]) if specs else None


def _number(key: str, value: object) -> float:
    """A metric value as a float: an int or float scalar (not bool, not a list), not NaN."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ReplyError(f"metric {key!r} is a {type(value).__name__}, expected a number")
    number = float(value)
    if math.isnan(number):
        raise ReplyError(f"metric {key!r} is NaN")
    return number


def check_metrics(metrics: dict, known: tuple[str, ...], max_num_examples: float) -> dict[str, float]:
    """The known metrics as floats, each checked; raises ``ReplyError`` on the first bad one.

    ``num-examples`` must be a whole number in ``(0, max_num_examples]``; every other known
    metric a finite number, except ``epsilon``, which is ``inf`` for a site without DP (as
    clients/app.py reports it). Ranges: epsilon ≥ 0, 0 ≤ delta < 1, 0 < sample-rate ≤ 1,
    steps, noise-multiplier, update-bytes, train-seconds ≥ 0.
    """
    if "num-examples" not in metrics:
        raise ReplyError("metric 'num-examples' is missing")
    values = {key: _number(key, metrics[key]) for key in known if key in metrics}
    for key, value in values.items():
        if math.isinf(value) and not (key == "epsilon" and value > 0):
            raise ReplyError(f"metric {key!r} is infinite")
    n = values["num-examples"]
    if not (n > 0 and n.is_integer()):
        raise ReplyError(f"metric 'num-examples' is {n:g}, expected a positive whole number")
    if n > max_num_examples:
        raise ReplyError(f"metric 'num-examples' is {n:g}, above the server cap max-num-examples")
    for key in ("epsilon", "steps", "noise-multiplier", "update-bytes", "train-seconds"):
        if values.get(key, 0.0) < 0:
            raise ReplyError(f"metric {key!r} is {values[key]:g}, expected ≥ 0")
    if not 0.0 <= values.get("delta", 0.0) < 1.0:
        raise ReplyError(f"metric 'delta' is {values['delta']:g}, expected 0 ≤ delta < 1")
    if not 0.0 < values.get("sample-rate", 1.0) <= 1.0:
        raise ReplyError(f"metric 'sample-rate' is {values['sample-rate']:g}, expected 0 < q ≤ 1")
    return values


def check_dp_consistency(metrics: dict[str, float]) -> None:
    """A DP site's ``num-examples`` against its own privacy parameters, where that is sound.

    A fedllm site refuses to train with δ ≥ 1/n (fedllm.privacy.resolve_delta), so a reply with
    δ > 0 and ``num-examples`` ≥ 1/δ contradicts the plan it claims. Nothing finer is checkable:
    under Poisson sampling the batch sizes are random and never sent, and (q, steps, σ) fix ε
    without n (q is a setting, not batch/n), so any n ≥ 1 fits them; the weight cap
    (``max-site-weight``) bounds what an inflated count can buy instead.
    """
    delta = metrics.get("delta", 0.0)
    if delta > 0 and metrics["num-examples"] * delta >= 1.0:
        raise ReplyError(
            f"metric 'num-examples' is {metrics['num-examples']:g}, not below 1/delta = {1 / delta:g} "
            "(a DP site's delta is below 1/n)"
        )


def check_arrays(record: ArrayRecord, spec: Spec) -> dict[str, np.ndarray]:
    """The record's arrays, exactly ``spec``'s names and shapes, float32, all finite.

    Every array's declaration (serialisation, dtype, shape, payload length) is checked before
    any is decoded (``fedllm.wire.declared_problem``), so an oversized or mislabelled array is
    refused without being copied; the decoded arrays are checked again.
    """
    missing = [k for k in spec if k not in record]
    extra = [k for k in record if k not in spec]
    if missing or extra:
        raise ReplyError(f"adapter names differ: missing {missing[:2]}, unexpected {extra[:2]}")
    for name, shape in spec.items():
        if problem := declared_problem(name, record[name], shape):
            raise ReplyError(problem)
    arrays = {}
    for name, shape in spec.items():
        try:
            array = record[name].numpy()  # never unpickles (allow_pickle=False)
        except Exception as err:  # any undecodable payload (bad header, truncated data) is a bad reply
            raise ReplyError(f"adapter array {name!r} cannot be read: {type(err).__name__}") from err
        if tuple(array.shape) != shape:
            raise ReplyError(f"adapter array {name!r} has shape {tuple(array.shape)}, expected {shape}")
        if array.dtype != np.dtype(np.float32):
            raise ReplyError(f"adapter array {name!r} has dtype {array.dtype}, expected float32")
        if not np.isfinite(array).all():
            raise ReplyError(f"adapter array {name!r} contains NaN or inf")
        arrays[name] = array
    return arrays


def check_train_reply(node: int, content: RecordDict, spec: Spec, max_num_examples: float) -> ValidReply:
    """One train reply, checked against the global adapter's ``spec``; raises ``ReplyError``."""
    if list(content.array_records) != ["arrays"]:
        raise ReplyError(f"expected one ArrayRecord 'arrays', got {list(content.array_records)[:3]}")
    if list(content.metric_records) != ["metrics"]:
        raise ReplyError(f"expected one MetricRecord 'metrics', got {list(content.metric_records)[:3]}")
    metrics = check_metrics(content["metrics"], TRAIN_METRICS, max_num_examples)
    check_dp_consistency(metrics)
    arrays = check_arrays(content["arrays"], spec)
    return ValidReply(node, arrays, metrics)
