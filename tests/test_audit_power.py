"""The audit's confidence and power: the one-run bound holds at its stated confidence on a
mechanism of known ε (Monte Carlo, checked with a binomial bound), the gradient canaries let it
exceed 3 without noise, and what refuting a given ε takes."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from transformers import BertConfig

from fedllm.audit import (
    GUESS_FRACTIONS,
    audit_from_scores,
    canaries_to_refute,
    correct_needed,
    epsilon_lower_bound,
)
from fedllm.audit_scores import UpdateLog
from fedllm.gradient_canaries import CanaryInserter, draw_gradient_canaries, gradient_canary_scores
from simulations.inprocess import federate

from .conftest import TINY

# ---------------------------------------------------------------- the stated confidence


def _randomized_response_bounds(epsilon: float, trials: int, m: int, confidence: float) -> np.ndarray:
    """The audit's bound in ``trials`` runs of randomized response on m inclusion bits: each
    canary reports its bit truly with probability e^ε / (1 + e^ε), an ε-DP mechanism (δ = 0)."""
    rng = np.random.default_rng(2024)
    keep = math.exp(epsilon) / (1 + math.exp(epsilon))
    bounds = []
    for _ in range(trials):
        truth = rng.random(m) < 0.5
        seen = np.where(rng.random(m) < keep, truth, ~truth)
        scores = seen + 0.5 * rng.random(m)  # ties broken by noise independent of the secret
        bounds.append(audit_from_scores(scores, truth, 0.0, confidence).epsilon)
    return np.asarray(bounds)


def _too_many(exceeded: int, trials: int, rate: float) -> bool:
    """Whether ``exceeded`` of ``trials`` is implausible (p < 0.001) if each exceeds with ``rate``."""
    return float(stats.binom.sf(exceeded - 1, trials, rate)) < 0.001


def test_the_bound_exceeds_a_known_epsilon_at_most_at_the_stated_rate():
    epsilon, trials, beta = 2.0, 300, 0.05
    bounds = _randomized_response_bounds(epsilon, trials, 1000, 1 - beta)
    exceeded = int(np.sum(bounds > epsilon))
    assert not _too_many(exceeded, trials, beta), f"{exceeded} of {trials} bounds above the true ε"
    assert np.median(bounds) > 1.0  # the audit is not vacuous on this mechanism
    # the check has teeth: the same audit without its union bound over the options (each option
    # at the full beta) exceeds the true epsilon too often, and so does a mechanism leaking more
    loose = _randomized_response_bounds(epsilon, trials, 1000, 1 - beta * len(GUESS_FRACTIONS))
    assert _too_many(int(np.sum(loose > epsilon)), trials, beta)
    leakier = _randomized_response_bounds(2.5, trials, 1000, 1 - beta)
    assert _too_many(int(np.sum(leakier > epsilon)), trials, beta)


# ---------------------------------------------------------------- what the bound can reach


def test_what_refuting_an_epsilon_takes():
    # the figures for 500 text canaries: 246 of 250 right to refute epsilon 3
    assert correct_needed(500, 250, 3.0, 1e-5, 0.99) == 246
    assert (
        epsilon_lower_bound(500, 250, 245, 1e-5, 0.99) <= 3.0 < epsilon_lower_bound(500, 250, 246, 1e-5, 0.99)
    )
    assert correct_needed(500, 500, 8.0, 1e-5, 0.99) is None  # 500 of 500 cannot refute 8
    m = canaries_to_refute(3.0, 1e-5, 0.99)
    assert (
        epsilon_lower_bound(m, m, m, 1e-5, 0.99) > 3.0 >= epsilon_lower_bound(m - 1, m - 1, m - 1, 1e-5, 0.99)
    )
    # epsilon 8 at delta 1e-5: out of reach with the audit's five options (each at 99%) ...
    assert canaries_to_refute(8.0, 1e-5, 0.99) is None
    # ... and thousands of canaries, every one guessed right, with a single option at 95%
    eight = canaries_to_refute(8.0, 1e-5, 0.95)
    assert 10_000 < eight < 20_000
    assert epsilon_lower_bound(eight, eight, eight, 1e-5, 0.95) > 8.0


# ---------------------------------------------------------------- gradient canaries

WIDE = BertConfig(**{**TINY.to_dict(), "hidden_size": 128})  # 128 clean directions per site


@pytest.fixture
def head_run(settings, frame, tmp_path):
    path = tmp_path / "data.csv"
    frame.to_csv(path, index=False)
    return settings.replace(
        dataset=str(path), trainable="head", optimizer="sgd", lr=0.5, max_steps=3, sample_rate=1.0
    )


def _canary_run(settings, epsilon: float, m: int = 256, sites: int = 2):
    canaries = draw_gradient_canaries(m, sites, WIDE.hidden_size, seed=5)
    insert, log = CanaryInserter(canaries, settings.max_grad_norm), UpdateLog()
    fed = federate(
        settings.replace(target_epsilon=epsilon),
        sites,
        2,
        {"scheme": "iid"},
        bert_config=WIDE,
        noise_free=not math.isfinite(epsilon),
        on_update=lambda u: log.observe(u.round, u.site, u.start, u.state),
        before_noise=insert,
    )
    return fed, canaries, insert, gradient_canary_scores(log, canaries)


def test_gradient_canaries_are_drawn_per_site_on_distinct_coordinates():
    c = draw_gradient_canaries(300, 5, 64, seed=1)
    pairs = set(zip(c.sites.tolist(), c.coordinates.tolist(), strict=True))
    assert len(pairs) == 300 and set(c.sites.tolist()) == set(range(5))
    assert np.array_equal(c.included, draw_gradient_canaries(300, 5, 64, seed=1).included)
    assert abs(c.included.mean() - 0.5) < 0.1
    with pytest.raises(ValueError, match="at most 320"):
        draw_gradient_canaries(321, 5, 64, seed=1)


def test_without_noise_the_gradient_canaries_separate_and_the_bound_exceeds_3(head_run):
    fed, canaries, insert, scores = _canary_run(head_run, math.inf)
    assert fed.epsilons == [math.inf, math.inf]
    inside = canaries.included
    # q = 1: every included canary was drawn in every step, the others never
    assert np.all(insert.drawn[inside] == 2 * 3) and np.all(insert.drawn[~inside] == 0)
    assert scores[inside].min() > 100 * np.abs(scores[~inside]).max()
    result = audit_from_scores(scores, inside, max(fed.deltas))
    # every option guesses half "in": all right while the top and bottom r / 2 are all in / out
    assert all(o["v"] == o["r"] for o in result.options if o["r"] <= 2 * min(inside.sum(), (~inside).sum()))
    assert result.v == result.r >= 128
    assert result.epsilon > 3.0


def test_with_noise_the_bound_stays_below_the_accountant(head_run):
    fed, canaries, insert, scores = _canary_run(head_run, 1.0)
    drawn = insert.drawn[canaries.included]  # q = 1: in every step the plan took (fewer at small ε)
    assert drawn.min() == drawn.max() > 0 and not insert.drawn[~canaries.included].any()
    result = audit_from_scores(scores, canaries.included, max(fed.deltas))
    # sound: below the accountant's 1, where the same canaries without the noise prove > 3
    assert result.epsilon <= max(fed.epsilons) <= 1.0 + 1e-6
