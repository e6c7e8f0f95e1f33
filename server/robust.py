"""Bounding one site's influence: update-norm clipping, a weight cap, Flower's robust aggregators.

Run config keys (pyproject.toml's ``[tool.flwr.app.config]``):

- ``aggregator``: ``cosine`` (default) | ``fedavg`` | ``median`` | ``trimmed-mean`` | ``krum`` |
  ``bulyan``, over the (clipped) adapters. ``cosine`` is FedAvg without the site (at most
  ``num-malicious-sites``) whose update the norm bound had to cut, or else whose updates keep
  pointing away from the others' (server/direction.py: each round a site scores the median
  cosine of its update with the others', in units of a random direction's spread 1/√d; its
  evidence, the sum of its scores since the sum was last above 0 over √those rounds, must fall
  below ``-direction-threshold``, default 3); ``fedavg`` is the plain weighted mean (the default
  before); the others are Flower's own aggregation code (``flwr.serverapp.strategy``).
- ``max-update-norm``: each site's update Δ = reply − current global adapter (L2 over all adapter
  tensors) is scaled down to this bound before aggregation. ``auto`` (default) = 2 × the median
  update norm of the round's valid replies: scale-free (no knowledge of lr, steps or DP noise
  needed), honest sites of similar data sizes rarely exceed it, and with an honest majority the
  median is an honest norm, so a ×1e6 update is cut to twice an honest one. ``<k>x`` sets the
  multiple, a positive number a fixed bound, 0 disables.
- ``max-site-weight``: the weight one site carries in a weighted mean is its ``num-examples``
  capped here, since the count is self-reported. ``auto`` (default) = 2 × the median reported
  count of the round; ``<k>x``, a positive number of examples, or 0 (no cap), as above.
- ``num-malicious-sites`` (default 1): the f that ``cosine`` may discount (it needs 2f + 1 valid
  replies, else it discounts none) and that Krum and Bulyan assume (Bulyan needs at least 4f + 3
  valid replies; with fewer the round keeps the global adapter and says why).
- ``direction-threshold`` (default 3): how far below 0 a site's accumulated direction evidence
  must fall before ``cosine`` discounts it.
- ``trim-fraction`` (default 0.2): the fraction trimmed-mean cuts from each tail per coordinate.
- ``min-noise-ratio`` (default 0.8): a reply that claims DP whose update norm is below this
  fraction of the DP noise its declared plan adds is left out of the round as too clean
  (server/noise.py; every aggregator but ``plain``'s ``without_bounds``); 0 turns the check off.
- ``noise-bound-slack`` (default 0.1): with the noise check on, a DP reply's update is also cut to
  √(((1 + slack) × the noise norm its declared plan adds)² + (2 × the round's median signal
  norm)²) (server/noise.py ``noise_bounds``) when that is below ``max-update-norm``: an honest DP
  update is mostly noise of a norm the server can compute, so 2 × the median norm would leave a
  flipped update room for several honest signals. 0 turns it off.

With 1 or 2 valid replies the medians are not robust (no honest majority to take them from);
set a fixed bound there.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.bulyan import aggregate_n_closest_weights
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
from flwr.serverapp.strategy.multikrum import select_multikrum
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedllm.settings_reader import key, read
from server.direction import DIRECTION_THRESHOLD
from server.noise import MIN_NOISE_RATIO, NOISE_BOUND_SLACK
from server.validation import DEFAULT_MAX_NUM_EXAMPLES, ValidReply

AGGREGATORS = ("cosine", "fedavg", "median", "trimmed-mean", "krum", "bulyan")
AUTO_NORM_MULTIPLE = 2.0
AUTO_WEIGHT_MULTIPLE = 2.0
_WEIGHT = "weight"  # the key Flower's aggregate_arrayrecords reads the weights from


@dataclass(frozen=True)
class Bound:
    """A bound fixed in advance (``absolute``), a multiple of the round's median, or none."""

    absolute: float | None = None
    multiple: float | None = None

    def resolve(self, values: list[float]) -> float | None:
        """The bound for this round, given the values it bounds (norms or counts); None = off."""
        if self.absolute is not None:
            return self.absolute
        if self.multiple is not None and values:
            return self.multiple * float(np.median(values))
        return None


def parse_bound(value: object, auto_multiple: float) -> Bound:
    """``auto``, ``<k>x`` (k × the round's median), a positive number, or 0 (off);
    ``ValueError(problem; fix)`` otherwise (``fedllm.settings_reader`` names the key)."""
    if isinstance(value, Bound):
        return value
    text = str(value).strip().lower()
    if text == "auto":
        return Bound(multiple=auto_multiple)
    try:
        number = float(text[:-1] if text.endswith("x") else text)
    except ValueError:
        number = math.nan
    if text.endswith("x") and math.isfinite(number) and number > 0:
        return Bound(multiple=number)
    if not text.endswith("x") and number == 0:
        return Bound()
    if not text.endswith("x") and math.isfinite(number) and number > 0:
        return Bound(absolute=number)
    raise ValueError(
        "is not a bound; use 'auto', a multiple of the round's median such as '3x', a positive "
        "number, or 0 to disable"
    )


@dataclass(frozen=True)
class RobustSettings:
    """How the server bounds and combines the valid replies of a round (the keys above)."""

    aggregator: str = key(
        "cosine",
        "cosine | fedavg | median | trimmed-mean | krum | bulyan, over the (clipped) adapters",
        choices=AGGREGATORS,
        parse=lambda value: str(value).strip().lower(),
    )
    max_update_norm: Bound = key(
        help="clip each site's update (reply - global, L2): auto = 2x the round's median update "
        "norm; '<k>x' = k x median; a number = fixed bound; 0 = off",
        default_factory=lambda: Bound(multiple=AUTO_NORM_MULTIPLE),
        parse=lambda value: parse_bound(value, AUTO_NORM_MULTIPLE),
    )
    max_site_weight: Bound = key(
        help="cap a site's weight (its self-reported num-examples): auto = 2x the round's median "
        "count; '<k>x'; a number of examples; 0 = off",
        default_factory=lambda: Bound(multiple=AUTO_WEIGHT_MULTIPLE),
        parse=lambda value: parse_bound(value, AUTO_WEIGHT_MULTIPLE),
    )
    max_num_examples: float = key(
        DEFAULT_MAX_NUM_EXAMPLES,
        "a reply claiming more examples is dropped",
        low=1,
        finite=True,
        fix="use a number >= 1",
    )
    num_malicious_sites: int = key(
        1,
        "the f that cosine may discount (needs 2f+1 valid replies) and that krum and bulyan assume "
        "(bulyan needs 4f+3)",
        low=0,
        fix="use a whole number >= 0",
    )
    trim_fraction: float = key(
        0.2,
        "trimmed-mean: fraction cut from each tail per coordinate",
        low=0,
        high=0.5,
        high_open=True,
        fix="use 0 <= trim-fraction < 0.5",
    )
    direction_threshold: float = key(
        DIRECTION_THRESHOLD,
        "cosine: how far below 0 a site's accumulated direction evidence must fall before it is discounted",
        low=0,
        low_open=True,
        finite=True,
        fix="use a positive number (default 3)",
    )
    min_noise_ratio: float = key(
        MIN_NOISE_RATIO,
        "a reply that claims DP with an update below this fraction of the noise its declared "
        "plan adds is left out as too clean; 0 = off",
        low=0,
        high=1,
        high_open=True,
        fix=f"use 0 <= min-noise-ratio < 1 (default {MIN_NOISE_RATIO}; 0 = no noise check)",
    )
    noise_bound_slack: float = key(
        NOISE_BOUND_SLACK,
        "with the noise check on, a DP reply's update is also clipped to the noise norm its plan "
        "adds times (1 + this), with the round's signal; 0 = off",
        low=0,
        finite=True,
        fix=f"use a number >= 0 (default {NOISE_BOUND_SLACK}; 0 = no bound from the noise model)",
    )

    @classmethod
    def from_run_config(cls, rc: Mapping[str, Any]) -> RobustSettings:
        """Read and check the keys above; a bad value raises one line naming the key and the fix."""
        return read(cls, rc, "run config")

    def describe(self) -> str:
        """One line for the server's log."""

        def text(bound: Bound, what: str) -> str:
            if bound.absolute is not None:
                return f"{bound.absolute:g}"
            return f"{bound.multiple:g}x the round's median {what}" if bound.multiple else "off"

        return (
            f"aggregator {self.aggregator}; max-update-norm {text(self.max_update_norm, 'update norm')}; "
            f"max-site-weight {text(self.max_site_weight, 'num-examples')}; "
            f"max-num-examples {self.max_num_examples:g}"
        )

    def without_bounds(self) -> RobustSettings:
        """No norm bound, weight cap, direction or noise check: plain FedAvg for fedavg and cosine."""
        aggregator = "fedavg" if self.aggregator == "cosine" else self.aggregator
        return replace(
            self,
            aggregator=aggregator,
            max_update_norm=Bound(),
            max_site_weight=Bound(),
            min_noise_ratio=0.0,
            noise_bound_slack=0.0,
        )


def update_norm(global_arrays: dict[str, np.ndarray], arrays: dict[str, np.ndarray]) -> float:
    """L2 norm of ``arrays - global_arrays`` over every tensor, in float64 (no overflow)."""
    total = sum(float(np.sum(np.square(arrays[k].astype(np.float64) - g))) for k, g in global_arrays.items())
    return math.sqrt(total)


def clip_updates(
    global_arrays: dict[str, np.ndarray] | None,
    replies: list[ValidReply],
    bound: Bound,
    limits: list[float | None] | None = None,
) -> tuple[list[dict[str, np.ndarray]], float | None, list[dict]]:
    """Each reply's adapter with its update scaled down to the round's norm bound.

    ``limits``: a bound per reply besides the round's (the noise model's, server/noise.py
    ``noise_bounds``; None where there is none); each update is cut to the lower of the two.
    Returns (adapters, the round's bound, ``[{"node", "norm", "bound"}]`` of those clipped,
    ``bound`` the one applied). Replies within their bound are passed through unchanged;
    without a global adapter nothing is clipped.
    """
    if global_arrays is None:
        return [r.arrays for r in replies], None, []
    norms = [update_norm(global_arrays, r.arrays) for r in replies]
    limit = bound.resolve(norms)
    adapters, clipped = [], []
    for i, (reply, norm) in enumerate(zip(replies, norms, strict=True)):
        own = [b for b in (limit, limits[i] if limits else None) if b is not None]
        if not own or norm <= min(own):
            adapters.append(reply.arrays)
            continue
        scale = min(own) / norm
        adapters.append(
            {
                k: (g + scale * (reply.arrays[k].astype(np.float64) - g)).astype(np.float32)
                for k, g in global_arrays.items()
            }
        )
        clipped.append({"node": reply.node, "norm": norm, "bound": min(own)})
    return adapters, limit, clipped


def cap_weights(replies: list[ValidReply], bound: Bound) -> tuple[list[float], float | None, list[dict]]:
    """Each reply's weight: its ``num-examples`` capped at the round's bound.

    Returns (weights, the cap used, ``[{"node", "num-examples"}]`` of those capped).
    """
    counts = [r.num_examples for r in replies]
    cap = bound.resolve(counts)
    if cap is None:
        return counts, None, []
    capped = [{"node": r.node, "num-examples": r.num_examples} for r in replies if r.num_examples > cap]
    return [min(n, cap) for n in counts], cap, capped


def _records(adapters: list[dict[str, np.ndarray]], weights: list[float]) -> list[RecordDict]:
    """Flower records of the adapters in float64: FedAvg sums them in the canonical (node id)
    order, and node ids are new in every run, so a float32 sum rounded differently from run to
    run; in float64 the order's effect is ~1e-16 and vanishes when the result is cast to float32."""
    return [
        RecordDict(
            {
                "arrays": ArrayRecord({k: Array(np.asarray(v, dtype=np.float64)) for k, v in a.items()}),
                "metrics": MetricRecord({_WEIGHT: float(w)}),
            }
        )
        for a, w in zip(adapters, weights, strict=True)
    ]


def _stacked(adapters: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.stack([a[k] for a in adapters]) for k in adapters[0]}


def combine(
    adapters: list[dict[str, np.ndarray]], weights: list[float], settings: RobustSettings
) -> tuple[dict[str, np.ndarray] | None, list[int], str]:
    """One adapter from the round's (clipped) adapters, by ``settings.aggregator``.

    Returns (adapter or None, indices of the adapters it was computed from, why None). Uses
    Flower's helpers: FedAvg's ``aggregate_arrayrecords``, FedMedian's per-coordinate median,
    FedTrimmedAvg's ``trim_mean``, Krum's ``select_multikrum``, Bulyan's
    ``aggregate_n_closest_weights``. Only FedAvg (and the weighted mean Krum ends with) uses
    the weights; the others are unweighted, as in Flower.
    """
    n, f = len(adapters), settings.num_malicious_sites
    everyone = list(range(n))
    if settings.aggregator == "cosine":  # FedAvg over the sites direction_weights left a weight
        used = [i for i, w in enumerate(weights) if w > 0]
        record = aggregate_arrayrecords(
            _records([adapters[i] for i in used], [weights[i] for i in used]), _WEIGHT
        )
        return {k: v.numpy() for k, v in record.items()}, used, ""
    if settings.aggregator == "fedavg":
        record = aggregate_arrayrecords(_records(adapters, weights), _WEIGHT)
        return {k: v.numpy() for k, v in record.items()}, everyone, ""
    if settings.aggregator == "median":
        return {k: np.median(s, axis=0) for k, s in _stacked(adapters).items()}, everyone, ""
    if settings.aggregator == "trimmed-mean":
        return {k: trim_mean(s, settings.trim_fraction) for k, s in _stacked(adapters).items()}, everyone, ""
    records = _records(adapters, weights)
    index = {id(r): i for i, r in enumerate(records)}
    if settings.aggregator == "krum":
        chosen = select_multikrum(records, num_malicious_nodes=f, num_nodes_to_select=1)
        record = aggregate_arrayrecords(chosen, _WEIGHT)
        return {k: v.numpy() for k, v in record.items()}, [index[id(r)] for r in chosen], ""
    # bulyan, as flwr.serverapp.strategy.Bulyan.aggregate_train
    if n < 4 * f + 3:
        return None, [], f"bulyan needs at least 4f+3 = {4 * f + 3} valid replies (f={f}), got {n}"
    theta = n - 2 * f
    chosen = select_multikrum(records, f, theta)
    selected = [[adapters[index[id(r)]][k] for k in adapters[0]] for r in chosen]
    median = [np.median(layer, axis=0) for layer in zip(*selected, strict=True)]
    combined = aggregate_n_closest_weights(median, selected, theta - 2 * f)
    return dict(zip(adapters[0], combined, strict=True)), [index[id(r)] for r in chosen], ""
