"""One deployed site driven through the real ClientApp: the server's message, the site's reply, its ledger.

Shared by the site-side tests (test_site_guarantee, test_imbalance, test_privacy_statement), with
the ``site`` and ``run_config`` fixtures of conftest.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Message, RecordDict

from clients.app import app
from fedllm.adapters import adapter_to_record
from fedllm.config import settings_from
from fedllm.contract import FEATURE_CENTER
from fedllm.model import build_model

from .conftest import COUNT_NOISE, LABELS, flower_context
from .replies import delivered

__all__ = ["COUNT_NOISE", "ask", "ledger_path", "message"]


def message(
    run_config: dict, kind: str = "train", server_round: int = 1, center: list[float] | None = None
) -> Message:
    """What the server sends: its starting adapter and the round's config (with ``center``, the
    feature centre of ``center-features``), as delivered."""
    model = build_model(settings_from(run_config).resolved(), LABELS, torch.device("cpu"))
    arrays = adapter_to_record(model)
    config = ConfigRecord({"labels": json.dumps(LABELS), "num-rounds": 1, "server-round": server_round})
    if center is not None:
        config[FEATURE_CENTER] = center
    return delivered(RecordDict({"arrays": arrays, "config": config}), kind)


def ask(node_config: dict, run_config: dict, run_id: int = 1, kind: str = "train", context=None) -> Message:
    """The site's reply to one message of ``kind`` (a fresh Context unless one is given)."""
    return app(message(run_config, kind), context or flower_context(node_config, run_config, run_id))


def ledger_path(site: dict) -> Path:
    """The site's privacy ledger."""
    return Path(site["state-dir"]) / "privacy_ledger.json"
