"""One poisoning site cannot move the global adapter far: norm clipping, weight cap, aggregators."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from server.direction import DirectionEvidence, direction_weights
from server.robust import AGGREGATORS, DIRECTION_THRESHOLD, Bound, RobustSettings, combine, parse_bound
from server.strategy import AdapterFedAvg

from .replies import (
    as_dict,
    distance,
    dp_metrics,
    global_adapter,
    honest,
    reply,
    server_identity,  # noqa: F401 - the fixture below
    start_round,
)

pytestmark = pytest.mark.usefixtures("server_identity")
HONEST = {1: 100, 2: 140, 3: 80, 4: 120}  # node -> num-examples
BAD = 9


def _sign_flip(g: dict, factor: float = 1e6) -> dict:
    """An honest-looking update, flipped and scaled by ``factor``."""
    return {k: (v - factor * (honest(g, BAD)[k] - v)).astype(np.float32) for k, v in g.items()}


def _round(
    settings: RobustSettings, g: dict, bad: dict | None, bad_examples: float = 100, honest_sites=HONEST
):
    strategy = AdapterFedAvg(robust=settings)
    nodes = [*honest_sites, BAD] if bad is not None else list(honest_sites)
    start_round(strategy, g, nodes)
    replies = [reply(n, honest(g, n), dp_metrics(size)) for n, size in honest_sites.items()]
    if bad is not None:
        replies.append(reply(BAD, bad, dp_metrics(bad_examples)))
    arrays, _ = strategy.aggregate_train(1, replies)
    return as_dict(arrays), strategy.round_summary(1)


def _honest_mean(g: dict, honest_sites=HONEST) -> dict:
    adapters = [honest(g, n) for n in honest_sites]
    return {k: np.mean([a[k] for a in adapters], axis=0) for k in g}


def test_a_sign_flipped_update_x1e6_moves_the_global_by_at_most_the_auto_bound():
    g = global_adapter()
    aggregate, record = _round(RobustSettings(), g, _sign_flip(g))
    honest_norms = [distance(honest(g, n), g) for n in HONEST]
    assert record["norm-bound"] <= 2 * max(honest_norms)  # twice the median: an honest scale
    assert distance(aggregate, g) <= record["norm-bound"] + 1e-5
    assert [c["node"] for c in record["clipped"]] == [BAD]  # honest sites are not clipped
    assert record["clipped"][0]["norm"] > 1e5 * record["norm-bound"]
    # the same reply without a bound drags the global 1e5 times further
    unbounded, _ = _round(RobustSettings().without_bounds(), g, _sign_flip(g))
    assert distance(unbounded, g) > 1e4 * record["norm-bound"]


def test_a_fixed_norm_bound_is_a_hard_limit_on_every_site():
    g = global_adapter()
    aggregate, record = _round(RobustSettings(max_update_norm=Bound(absolute=0.05)), g, _sign_flip(g))
    assert record["norm-bound"] == 0.05
    assert distance(aggregate, g) <= 0.05 + 1e-6
    assert {c["node"] for c in record["clipped"]} == {*HONEST, BAD}


def test_an_inflated_example_count_buys_at_most_the_weight_cap():
    g = global_adapter()
    bad = honest(g, BAD, scale=3.0)  # an update 30 x an honest one, with 90 000 examples claimed
    # (below 1/delta = 100 000, so the DP consistency check lets it through)
    settings = RobustSettings(aggregator="fedavg", max_update_norm=Bound())
    aggregate, record = _round(settings, g, bad, bad_examples=90_000)
    cap = 2 * float(np.median([*HONEST.values(), 90_000]))
    assert record["weight-cap"] == cap
    assert record["capped"] == [{"node": BAD, "num-examples": 90_000.0}]
    weights = [*HONEST.values(), cap]
    adapters = [honest(g, n) for n in HONEST] + [bad]
    expected = {k: sum(w * a[k] for w, a in zip(weights, adapters, strict=True)) / sum(weights) for k in g}
    assert all(np.allclose(aggregate[k], expected[k], atol=1e-5) for k in g)
    # uncapped, the site is 99.5 % of the mean
    unbounded, _ = _round(settings.without_bounds(), g, bad, bad_examples=90_000)
    assert distance(unbounded, bad) < 0.02 * distance(aggregate, bad)


SIX_SITES = {n: 100 for n in range(1, 7)}  # 6 honest + 1: Bulyan with f=1 needs 7


@pytest.mark.parametrize("aggregator", AGGREGATORS)
def test_each_aggregator_is_not_moved_far_by_one_outlier(aggregator):
    g = global_adapter()
    settings = RobustSettings(aggregator=aggregator)
    aggregate, record = _round(settings, g, _sign_flip(g, 1e3), honest_sites=SIX_SITES)
    assert record["aggregator"] == aggregator and "global-unchanged" not in record
    assert all(np.isfinite(v).all() for v in aggregate.values())
    honest_spread = max(distance(honest(g, n), g) for n in SIX_SITES)
    assert distance(aggregate, _honest_mean(g, SIX_SITES)) <= honest_spread
    if aggregator == "cosine":  # the site the bound had to cut is left out: the honest mean exactly
        assert record["discounted"] == [BAD]
        assert distance(aggregate, _honest_mean(g, SIX_SITES)) < 1e-5
    if aggregator in ("krum", "bulyan"):
        assert BAD not in record["selected"]


@pytest.mark.parametrize("aggregator", [a for a in AGGREGATORS if a not in ("fedavg", "cosine")])
def test_the_robust_rules_ignore_the_outliers_size_without_any_clipping(aggregator):
    """Median, trimmed mean, Krum and Bulyan hold on their own: x1e3 or x1e6 gives the same global."""
    g = global_adapter()
    settings = RobustSettings(aggregator=aggregator).without_bounds()
    small, record = _round(settings, g, _sign_flip(g, 1e3), honest_sites=SIX_SITES)
    large, _ = _round(settings, g, _sign_flip(g, 1e6), honest_sites=SIX_SITES)
    assert not record.get("norm-bound") and not record["clipped"]
    honest_spread = max(distance(honest(g, n), g) for n in SIX_SITES)
    assert distance(small, large) < 1e-4 * honest_spread
    assert distance(small, _honest_mean(g, SIX_SITES)) <= honest_spread


def test_without_bounds_cosine_is_plain_fedavg_and_one_outlier_drags_it():
    """The benches' `plain`: no clip, no weight cap, no direction check, whatever the aggregator."""
    g = global_adapter()
    honest_spread = max(distance(honest(g, n), g) for n in SIX_SITES)
    plain = {}
    for aggregator in ("cosine", "fedavg"):
        settings = RobustSettings(aggregator=aggregator).without_bounds()
        plain[aggregator], record = _round(settings, g, _sign_flip(g, 1e3), honest_sites=SIX_SITES)
        assert record["aggregator"] == "fedavg" and not record.get("discounted")
    assert distance(plain["cosine"], plain["fedavg"]) < 1e-6
    assert distance(plain["cosine"], _honest_mean(g, SIX_SITES)) > 10 * honest_spread


def test_bulyan_with_too_few_replies_keeps_the_global_adapter_and_says_why():
    g = global_adapter()
    strategy = AdapterFedAvg(robust=RobustSettings(aggregator="bulyan"))
    start_round(strategy, g, list(HONEST))
    arrays, _ = strategy.aggregate_train(1, [reply(n, honest(g, n)) for n in HONEST])
    assert arrays is None
    assert "4f+3 = 7" in strategy.round_summary(1)["global-unchanged"]


def test_run_config_keys_are_read_and_bad_values_are_one_line_naming_the_key():
    default = RobustSettings.from_run_config({})
    assert default == RobustSettings() and default.aggregator == "cosine"
    assert default.max_update_norm == Bound(multiple=2.0) and default.max_site_weight == Bound(multiple=2.0)
    rc = {"aggregator": "Krum", "max-update-norm": "3x", "max-site-weight": 500, "num-malicious-sites": 2}
    custom = RobustSettings.from_run_config(rc)
    assert custom.aggregator == "krum" and custom.num_malicious_sites == 2
    assert custom.max_update_norm == Bound(multiple=3.0) and custom.max_site_weight == Bound(absolute=500.0)
    assert parse_bound(0, 2.0) == Bound() and parse_bound("0.5", 2.0) == Bound(absolute=0.5)
    for key, value in [
        ("aggregator", "mean"),
        ("max-update-norm", -1),
        ("max-update-norm", "inf"),
        ("max-site-weight", "0x"),
        ("max-site-weight", "lots"),
        ("num-malicious-sites", -1),
        ("trim-fraction", 0.5),
        ("max-num-examples", 0),
        ("min-noise-ratio", 1.5),
    ]:
        with pytest.raises(ValueError, match=f"^run config: key '{key}' = ") as err:
            RobustSettings.from_run_config({key: value})
        assert "\n" not in str(err.value)


def _agreeing(g: dict, node: int) -> dict:
    """An honest site on non-IID data: a direction all sites share plus its own, smaller part."""
    shared = global_adapter(seed=7)
    own = honest(g, node, scale=0.05)
    return {k: (own[k] + 0.1 * shared[k]).astype(np.float32) for k in g}


def _scored_round(settings: RobustSettings, g: dict, adapters: dict[int, dict], counts: dict[int, float]):
    strategy = AdapterFedAvg(robust=settings)
    start_round(strategy, g, list(adapters))
    replies = [reply(n, a, dp_metrics(counts[n])) for n, a in adapters.items()]
    arrays, _ = strategy.aggregate_train(1, replies)
    return as_dict(arrays), strategy.round_summary(1)


@pytest.mark.parametrize("bound", [Bound(multiple=2.0), Bound()], ids=["clipped", "unclipped"])
def test_cosine_gives_a_sign_flipped_update_weight_zero_and_the_honest_ones_their_counts(bound):
    g = global_adapter()
    adapters = {n: _agreeing(g, n) for n in HONEST}
    flipped = _agreeing(g, BAD)
    adapters[BAD] = {k: (v - 1e6 * (flipped[k] - v)).astype(np.float32) for k, v in g.items()}
    settings = RobustSettings(max_update_norm=bound)
    assert settings.aggregator == "cosine"  # the default
    aggregate, record = _scored_round(settings, g, adapters, {**HONEST, BAD: 100})
    assert record["discounted"] == [BAD]
    scores = record["direction-score"]
    assert scores[str(BAD)] < -DIRECTION_THRESHOLD < 0 < min(scores[str(n)] for n in HONEST)
    # one round: the evidence is the score where it is below 0; a positive one restarts the record
    assert record["direction-evidence"] == {n: min(z, 0.0) for n, z in scores.items()}
    assert all(np.isfinite(v).all() for v in aggregate.values())
    total = sum(HONEST.values())
    expected = {k: sum(c * adapters[n][k] for n, c in HONEST.items()) / total for k in g}
    assert all(np.allclose(aggregate[k], expected[k], atol=1e-5) for k in g)
    # the old default, plain FedAvg with the same bound, lets the flipped update in
    fedavg, _ = _scored_round(replace(settings, aggregator="fedavg"), g, adapters, {**HONEST, BAD: 100})
    assert distance(fedavg, expected) > 10 * distance(aggregate, expected)


def test_cosine_discounts_at_most_f_sites_and_none_without_an_honest_majority():
    g = global_adapter()
    adapters = {n: _agreeing(g, n) for n in range(1, 8)}
    for bad in (6, 7):  # two sign-flipped sites
        adapters[bad] = {k: (2 * v - adapters[bad][k]).astype(np.float32) for k, v in g.items()}
    counts = dict.fromkeys(adapters, 100)
    for f in (1, 2):
        _, record = _scored_round(RobustSettings(num_malicious_sites=f), g, adapters, counts)
        evidence = record["direction-evidence"]
        assert evidence["6"] < -DIRECTION_THRESHOLD and evidence["7"] < -DIRECTION_THRESHOLD
        lowest = sorted(evidence, key=evidence.get)[:f]
        assert sorted(record["discounted"]) == sorted(int(n) for n in lowest)
    two = {n: adapters[n] for n in (1, 6)}
    aggregate, record = _scored_round(RobustSettings(), g, two, counts)
    assert record["discounted"] == [] and record["direction-score"] == {}
    assert all(np.allclose(aggregate[k], (two[1][k] + two[6][k]) / 2, atol=1e-5) for k in g)


def _rounds(strategy: AdapterFedAvg, g: dict, adapters_of_round, first: int, last: int) -> list[dict]:
    """Rounds ``first`` .. ``last``, each from the global adapter ``g``; their records."""
    records = []
    for server_round in range(first, last + 1):
        adapters = adapters_of_round(server_round)
        start_round(strategy, g, list(adapters), server_round)
        strategy.aggregate_train(server_round, [reply(n, a, dp_metrics(100)) for n, a in adapters.items()])
        records.append(strategy.round_summary(server_round))
    return records


def _noisy_round(g: dict, server_round: int, lean: float) -> dict[int, dict]:
    """Updates dominated by noise (as under DP); site BAD leans ``lean`` against a shared direction."""
    rng = np.random.default_rng(server_round)
    shared = {k: rng.normal(size=v.shape) for k, v in g.items()}
    adapters = {}
    for node in [*HONEST, BAD]:
        sign = -lean if node == BAD else 0.3
        adapters[node] = {
            k: (v + rng.normal(size=v.shape) + sign * shared[k]).astype(np.float32) for k, v in g.items()
        }
    return adapters


def test_cosine_keeps_an_update_without_direction_and_discounts_one_that_leans_away_round_after_round():
    g = global_adapter()
    # an honest-sized update with no direction (as a site with no signal): never discounted
    records = _rounds(AdapterFedAvg(), g, lambda r: _noisy_round(g, r, lean=0.0), 1, 8)
    assert all(r["discounted"] == [] for r in records)
    # a site leaning away a little every round: too little to tell in round 1, clear by the end
    records = _rounds(AdapterFedAvg(), g, lambda r: _noisy_round(g, r, lean=0.25), 1, 8)
    first, last = records[0], records[-1]
    assert first["direction-evidence"][str(BAD)] > -DIRECTION_THRESHOLD and first["discounted"] == []
    assert last["direction-evidence"][str(BAD)] < -DIRECTION_THRESHOLD and last["discounted"] == [BAD]
    assert all(BAD not in r["discounted"] or r["discounted"] == [BAD] for r in records)


def test_a_resumed_strategy_carries_the_direction_evidence_of_the_kept_rounds():
    g = global_adapter()
    whole = _rounds(AdapterFedAvg(), g, lambda r: _noisy_round(g, r, lean=0.25), 1, 6)
    resumed = AdapterFedAvg()
    resumed.restore(json.loads(json.dumps(whole[:3])))  # as the run log keeps them
    later = _rounds(resumed, g, lambda r: _noisy_round(g, r, lean=0.25), 4, 6)
    assert later[-1]["direction-evidence"] == whole[-1]["direction-evidence"]
    assert later[-1]["discounted"] == whole[-1]["discounted"]
    fresh = _rounds(AdapterFedAvg(), g, lambda r: _noisy_round(g, r, lean=0.25), 4, 6)
    assert fresh[-1]["direction-evidence"] != whole[-1]["direction-evidence"]


def test_an_oversized_update_is_discounted_first_and_takes_the_place_of_a_leaning_site():
    g = global_adapter()

    def attacked(server_round: int) -> dict[int, dict]:
        adapters = _noisy_round(g, server_round, lean=0.6)  # BAD leans away: evidence < -3 soon
        rng = np.random.default_rng(100 + server_round)
        adapters[99] = {k: (v + 1e3 * rng.normal(size=v.shape)).astype(np.float32) for k, v in g.items()}
        return adapters

    records = _rounds(AdapterFedAvg(), g, attacked, 1, 6)
    assert all(r["discounted"] == [99] for r in records)  # f = 1: the random update of norm 1e3
    assert records[-1]["direction-evidence"][str(BAD)] < -DIRECTION_THRESHOLD
    records = _rounds(AdapterFedAvg(robust=RobustSettings(num_malicious_sites=2)), g, attacked, 1, 6)
    assert sorted(records[-1]["discounted"]) == sorted([99, BAD])


def _build_then_flip(g: dict, server_round: int, flip_from: int = 5) -> dict[int, dict]:
    """Honest sites: a shared direction under noise twice its size. Site BAD sends the shared
    direction without noise (it scores high and agrees) until ``flip_from``, then the flipped
    direction at 1.99 x the round's median update norm (just inside the auto bound, never cut)."""
    rng = np.random.default_rng(server_round)
    shared = {k: rng.normal(size=v.shape) for k, v in g.items()}
    adapters = {
        n: {k: (v + rng.normal(size=v.shape) + 0.5 * shared[k]).astype(np.float32) for k, v in g.items()}
        for n in HONEST
    }
    if server_round < flip_from:
        adapters[BAD] = {k: (v + 0.5 * shared[k]).astype(np.float32) for k, v in g.items()}
        return adapters
    norms = [distance(a, g) for a in adapters.values()]
    target = 1.99 * float(np.median([*norms, np.inf]))  # the median of all five, BAD the largest
    size = float(np.sqrt(sum(np.sum(s**2) for s in shared.values())))
    adapters[BAD] = {k: (v - target / size * shared[k]).astype(np.float32) for k, v in g.items()}
    return adapters


def test_good_rounds_cannot_be_banked_against_a_flip():
    g = global_adapter()
    records = _rounds(AdapterFedAvg(), g, lambda r: _build_then_flip(g, r), 1, 8)
    early, late = records[:4], records[4:]
    assert min(r["direction-score"][str(BAD)] for r in early) > 5  # it agreed, strongly
    assert all(r["clipped"] == [] for r in late)  # inside the norm bound: only direction can tell
    assert all(r["direction-score"][str(BAD)] < -5 for r in late)
    # with the plain sum over the run (before issue 22) its evidence stayed above -3 to round 8;
    # the record restarts whenever it turns positive, so the first flipped round counts alone
    assert all(r["discounted"] == [BAD] for r in late)
    assert late[0]["direction-evidence"][str(BAD)] == late[0]["direction-score"][str(BAD)]
    assert all(BAD not in r["discounted"] and r["discounted"] == [] for r in early)


def test_of_two_sites_below_the_threshold_the_one_that_pulls_harder_is_discounted():
    rng = np.random.default_rng(7)
    g = {"w": np.zeros(2000)}
    shared = rng.normal(size=2000)
    adapters = [{"w": rng.normal(size=2000) + 0.3 * shared} for _ in range(3)]  # honest
    adapters.append({"w": rng.normal(size=2000) - 0.1 * shared})  # 3: a non-IID site, low record
    adapters.append({"w": -2.0 * np.linalg.norm(adapters[0]["w"]) / np.linalg.norm(shared) * shared})
    evidence = DirectionEvidence(sums={3: -60.0}, counts={3: 8})  # 4: a flip, a fresh record
    weights, scores, record = direction_weights(g, adapters, [1.0] * 5, [0, 1, 2, 3, 4], evidence, 1)
    assert record[3] < record[4] < -DIRECTION_THRESHOLD  # by evidence alone site 3 would go
    assert weights == [1.0, 1.0, 1.0, 1.0, 0.0]  # the flip at twice an honest norm goes instead


def test_fedavg_gives_the_same_bits_whatever_order_the_sites_come_in():
    """Node ids are new in every run, so the canonical order puts the same sites in another
    order each time: a seeded rerun must still give a bit-identical global (a float32 sum in
    that order did not: the default sweep's loss moved in the 8th digit between reruns)."""
    rng = np.random.default_rng(0)
    adapters = [{"w": rng.normal(size=20_000).astype(np.float32)} for _ in range(5)]
    weights = [float(n) for n in rng.integers(100, 600, size=5)]
    settings = RobustSettings(aggregator="fedavg").without_bounds()
    first, _, _ = combine(adapters, weights, settings)
    assert first is not None
    for _ in range(6):
        order = rng.permutation(5)
        again, _, _ = combine([adapters[i] for i in order], [weights[i] for i in order], settings)
        assert again is not None
        assert (
            np.asarray(again["w"], dtype=np.float32).tobytes()
            == np.asarray(first["w"], dtype=np.float32).tobytes()
        )
