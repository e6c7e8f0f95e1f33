"""fedllm ClientApp: fine-tune the global LoRA adapter on this site's data with DP-SGD.

The site's data comes from its node config: ``data-file`` (plus ``text-column`` /
``label-column`` / ``test-fraction``) and ``state-dir`` in deployment, or ``partition-id`` /
``num-partitions`` in simulation. The site's policy (``clients.policy``) is checked before any
step: its lifetime ε cap over every run in its ledger, its δ cap, DP required unless it opts
out. Under DP only the adapter and the privacy numbers leave; failures reach the server as
fixed codes. The site's privacy state lives in its ledger (``<state-dir>/privacy_ledger.json``)
and, within a run, in ``context.state``, both under the run key the server sends (``run-key``,
stable when a crashed run is resumed; Flower's run id from a server that sends none).

A round this site already trained, asked again with the same global adapter (a resumed run),
is answered with the reply it kept (``clients.replay``): no step, no new ε.
"""

from __future__ import annotations

import json
import math
import time
from functools import lru_cache
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.bookkeeping import book_releases, site_state_dir
from clients.policy import SitePolicy, failures_as_codes, is_virtual_site, site_secret
from clients.replay import KeptReply, ReplyStore, arrays_digest, run_key
from fedllm.adapters import adapter_from_record, adapter_to_record
from fedllm.config import Settings, settings_from
from fedllm.data import SiteData, load_site_file, loss_weights, partition_sites, tokenize
from fedllm.ledger import LedgerError, PrivacyLedger, fingerprint_file, statement
from fedllm.model import build_model, load_tokenizer, pick_device
from fedllm.privacy import epsilon_for, plan_privacy
from fedllm.shards import ShardSettings
from fedllm.train import evaluate, train_local

app = ClientApp(mods=[failures_as_codes, book_releases])
STATE_KEY = "fedllm-privacy"
LEDGER_NAME = "privacy_ledger.json"


def _labels(msg: Message) -> list[str]:
    return json.loads(str(msg.content["config"]["labels"]))


@lru_cache(maxsize=2)
def _simulated_sites(run_items: tuple, labels: tuple, num_partitions: int) -> list[SiteData]:
    """All virtual sites of a run, computed once per process (tables only, no models)."""
    run = dict(run_items)
    shards = ShardSettings.from_run_config(run)
    return partition_sites(
        settings_from(run),
        list(labels),
        num_partitions,
        shards.partitioning,
        shards.dirichlet_alpha,
        shards.partition_column,
    )


def _state_dir(context: Context) -> Path:
    """A real site's state folder (its ledger and secret): initialised and absolute, or refused."""
    return site_state_dir(context)


def _site_data(context: Context, settings: Settings, labels: list[str]) -> SiteData:
    """This site's data: its own file split by its own secret (deployment), or its partition."""
    node, run = context.node_config, context.run_config
    if not is_virtual_site(context):
        own = settings.replace(test_fraction=float(node.get("test-fraction", Settings.test_fraction)))
        return load_site_file(
            node["data-file"],
            str(node.get("text-column", settings.text_column)),
            str(node.get("label-column", settings.label_column)),
            labels,
            own,
            site_secret(_state_dir(context)),
        )
    sites = _simulated_sites(tuple(sorted(run.items())), tuple(labels), int(node["num-partitions"]))
    return sites[int(node["partition-id"])]


def _setup(msg: Message, context: Context, settings: Settings):
    """Label names, this site's data and the model with the global adapter loaded."""
    labels = json.loads(str(msg.content["config"]["labels"]))
    site = _site_data(context, settings, labels)
    model = build_model(settings, labels, pick_device(settings.device))
    adapter_from_record(model, msg.content["arrays"])
    return labels, site, model


def _ledger(context: Context) -> PrivacyLedger | None:
    """A real site's ledger; a virtual site keeps its history in ``context.state`` only."""
    return None if is_virtual_site(context) else PrivacyLedger(_state_dir(context) / LEDGER_NAME)


def _histories(context: Context, ledger: PrivacyLedger | None, key: str) -> tuple[list, list, int]:
    """(every other run's history, this run's history, number of other runs) from the books.

    ``key`` is the run key (``clients.replay.run_key``). Refuses to train when ``context.state``
    shows spend under this key that the ledger lost.
    """
    state = context.state.config_records.get(STATE_KEY)
    in_state = json.loads(str(state["history"])) if state and state.get("run-key", key) == key else []
    if ledger is None:
        return [], in_state, 0
    runs = ledger.runs
    this_run = [list(h) for h in runs.get(key, {}).get("history", [])]
    if sum(int(h[2]) for h in in_state) > sum(int(h[2]) for h in this_run):
        raise LedgerError(
            f"{ledger.path}: this run already spent privacy that the ledger no longer holds (deleted or "
            "reset?); restore it from its .bak backup before this site trains again"
        )
    others = [run for name, run in runs.items() if name != key]
    return [list(h) for run in others for h in run["history"]], this_run, len(others)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round at this site: check its policy, DP-train locally, send the adapter back.

    The run key's lock is held from the first look at the books to the kept reply, so two
    messages of one run key (a dead run's last message, delivered after a SuperLink restart, and
    the resumed run's) are handled one after the other: the second replays the first's reply.
    """
    start = time.perf_counter()
    policy = SitePolicy.from_context(context)
    key = run_key(msg, context)
    ledger = _ledger(context)
    store = ReplyStore(context, None if ledger is None else ledger.path.parent)
    with store.exclusive(key):
        return _train_round(msg, context, policy, key, ledger, store, start)


def _train_round(
    msg: Message,
    context: Context,
    policy: SitePolicy,
    key: str,
    ledger: PrivacyLedger | None,
    store: ReplyStore,
    start: float,
) -> Message:
    """``train``'s work, under the run key's lock: replay a kept reply, or check, train and record."""
    rounds = int(msg.content["config"]["num-rounds"])
    server_round = int(msg.content["config"]["server-round"])
    digest = arrays_digest(msg.content["arrays"])
    kept = store.load(key)
    settings = settings_from(context.run_config)
    if kept is not None and kept.answers(key, server_round, digest):
        _histories(context, ledger, key)  # a ledger that lost this run's spend still refuses
        print(
            f"[site {context.node_id}] round {server_round} of run {key}: already trained on this "
            "global adapter; the kept reply is sent again (no step, no new epsilon)"
        )
        metrics = MetricRecord(policy.reply_metrics(kept.metrics, private=settings.private))
        return Message(RecordDict({"arrays": kept.arrays, "metrics": metrics}), reply_to=msg)
    labels, site, model = _setup(msg, context, settings)
    tokenizer = load_tokenizer(settings.model)
    train_ds = tokenize(site.train, tokenizer, labels, settings.max_length, settings.truncation)
    plan = None
    if settings.private:  # the noisy coordinates bound the steps worth taking (max-step-noise)
        dimension = model.get_nb_trainable_parameters()[0]
        plan = plan_privacy(settings, len(train_ds), rounds, dimension=dimension)
    past, this_run, other_runs = _histories(context, ledger, key)
    # before any step: the site's limits win
    policy.check_train(plan, past, this_run, next_steps=plan.local_steps if plan else 0)
    result = train_local(
        model,
        train_ds,
        settings,
        plan=plan,
        history=this_run,
        class_weight=loss_weights(settings, site.train, labels),
        seed_offset=server_round,
        round_of=(server_round, rounds),
    )
    if plan is not None:
        context.state[STATE_KEY] = ConfigRecord({"run-key": key, "history": json.dumps(result.history)})
        if ledger is not None:
            lifetime = epsilon_for([*past, *result.history], policy.max_delta, policy.accountant)
            lifetime_text = statement(
                lifetime, policy.max_delta, other_runs + 1, policy.accountant, policy.not_covered()
            )
            ledger.record(
                key,
                result.history,
                plan.to_dict(),
                result.epsilon,
                round=server_round,
                num_rounds=rounds,
                data_fingerprint=fingerprint_file(context.node_config["data-file"]),
                not_covered=policy.not_covered(),
                statement=lifetime_text,
            )
            print(f"[site {context.node_id}] {lifetime_text}")
    reply_arrays = adapter_to_record(model)
    metrics = {
        "num-examples": len(train_ds),
        "train-loss": float(result.mean_loss),
        "steps": int(result.steps),
        "epsilon": float(result.epsilon) if plan else math.inf,
        "delta": float(plan.delta) if plan else 0.0,
        "noise-multiplier": float(result.noise_multiplier),
        "sample-rate": float(plan.sample_rate) if plan else 1.0,
        "update-bytes": reply_arrays.count_bytes(),
        "train-seconds": float(time.perf_counter() - start),
    }
    eps = f"epsilon so far {result.epsilon:.3f} (delta {plan.delta:g})" if plan else "no DP"
    print(
        f"[site {context.node_id}] round {server_round}: "
        f"{result.steps} steps on {len(train_ds)} texts, loss {result.mean_loss:.4f}, {eps}"
    )
    reply = MetricRecord(policy.reply_metrics(metrics, private=plan is not None))
    store.keep(KeptReply(key, server_round, digest, reply_arrays, dict(reply)))  # after the ledger
    return Message(RecordDict({"arrays": reply_arrays, "metrics": reply}), reply_to=msg)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """Score the global adapter on this site's local test split, if the site releases that."""
    settings = settings_from(context.run_config)
    SitePolicy.from_context(context).check_evaluate(settings.private)
    labels, site, model = _setup(msg, context, settings)
    test_ds = tokenize(
        site.test, load_tokenizer(settings.model), labels, settings.max_length, settings.truncation
    )
    scores = evaluate(model, test_ds, labels, head_only=settings.resolved().trainable == "head")
    metrics = {
        "num-examples": int(scores["num_examples"]),
        "loss": float(scores["loss"]),
        "accuracy": float(scores["accuracy"]),
        "macro-f1": float(scores["macro_f1"]),
    }
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
