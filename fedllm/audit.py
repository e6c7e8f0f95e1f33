"""Empirical privacy audit: from membership scores to a lower bound on ε and an attack's success.

The audit's parts, in the order a run uses them:

- **Canaries** (``fedllm.canaries``): m records, each inserted at a random site with probability
  ½ from a seeded draw; the inclusion draw is the secret the attacker guesses.
- **Scores** (``fedllm.audit_scores``), higher = "in": black-box, minus the final model's loss;
  white-box, the alignment of a site's updates with the record's negative loss gradient.
- **Lower bound** (``epsilon_lower_bound``, ``audit_from_scores``, here): Steinke, Nasr and
  Jagielski, "Privacy auditing with one (1) training run" (NeurIPS 2023), Theorem 3.1 with its
  δ term: the attacker guesses "in" for the k+ highest scores, "out" for the k- lowest, abstains
  on the rest; from r guesses with v correct, the largest ε that an (ε, δ)-DP mechanism would
  make this unlikely (p-value ≤ β) is a lower bound on ε at confidence 1 − β.
- **Membership inference** (``membership_inference``, here): any score (the loss-threshold
  attack: minus the loss), ROC AUC with a bootstrap interval, TPR at 1% and 0.1% FPR.

Everything here works on saved scores too: an operator who holds a run's canary scores and
inclusion draw calls ``audit_from_scores``. The method: docs/audit.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import stats
from sklearn.metrics import roc_auc_score, roc_curve

# Guess r = fraction * m canaries (half "in" from the top, half "out" from the bottom); the bound
# is the best of these options, each tested at beta / len(options) (a union bound). Fixed in advance.
GUESS_FRACTIONS = (0.05, 0.1, 0.2, 0.5, 1.0)


# ---------------------------------------------------------------- the lower bound


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[at least v of r guesses correct] if the mechanism were (ε, δ)-DP: Steinke et al.'s
    Theorem 3.1, f(v) + 2 m δ max_{1≤i≤v} (f(v − i) − f(v)) / i with f(u) = P[Bin(r, e^ε/(1+e^ε)) ≥ u].
    """
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got m={m}, r={r}, v={v}")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and delta in [0, 1], got {epsilon}, {delta}")
    q = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(stats.binom.sf(v - 1, r, q))
    alpha = 0.0
    if delta > 0 and v > 0:  # (f(v - i) - f(v)) = P[v - i <= Bin < v], for i = 1 .. v
        below = np.cumsum(stats.binom.pmf(np.arange(v - 1, -1, -1), r, q))
        alpha = float(np.max(below / np.arange(1, v + 1)))
    return min(1.0, tail + 2 * m * delta * alpha)


def epsilon_lower_bound(
    m: int, r: int, v: int, delta: float = 0.0, confidence: float = 0.95, tolerance: float = 1e-6
) -> float:
    """The largest ε whose p-value (``p_value``) for v of r correct guesses is ≤ 1 − confidence.

    With confidence ``1 - beta`` the mechanism is not (ε', δ)-DP for any ε' below it. 0 when
    even ε = 0 explains the guesses. Found by bisection as in the paper (p grows with ε).
    """
    beta = 1.0 - confidence
    if not 0 < beta < 1:
        raise ValueError(f"confidence {confidence} must be in (0, 1)")
    if p_value(m, r, v, 0.0, delta) > beta:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) <= beta:
        low, high = high, 2 * high
        if high > 1e4:  # numerically every epsilon is ruled out: report the largest one tried
            return low
    while high - low > tolerance:
        middle = (low + high) / 2
        if p_value(m, r, v, middle, delta) <= beta:
            low = middle
        else:
            high = middle
    return low


def guesses(scores: np.ndarray, k_plus: int, k_minus: int) -> np.ndarray:
    """+1 ("in") for the k+ highest scores, -1 ("out") for the k- lowest, 0 (abstain) otherwise.

    Ties are broken by position (a stable sort), which does not depend on the secret.
    """
    scores = np.asarray(scores, dtype=float)
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus > len(scores):
        raise ValueError(f"k+={k_plus}, k-={k_minus} for {len(scores)} scores: need k+ + k- <= m")
    order = np.argsort(scores, kind="stable")
    out = np.zeros(len(scores), dtype=int)
    out[order[len(scores) - k_plus :]] = 1
    out[order[:k_minus]] = -1
    return out


@dataclass
class AuditResult:
    """The lower bound and the guesses that gave it (one entry per pre-registered option)."""

    epsilon: float  # the lower bound at ``confidence`` (the best option, union-bounded)
    confidence: float
    delta: float
    m: int
    k_plus: int
    k_minus: int
    r: int
    v: int
    options: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        """Plain values (JSON)."""
        return asdict(self)


def audit_from_scores(
    scores: Sequence[float],
    included: Sequence[bool],
    delta: float,
    confidence: float = 0.95,
    fractions: Sequence[float] = GUESS_FRACTIONS,
) -> AuditResult:
    """The ε lower bound from canary scores (higher = "in") and the true inclusions.

    For each fraction f the attacker guesses on r = round(f m) canaries, half "in" (highest)
    and half "out" (lowest); each option is tested at β / len(fractions) so that reporting the
    best is still a lower bound at ``confidence`` (union bound). ``delta``: the run's δ (the
    largest of the sites').
    """
    values, truth = np.asarray(scores, dtype=float), np.asarray(included, dtype=bool)
    if values.shape != truth.shape or values.ndim != 1:
        raise ValueError(f"scores {values.shape} and included {truth.shape} must be 1-D of one length")
    if not np.all(np.isfinite(values)):
        raise ValueError("canary scores hold NaN or inf: the run or the scoring failed")
    m = len(values)
    each = 1.0 - (1.0 - confidence) / max(len(fractions), 1)
    best = AuditResult(0.0, confidence, delta, m, 0, 0, 0, 0)
    for fraction in fractions:
        r = min(m, max(0, round(fraction * m)))
        k_plus = r // 2 + r % 2
        guess = guesses(values, k_plus, r - k_plus)
        v = int(np.sum((guess == 1) & truth) + np.sum((guess == -1) & ~truth))
        eps = epsilon_lower_bound(m, r, v, delta, each) if r else 0.0
        best.options.append(
            {"fraction": fraction, "k_plus": k_plus, "k_minus": r - k_plus, "r": r, "v": v, "epsilon": eps}
        )
        if eps > best.epsilon:
            best.epsilon, best.k_plus, best.k_minus, best.r, best.v = eps, k_plus, r - k_plus, r, v
    return best


# ---------------------------------------------------------------- membership inference


def membership_inference(
    member_scores: Sequence[float],
    nonmember_scores: Sequence[float],
    confidence: float = 0.95,
    bootstrap: int = 1000,
    seed: int = 0,
) -> dict:
    """An attack's success at telling members from non-members (higher score = member): ROC AUC
    with a bootstrap interval, TPR at 1% and 0.1% FPR. The loss-threshold attack passes minus
    the losses.

    The interval resamples members and non-members separately (``bootstrap`` times, percentile
    method). With fewer than 1 / FPR non-members a TPR at that FPR is the TPR at FPR 0 (the
    counts are returned next to it).
    """
    members, others = np.asarray(member_scores, float), np.asarray(nonmember_scores, float)
    if len(members) == 0 or len(others) == 0:
        raise ValueError(f"{len(members)} members and {len(others)} non-members: need both")
    truth = np.r_[np.ones(len(members)), np.zeros(len(others))]
    scores = np.r_[members, others]
    auc = float(roc_auc_score(truth, scores))
    rng = np.random.default_rng(seed)
    samples = [
        roc_auc_score(truth, np.r_[rng.choice(members, len(members)), rng.choice(others, len(others))])
        for _ in range(bootstrap)
    ]
    tail = (1 - confidence) / 2
    low, high = (float(x) for x in np.quantile(samples, [tail, 1 - tail])) if samples else (auc, auc)
    fpr, tpr, _ = roc_curve(truth, scores)
    return {
        "auc": auc,
        "auc_low": low,
        "auc_high": high,
        "tpr_at_1pct_fpr": float(tpr[fpr <= 0.01].max()),
        "tpr_at_0.1pct_fpr": float(tpr[fpr <= 0.001].max()),
        "members": len(members),
        "nonmembers": len(others),
    }


# ---------------------------------------------------------------- what a bound can reach


def correct_needed(
    m: int, r: int, epsilon: float, delta: float = 0.0, confidence: float = 0.95
) -> int | None:
    """The fewest correct guesses of r (m canaries) whose lower bound exceeds ``epsilon``, i.e.
    that refute (ε, δ)-DP at ``confidence``; None when even r of r do not."""
    beta = 1.0 - confidence
    if p_value(m, r, r, epsilon, delta) > beta:
        return None
    low, high = 0, r  # p_value falls as v grows: p(low) > beta >= p(high)
    if p_value(m, r, 0, epsilon, delta) <= beta:
        return 0
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if p_value(m, r, middle, epsilon, delta) <= beta else (middle, high)
    return high


def canaries_to_refute(
    epsilon: float, delta: float = 0.0, confidence: float = 0.95, limit: int = 10**6
) -> int | None:
    """The fewest canaries m that refute (ε, δ)-DP when all m are guessed and every guess is
    right; None when no m up to ``limit`` does.

    Fewer canaries cannot refute ε in one run at ``confidence``, however good the attack. With
    δ > 0 the reachable bound rises with m and then falls (the δ term grows with m), so ε near
    log(β / δ) is out of reach at any m. Found by doubling, then bisection below the first m
    that refutes.
    """

    def refutes(m: int) -> bool:
        return correct_needed(m, m, epsilon, delta, confidence) is not None

    high = 1
    while not refutes(high):
        high *= 2
        if high > limit:
            return None
    low = high // 2  # does not refute (or is 0)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if refutes(middle) else (middle, high)
    return high
