"""One site's round of local training, shared by the ClientApp and the in-process driver.

``clients/handlers.py`` (a Flower site) and ``simulations/inprocess.py`` (a federation in one process)
differ in where a site's data, books and plan come from — a site's own file, ledger and DP count
booked before it is drawn, against partitions held in memory with their plans made up front — but
a round itself, once the plan is made, is the same: the class weights and logit offset from the
site's label histogram, the one training loop (``train_local``) seeded by the round, and the count
the reply weighs with. Both call these functions, so the two drivers cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedllm.accounting import PrivacyPlan
from fedllm.config import ResolvedSettings
from fedllm.contract import TrainMetrics
from fedllm.imbalance import logit_offset, prior_weights
from fedllm.loop import TrainResult
from fedllm.train import train_local


def train_site_round(
    model: nn.Module,
    dataset: TensorDataset,
    settings: ResolvedSettings,
    rounds: tuple[int, int],
    *,
    plan: PrivacyPlan | None,
    history: list,
    histogram: list | None,
    num_classes: int,
    class_weight: torch.Tensor | None = None,
    before_noise: Callable[[list[nn.Parameter]], None] | None = None,
) -> TrainResult:
    """Round ``rounds[0]`` of ``rounds[1]`` at one site: ``train_local`` on ``dataset``.

    ``plan`` / ``history``: the site's privacy plan and its accountant history before this round
    (None / [] without DP). ``histogram``: the site's label histogram (DP under DP, exact without;
    None without ``imbalance``), which sets the loss's prior weights (``balanced``) or logit
    offset (``logit-adjust``); ``class_weight`` is used when the prior gives none.
    """
    weights = prior_weights(settings, histogram, num_classes)
    return train_local(
        model,
        dataset,
        settings,
        plan=plan,
        history=history,
        class_weight=weights if weights is not None else class_weight,
        logit_offset=logit_offset(settings, histogram, num_classes),
        round_of=rounds,
        before_noise=before_noise,
    )


def reported_count(plan: PrivacyPlan | None, num_examples: int) -> int:
    """The example count a site reports and is weighted by: under DP its DP count n̂, never n."""
    return plan.public_n if plan is not None and plan.public_n else num_examples


def train_metrics(
    result: TrainResult, plan: PrivacyPlan | None, num_examples: int, update_bytes: int, seconds: float
) -> TrainMetrics:
    """A train reply's metrics (``fedllm.contract.TrainMetrics``), before the site's policy
    filters what it releases (clients/policy.py)."""
    return {
        "num-examples": reported_count(plan, num_examples),
        "train-loss": float(result.mean_loss),
        "steps": int(result.steps),
        "epsilon": float(result.epsilon) if plan else float("inf"),
        "delta": float(plan.delta) if plan else 0.0,
        "noise-multiplier": float(result.noise_multiplier),
        "sample-rate": float(plan.sample_rate) if plan else 1.0,
        "update-bytes": update_bytes,
        "train-seconds": float(seconds),
    }
