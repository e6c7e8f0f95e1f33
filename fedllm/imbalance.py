"""Imbalanced labels under DP: a site's DP label histogram and what training makes of it.

Under DP a site with ``imbalance`` set releases, in place of its DP count n̂, a **DP label
histogram**: one Gaussian count per class plus one for rows whose label the run does not list,
each with noise ``N(0, count-noise²)``. Adding or removing one (text, label) row changes exactly
one bin by 1, so the histogram is a Gaussian mechanism of L2 sensitivity 1 at noise multiplier
``count-noise``: the same accountant entry as the DP count (``accounting.count_entry``), the same
ε. n̂ is the rounded sum of its bins (post-processing), used everywhere the count was.

What the site makes of it (post-processing, no further ε; docs/imbalance.md):

- ``logit-adjust``: the logit-adjusted loss of Menon et al. (ICLR 2021): training adds
  ``imbalance-tau · log π`` to the logits, π the site's prior from its own histogram; the model's
  raw logits then estimate the balanced posterior, and inference is unchanged.
- ``balanced``: class weights ``π_k^(-imbalance-tau)`` (mean 1) on each example's loss; under DP
  per-example clipping caps their effect on any example whose gradient is clipped.
- ``local-prior`` (``personalized_offset``): at a site, the global model's logits plus
  ``imbalance-tau · log π_site`` — the site's own label shift put back for its own predictions.
"""

from __future__ import annotations

import random

import numpy as np
import pandas as pd
import torch

from fedllm.accounting import PrivacyPlan, count_entry, plan_privacy
from fedllm.config import ResolvedSettings, Settings

IMBALANCE_MODES = ("none", "logit-adjust", "balanced")
PRIOR_FLOOR = 1.0  # rows: a bin's noisy count below this counts as this (a prior is never 0)


def label_ids(frame: pd.DataFrame, labels: list[str]) -> np.ndarray:
    """Each row's class index; ``len(labels)`` for a label the run does not list (the last bin)."""
    index = {name: i for i, name in enumerate(labels)}
    return np.array([index.get(v, len(labels)) for v in frame["label"]], dtype=np.int64)


def exact_histogram(ids: np.ndarray, num_classes: int) -> list[float]:
    """The exact counts of the ``num_classes`` classes and the unlisted bin (``num_classes + 1`` bins)."""
    return [float(c) for c in np.bincount(ids, minlength=num_classes + 1)[: num_classes + 1]]


def private_histogram(ids: np.ndarray, num_classes: int, count_noise: float) -> list[float]:
    """The DP label histogram: every bin of ``exact_histogram`` plus ``N(0, count_noise²)`` drawn
    from the OS's entropy (never a seed). Book ``accounting.count_entry(count_noise)`` *before*
    calling this: a draw that fails after it stays booked."""
    draw = random.SystemRandom()
    return [c + draw.gauss(0.0, count_noise) for c in exact_histogram(ids, num_classes)]


def histogram_count(histogram: list[float]) -> int:
    """n̂ from a DP histogram: the rounded sum of every bin, at least 1 (post-processing)."""
    return max(1, round(float(sum(histogram))))


def label_prior(histogram: list[float], num_classes: int) -> np.ndarray:
    """The class prior of the listed classes: each bin floored at ``PRIOR_FLOOR`` rows, normalised."""
    counts = np.maximum(np.asarray(histogram[:num_classes], dtype=np.float64), PRIOR_FLOOR)
    return counts / counts.sum()


def logit_offset(settings: Settings, histogram: list[float] | None, num_classes: int) -> torch.Tensor | None:
    """``imbalance-tau · log π`` added to the logits in training (``logit-adjust``), else None."""
    if settings.imbalance != "logit-adjust" or histogram is None:
        return None
    prior = label_prior(histogram, num_classes)
    return torch.tensor(settings.imbalance_tau * np.log(prior), dtype=torch.float32)


def prior_weights(settings: Settings, histogram: list[float] | None, num_classes: int) -> torch.Tensor | None:
    """Class weights ``π_k^(-imbalance-tau)``, mean 1, for ``balanced``; else None."""
    if settings.imbalance != "balanced" or histogram is None:
        return None
    weights = label_prior(histogram, num_classes) ** (-settings.imbalance_tau)
    return torch.tensor(weights / weights.mean(), dtype=torch.float32)


def personalized_offset(histogram: list[float], num_classes: int, tau: float) -> torch.Tensor:
    """A site's own prior as a logit offset, ``tau · log π_site``: its local prediction is
    ``argmax(global logits + offset)``. Post-processing of its DP histogram: no ε."""
    return torch.tensor(tau * np.log(label_prior(histogram, num_classes)), dtype=torch.float32)


def histogram_plan(
    settings: ResolvedSettings, ids: np.ndarray, num_classes: int, planned_rounds: int = 1, dimension: int = 0
) -> tuple[PrivacyPlan, list, list[float]]:
    """``accounting.counted_plan`` with the DP label histogram in place of the DP count.

    For drivers that hold the data themselves (in-process, bench). Returns the plan made from
    n̂ = ``histogram_count``, the history holding the histogram's entry (the count's), and the
    histogram. The ClientApp books the entry before it draws (``clients.handlers``).
    """
    history = [count_entry(settings.count_noise)]
    histogram = private_histogram(ids, num_classes, settings.count_noise)
    public_n = histogram_count(histogram)
    plan = plan_privacy(settings, public_n, planned_rounds, dimension, count_noise=settings.count_noise)
    return plan, history, histogram
