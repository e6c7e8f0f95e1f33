"""The malicious site of bench/poisoning.py: how it trains and what it sends instead of its update.

Attacks (bench/poisoning.py's docstring says what each measures): ``none``; ``sign-flip`` (its
trained update × -1e6); ``random`` (a random update of norm ``random_norm``); ``label-flip`` (it
trains honestly on labels shifted by one class: ``flip_labels``); ``inflated`` /
``inflated-valid`` (honest update, an inflated ``num-examples``); the ``build-flip`` family
(``NOISE_FREE``: it runs the DP code with the noise removed, ``noise_free``, then sends an
honest-looking update for the first half of the rounds and a flipped one after, scaled to the
server's bounds as far as it can compute them).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import opacus.optimizers.optimizer as dp_optimizer
import torch

from server.noise import NOISE_BOUND_SLACK, NoiseModel, expected_noise_norm, noise_bounds
from server.robust import RobustSettings, update_norm

ATTACKS = (
    "none",
    "sign-flip",
    "random",
    "label-flip",
    "inflated",
    "inflated-valid",
    "build-flip",
    "build-flip-noisy",
    "build-flip-bound",
)
NOISE_FREE = ("build-flip", "build-flip-noisy", "build-flip-bound")  # the attacker trains without DP noise


@contextmanager
def noise_free():
    """Opacus' DP optimizer with its noise replaced by zeros: the DP code, less its noise."""
    original = dp_optimizer._generate_noise
    dp_optimizer._generate_noise = lambda std, reference, *args, **kwargs: torch.zeros_like(reference)
    try:
        yield
    finally:
        dp_optimizer._generate_noise = original


def flip_labels(frame, column: str, labels: list[str]):
    """The same texts with every label moved to the next class."""
    shifted = {name: labels[(i + 1) % len(labels)] for i, name in enumerate(labels)}
    return frame.assign(**{column: frame[column].map(shifted)})


@dataclass(frozen=True)
class Attacker:
    """Site ``index`` of a federation of ``rounds`` rounds, against the server's ``noise`` model."""

    index: int
    rounds: int
    noise: NoiseModel
    random_norm: float

    def attack(self, attack: str, g: dict, arrays: dict, metrics: dict, rng, robust: RobustSettings):
        """The attacker's (arrays, metrics) for the attacks that change its trained reply."""
        if attack == "sign-flip":
            arrays = {k: (g[k] - 1e6 * (arrays[k] - g[k])).astype(np.float32) for k in g}
        elif attack == "random":
            noise = {k: rng.normal(size=v.shape) for k, v in g.items()}
            norm = math.sqrt(sum(float(np.sum(v**2)) for v in noise.values()))
            arrays = {k: (g[k] + self.random_norm / norm * noise[k]).astype(np.float32) for k in g}
        elif attack == "inflated":
            metrics = {**metrics, "num-examples": 1e12}
        elif attack == "inflated-valid":
            below_delta = math.ceil(1 / metrics["delta"]) - 1 if metrics["delta"] > 0 else math.inf
            metrics = {**metrics, "num-examples": float(min(below_delta, robust.max_num_examples))}
        return arrays, metrics

    def declared_std(self, g: dict, metrics: dict, server_round: int) -> float:
        """The noise per adapter value that a reply declaring ``metrics`` must carry."""
        d = sum(v.size for v in g.values())
        return expected_noise_norm(metrics, d, self.noise, server_round) / math.sqrt(d)

    def flip_target(
        self, g: dict, arrays: list[dict], metrics: list[dict], server_round: int, adaptive: bool
    ) -> float:
        """The norm the attacker's flipped update goes out at: 1.99 × the median norm the server
        will see (the attacker is the largest), or (``adaptive``) 0.99 × the lowest bound the
        server's default applies to it (that and the noise model's, ``server.noise.noise_bounds``,
        computed as the server will from every reply's declared plan)."""
        others = [update_norm(g, a) for i, a in enumerate(arrays) if i != self.index]
        target = 1.99 * float(np.median([*others, np.inf]))
        if not adaptive:
            return target
        norms = [np.inf if i == self.index else update_norm(g, a) for i, a in enumerate(arrays)]
        d, cap = sum(v.size for v in g.values()), 2.0 * float(np.median([m["num-examples"] for m in metrics]))
        bounds = noise_bounds(metrics, norms, d, self.noise, server_round, NOISE_BOUND_SLACK, cap)
        return min(target, 0.99 * bounds[self.index]) if bounds[self.index] else target

    def build_flip(
        self,
        g: dict,
        arrays: list[dict],
        metrics: list[dict],
        server_round: int,
        attack: str,
        rng: np.random.Generator,
    ) -> dict[str, np.ndarray]:
        """The attacker's adapter for the build-flip attacks, from its noise-free update
        ``arrays[index]`` and the other sites' updates (and declared plans)."""
        flipping = server_round > self.rounds // 2
        noisy = attack == "build-flip-noisy" or (attack == "build-flip-bound" and not flipping)
        delta = {k: arrays[self.index][k].astype(np.float64) - g[k] for k in g}
        std = self.declared_std(g, metrics[self.index], server_round) if noisy else 0.0
        noise = {k: rng.normal(scale=std, size=v.shape) if noisy else np.zeros(v.shape) for k, v in g.items()}
        if flipping:  # flip, at the target norm (beside its noise, if any)
            target = self.flip_target(g, arrays, metrics, server_round, attack == "build-flip-bound")
            size = math.sqrt(sum(float(np.sum(v**2)) for v in delta.values()))
            beside = math.sqrt(sum(float(np.sum(v**2)) for v in noise.values()))
            scale = math.sqrt(max(target**2 - beside**2, 0.0)) / size
            delta = {k: -scale * v for k, v in delta.items()}
        return {k: (g[k] + delta[k] + noise[k]).astype(np.float32) for k in g}
