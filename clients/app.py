"""fedllm ClientApp: fine-tune the global LoRA adapter on this site's data with DP-SGD.

The site's data comes from its node config: ``data-file`` (plus ``text-column`` /
``label-column``) in deployment, or ``partition-id`` / ``num-partitions`` in simulation. The
site's privacy state (its accountant history) lives in ``context.state`` and, when the node
config names a ``state-dir``, in a ledger file on the site's own disk; only epsilon leaves.
"""

from __future__ import annotations

import json
import logging
import math
import time
from functools import lru_cache
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedllm.adapters import adapter_state, nbytes, set_adapter_arrays
from fedllm.config import settings_from
from fedllm.data import SiteData, load_site_file, loss_weights, partition_sites, tokenize
from fedllm.model import build_model, load_tokenizer, pick_device
from fedllm.privacy import BudgetExhaustedError, PrivacyLedger, PrivacyPlan, plan_privacy
from fedllm.train import evaluate, train_local

app = ClientApp()
log = logging.getLogger("fedllm.client")
STATE_KEY = "fedllm-privacy"


def _labels(msg: Message) -> list[str]:
    return json.loads(str(msg.content["config"]["labels"]))


@lru_cache(maxsize=2)
def _simulated_sites(run_items: tuple, labels: tuple, num_partitions: int) -> list[SiteData]:
    """All virtual sites of a run, computed once per process (tables only, no models)."""
    run = dict(run_items)
    return partition_sites(
        settings_from(run),
        list(labels),
        num_partitions,
        str(run.get("partitioning", "iid")),
        float(run.get("dirichlet-alpha", 1.0)),
        str(run.get("partition-column", "")),
    )


def _site_data(context: Context, labels: list[str]) -> SiteData:
    """This site's data: its own file (deployment) or its partition (simulation)."""
    node, run = context.node_config, context.run_config
    settings = settings_from(run)
    if "data-file" in node:
        return load_site_file(
            node["data-file"],
            str(node.get("text-column", settings.text_column)),
            str(node.get("label-column", settings.label_column)),
            labels,
            settings,
        )
    sites = _simulated_sites(tuple(sorted(run.items())), tuple(labels), int(node["num-partitions"]))
    return sites[int(node["partition-id"])]


def _setup(msg: Message, context: Context):
    """Settings, label names, this site's data and the model with the global adapter loaded."""
    settings = settings_from(context.run_config)
    labels = _labels(msg)
    site = _site_data(context, labels)
    model = build_model(settings, labels, pick_device(settings.device))
    arrays = msg.content["arrays"]
    set_adapter_arrays(model, dict(zip(arrays.keys(), arrays.to_numpy_ndarrays(), strict=True)))
    return settings, labels, site, model


def _ledger(context: Context) -> PrivacyLedger | None:
    state_dir = context.node_config.get("state-dir")
    return PrivacyLedger(Path(str(state_dir)) / "privacy_ledger.json") if state_dir else None


def _history(context: Context, ledger: PrivacyLedger | None) -> list:
    """This site's accountant history for this run: the disk ledger if any, else context.state."""
    if ledger is not None:
        return ledger.history(str(context.run_id))
    if STATE_KEY in context.state:
        return json.loads(str(context.state[STATE_KEY]["history"]))
    return []


def check_site_policy(context: Context, plan: PrivacyPlan | None) -> None:
    """Enforce the site's own cap (node config ``max-epsilon``), whatever the run config asks."""
    cap = context.node_config.get("max-epsilon")
    if cap is None:
        return
    if plan is None:
        raise BudgetExhaustedError(f"this site requires DP (max-epsilon={cap}); the run asks for none")
    if plan.target_epsilon > float(cap) * (1 + 1e-9):
        raise BudgetExhaustedError(
            f"the run targets epsilon={plan.target_epsilon:g} but this site allows at most {cap}"
        )


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round at this site: load the global adapter, DP-train locally, send the adapter back."""
    start = time.perf_counter()
    settings, labels, site, model = _setup(msg, context)
    tokenizer = load_tokenizer(settings.model)
    train_ds = tokenize(site.train, tokenizer, labels, settings.max_length, settings.truncation)
    rounds = int(msg.content["config"]["num-rounds"])
    server_round = int(msg.content["config"]["server-round"])
    plan = plan_privacy(settings, len(train_ds), planned_rounds=rounds) if settings.private else None
    check_site_policy(context, plan)
    ledger = _ledger(context)
    result = train_local(
        model,
        train_ds,
        settings,
        plan=plan,
        history=_history(context, ledger),
        class_weight=loss_weights(settings, site.train, labels),
        seed_offset=server_round,
        round_of=(server_round, rounds),
    )
    if plan is not None:
        context.state[STATE_KEY] = ConfigRecord({"history": json.dumps(result.history)})
        if ledger is not None:
            ledger.record(
                str(context.run_id),
                result.history,
                plan,
                result.epsilon,
                round=server_round,
                source=site.source,
            )
    state = adapter_state(model)
    reply_arrays = ArrayRecord({k: v.detach().cpu() for k, v in state.items()})
    metrics = {
        "num-examples": len(train_ds),
        "train-loss": float(result.mean_loss),
        "steps": int(result.steps),
        "epsilon": float(result.epsilon) if plan else math.inf,
        "delta": float(plan.delta) if plan else 0.0,
        "noise-multiplier": float(result.noise_multiplier),
        "sample-rate": float(plan.sample_rate) if plan else 1.0,
        "update-bytes": nbytes(reply_arrays.to_numpy_ndarrays()),
        "train-seconds": float(time.perf_counter() - start),
    }
    eps = f"epsilon so far {result.epsilon:.3f} (delta {plan.delta:g})" if plan else "no DP"
    print(
        f"[site {context.node_id}] round {server_round}: "
        f"{result.steps} steps on {len(train_ds)} texts, loss {result.mean_loss:.4f}, {eps}"
    )
    return Message(RecordDict({"arrays": reply_arrays, "metrics": MetricRecord(metrics)}), reply_to=msg)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """Score the global adapter on this site's local test split."""
    settings, labels, site, model = _setup(msg, context)
    test_ds = tokenize(
        site.test, load_tokenizer(settings.model), labels, settings.max_length, settings.truncation
    )
    scores = evaluate(model, test_ds, labels)
    metrics = {
        "num-examples": int(scores["num_examples"]),
        "loss": float(scores["loss"]),
        "accuracy": float(scores["accuracy"]),
        "macro-f1": float(scores["macro_f1"]),
    }
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
