"""A real round's messages and run-log rows hold to fedllm/contract.py, key for key.

The real ServerApp ``main`` runs two rounds against a grid whose sites are the real ClientApp
(its mods included), called in this process as virtual sites: every config the server sends,
every reply a site sends and every ``metrics.jsonl`` row is compared with the keys the contract
declares. A key added on either side without declaring it (or a declared key no longer sent)
fails here.
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest
from flwr.app import Context, Message, RecordDict

from clients.app import app as client_app
from fedllm.contract import (
    DP_REPLY_KEYS,
    EPSILON_MAX,
    EPSILON_MEAN,
    EVALUATE_CONFIG_KEYS,
    EVALUATE_REPLY_KEYS,
    ROUND_RECORD_KEYS,
    ROW_KEYS,
    SCORE_KEYS,
    SITE_RECORD_KEYS,
    TRAIN_CONFIG_KEYS,
    TRAIN_REPLY_KEYS,
    VALIDATION_PREFIX,
    EvaluateMetrics,
    round_records,
)
from server.app import main

from .replies import delivered, reply, server_identity  # noqa: F401

pytestmark = pytest.mark.usefixtures("server_identity")

ROOT = Path(__file__).resolve().parent.parent
RUN_ID = 5
SITES = 3


class LoopbackGrid:
    """A Grid whose nodes are the real ClientApp in this process; it keeps every message."""

    def __init__(self, run_config: dict):
        self.contexts = {
            node: Context(
                run_id=RUN_ID,
                node_id=node,
                node_config={"partition-id": node - 1, "num-partitions": SITES},
                state=RecordDict(),
                run_config=run_config,
            )
            for node in range(1, SITES + 1)
        }
        self.sent: list[tuple[str, dict]] = []  # (message type, config)
        self.answered: list[tuple[str, dict]] = []  # (message type, reply metrics)

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages, timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            node, kind = msg.metadata.dst_node_id, msg.metadata.message_type
            self.sent.append((kind, dict(msg.content.config_records["config"])))
            answer = client_app(delivered(msg.content, kind, RUN_ID, node), self.contexts[node])
            assert not answer.has_error(), f"site {node} failed: {answer.error}"
            self.answered.append((kind, dict(answer.content.metric_records["metrics"])))
            replies.append(reply(node, {}, records=dict(answer.content.items())))
        return replies


def _run(tiny_checkpoint, tmp_path: Path, **extra) -> tuple[LoopbackGrid, list[dict]]:
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    config = {
        **table,
        "model": str(tiny_checkpoint),
        "max-length": 32,
        "max-steps": 1,
        "num-server-rounds": 2,
        "fraction-evaluate": 1.0,
        "sim-site-release-evaluation": True,
        "run-dir": str(tmp_path / "runs"),
        "run-name": "contract",
        **extra,
    }
    grid = LoopbackGrid(config)
    main(grid, Context(run_id=RUN_ID, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    return grid, round_records(tmp_path / "runs" / "contract")  # the run log, read as the benches read it


def _check_messages(grid: LoopbackGrid, train_keys: tuple[str, ...], evaluate_keys: tuple[str, ...]) -> None:
    """Every config sent and every reply has exactly the declared keys."""
    kinds = {kind.split(".")[0] for kind, _ in grid.sent}
    assert kinds == {"train", "evaluate"}, kinds
    for kind, config in grid.sent:
        declared = TRAIN_CONFIG_KEYS if kind.startswith("train") else EVALUATE_CONFIG_KEYS
        assert set(config) == set(declared), (kind, sorted(config))
    for kind, metrics in grid.answered:
        declared = train_keys if kind.startswith("train") else evaluate_keys
        assert set(metrics) == set(declared), (kind, sorted(metrics))
    assert len(grid.answered) == 2 * 2 * SITES  # 2 rounds x (train + evaluate) x every site


def _check_rows(rows: list[dict], site_keys: tuple[str, ...], reply_keys: tuple[str, ...]) -> None:
    """Every run-log row holds only declared keys and the ones every row has; every round's record
    names each site with the declared per-site keys and the server's declared scores."""
    assert [r["round"] for r in rows] == [0, 1, 2]
    scores = {*SCORE_KEYS, *(VALIDATION_PREFIX + k for k in SCORE_KEYS)}
    for row in rows:
        assert set(ROW_KEYS) <= set(row) <= set(ROUND_RECORD_KEYS), sorted(set(row) - set(ROUND_RECORD_KEYS))
        assert set(row["server"]) == scores
    for row in rows[1:]:
        assert row["train-failures"] == row["evaluate-failures"] == []
        assert "global-unchanged" not in row
        assert len(row["sites"]) == SITES
        assert all(set(site) == set(site_keys) for site in row["sites"].values())
        means = set(reply_keys) - {"epsilon", "num-examples"}  # num-examples: the weight
        assert set(row["train"]) == means | {EPSILON_MAX, EPSILON_MEAN}
        assert set(row["evaluate"]) <= set(EVALUATE_REPLY_KEYS)


def test_a_dp_round_sends_and_logs_only_the_declared_keys(tiny_checkpoint, tmp_path):
    # under DP the sites release the DP keys only (no train loss or time: not opted in)
    grid, rows = _run(tiny_checkpoint, tmp_path)
    required = tuple(EvaluateMetrics.__required_keys__)
    _check_messages(grid, DP_REPLY_KEYS, required)
    _check_rows(rows, SITE_RECORD_KEYS, DP_REPLY_KEYS)
    assert all(math.isfinite(float(s["epsilon"])) for r in rows[1:] for s in r["sites"].values())


@pytest.mark.slow
def test_a_round_without_dp_sends_every_declared_key(tiny_checkpoint, tmp_path):
    # without DP a site sends every train key; with imbalance its evaluation adds the personal scores
    extra = {"target-epsilon": math.inf, "sim-site-allow-no-dp": True, "imbalance": "logit-adjust"}
    grid, rows = _run(tiny_checkpoint, tmp_path, **extra)
    _check_messages(grid, TRAIN_REPLY_KEYS, EVALUATE_REPLY_KEYS)
    _check_rows(rows, SITE_RECORD_KEYS, TRAIN_REPLY_KEYS)
    assert all(s["epsilon"] == "inf" for r in rows[1:] for s in r["sites"].values())
