"""Gradient canaries: the audit's white-box design with power (Dirac canaries inserted as gradients).

A gradient canary is a record that exists only as its clipped gradient: at its site, in every
DP-SGD step, it is drawn with the plan's sampling rate q (as a record is) and its gradient is
added to the clipped gradient sum before the noise (``train_local``'s ``before_noise`` hook).
Each canary's gradient has the clipping norm C and points along

    u_j = (1, ..., 1) / sqrt(K) ⊗ e_j     in the head's weight (K classes × d features),

all K logits moved alike along feature coordinate j. Two facts make this direction clean:

- every per-example gradient of a linear head under cross-entropy is (p − e_y) x^T, whose
  columns sum to zero, so the real records' clipped sum has *no* component along any u_j; and
- adding the same number to every logit leaves the softmax unchanged, so a canary never
  changes a prediction, a loss, or another record's gradient.

Canaries at one site get distinct j (so at most d per site), and a canary's score is its site's
updates moved along −u_j, summed over rounds (``gradient_canary_scores``). Without noise an
inserted canary scores Σ lr · C / B per step it was drawn in and an absent one exactly 0; with
noise σ both get the Gaussian noise of DP-SGD along u_j. This is the audit Steinke, Nasr and
Jagielski (2023) run white-box: it tests the noise, the clipping norm it is scaled to, the
sampling and the accounting — not the per-example gradients of text records (the text
canaries, ``fedllm.canaries``, do that). The method: docs/audit.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fedllm.accounting import PrivacyPlan
from fedllm.audit_scores import UpdateLog


@dataclass
class GradientCanaries:
    """m gradient canaries: each one's site, feature coordinate j, and inclusion (the secret)."""

    sites: np.ndarray  # int
    coordinates: np.ndarray  # int, j: the canary's direction u_j in its site's head weight
    included: np.ndarray  # bool, probability 1/2, independent
    seed: int

    def __len__(self) -> int:
        return len(self.sites)


def draw_gradient_canaries(m: int, num_sites: int, width: int, seed: int) -> GradientCanaries:
    """Canary i goes to site i mod ``num_sites`` at coordinate i div ``num_sites``; each is
    included with probability ½ from a stream of ``seed`` that the text canaries do not use.

    ``width``: the head's feature width d; at most ``num_sites * width`` canaries.
    """
    if m < 0 or num_sites < 1 or width < 1:
        raise ValueError(f"gradient canaries={m}, sites={num_sites}, width={width}: need m >= 0, >= 1, >= 1")
    if m > num_sites * width:
        raise ValueError(
            f"{m} gradient canaries: at most {num_sites * width} ({num_sites} sites × {width} features)"
        )
    secret = np.random.default_rng(np.random.SeedSequence(seed).spawn(4)[3])
    index = np.arange(m)
    return GradientCanaries(index % num_sites, index // num_sites, secret.random(m) < 0.5, seed)


def _head_weight(params: list[torch.nn.Parameter]) -> torch.nn.Parameter:
    """The head's weight: the one matrix among the trained parameters (trainable = head)."""
    matrices = [p for p in params if p.dim() == 2]
    if len(matrices) != 1:
        raise ValueError(f"{len(matrices)} weight matrices trained: gradient canaries need trainable=head")
    return matrices[0]


class CanaryInserter:
    """``federate``'s ``before_noise`` hook: adds each site's drawn, included canaries to the sum.

    Each included canary is drawn in a step with the plan's q (OS entropy, like DP-SGD's own
    sampling) and adds C / sqrt(K) to every entry of column j of the head's clipped weight sum.
    ``drawn`` counts the insertions per canary (for tests and reports; never used by a score).
    """

    def __init__(self, canaries: GradientCanaries, clip: float) -> None:
        self.canaries, self.clip = canaries, clip
        self.drawn = np.zeros(len(canaries), dtype=int)
        self._rng = np.random.default_rng()

    def __call__(self, site: int, plan: PrivacyPlan, params: list[torch.nn.Parameter]) -> None:
        """Insert site ``site``'s included canaries, each with probability ``plan.sample_rate``."""
        weight = _head_weight(params)
        mine = np.flatnonzero((self.canaries.sites == site) & self.canaries.included)
        mine = mine[self._rng.random(len(mine)) < plan.sample_rate]
        if len(mine) == 0:
            return
        if int(self.canaries.coordinates[mine].max()) >= weight.shape[1]:
            raise ValueError(f"a canary coordinate is beyond the head's {weight.shape[1]} features")
        self.drawn[mine] += 1
        columns = torch.as_tensor(self.canaries.coordinates[mine], device=weight.device)
        summed = weight.summed_grad  # type: ignore[attr-defined]  # set by Opacus' GradSampleModule
        summed[:, columns] += self.clip / math.sqrt(weight.shape[0])


def _weight_block(start: dict[str, torch.Tensor]) -> tuple[int, torch.Size]:
    """Offset and shape of the head's weight in the flattened wire vector (``UpdateLog``)."""
    at, found = 0, []
    for value in start.values():
        if value.dim() == 2:
            found.append((at, value.shape))
        at += value.numel()
    if len(found) != 1:
        raise ValueError(f"{len(found)} weight matrices on the wire: gradient canaries need trainable=head")
    return found[0]


def gradient_canary_scores(log: UpdateLog, canaries: GradientCanaries) -> np.ndarray:
    """Each canary's score: −⟨Δ_s, u_j⟩ summed over rounds, Δ_s its site's update (higher = "in")."""
    scores = np.zeros(len(canaries))
    for round_, start in sorted(log.starts.items()):
        at, shape = _weight_block(start)
        for site, update in log.updates[round_].items():
            block = update[at : at + shape.numel()].reshape(shape)
            mine = np.flatnonzero(canaries.sites == site)
            moved = block[:, torch.as_tensor(canaries.coordinates[mine])].sum(0) / math.sqrt(shape[0])
            scores[mine] -= moved.numpy()
    return scores
