"""Secure aggregation (SecAgg+): the server learns the sum of the sites' updates and nothing else.

The real protocol runs end to end here: ``SecAggFedAvg`` (server/secagg_fedavg.py) on a grid
whose sites are the real site mod (clients/secagg.py) over a scripted train handler
(tests/secagg_sites.py), so keys, Shamir shares, encryption and masks are all real.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

from fedllm.config import Settings
from fedllm.contract import SecAggKey
from fedllm.secagg import (
    QUANT_RANGE,
    SecAggSettings,
    decode,
    encode,
    flatten,
    mask,
    modulus_bits,
    pack,
    packed_size,
    quantisation_bound,
    site_weight,
    unpack,
)
from server.robust import RobustSettings
from server.secagg_fedavg import SecAggFedAvg
from server.strategy import AdapterFedAvg

from .replies import (
    SHAPES,
    as_dict,
    global_adapter,
    reply,
    server_identity,  # noqa: F401 - the fixture below
    start_round,
)
from .secagg_sites import SecAggGrid

NODES = [11, 22, 33, 44, 55]
CLIP = 1.0
pytestmark = pytest.mark.usefixtures("server_identity")
RUN = {"aggregation": "secagg+", "secagg-clip": CLIP, "secagg-max-weight": 1000.0, "target-epsilon": "inf"}


def _updates(seed: int = 0) -> dict[int, dict]:
    rng = np.random.default_rng(seed)
    return {n: {k: (0.1 * rng.normal(size=s)).astype(np.float32) for k, s in SHAPES.items()} for n in NODES}


def _metrics(private: bool) -> dict[int, dict]:
    counts = dict(zip(NODES, [101, 202, 303, 404, 505], strict=True))
    if not private:
        return {n: {"num-examples": c, "steps": 3, "epsilon": math.inf} for n, c in counts.items()}
    return {
        n: {"num-examples": c, "steps": 3, "epsilon": 1.5 + i, "delta": 1e-5, "noise-multiplier": 2.0 + i}
        | {"sample-rate": 1.0, "update-bytes": 4096}
        for i, (n, c) in enumerate(counts.items())
    }


def _run(grid: SecAggGrid, glob: dict, run: dict = RUN) -> SecAggFedAvg:
    """One secure round through Flower's ``Strategy.start``."""
    strategy = SecAggFedAvg(
        SecAggSettings.from_run_config(run),
        Settings(target_epsilon=math.inf).resolved(),
        robust=RobustSettings.from_run_config({"aggregator": "fedavg"}),
        min_available_nodes=len(grid.updates),
        min_train_nodes=len(grid.updates),
        fraction_evaluate=0.0,
    )
    initial = ArrayRecord({k: Array(v) for k, v in glob.items()})
    strategy.start(grid, initial, num_rounds=1, train_config=ConfigRecord({"num-rounds": 1}))
    return strategy


def _weighted_mean(glob: dict, updates: dict, metrics: dict, nodes: list[int]) -> dict:
    weights = {n: site_weight(metrics[n]["num-examples"], RUN["secagg-max-weight"]) for n in nodes}
    total = sum(weights.values())
    return {k: glob[k] + sum(weights[n] * updates[n][k] for n in nodes) / total for k in glob}


def _bound(metrics: dict, nodes: list[int]) -> float:
    weight = sum(site_weight(metrics[n]["num-examples"], RUN["secagg-max-weight"]) for n in nodes)
    return quantisation_bound(len(nodes), CLIP, weight / QUANT_RANGE) + 1e-6  # + float32 rounding


def _max_error(a: dict, b: dict) -> float:
    return max(float(np.max(np.abs(np.float64(a[k]) - b[k]))) for k in a)


def test_the_secure_aggregate_is_plain_fedavg_within_the_quantisation_bound():
    """DP off, fixed seeds: secure FedAvg equals plain FedAvg (the project's strategy, weights
    n̂, no clipping or capping) of the same updates within K·2c/Q over the total weight."""
    np.random.seed(7)  # Flower's stochastic rounding draws from numpy's global generator
    glob, updates, metrics = global_adapter(), _updates(), _metrics(private=False)
    secure = as_dict(_run(SecAggGrid(updates, metrics, RUN), glob).global_arrays)

    plain = AdapterFedAvg(
        robust=RobustSettings.from_run_config(
            {"aggregator": "fedavg", "max-update-norm": 0, "max-site-weight": 0}
        )
    )
    start_round(plain, glob, NODES)
    sites = {n: {k: glob[k] + updates[n][k] for k in glob} for n in NODES}
    arrays, _ = plain.aggregate_train(1, [reply(n, sites[n], metrics[n]) for n in NODES])
    expected = as_dict(arrays)
    weight_error = max(1 / site_weight(m["num-examples"], 1000.0) for m in metrics.values())  # w rounding
    assert 0 < _max_error(secure, expected) <= _bound(metrics, NODES) + weight_error
    assert _max_error(secure, _weighted_mean(glob, updates, metrics, NODES)) <= _bound(metrics, NODES)


def test_a_recording_hook_sees_no_update_count_or_metric_of_a_single_site():
    glob, updates, metrics = global_adapter(), _updates(1), _metrics(private=True)
    grid = SecAggGrid(updates, metrics, RUN)
    strategy = _run(grid, glob)
    counts = {m["num-examples"] for m in metrics.values()}
    names = set(SHAPES)
    for node, stage, content in grid.recorded:
        assert not content.metric_records, f"{stage}: a metric record reached the server"
        for record in content.config_records.values():
            for key, value in record.items():
                values = value if isinstance(value, list) else [value]
                assert not any(isinstance(v, float) for v in values), f"{stage}: a number {key}"
                ints = {v for v in values if isinstance(v, int) and not isinstance(v, bool)}
                assert not ints & counts, f"{stage}: a count in {key}"
                assert not ints - set(NODES), f"{stage}: an integer other than a node id in {key}"
        for record in content.array_records.values():
            assert not set(record) & names
            packed = record["vector"].numpy()
            plain, _ = encode(flatten(updates[node], list(SHAPES)), metrics[node], CLIP, 1000.0)
            bits = modulus_bits(len(NODES))
            assert packed.dtype == np.uint8 and packed.size == packed_size(plain.size, bits) < 4 * plain.size
            # masked: the site's own (unmasked) encoding is nowhere near it
            assert np.mean(unpack(packed, plain.size, bits) == plain) < 0.01
    assert {stage for _, stage, _ in grid.recorded} == {"setup", "share-keys", "collect", "unmask"}
    record = strategy.round_summary(1)
    assert "sites" not in record and record["train-replies"] == 5
    train = record["train"]
    assert train["num-examples"] == sum(counts) and train["sites"] == 5
    assert train["epsilon-mean"] == pytest.approx(np.mean([m["epsilon"] for m in metrics.values()]), abs=1e-3)
    assert "epsilon-max" not in train  # a maximum over sites would need each site's value


def test_every_stage_message_and_answer_has_exactly_the_contracts_keys():
    K = SecAggKey
    sent = {
        "setup": {K.SITES, K.NUM_SHARES, K.THRESHOLD},
        "share-keys": {K.NIDS, K.PK1S, K.PK2S},
        "collect": {K.SRCS, K.CTXTS},
        "unmask": {K.ACTIVE, K.DEAD},
    }
    answered = {"setup": {K.PK1, K.PK2}, "share-keys": {K.DSTS, K.CTXTS}, "unmask": {K.NIDS, K.SHARES}}
    grid = SecAggGrid(_updates(), _metrics(private=True), RUN)
    _run(grid, global_adapter())
    assert {stage for stage, _ in grid.sent_keys} == set(K.STAGES)
    for stage, keys in grid.sent_keys:
        assert keys == {K.STAGE, K.ROUND} | sent[stage], stage
    for _, stage, content in grid.recorded:
        if stage == "collect":
            assert list(content.array_records) == [K.MASKED] and list(content[K.MASKED]) == [K.VECTOR]
        else:
            assert list(content.config_records) == [K.RECORD] and set(content[K.RECORD]) == answered[stage]
    assert {stage for _, stage, _ in grid.recorded} == set(K.STAGES)


@pytest.mark.parametrize("stage", ["collect", "unmask"])
def test_one_of_five_sites_dropping_completes_the_round_with_the_survivors_mean(stage):
    """Lost before its vector (collect): excluded, its pairwise masks rebuilt from key shares.
    Lost after it (unmask): its vector is in the sum, its private mask rebuilt from b-shares."""
    np.random.seed(3)
    glob, updates, metrics = global_adapter(), _updates(2), _metrics(private=False)
    grid = SecAggGrid(updates, metrics, RUN)
    grid.drop[NODES[2]] = stage
    strategy = _run(grid, glob)
    summed = [n for n in NODES if n != NODES[2]] if stage == "collect" else NODES
    result = as_dict(strategy.global_arrays)
    assert _max_error(result, _weighted_mean(glob, updates, metrics, summed)) <= _bound(metrics, summed)
    record = strategy.round_summary(1)
    assert record["secagg"]["masked"] == sorted(summed)
    assert record["secagg"]["recovered"] == ([NODES[2]] if stage == "collect" else [])


def test_a_site_whose_training_fails_drops_out_with_its_fixed_code():
    """The train handler's failure reaches the server as the code it always was (site-declined);
    the round goes on without that site, as for a site lost before masking."""
    np.random.seed(5)
    glob, updates, metrics = global_adapter(), _updates(6), _metrics(private=False)
    grid = SecAggGrid(updates, metrics, RUN)
    grid.fail.add(NODES[1])
    strategy = _run(grid, glob)
    survivors = [n for n in NODES if n != NODES[1]]
    result = as_dict(strategy.global_arrays)
    assert _max_error(result, _weighted_mean(glob, updates, metrics, survivors)) <= _bound(metrics, survivors)
    assert strategy.round_summary(1)["train-failures"] == [{"node": NODES[1], "reason": "site-declined"}]


@pytest.mark.parametrize("stage", ["setup", "share-keys", "collect", "unmask"])
def test_too_many_drops_abort_the_round_and_the_global_stays(stage):
    glob, updates, metrics = global_adapter(), _updates(3), _metrics(private=False)
    grid = SecAggGrid(updates, metrics, RUN)
    for node in NODES[:3]:  # 2 of 5 left: below the threshold 3 and below 3 sites
        grid.drop[node] = stage
    strategy = _run(grid, glob)
    assert _max_error(as_dict(strategy.global_arrays), glob) == 0
    assert "aborted" in strategy.round_summary(1)["global-unchanged"]


def test_a_round_of_two_sites_is_refused():
    glob = global_adapter()
    updates, metrics = _updates(), _metrics(private=False)
    two = SecAggGrid({n: updates[n] for n in NODES[:2]}, {n: metrics[n] for n in NODES[:2]}, RUN)
    strategy = _run(two, glob)
    assert _max_error(as_dict(strategy.global_arrays), glob) == 0
    assert "3..1023 sites" in strategy.round_summary(1)["global-unchanged"]
    assert not two.sent  # nothing was asked of the sites


def test_masks_from_seeds_x_y_and_y_x_differ():
    """Flower's PRG folds the seed to 32 bits by XOR: x‖y and y‖x collide. Ours reads it whole."""
    x, y = bytes(range(16)), bytes(range(100, 116))
    ours = mask(x + y, 1000), mask(y + x, 1000)
    assert not np.array_equal(*ours) and np.mean(ours[0] == ours[1]) < 0.01
    flowers = [pseudo_rand_gen(s, 2**32, [(1000,)])[0] for s in (x + y, y + x)]
    assert np.array_equal(*flowers)  # the weakness replaced (flwr issue #7522)
    assert np.array_equal(mask(x + y, 1000), mask(x + y, 1000))  # a function of the seed


def test_encoding_round_trips_and_checks_the_sum():
    rng = np.random.default_rng(0)
    deltas = [rng.uniform(-2, 2, size=50) for _ in range(3)]
    metrics = [{"num-examples": 100 * (i + 1), "steps": 2, "epsilon": 1.0} for i in range(3)]
    vectors = [encode(d, m, 1.0, 1000.0) for d, m in zip(deltas, metrics, strict=True)]
    assert vectors[0][1] == pytest.approx(np.mean(np.abs(deltas[0]) > 1.0))  # the clipped fraction
    total = sum(v for v, _ in vectors).astype(np.uint32)
    aggregate = decode(total, 3, 1.0)
    weights = [0.1, 0.2, 0.3]
    expected = sum(w * np.clip(d, -1, 1) for w, d in zip(weights, deltas, strict=True)) / sum(weights)
    assert np.max(np.abs(aggregate.mean_delta - expected)) <= quantisation_bound(3, 1.0, 0.6) + 1e-9
    assert aggregate.train_metrics()["num-examples"] == 600
    with pytest.raises(ValueError, match="counts 3 sites"):
        decode(total, 4, 1.0)
    with pytest.raises(ValueError, match="above K·Q"):
        decode(total + np.uint32(2**31), 3, 1.0)


def test_the_modulus_holds_every_honest_sum_and_packing_round_trips():
    """2^b > K·Q (every slot of K honest sites sums below it) and no smaller b would; a vector
    packed at b bits unpacks to itself; a stream of the wrong size is refused."""
    for sites in (1, 3, 5, 8, 1023):
        bits = modulus_bits(sites)
        assert sites * QUANT_RANGE < 2**bits and sites * QUANT_RANGE >= 2 ** (bits - 1)
    assert modulus_bits(5) == 25 and modulus_bits(1023) == 32
    values = np.random.default_rng(0).integers(0, 2**25, size=1933, dtype=np.uint32)
    packed = pack(values, 25)
    assert packed.size == (1933 * 25 + 7) // 8 and np.array_equal(unpack(packed, 1933, 25), values)
    with pytest.raises(ValueError, match="does not fit"):
        pack(np.array([2**25], dtype=np.uint32), 25)
    with pytest.raises(ValueError, match="uint8 bytes"):
        unpack(packed[:-1], 1933, 25)


def _unmask(node: int, active: list[int], dead: list[int]):
    body = {"stage": "unmask", "round": 1, "active": active, "dead": dead}
    return Message(RecordDict({"secagg": ConfigRecord(body)}), dst_node_id=node, message_type="train")


def test_a_site_refuses_to_unmask_when_active_and_dropped_lists_overlap():
    """Both shares of one site (its b and its mask key) would unmask its own vector."""
    glob, updates, metrics = global_adapter(), _updates(4), _metrics(private=True)
    grid = SecAggGrid(updates, metrics, RUN)
    strategy = SecAggFedAvg(SecAggSettings.from_run_config(RUN), Settings().resolved(), min_available_nodes=5)
    initial = ArrayRecord({k: Array(v) for k, v in glob.items()})
    grid.send_and_receive(strategy.configure_train(1, initial, ConfigRecord({"num-rounds": 1}), grid))
    node = NODES[0]
    [answer] = grid.send_and_receive([_unmask(node, NODES, [NODES[1]])])
    assert answer.has_error() and answer.error.reason == "site-refused-secagg"
    [answer] = grid.send_and_receive([_unmask(node, NODES[1:], [])])  # omits the site itself
    assert answer.has_error()
    [answer] = grid.send_and_receive([_unmask(node, NODES[:2], [])])  # below the threshold 3
    assert answer.has_error()
    [answer] = grid.send_and_receive([_unmask(node, NODES, [])])  # the honest request
    assert not answer.has_error() and len(answer.content["secagg"]["shares"]) == 5
    [again] = grid.send_and_receive([_unmask(node, NODES[:4], [NODES[4]])])  # once per round
    assert again.has_error() and again.error.reason == "site-refused-secagg"


def test_a_site_refuses_a_plain_train_message_or_a_small_round_under_secagg():
    glob, updates, metrics = global_adapter(), _updates(5), _metrics(private=True)
    grid = SecAggGrid(updates, metrics, RUN)
    arrays = ArrayRecord({k: Array(v) for k, v in glob.items()})
    plain = Message(
        RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}),
        dst_node_id=NODES[0],
        message_type="train",
    )
    [answer] = grid.send_and_receive([plain])
    assert answer.has_error() and answer.error.reason == "site-refused-secagg"
    setup = {"stage": "setup", "round": 1, "sites": 2, "num-shares": 2, "threshold": 2}
    small = Message(RecordDict({"secagg": ConfigRecord(setup)}), dst_node_id=NODES[0], message_type="train")
    [answer] = grid.send_and_receive([small])
    assert answer.has_error() and answer.error.reason == "site-refused-secagg"


def test_settings_clip_range_and_share_plan():
    default = SecAggSettings()
    assert not default.enabled and SecAggSettings.from_run_config({}) == default
    dp_head = Settings(target_epsilon=8.0).resolved()  # the DP head recipe: lr 10, C 1
    assert default.clip(dp_head) == 4 * 10.0 * 1.0
    assert default.clip(Settings(target_epsilon=math.inf).resolved()) == 1.0
    assert SecAggSettings(secagg_clip=0.5).clip(dp_head) == 0.5
    with pytest.raises(TypeError, match="resolved settings"):
        default.clip(Settings(target_epsilon=8.0))
    assert default.shares_and_threshold(5) == (5, 3)
    assert SecAggSettings(secagg_num_shares=4).shares_and_threshold(10) == (5, 3)  # odd ring
    assert SecAggSettings(secagg_threshold=1.0).shares_and_threshold(4) == (4, 4)
    assert SecAggSettings.from_run_config({"aggregation": " SecAgg+ "}).enabled
    with pytest.raises(
        ValueError, match=r"^run config: key 'aggregation' = 'secagg' .*'plain' or 'secagg\+'$"
    ):
        SecAggSettings.from_run_config({"aggregation": "secagg"})
    with pytest.raises(ValueError, match=r"^run config: key 'secagg-threshold' = 0.4 .*\[0.5, 1\]$"):
        SecAggSettings.from_run_config({"secagg-threshold": 0.4})
    with pytest.raises(ValueError, match=r"^run config: key 'secagg-num-shares' = 2 .*at least 3$"):
        SecAggSettings.from_run_config({"secagg-num-shares": 2})
    with pytest.raises(ValueError, match="aggregator='krum' needs each site's update"):
        SecAggFedAvg(
            SecAggSettings(aggregation="secagg+"), Settings().resolved(), RobustSettings(aggregator="krum")
        )


def test_the_clientapp_and_its_mods_import_no_torch():
    """Flower starts a ClientApp process for every message: the app and its mods (the SecAgg+
    stages setup, share-keys and unmask are answered there) import no torch, transformers, peft or
    Opacus, seconds each on a small CPU; a message that trains imports them (clients.handlers)."""
    heavy = ("torch", "transformers", "peft", "opacus")
    code = f"import sys, clients.app; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
