"""The privacy audit: the one-run lower bound, the canary draw, the attack metrics, and that the
audit's hooks leave a federation's training untouched."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from fedllm.adapters import adapter_state
from fedllm.audit import (
    GUESS_FRACTIONS,
    audit_from_scores,
    epsilon_lower_bound,
    guesses,
    membership_inference,
    p_value,
)
from fedllm.audit_scores import UpdateLog, alignment_scores, per_example_gradients
from fedllm.canaries import draw_canaries
from fedllm.data import tokenize
from fedllm.model import build_model
from simulations.audit import check_config, parse_args, violations
from simulations.inprocess import federate

from .conftest import LABELS


def _logit_inverse(p: float) -> float:
    return math.log(p / (1 - p))


# ---------------------------------------------------------------- the lower bound


def test_all_guesses_right_gives_the_hand_computed_bound_which_grows_with_the_guesses():
    # v = r = 10, delta 0: P[Bin(10, q) >= 10] = q^10 = 0.05 at the bound, eps = logit(0.05^(1/10))
    assert epsilon_lower_bound(1000, 10, 10) == pytest.approx(_logit_inverse(0.05 ** (1 / 10)), abs=1e-5)
    bounds = [epsilon_lower_bound(1000, r, r) for r in (5, 10, 20, 50, 100)]
    assert bounds == sorted(bounds) and bounds[0] < bounds[-1]
    assert bounds[0] == pytest.approx(_logit_inverse(0.05 ** (1 / 5)), abs=1e-5)


def test_half_right_or_worse_proves_nothing():
    assert epsilon_lower_bound(100, 20, 10) == 0.0
    assert epsilon_lower_bound(100, 100, 50) == 0.0
    assert epsilon_lower_bound(100, 20, 3) == 0.0


def test_p_value_is_the_binomial_tail_plus_the_theorems_delta_term():
    # r = 3, v = 2, eps = ln 3: q = 3/4, P[Bin >= 2] = 3 (3/4)^2 (1/4) + (3/4)^3 = 54/64
    assert p_value(10, 3, 2, math.log(3), 0.0) == pytest.approx(54 / 64)
    # r = v = 2, eps = 0 (q = 1/2): tail 1/4; max over i of P[2 - i <= Bin < 2] / i = max(1/2, 3/8)
    assert p_value(10, 2, 2, 0.0, 0.01) == pytest.approx(0.25 + 2 * 10 * 0.01 * 0.5)
    with pytest.raises(ValueError, match="v <= r <= m"):
        p_value(10, 3, 4, 1.0, 0.0)


def test_the_bound_falls_with_confidence_and_with_delta():
    loose, usual, strict = (epsilon_lower_bound(500, 60, 55, 0.0, c) for c in (0.5, 0.95, 0.99))
    assert loose > usual > strict > 0
    with_delta = epsilon_lower_bound(500, 60, 55, 1e-4, 0.95)
    assert 0 < with_delta < usual
    # the bound is where the p-value crosses beta
    assert p_value(500, 60, 55, usual, 0.0) <= 0.05 < p_value(500, 60, 55, usual + 1e-3, 0.0)


def test_guesses_take_the_extremes_and_abstentions_do_not_count():
    scores = np.array([5.0, 1.0, 3.0, 0.0, 4.0, 2.0])
    assert guesses(scores, 2, 1).tolist() == [1, 0, 0, -1, 1, 0]
    # top 10% all in, bottom 10% all out, the 80% in between all wrong way round
    m = 200
    scores = np.arange(m, dtype=float)
    truth = np.zeros(m, dtype=bool)
    truth[-20:] = True
    truth[20:100] = True  # low scores but "in": wrong for a threshold, yet never guessed on
    result = audit_from_scores(scores, truth, 0.0, 0.95, fractions=(0.2,))
    assert (result.r, result.v, result.k_plus, result.k_minus) == (40, 40, 20, 20)
    assert result.epsilon == pytest.approx(epsilon_lower_bound(m, 40, 40, 0.0, 0.95))


def test_the_best_of_the_preregistered_options_is_union_bounded():
    m = 400
    truth = np.arange(m) % 2 == 0
    scores = truth + np.linspace(0, 0.5, m)  # perfectly separating
    result = audit_from_scores(scores, truth, 1e-5)
    each = 1 - 0.05 / len(GUESS_FRACTIONS)
    assert result.epsilon == pytest.approx(epsilon_lower_bound(m, m, m, 1e-5, each))
    assert [o["r"] for o in result.options] == [round(f * m) for f in GUESS_FRACTIONS]
    assert result.epsilon > max(epsilon_lower_bound(m, r, r, 1e-5, 0.95) for r in (20, 40, 80)) - 1e-9
    with pytest.raises(ValueError, match="NaN or inf"):
        audit_from_scores([0.0, math.nan], [True, False], 0.0)


# ---------------------------------------------------------------- canaries


def _canaries(m: int, seed: int, kind: str = "random-tokens", sites: int = 5):
    words = [f"w{i}" for i in range(50)]
    source = pd.DataFrame(
        {"text": [f"text {i}" for i in range(m)], "label": [LABELS[i % 3] for i in range(m)]}
    )
    return draw_canaries(m, sites, seed, kind=kind, labels=LABELS, vocabulary=words, source=source)


def test_the_inclusion_draw_is_seeded_and_independent_per_canary_with_probability_one_half():
    a, b, other = _canaries(20000, 7), _canaries(20000, 7), _canaries(20000, 8)
    assert a.texts == b.texts and a.labels == b.labels
    assert np.array_equal(a.included, b.included) and np.array_equal(a.sites, b.sites)
    assert not np.array_equal(a.included, other.included)
    z = a.included.astype(float)
    assert abs(z.mean() - 0.5) < 0.015  # 4 standard errors of 20000 fair coins
    assert abs(np.mean(z[:-1] * z[1:]) - 0.25) < 0.015  # neighbours independent
    assert abs(np.corrcoef(z, a.sites)[0, 1]) < 0.03  # independent of the site
    for site in range(5):
        assert abs(z[a.sites == site].mean() - 0.5) < 0.04
    first = np.array([_canaries(3, seed).included[0] for seed in range(2000)], dtype=float)
    assert abs(first.mean() - 0.5) < 0.05  # one canary over many audit seeds
    # the secret does not depend on what the canaries are
    assert np.array_equal(_canaries(100, 3, "mislabeled").included, _canaries(100, 3).included)


def test_canaries_join_only_their_own_site_and_only_when_drawn():
    c = _canaries(60, 1, sites=3)
    total = 0
    for site in range(3):
        rows = c.rows(site)
        expected = [t for t, s, z in zip(c.texts, c.sites, c.included, strict=True) if s == site and z]
        assert rows["text"].tolist() == expected
        total += len(rows)
    assert total == int(c.included.sum())
    mislabeled = _canaries(60, 1, "mislabeled")
    truth = {f"text {i}": LABELS[i % 3] for i in range(60)}
    assert all(truth[t] != lab for t, lab in zip(mislabeled.texts, mislabeled.labels, strict=True))
    with pytest.raises(ValueError, match="use fewer canaries"):
        draw_canaries(5, 2, 0, kind="mislabeled", labels=LABELS, source=mislabeled.frame().head(3))


# ---------------------------------------------------------------- membership inference


def test_mia_metrics_on_synthetic_scores():
    rng = np.random.default_rng(0)
    apart = membership_inference(rng.normal(10, 1, 300), rng.normal(0, 1, 300), bootstrap=200)
    assert apart["auc"] == 1.0 and apart["auc_low"] == pytest.approx(1.0)
    assert apart["tpr_at_1pct_fpr"] == 1.0 and apart["tpr_at_0.1pct_fpr"] == 1.0
    same = membership_inference(np.ones(300), np.ones(300), bootstrap=200)
    assert same["auc"] == 0.5 and same["tpr_at_1pct_fpr"] == 0.0
    mixed = membership_inference(rng.normal(0, 1, 2000), rng.normal(0, 1, 2000), bootstrap=200)
    assert mixed["auc_low"] < 0.5 < mixed["auc_high"]
    assert membership_inference(np.zeros(50), np.ones(50), bootstrap=0)["auc"] == 0.0


# ---------------------------------------------------------------- the federation and its hooks


@pytest.fixture
def tiny_run(settings, frame, tmp_path):
    path = tmp_path / "data.csv"
    frame.to_csv(path, index=False)
    s = settings.replace(
        dataset=str(path), trainable="head", optimizer="sgd", lr=0.5, max_steps=2, target_epsilon=math.inf
    )
    return s


def _run(settings, tiny_config, **hooks):
    return federate(settings, 2, 2, {"scheme": "iid"}, bert_config=tiny_config, **hooks)


def test_the_audit_hooks_do_not_change_a_run(tiny_run, tiny_config):
    plain = _run(tiny_run, tiny_config)
    log = UpdateLog()
    none = _canaries(0, 0, sites=2)
    hooked = _run(
        tiny_run,
        tiny_config,
        extra_rows=[none.rows(i) for i in range(2)],
        on_update=lambda u: log.observe(u.round, u.site, u.start, u.state),
    )
    a, b = plain.model.state_dict(), hooked.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "an audit with no canaries must train the same model"
    assert plain.scores == hooked.scores
    assert sorted(log.updates) == [1, 2] and all(sorted(u) == [0, 1] for u in log.updates.values())
    # the same hooks with canaries inserted do change the model (the comparison above can fail)
    some = draw_canaries(20, 2, 0, kind="random-tokens", labels=LABELS, vocabulary=["alpha", "beta", "gamma"])
    canaried = _run(tiny_run, tiny_config, extra_rows=[some.rows(i) for i in range(2)])
    c = canaried.model.state_dict()
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_the_noise_free_point_is_dp_sgd_without_noise(tiny_run, tiny_config):
    run = _run(tiny_run, tiny_config, noise_free=True)
    assert run.epsilons == [math.inf, math.inf]
    # booked like any private site: the default delta, min(1e-5, 1 / (10 n)) for its n examples
    assert run.deltas == [min(1e-5, 1 / (10 * len(site.train))) for site in run.sites]


def test_training_sites_trains_only_the_first_sites_as_partitioned(tiny_run, tiny_config):
    both = _run(tiny_run, tiny_config)
    seen = []
    one = _run(tiny_run, tiny_config, training_sites=1, on_update=lambda u: seen.append((u.round, u.site)))
    assert seen == [(1, 0), (2, 0)] and len(one.sites) == 1 and len(one.epsilons) == 1
    # site 0 holds the same shard as in the full federation: only who trains changed
    assert one.sites[0].train.equals(both.sites[0].train)
    a, b = both.model.state_dict(), one.model.state_dict()
    assert not all(torch.equal(a[k], b[k]) for k in a)


def test_alignment_scores_a_record_trained_on_by_its_gradient(settings, tiny_config, tokenizer, frame):
    s = settings.replace(trainable="head", optimizer="sgd", lr=0.5, target_epsilon=math.inf)
    model = build_model(s.resolved(), LABELS, torch.device("cpu"), tiny_config)
    data = tokenize(frame.head(4), tokenizer, LABELS, s.max_length)
    start = {k: v.detach().clone() for k, v in adapter_state(model).items()}
    grad = per_example_gradients(model, data, head_only=True)[0]
    flat_start = torch.cat([v.double().flatten() for v in start.values()])
    moved, at = {}, 0
    for k, v in start.items():  # the site took one step of 0.1 on record 0 alone
        moved[k] = (
            (flat_start[at : at + v.numel()] - 0.1 * grad[at : at + v.numel()]).reshape(v.shape).float()
        )
        at += v.numel()
    log = UpdateLog()
    log.observe(1, 0, start, moved)
    scores = alignment_scores(log, model, data, np.array([0, 0, 0, 1]), head_only=True)
    assert scores[0] == pytest.approx(0.1 * float(grad.norm()), rel=1e-4)
    assert scores[3] == 0.0  # site 1 sent no update
    assert max(scores[1:3]) < scores[0]


# ---------------------------------------------------------------- the command


def test_soundness_violations_and_resume_refusal(tmp_path):
    rows = [
        {
            "target_epsilon": 1.0,
            "seed": 0,
            "accounted_epsilon": 0.99,
            "epsilon_lb": 1.2,
            "epsilon_lb_blackbox": 0.0,
        },
        {
            "target_epsilon": 8.0,
            "seed": 0,
            "accounted_epsilon": 7.99,
            "epsilon_lb": 0.4,
            "epsilon_lb_blackbox": 0.1,
            "epsilon_lb_gradient": 8.5,
        },
        {
            "target_epsilon": math.inf,
            "seed": 0,
            "accounted_epsilon": math.inf,
            "epsilon_lb": 3.0,
            "epsilon_lb_blackbox": 0,
        },
    ]
    bad = violations(rows)
    assert len(bad) == 2 and "eps 1 seed 0: epsilon_lb 1.200 > accounted epsilon 0.990" in bad[0]
    assert "eps 8 seed 0: epsilon_lb_gradient 8.500 > accounted epsilon 7.990" in bad[1]
    saved = tmp_path / "audit-config.json"
    check_config(parse_args(["--canaries", "50"]), saved)
    check_config(parse_args(["--canaries", "50", "--epsilons", "8"]), saved)  # more points: fine
    with pytest.raises(SystemExit, match="other settings \\(canaries\\)"):
        check_config(parse_args(["--canaries", "60"]), saved)
    with pytest.raises(SystemExit, match="the audit sets these itself"):
        check_config(parse_args(["--set", "target-epsilon=3"]), tmp_path / "other.json")
    with pytest.raises(SystemExit, match="unknown settings"):
        check_config(parse_args(["--set", "lrr=3"]), tmp_path / "other.json")
