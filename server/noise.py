"""The noise check: a reply that claims DP must carry the noise its declared plan adds.

Where the noise of a DP update comes from (fedllm.train, fedllm.privacy, Opacus' DPOptimizer):
at each local step k = 0 .. T−1 of round r of R the optimizer sets

    p.grad = (Σ of the step's clipped per-example gradients + z_k) / (q · n̂),
    z_k ~ N(0, (σ C)² I_d), drawn afresh each step (``add_noise``),

dividing by ``expected_batch_size`` = q · n̂ (``scale_grad``; n̂ the site's public DP count,
``_book_realised_rate``), and torch's SGD then takes ``v_k = μ v_{k−1} + p.grad + λ p`` (momentum
μ, weight decay λ, no dampening) and ``p ← p − lr · f_k · v_k``, with ``f_k`` the learning-rate
schedule's factor (``fedllm.train.lr_schedule``: a linear decay over all R · T steps of the run,
or 1). All of it is linear in the z's, so the noise part of the update Δ = reply − global is
Σ_j a_j z_j / (q n̂) for scalars a_j that ``NoiseModel.gain`` gets by running that recursion on
coefficients. It is N(0, s² I_d) with s = σ C √(Σ a_j²) / (q n̂) per value, its norm s √d to a
relative spread of 1/√(2d). Without momentum, weight decay or schedule a_j = lr, and the norm is
lr · σ C √d √T / (q n̂). σ, q, T and n̂ are the reply's own declared ``noise-multiplier``,
``sample-rate``, ``steps`` and ``num-examples``; C, lr, μ, λ, the schedule and R are the run
config the server itself sent; d is the number of adapter values (every one is noised).

The clipped-gradient signal is drawn independently of the step's noise, so an honest update's
squared norm is ‖signal‖² + ‖noise‖² plus a cross term of relative size at most about
2‖signal‖ / (‖noise‖ √d): its norm is at least s √d (1 − 3 / √(2d)) but for a chance of about
1e-3. A noise-free update carries only the signal, which under the DP recipe's
``max-step-noise`` (an averaged step's noise ≤ 2 C, its signal ≤ C) is well below the noise.
So a reply whose ‖Δ‖ is below ``min-noise-ratio`` (0.8) of s √d (or below √(1 − 3.1 √(2/d)) of
it, where d is too small for 0.8 to be safe) is too clean for the DP it claims: left out of the
round, and logged with the numbers.

What the check binds is the declaration: a site that declares a smaller σ or a larger n̂ than its
plan's expects less noise. n̂ enters the check at most at the round's weight cap (the
``max-site-weight`` the aggregate uses), so a count claimed near 1/δ buys no quieter check; σ
and q are taken as declared (they are in the round record's ``sites`` for an auditor). Under
AdamW (never the DP default) the noise is not additive and nothing is checked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedllm.config import ResolvedSettings, require_resolved
from fedllm.train import lr_schedule

MIN_NOISE_RATIO = 0.8
NOISE_BOUND_SLACK = 0.1  # the noise part's allowance: (1 + this) × s √d, ~6 of its spreads at d ≈ 2,000
SIGNAL_MULTIPLE = 2.0  # the signal part's allowance: this × the round's median signal norm
# An update the noise bound cuts is also discounted (``cosine``'s oversized rule) only when it is
# more than this × that bound: an honest non-IID site's signal can be 2-4 × the round's median
# (BBC, issue 22: up to 1.16 × its bound), so between 1 and this it is only cut.
NOISE_OVERSIZED = 1.25
_Z = 3.1  # a Gaussian vector's norm falls below √(1 − 3.1 √(2/d)) of its RMS with chance ≲ 1e-3


@dataclass(frozen=True)
class NoiseModel:
    """What shapes a DP update's noise that the server itself sent: the run's settings and rounds."""

    settings: ResolvedSettings
    num_rounds: int

    @classmethod
    def of(cls, settings: ResolvedSettings, num_rounds: int) -> NoiseModel:
        """The model for a run of ``num_rounds`` rounds with the run's resolved fine-tune settings."""
        return cls(require_resolved(settings, "NoiseModel.of"), max(int(num_rounds), 1))

    def gain(self, steps: int, server_round: int) -> float | None:
        """√(Σ_j a_j²): the update's noise per value is this × σ C / (q n̂); None under AdamW.

        Runs torch SGD's recursion on the coefficients of each step's noise z_j in the
        parameters' noise part (``a``) and in the momentum buffer (``b``).
        """
        s = self.settings
        if s.optimizer != "sgd" or steps < 1:
            return None
        factor = lr_schedule(s, steps, server_round, self.num_rounds)
        a, b = np.zeros(steps), np.zeros(steps)
        for k in range(steps):
            grad = s.weight_decay * a
            grad[k] += 1.0
            b = s.momentum * b + grad
            a = a - s.lr * factor(k) * b
        return float(np.linalg.norm(a))


def noise_floor(dimension: int, ratio: float) -> float:
    """The fraction of the expected noise norm below which an update is too clean."""
    statistical = math.sqrt(max(0.0, 1.0 - _Z * math.sqrt(2.0 / max(dimension, 1))))
    return min(ratio, statistical)


def expected_noise_norm(
    metrics: dict[str, float],
    dimension: int,
    model: NoiseModel,
    server_round: int,
    count_cap: float | None = None,
) -> float | None:
    """s √d: the norm of the noise a reply's declared plan adds to its update (see above).

    None when it declares no usable plan (σ, q or steps missing or 0) or under AdamW; n̂ is
    taken at most at ``count_cap``.
    """
    sigma, q = metrics.get("noise-multiplier", 0.0), metrics.get("sample-rate", 0.0)
    steps = int(metrics.get("steps", 0))
    gain = model.gain(steps, server_round) if sigma > 0 and q > 0 else None
    if not gain:
        return None
    count = metrics["num-examples"] if count_cap is None else min(metrics["num-examples"], count_cap)
    return gain * sigma * model.settings.max_grad_norm * math.sqrt(dimension) / (q * count)


def too_clean(
    metrics: dict[str, float],
    norm: float,
    dimension: int,
    model: NoiseModel,
    server_round: int,
    ratio: float,
    count_cap: float | None = None,
) -> tuple[float, str] | None:
    """(expected noise norm, reason) when a reply that claims DP is too clean; else None.

    A reply claims DP when its ``epsilon`` is finite (a site without DP sends +inf). Declaring DP
    with no noise multiplier, sample rate or steps is too clean whatever the update.
    """
    epsilon = metrics.get("epsilon", math.inf)
    if not math.isfinite(epsilon):
        return None
    sigma, q = metrics.get("noise-multiplier", 0.0), metrics.get("sample-rate", 0.0)
    steps = int(metrics.get("steps", 0))
    if sigma <= 0 or q <= 0 or steps < 1:
        return 0.0, (
            f"claims DP (epsilon {epsilon:.3g}) but declares noise-multiplier {sigma:g}, "
            f"sample-rate {q:g}, {steps} steps"
        )
    expected = expected_noise_norm(metrics, dimension, model, server_round, count_cap)
    floor = noise_floor(dimension, ratio)
    if expected is None or norm >= floor * expected:
        return None
    count = metrics["num-examples"] if count_cap is None else min(metrics["num-examples"], count_cap)
    return expected, (
        f"too clean for the DP it claims: update norm {norm:.3g} is {norm / expected:.2f} of the "
        f"noise its plan adds ({expected:.3g} for sigma {sigma:g}, q {q:g}, {steps} steps, "
        f"n {count:g}, C {model.settings.max_grad_norm:g}), below {floor:.2f}"
    )


def noise_check(
    metrics: list[dict[str, float]],
    nodes: list[int],
    norms: list[float],
    dimension: int,
    model: NoiseModel,
    server_round: int,
    ratio: float,
    count_cap: float | None = None,
) -> tuple[list[dict], str]:
    """``[{node, norm, expected, reason}]`` of the replies too clean for their DP, and a note.

    When more than half of the replies are too clean, the server's model of the noise is what is
    wrong (sites on another version of the app, say), not the sites: nothing is flagged and the
    note says why.
    """
    flagged = []
    for m, node, norm in zip(metrics, nodes, norms, strict=True):
        verdict = too_clean(m, norm, dimension, model, server_round, ratio, count_cap)
        if verdict is not None:
            flagged.append({"node": node, "norm": norm, "expected": verdict[0], "reason": verdict[1]})
    if 2 * len(flagged) > len(nodes):
        note = (
            f"the noise check found {len(flagged)} of {len(nodes)} replies too clean: the server's "
            "noise model does not match the sites (same app version and run config?); none left out"
        )
        return [], note
    return flagged, ""


def _median(values: list[float]) -> float:
    return float(np.median(values)) if values else 0.0


def noise_bounds(
    metrics: list[dict[str, float]],
    norms: list[float],
    dimension: int,
    model: NoiseModel,
    server_round: int,
    slack: float,
    count_cap: float | None = None,
) -> list[float | None]:
    """Per reply: the largest update norm an honest DP update of its declared plan reaches.

    An honest update is its signal plus noise independent of it, ‖Δ‖² ≈ ‖signal‖² + (s √d)²,
    and s √d is known to a relative spread of 1/√(2d) (a chi distribution). So a reply's bound
    is √(((1 + ``slack``) · s √d)² + A²) (``slack`` at least 3.1 / √(2d), that spread's 1e-3
    tail, where d is small), where A, the signal allowance, is ``SIGNAL_MULTIPLE``
    × the round's median signal norm √(max(‖Δ_j‖² − (s_j √d)², 0)) over the replies that
    declare a plan (the median: one site cannot move it past an honest one's). Unlike 2 × the
    median norm it does not double the noise, which under DP is most of every norm: an update
    above it carries more than twice an honest signal (a flip scaled up, say). The declaration
    is taken as in ``too_clean`` (n̂ at most ``count_cap``), and s √d at most 2 × the round's
    median of it, so declaring a larger σ or a smaller n̂ buys at most twice the room; a reply
    without a usable plan (no DP claimed) is bounded with the round's median s √d. All None
    when no reply declares a plan (no DP run, AdamW) or ``slack`` ≤ 0 (off).
    """
    expected = [
        expected_noise_norm(m, dimension, model, server_round, count_cap)
        if math.isfinite(m.get("epsilon", math.inf))
        else None
        for m in metrics
    ]
    known = [e for e in expected if e]
    if slack <= 0 or not known:
        return [None] * len(metrics)
    slack = max(slack, _Z / math.sqrt(2.0 * max(dimension, 1)))  # a small d's own spread
    median, signals = _median(known), []
    for e, norm in zip(expected, norms, strict=True):
        if e:
            signals.append(math.sqrt(max(norm * norm - e * e, 0.0)))
    allowance = SIGNAL_MULTIPLE * _median(signals)
    return [math.hypot((1.0 + slack) * min(e or median, 2.0 * median), allowance) for e in expected]
