"""A reply that claims DP must carry the noise its declared plan adds (server/noise.py).

The model of the noise is checked against fedllm's own training loop (the update of a DP run
whose clipped gradients are zeroed is pure noise), then the check against honest-looking and
noise-free replies, through the server's own ``AdapterFedAvg.aggregate_train``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedllm.accounting import plan_privacy
from fedllm.config import Settings
from fedllm.train import train_local
from server.noise import NOISE_OVERSIZED, NoiseModel, noise_check, too_clean
from server.robust import RobustSettings, update_norm
from server.strategy import AdapterFedAvg

from .replies import as_dict, dp_metrics, global_adapter, reply, server_identity, start_round  # noqa: F401

ROUNDS = 8
DP = Settings(target_epsilon=8.0, max_grad_norm=1.0).resolved()  # the DP recipe: SGD, lr 10, linear decay


def _pure_noise_update(settings: Settings, server_round: int, rounds: int) -> tuple[float, int, object]:
    """The norm of one DP local training's update when every clipped gradient sum is zeroed."""
    torch.manual_seed(server_round)
    model = nn.Linear(64, 8)
    nn.init.zeros_(model.weight), nn.init.zeros_(model.bias)  # weight decay then shrinks noise only
    n = 64
    data = TensorDataset(torch.randn(n, 64), torch.randint(0, 8, (n,)))
    plan = plan_privacy(settings.resolved(), n, planned_rounds=rounds)

    def zeroed(params: list) -> None:
        for p in params:
            p.summed_grad.zero_()

    result = train_local(
        model, data, settings.resolved(), plan=plan, round_of=(server_round, rounds), before_noise=zeroed
    )
    update = torch.cat([p.detach().ravel() for p in model.parameters()])
    return float(update.norm()), result.steps, plan


@pytest.mark.parametrize(
    "changes",
    [
        {"schedule": "constant"},
        {"schedule": "linear", "momentum": 0.9, "weight_decay": 0.05},
    ],
    ids=["plain-sgd", "momentum-decay-schedule"],
)
def test_the_noise_model_is_the_noise_fedllm_train_adds(changes):
    settings = Settings(
        trainable="lora",  # a plain module: no cached features
        optimizer="sgd",
        lr=0.5,
        sample_rate=0.5,
        max_steps=4,
        noise_multiplier=1.3,
        max_grad_norm=0.7,
        **changes,
    ).resolved()
    model = NoiseModel.of(settings, num_rounds=3)
    d = 64 * 8 + 8
    for server_round in (1, 3):
        norm, steps, plan = _pure_noise_update(settings, server_round, 3)
        gain = model.gain(steps, server_round)
        expected = gain * plan.noise_multiplier * settings.max_grad_norm * math.sqrt(d)
        expected /= plan.sample_rate * plan.public_n
        assert abs(norm / expected - 1) < 4 / math.sqrt(2 * d), (norm, expected)
    if changes["schedule"] == "constant":  # the closed form: lr √T
        assert model.gain(4, 2) == pytest.approx(0.5 * 2)


def _declared_std(metrics: dict, server_round: int) -> float:
    """The per-value noise a reply declaring ``metrics`` must carry in ``server_round``."""
    gain = NoiseModel.of(DP, ROUNDS).gain(int(metrics["steps"]), server_round)
    divisor = metrics["sample-rate"] * metrics["num-examples"]
    return gain * metrics["noise-multiplier"] * DP.max_grad_norm / divisor


def test_honest_updates_pass_and_noise_free_ones_are_too_clean():
    model, rng = NoiseModel.of(DP, ROUNDS), np.random.default_rng(0)
    d, metrics = 2000, dp_metrics(300)
    flagged = {"honest": 0, "noise-free": 0}
    total = 0
    for server_round in range(1, ROUNDS + 1):
        std = _declared_std(metrics, server_round)
        for _ in range(50):
            signal = rng.normal(size=d) * std * rng.uniform(0.0, 0.75)  # below 0.8 of the noise
            noise = rng.normal(size=d) * std
            total += 1
            for kind, update in (("honest", signal + noise), ("noise-free", signal)):
                verdict = too_clean(metrics, float(np.linalg.norm(update)), d, model, server_round, 0.8)
                flagged[kind] += verdict is not None
    assert flagged == {"honest": 0, "noise-free": total}


def test_what_a_dp_reply_must_declare_and_what_is_not_checked():
    model = NoiseModel.of(DP, ROUNDS)
    assert too_clean(dp_metrics(300, epsilon=math.inf), 0.0, 100, model, 1, 0.8) is None  # no DP claimed
    for bad in ({"noise-multiplier": 0.0}, {"sample-rate": 0.0}, {"steps": 0}):
        expected, reason = too_clean(dp_metrics(300, **bad), 5.0, 100, model, 1, 0.8)
        assert reason.startswith("claims DP") and "\n" not in reason
    adamw = NoiseModel.of(Settings(target_epsilon=8.0, optimizer="adamw").resolved(), ROUNDS)
    assert too_clean(dp_metrics(300), 0.0, 100, adamw, 1, 0.8) is None  # no additive noise to expect


def test_a_count_claimed_near_one_over_delta_buys_no_quieter_check():
    model, d = NoiseModel.of(DP, ROUNDS), 2000
    honest = dp_metrics(300)
    quiet = 0.3 * _declared_std(honest, 1) * math.sqrt(d)  # a noise-free update's norm
    inflated = dp_metrics(99_999)
    assert too_clean(inflated, quiet, d, model, 1, 0.8) is None  # taken at its word: passes
    cap = 600  # the round's weight cap: 2 x the median count
    expected, reason = too_clean(inflated, quiet, d, model, 1, 0.8, count_cap=cap)
    assert "n 600" in reason and quiet < 0.8 * expected


def test_when_most_replies_are_too_clean_the_model_is_wrong_and_nothing_is_left_out():
    model = NoiseModel.of(DP, ROUNDS)
    metrics = [dp_metrics(300)] * 3
    flagged, note = noise_check(metrics, [1, 2, 3], [0.0, 0.0, 1e9], 2000, model, 1, 0.8)
    assert flagged == [] and "2 of 3 replies too clean" in note
    flagged, note = noise_check(metrics, [1, 2, 3], [0.0, 1e9, 1e9], 2000, model, 1, 0.8)
    assert [f["node"] for f in flagged] == [1] and note == ""


def _dp_like(g: dict, metrics: dict, server_round: int, rng, noise: bool = True) -> dict:
    """The global plus a small shared signal plus (unless ``noise`` is off) the declared DP noise."""
    std = _declared_std(metrics, server_round)
    scale = std if noise else 0.0
    return {k: (v + 0.3 * std + scale * rng.normal(size=v.shape)).astype(np.float32) for k, v in g.items()}


@pytest.mark.usefixtures("server_identity")
def test_the_strategy_leaves_a_too_clean_reply_out_and_says_why():
    g, rng = global_adapter(), np.random.default_rng(1)
    counts = {1: 300, 2: 280, 3: 320, 4: 310, 9: 300}
    adapters = {n: _dp_like(g, dp_metrics(c), 1, rng, noise=n != 9) for n, c in counts.items()}
    strategy = AdapterFedAvg(robust=RobustSettings(), noise=NoiseModel.of(DP, ROUNDS))
    start_round(strategy, g, list(counts))
    arrays, _ = strategy.aggregate_train(1, [reply(n, a, dp_metrics(counts[n])) for n, a in adapters.items()])
    record = strategy.round_summary(1)
    assert [e["node"] for e in record["too-clean"]] == [9]
    assert "too clean for the DP it claims" in record["too-clean"][0]["reason"]
    assert record["train-replies"] == 5 and "9" not in record["direction-score"]
    total = sum(c for n, c in counts.items() if n != 9)
    mean = {k: sum(counts[n] * adapters[n][k] for n in (1, 2, 3, 4)) / total for k in g}
    assert all(np.allclose(as_dict(arrays)[k], mean[k], atol=1e-5) for k in g)
    assert update_norm(g, adapters[9]) < 0.8 * record["too-clean"][0]["expected"]
    # the benches' plain setting (and min-noise-ratio 0) checks nothing
    for settings in (RobustSettings().without_bounds(), RobustSettings(min_noise_ratio=0.0)):
        plain = AdapterFedAvg(robust=settings, noise=NoiseModel.of(DP, ROUNDS))
        start_round(plain, g, list(counts))
        plain.aggregate_train(1, [reply(n, a, dp_metrics(counts[n])) for n, a in adapters.items()])
        assert plain.round_summary(1)["too-clean"] == []


def _norm(arrays: dict) -> float:
    return math.sqrt(sum(float(np.sum(np.square(v))) for v in arrays.values()))


def _flip_round(g: dict, server_round: int, rng, noisy_attacker: bool) -> tuple[dict, dict]:
    """Four honest DP-like updates (their declared noise plus a shared signal of 0.2-0.9 × the
    noise's size per value) and site 9's: the shared signal flipped (beside its declared noise
    when ``noisy_attacker``) at 1.99 × the round's median update norm, just inside the old bound."""
    counts = {1: 300, 2: 260, 3: 340, 4: 310, 9: 300}
    shared = {k: rng.normal(size=v.shape) for k, v in g.items()}
    adapters = {}
    for node in (1, 2, 3, 4):
        std, lean = _declared_std(dp_metrics(counts[node]), server_round), rng.uniform(0.2, 0.9)
        adapters[node] = {k: v + std * (lean * shared[k] + rng.normal(size=v.shape)) for k, v in g.items()}
    target = 1.99 * float(np.median([*(update_norm(g, a) for a in adapters.values()), np.inf]))
    std = _declared_std(dp_metrics(counts[9]), server_round) if noisy_attacker else 0.0
    z = {k: std * rng.normal(size=v.shape) for k, v in g.items()}
    room = math.sqrt(max(target**2 - _norm(z) ** 2, 0.0)) / _norm(shared)
    update = {k: z[k] - room * shared[k] for k in g}
    adapters[9] = {k: v + target / _norm(update) * update[k] for k, v in g.items()}
    return {n: {k: v.astype(np.float32) for k, v in a.items()} for n, a in adapters.items()}, counts


@pytest.mark.usefixtures("server_identity")
def test_the_noise_bound_clips_a_flip_sent_just_under_twice_the_median_norm():
    g = {"head.weight": np.zeros((4, 480), np.float32), "head.bias": np.zeros(4, np.float32)}  # d 1,924
    rng, honest_clipped = np.random.default_rng(3), 0
    for noisy_attacker in (False, True):
        for server_round in range(1, ROUNDS + 1):
            adapters, counts = _flip_round(g, server_round, rng, noisy_attacker)
            replies = [reply(n, a, dp_metrics(counts[n])) for n, a in adapters.items()]
            for settings, bound_on in (
                (RobustSettings(), True),
                (RobustSettings(noise_bound_slack=0.0), False),
            ):
                strategy = AdapterFedAvg(robust=settings, noise=NoiseModel.of(DP, ROUNDS))
                start_round(strategy, g, list(counts), server_round)
                arrays, _ = strategy.aggregate_train(server_round, replies)
                record = strategy.round_summary(server_round)
                clipped = {c["node"]: c for c in record["clipped"]}
                assert record["too-clean"] == []  # it carries the noise's norm: only a bound can tell
                if not bound_on:  # 2 x the median norm alone lets it in, at full weight
                    assert clipped == {} and "noise-bounds" not in record
                    continue
                assert clipped[9]["bound"] < clipped[9]["norm"] < record["norm-bound"]  # under the old
                assert record["discounted"] == [9]
                honest_clipped += len(set(clipped) - {9})
                bounds = record["noise-bounds"]
                assert all(update_norm(g, adapters[n]) < bounds[str(n)] for n in (1, 2, 3, 4))
                honest = sum(counts[n] * (adapters[n]["head.bias"]) for n in (1, 2, 3, 4)) / 1210
                assert np.allclose(as_dict(arrays)["head.bias"], honest, atol=1e-5)
    assert honest_clipped == 0


@pytest.mark.usefixtures("server_identity")
def test_an_honest_site_a_little_over_its_noise_bound_is_cut_not_discounted():
    g = {"head.weight": np.zeros((4, 480), np.float32), "head.bias": np.zeros(4, np.float32)}
    rng = np.random.default_rng(5)
    shared = {k: rng.normal(size=v.shape) for k, v in g.items()}
    leans = {1: 0.3, 2: 0.4, 3: 0.5, 4: 0.45, 5: 1.3}  # site 5: a strong signal of its own data
    std = _declared_std(dp_metrics(300), 1)
    adapters = {
        n: {
            k: (v + std * (lean * shared[k] + rng.normal(size=v.shape))).astype(np.float32)
            for k, v in g.items()
        }
        for n, lean in leans.items()
    }
    strategy = AdapterFedAvg(robust=RobustSettings(), noise=NoiseModel.of(DP, ROUNDS))
    start_round(strategy, g, list(leans))
    strategy.aggregate_train(1, [reply(n, a, dp_metrics(300)) for n, a in adapters.items()])
    record = strategy.round_summary(1)
    (cut,) = record["clipped"]
    assert cut["node"] == 5 and cut["bound"] < cut["norm"] < NOISE_OVERSIZED * cut["bound"]
    assert cut["norm"] < record["norm-bound"] and record["discounted"] == []
