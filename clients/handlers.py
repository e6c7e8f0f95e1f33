"""What a site does with a train or an evaluate message: the ClientApp's work (``clients.app``).

``train``: check the site's policy, book the spend, DP-train on the site's data, reply with the
adapter and the privacy numbers; a round already trained on the same global adapter (a resumed
run) is answered with the kept reply (``clients.replay``). ``evaluate_global``: score the global
adapter on the site's own test split, where the site releases that. ``clients.app`` imports this
module with the first message that needs it: torch, transformers and peft are imported here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from flwr.app import Context, Message, MetricRecord, RecordDict
from peft import PeftModel
from torch.utils.data import TensorDataset

from clients.bookkeeping import site_state_dir
from clients.books import RunBooks, SiteBooks
from clients.policy import SitePolicy, SitePolicyError, is_virtual_site, site_secret
from clients.replay import KeptReply, ReplyStore, arrays_digest, run_key
from fedllm.accounting import (
    PrivacyPlan,
    count_entry,
    epsilon_for,
    plan_privacy,
    private_count,
    resolve_delta,
)
from fedllm.adapters import adapter_from_record, adapter_to_record
from fedllm.config import ResolvedSettings, Settings, settings_from
from fedllm.contract import EvaluateMetrics, RoundConfig, metric_values
from fedllm.data import SiteData, load_site_file, loss_weights, partition_sites, tokenize
from fedllm.files import fingerprint_file
from fedllm.imbalance import (
    exact_histogram,
    histogram_count,
    label_ids,
    personalized_offset,
    private_histogram,
)
from fedllm.ledger import PrivacyLedger
from fedllm.model import build_model, load_tokenizer, pick_device, set_feature_center
from fedllm.shards import ShardSettings
from fedllm.site_round import train_metrics, train_site_round
from fedllm.site_state import LEDGER
from fedllm.statement import lifetime_statement, statement
from fedllm.train import TrainResult, evaluate


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
            str(node["data-file"]),
            str(node.get("text-column", settings.text_column)),
            str(node.get("label-column", settings.label_column)),
            labels,
            own,
            site_secret(_state_dir(context)),
        )
    sites = _simulated_sites(tuple(sorted(run.items())), tuple(labels), int(node["num-partitions"]))
    return sites[int(node["partition-id"])]


def _setup(
    msg: Message, context: Context, settings: ResolvedSettings, labels: list[str]
) -> tuple[SiteData, PeftModel]:
    """This site's data and the model with the global adapter loaded, its head's input centred
    where the run config asks for it (``center-features``: the centre the server sent). The model
    and what the server sent are checked before the data is read: a refusal there depends on the
    message and the model only, in what it says and in when it comes."""
    center = RoundConfig.read(msg.content.config_records["config"], train=False).center_for(settings)
    model = build_model(settings, labels, pick_device(settings.device))
    set_feature_center(model, center)  # checked against the model, before the data is read
    adapter_from_record(model, msg.content.array_records["arrays"])
    site = _site_data(context, settings, labels)
    return site, model


def _ledger(context: Context) -> PrivacyLedger | None:
    """A real site's ledger; a virtual site keeps its history in ``context.state`` only."""
    return None if is_virtual_site(context) else PrivacyLedger(_state_dir(context) / LEDGER)


def train(msg: Message, context: Context) -> Message:
    """One round at this site: check its policy, book the spend, DP-train locally, reply.

    The run key's lock is held from the first look at the books to the kept reply, so two
    messages of one run key (a dead run's last message, delivered after a SuperLink restart, and
    the resumed run's) are handled one after the other: the second replays the first's reply.
    Different run keys share the site-wide budget lock while they check and book (``clients.books``).
    """
    start = time.perf_counter()
    policy = SitePolicy.from_context(context)
    key = run_key(msg, context)
    ledger = _ledger(context)
    store = ReplyStore(context, None if ledger is None else ledger.path.parent)
    with store.exclusive(key):
        return _train_round(msg, context, policy, SiteBooks(context, ledger, key), store, start)


def _replay(msg: Message, context: Context, kept: KeptReply, books: SiteBooks, private: bool) -> Message:
    """The reply this site kept for this round and global adapter: no step, no new ε."""
    books.this_run()  # a ledger that lost this run's spend still refuses
    print(
        f"[site {context.node_id}] round {kept.server_round} of run {books.key}: already trained on "
        "this global adapter; the kept reply is sent again (no step, no new epsilon)"
    )
    metrics = MetricRecord(SitePolicy.from_context(context).reply_metrics(kept.metrics, private=private))
    return Message(RecordDict({"arrays": kept.arrays, "metrics": metrics}), reply_to=msg)


def _book_round(
    context: Context,
    settings: ResolvedSettings,
    policy: SitePolicy,
    books: SiteBooks,
    train_ds,
    rounds: tuple[int, int],
    shape: tuple[int, int],
) -> tuple[PrivacyPlan, list, list | None]:
    """Under the budget lock: n̂, the plan from it, the lifetime check, and the booking of the
    count, this round's steps and the rest of the plan (reserved) — before any noise is drawn.

    ``rounds``: (this round, the run's rounds); ``shape``: (trainable parameters, classes).
    Returns the plan, the history *before* this round's steps (the accountant books those) and
    the run's DP label histogram (None without ``imbalance``).
    """
    server_round, num_rounds = rounds
    dimension, num_classes = shape
    run = books.this_run()
    fresh = run.public_n is None
    if fresh:
        run = _draw_count(settings, books, run, train_ds, num_classes)
    public_n = run.public_n
    assert public_n is not None  # the run's count: drawn above if it was not booked yet
    plan = plan_privacy(
        settings, public_n, num_rounds, dimension, count_noise=settings.count_noise, count_draws=run.draws
    )
    this_round = [plan.noise_multiplier, plan.sample_rate, plan.local_steps]
    done = sum(int(h[2]) for h in run.history) - run.draws  # each count draw is one entry of one "step"
    rest = max(plan.planned_steps - done - plan.local_steps, 0)
    reserved = [[plan.noise_multiplier, plan.sample_rate, rest]] if rest else []
    try:
        policy.check_count(plan.delta, public_n)
        policy.check_lifetime([*books.others(), *run.history, this_round, *reserved])
    except SitePolicyError:  # the refusal answers a question about n̂: a fresh count is booked
        if fresh:
            spent = epsilon_for(run.history, plan.delta, plan.accountant)
            books.book(RunBooks(run.history, run.public_n, [], run.histogram, run.draws), plan, spent)
        raise
    booked = RunBooks([*run.history, this_round], run.public_n, reserved, run.histogram, run.draws)
    lifetime = epsilon_for([*books.spent_by_others(), *booked.history], policy.max_delta, policy.accountant)
    gaps = policy.not_covered()
    books.book(
        booked,
        plan,
        epsilon_for(booked.history, plan.delta, plan.accountant),
        round=server_round,
        num_rounds=num_rounds,
        data_fingerprint=fingerprint_file(str(context.node_config["data-file"])) if books.ledger else "",
        not_covered=gaps,
        statement=statement(lifetime, policy.max_delta, books.other_runs() + 1, policy.accountant, gaps),
    )
    if books.ledger is not None:  # the whole ledger's statement: a no-DP release reads ε = ∞ here too
        text = lifetime_statement(books.ledger, policy.max_delta, policy.accountant, gaps)
        print(f"[site {context.node_id}] {text}")
    return plan, run.history, run.histogram


def _draw_count(settings: Settings, books: SiteBooks, run: RunBooks, train_ds, num_classes: int) -> RunBooks:
    """The run's DP count n̂, or with ``imbalance`` its DP label histogram (n̂ its rounded sum):
    the entry ``[σ_n, 1, 1]`` is booked durably first, then the noise drawn. A draw that fails
    stays booked; a later round books and draws again (``draws`` counts them)."""
    draws = run.draws if run.history else 0  # a run's history before its first count is empty
    history = [*run.history, count_entry(settings.count_noise)]
    pending = PrivacyPlan(0.0, 1.0, resolve_delta(settings), 0, settings.target_epsilon, settings.accountant)
    pending.count_noise = settings.count_noise
    spent = epsilon_for(history, pending.delta, pending.accountant)
    books.book(RunBooks(history, None, [], None, draws + 1), pending, spent)
    labels = train_ds.tensors[-1].numpy()
    if settings.imbalance == "none":
        return RunBooks(history, private_count(len(train_ds), settings.count_noise), [], None, draws + 1)
    ids = np.where(labels < 0, num_classes, labels)  # unlisted labels: the last bin
    histogram = private_histogram(ids, num_classes, settings.count_noise)
    return RunBooks(history, histogram_count(histogram), [], histogram, draws + 1)


@dataclass
class _SiteRound:
    """A round at this site once checked and booked: its data, model, plan and books."""

    rounds: tuple[int, int]  # (this round, the run's rounds)
    labels: list[str]
    site: SiteData
    model: PeftModel  # the global adapter loaded
    train_ds: TensorDataset
    plan: PrivacyPlan | None = None  # None without DP
    history: list = field(default_factory=list)  # the accountant's history before this round
    histogram: list | None = None  # the run's label histogram (DP under DP), None without imbalance


def _train_round(
    msg: Message, context: Context, policy: SitePolicy, books: SiteBooks, store: ReplyStore, start: float
) -> Message:
    """``train``'s work, under the run key's lock: replay a kept reply, or check, book, train, reply."""
    config = RoundConfig.read(msg.content.config_records["config"])
    digest = arrays_digest(msg.content.array_records["arrays"])
    settings = settings_from(context.run_config, source="run config").resolved()  # once, here
    kept = store.load(books.key)
    if kept is not None and kept.answers(books.key, config.server_round, digest):
        return _replay(msg, context, kept, books, settings.private)
    policy.check_run(settings)  # public: before anything reads the data
    work = _check_and_book(msg, context, settings, policy, books, config)
    result = train_site_round(
        work.model,
        work.train_ds,
        settings,
        work.rounds,
        plan=work.plan,
        history=work.history,
        histogram=work.histogram,
        num_classes=len(work.labels),
        class_weight=loss_weights(settings, work.site.train, work.labels),
    )
    reply_arrays = adapter_to_record(work.model)
    seconds = time.perf_counter() - start
    metrics = train_metrics(result, work.plan, len(work.train_ds), reply_arrays.count_bytes(), seconds)
    _print_round(context, work, result)
    reply = MetricRecord(policy.reply_metrics(dict(metrics), private=work.plan is not None))
    store.keep(KeptReply(books.key, config.server_round, digest, reply_arrays, dict(reply)))  # booked
    return Message(RecordDict({"arrays": reply_arrays, "metrics": reply}), reply_to=msg)


def _check_and_book(
    msg: Message,
    context: Context,
    settings: ResolvedSettings,
    policy: SitePolicy,
    books: SiteBooks,
    config: RoundConfig,
) -> _SiteRound:
    """Under the budget lock: the DP count's lifetime check (public), then the data and model, and
    under DP the round booked (``_book_round``) before any noise is drawn."""
    rounds = (config.server_round, config.num_rounds)
    with books.locked():
        run = books.this_run()
        if settings.private and run.public_n is None:  # public: the ledger and σ_n
            due = [*books.others(), *run.history, count_entry(settings.count_noise)]
            policy.check_lifetime(due, "the run's DP count")
        site, model = _setup(msg, context, settings, config.labels)
        train_ds = tokenize(
            site.train,
            load_tokenizer(settings.model),
            config.labels,
            settings.max_length,
            settings.truncation,
        )
        work = _SiteRound(rounds, config.labels, site, model, train_ds)
        if settings.private:
            shape = (model.get_nb_trainable_parameters()[0], len(config.labels))
            work.plan, work.history, work.histogram = _book_round(
                context, settings, policy, books, train_ds, rounds, shape
            )
        elif settings.imbalance != "none":  # without DP the exact counts: nothing is released
            work.histogram = exact_histogram(label_ids(site.train, config.labels), len(config.labels))
    return work


def _print_round(context: Context, work: _SiteRound, result: TrainResult) -> None:
    """The site's own log line for a trained round."""
    plan = work.plan
    eps = (
        f"epsilon so far {result.epsilon:.3f} (delta {plan.delta:g}, n̂ {plan.public_n})" if plan else "no DP"
    )
    print(
        f"[site {context.node_id}] round {work.rounds[0]}: "
        f"{result.steps} steps on {len(work.train_ds)} texts, loss {result.mean_loss:.4f}, {eps}"
    )


def evaluate_global(msg: Message, context: Context) -> Message:
    """Score the global adapter on this site's local test split, if the site releases that."""
    settings = settings_from(context.run_config, source="run config").resolved()  # once, here
    SitePolicy.from_context(context).check_evaluate(settings.private)
    labels = RoundConfig.read(msg.content.config_records["config"], train=False).labels
    site, model = _setup(msg, context, settings, labels)
    test_ds = tokenize(
        site.test, load_tokenizer(settings.model), labels, settings.max_length, settings.truncation
    )
    head_only = settings.trainable == "head"
    scores = evaluate(model, test_ds, labels, head_only=head_only)
    metrics: EvaluateMetrics = {
        "num-examples": int(scores["num_examples"]),
        "loss": float(scores["loss"]),
        "accuracy": float(scores["accuracy"]),
        "macro-f1": float(scores["macro_f1"]),
    }
    if settings.imbalance != "none":  # personalized: the global logits plus the site's own DP prior
        histogram = SiteBooks(context, _ledger(context), run_key(msg, context)).this_run().histogram
        own = scores  # a site that has not trained in this run has no prior: its global prediction
        if histogram is not None:
            offset = personalized_offset(histogram, len(labels), settings.imbalance_tau)
            own = evaluate(model, test_ds, labels, head_only=head_only, logit_offset=offset)
        metrics["personal-accuracy"] = float(own["accuracy"])
        metrics["personal-macro-f1"] = float(own["macro_f1"])
    return Message(RecordDict({"metrics": MetricRecord(metric_values(metrics))}), reply_to=msg)
