"""Every site reply is checked here before the server averages anything from it.

A train reply must carry exactly one ``arrays`` ArrayRecord with the global adapter's names,
shapes and float32 dtype and only finite values, and one ``metrics`` MetricRecord whose known
keys are finite numbers in range. ``check_train_reply`` returns the parsed reply or raises
``ReplyError`` with a one-line reason; the strategy turns that into a ``train-failures`` entry.
A site's error reply is recorded as its fixed failure code (``site_reason``: fedllm/failure_codes.py)
or ``unknown-reason``, and every recorded reason passes ``clean_reason`` (one line, ≤ 200
characters). Replies are taken in ``canonical`` order (by node id), never in arrival order.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, RecordDict

from fedllm.contract import EVALUATE_REPLY_KEYS, TRAIN_REPLY_KEYS
from fedllm.failure_codes import SITE_FAILURE_CODES, UNKNOWN_REASON
from fedllm.wire import declared_problem

DEFAULT_MAX_NUM_EXAMPLES = 1_000_000
# what a fedllm site may put in a reply (fedllm/contract.py); other keys are ignored: never
# averaged, never logged
TRAIN_METRICS = TRAIN_REPLY_KEYS
EVALUATE_METRICS = EVALUATE_REPLY_KEYS
# the largest loss a reply may report: a mean cross-entropy this large means logits 1e6 apart;
# with weights ≤ max-num-examples no weighted mean of bounded values overflows
MAX_LOSS = 1e6
MAX_VALUE = 1e15
# key: (lowest, highest, whole number); both bounds inclusive
RANGES = {
    "steps": (0.0, MAX_VALUE, True),
    "update-bytes": (0.0, MAX_VALUE, True),
    "noise-multiplier": (0.0, MAX_VALUE, False),
    "train-seconds": (0.0, MAX_VALUE, False),
    "train-loss": (0.0, MAX_LOSS, False),
    "loss": (0.0, MAX_LOSS, False),
    "accuracy": (0.0, 1.0, False),
    "macro-f1": (0.0, 1.0, False),
    "personal-accuracy": (0.0, 1.0, False),
    "personal-macro-f1": (0.0, 1.0, False),
}
REASON_LIMIT = 200  # characters of a reason the run log keeps
PREVIEW_LIMIT = 40  # characters of an unknown site reason shown after the placeholder

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


def canonical(replies: Iterable[Message]) -> list[Message]:
    """The replies sorted by sender node id (then message id): the one order every aggregate and
    decision is computed in, so the same replies give bit-identical results however they arrive."""
    return sorted(replies, key=lambda m: (m.metadata.src_node_id, m.metadata.message_id))


def adapter_spec(arrays: ArrayRecord | dict[str, np.ndarray]) -> Spec:
    """Names and shapes of the global adapter the server sent (its arrays are float32)."""
    return {name: tuple(int(d) for d in array.shape) for name, array in arrays.items()}


def majority_spec(contents: list[RecordDict]) -> Spec | None:
    """The names and shapes most replies agree on, for ``aggregate_train`` outside ``start()``.

    The server always knows the global adapter it sent (``configure_train`` keeps it); only a
    bare ``aggregate_train`` call (a test, a bench) has no reference and falls back to this.
    """
    specs: Counter[tuple[tuple[str, tuple[int, ...]], ...]] = Counter()
    for content in contents:
        records = list(content.array_records.values())
        if len(records) == 1:
            specs[tuple(adapter_spec(records[0]).items())] += 1
    return dict(specs.most_common(1)[0][0]) if specs else None


def clean_reason(text: object, limit: int = REASON_LIMIT) -> str:
    """``text`` fit for one log line: control characters escaped, at most ``limit`` characters.

    Every reason the server records or logs passes here, so no text a site chose (an array or
    record name inside a ``ReplyError``) can start a new log line, colour the terminal or grow a
    ``metrics.jsonl`` row past ``limit``.
    """
    text = str(text)[: limit + 1]
    escaped = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)
    return escaped if len(escaped) <= limit else escaped[: limit - 3] + "..."


def site_reason(reason: object, code: object = None) -> str:
    """A site's error reply as the server records it: one of the fixed codes, or the placeholder.

    fedllm sites send only ``SITE_FAILURE_CODES`` (fedllm/failure_codes.py). Any other reason,
    from a site that is not fedllm's or one forging log lines, is ``unknown-reason`` with
    Flower's error code and a short escaped preview (Flower's own errors, e.g. a node that went
    away, land here too).
    """
    if isinstance(reason, str) and reason in SITE_FAILURE_CODES:
        return reason
    number = code if isinstance(code, int) and not isinstance(code, bool) else "?"
    preview = clean_reason(str(reason)[:PREVIEW_LIMIT], PREVIEW_LIMIT)
    return f"{UNKNOWN_REASON} (error code {number}: {preview!r})"


def _number(key: str, value: object) -> float:
    """A metric value as a float: an int or float scalar (not bool, not a list), not NaN."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ReplyError(f"metric {key!r} is a {type(value).__name__}, expected a number")
    number = float(value)
    if math.isnan(number):
        raise ReplyError(f"metric {key!r} is NaN")
    return number


def _check_range(key: str, value: float) -> None:
    """``value`` within ``RANGES[key]`` (and a whole number where it must be one)."""
    low, high, whole = RANGES[key]
    if not low <= value <= high:
        raise ReplyError(f"metric {key!r} is {value:g}, expected {low:g} to {high:g}")
    if whole and not value.is_integer():
        raise ReplyError(f"metric {key!r} is {value:g}, expected a whole number")


def _check_epsilon(values: dict[str, float]) -> None:
    """ε > 0; ε = +inf only for a reply without DP (no noise, δ = 0), finite for one with DP."""
    if "epsilon" not in values:
        return
    epsilon = values["epsilon"]
    dp = values.get("noise-multiplier", 0.0) > 0 or values.get("delta", 0.0) > 0
    if not epsilon > 0:
        raise ReplyError(f"metric 'epsilon' is {epsilon:g}, expected > 0")
    if math.isinf(epsilon) and dp:
        raise ReplyError("metric 'epsilon' is inf for a DP reply (noise-multiplier or delta > 0)")
    if math.isfinite(epsilon) and epsilon > MAX_VALUE:
        raise ReplyError(f"metric 'epsilon' is {epsilon:g}, expected at most {MAX_VALUE:g}")


def check_metrics(
    metrics: Mapping[str, Any], known: tuple[str, ...], max_num_examples: float
) -> dict[str, float]:
    """The known metrics as floats, each checked; raises ``ReplyError`` on the first bad one.

    ``num-examples`` must be a whole number in ``(0, max_num_examples]``; ``epsilon`` > 0, and
    ``inf`` only for a reply without DP (as clients/handlers.py reports one); every other known metric
    finite and in ``RANGES`` (0 ≤ delta < 1 and 0 < sample-rate ≤ 1 besides).
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
    for key, value in values.items():
        if key in RANGES:
            _check_range(key, value)
    _check_epsilon(values)
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
    metrics = check_metrics(content.metric_records["metrics"], TRAIN_METRICS, max_num_examples)
    check_dp_consistency(metrics)
    arrays = check_arrays(content.array_records["arrays"], spec)
    return ValidReply(node, arrays, metrics)
