"""Client-level DP at the server: Flower's fixed-clipping wrapper and a Flower-protocol accountant,
fed only validated replies, with a fixed denominator so one failing site never stalls a round.

``client-dp-epsilon = ε`` (server/settings.py's ``ClientDPSettings``) wraps a plain FedAvg in
Flower's ``DifferentialPrivacyClientSideFixedClipping`` with an accountant implementing Flower's
``PrivacyAccountant`` protocol: by default dp-accounting's PLD accountant
(server/client_accountant.py, tight for the Gaussian mechanism), or Flower's ``RdpAccountant``
(``client-dp-accountant = "rdp"``; a valid bound ~7% looser at ε 3-8). σ is calibrated by the
same accountant that books the run. Each round the server samples m
sites, clips each site's update (its adapter minus the global) to L2 ≤ C with Flower's
``compute_clip_model_update`` (the server-side wrapper's own step, done before the wrapper because
Flower's divides by zero on a zero update, which a stand-in is), averages the m
results with equal weights (``FedAvg.aggregate_train``, unchanged, as Flower requires) and adds
Gaussian noise of std σC/m. The accountant books one Gaussian release per round without
amplification by sampling (Flower's only mode for this wrapper), under add/remove of one site.
Before the next round Flower checks the budget: a release that would pass ``client-dp-epsilon``
raises ``PrivacyBudgetExhausted``, which ends the run here with its result saved.

Before the wrapper sees a round, every reply is validated (server/validation.py). A reply that
fails, is refused or never arrives is replaced by a stand-in carrying the global adapter
(update 0), so the wrapper always averages exactly m replies: the denominator stays m, each
site's influence on the mean stays ≤ C/m, and the noise σC/m keeps its meaning. Without a
single valid reply the round keeps the global adapter and releases nothing (no ε booked).

The accountant's state (``state_dict``: its config and every composed event) is in each
round's record, so ``metrics.jsonl`` carries it beside the checkpoint and a resumed run
(``restore``) continues the same books.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any, cast

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.app.message.message import make_message
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg, Result
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from flwr.supercore.differential_privacy import compute_clip_model_update, get_norm
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    PrivacyAccountant,
)

from server.client_accountant import (
    ACCOUNTANT_NAMES,
    ACCOUNTANTS,
    MIN_NOISE_MULTIPLIER,
    PldAccountant,
    accountant,
    calibrate,
    epsilon_after,
)
from server.flower_log import destinations, reply_node
from server.settings import ClientDPSettings
from server.strategy import ResumableStart
from server.validation import (
    EVALUATE_METRICS,
    ReplyError,
    adapter_spec,
    canonical,
    check_metrics,
    check_train_reply,
    clean_reason,
    site_reason,
)

WEIGHT = "client-dp-weight"  # every site's weight: 1 (Flower's accounted path needs equal weights)
RECORD = "client-dp"


class UniformFedAvg(FedAvg):
    """Flower's FedAvg sampling exactly ``min_train_nodes`` sites a round; its ``aggregate_train``
    is FedAvg's own (the wrapper's accountant requires it)."""

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """m train messages, m = ``min_train_nodes``, sampled uniformly from the connected sites."""
        node_ids, _ = sample_nodes(grid, self.min_available_nodes, self.min_train_nodes)
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, node_ids, MessageType.TRAIN)


def _stand_in(node: int, arrays: ArrayRecord, like: Message | None) -> Message:
    """A reply from ``node`` carrying the global adapter (update 0) and weight 1."""
    meta = like.metadata if like is not None else None
    metadata = Metadata(
        run_id=meta.run_id if meta else 0,
        message_id=f"stand-in-{node}-{time.time_ns()}",
        src_node_id=node,
        dst_node_id=meta.src_node_id if meta else 0,
        reply_to_message_id=meta.message_id if meta else "",
        group_id=meta.group_id if meta else "",
        created_at=time.time(),
        ttl=meta.ttl if meta else 3600.0,
        message_type=MessageType.TRAIN,
    )
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord({WEIGHT: 1.0})})
    return make_message(metadata, content)


class ClientDPFedAvg(ResumableStart, DifferentialPrivacyClientSideFixedClipping):
    """Flower's fixed-clipping wrapper (noise + accountant) over ``UniformFedAvg``; the server
    clips every validated update itself before the wrapper (``_clipped``), so a site's own
    clipping (Flower's ``fixedclipping_mod``, which reads the ``clipping_norm`` the wrapper sends)
    is welcome but never trusted.

    ``max_num_examples``: server/validation.py's bound on a reply's claimed count.
    """

    def __init__(self, dp: ClientDPSettings, num_rounds: int, max_num_examples: float, **fedavg_kwargs):
        sites = dp.client_dp_sites or int(fedavg_kwargs.get("min_train_nodes", 2))
        fedavg_kwargs["min_train_nodes"] = sites
        fedavg_kwargs["min_available_nodes"] = max(sites, int(fedavg_kwargs.get("min_available_nodes", 2)))
        fedavg_kwargs.pop("fraction_train", None)
        inner = UniformFedAvg(weighted_by_key=WEIGHT, **fedavg_kwargs)
        method = dp.client_dp_accountant
        sigma = dp.client_dp_noise_multiplier or calibrate(
            dp.client_dp_epsilon, num_rounds, dp.client_dp_delta, method
        )
        if method == "pld" and sigma < MIN_NOISE_MULTIPLIER:
            raise ValueError(
                f"run config client-dp-noise-multiplier={sigma:g}: the PLD accountant books σ ≥ "
                f'{MIN_NOISE_MULTIPLIER}; raise it or set client-dp-accountant="rdp"'
            )
        books = accountant(dp.client_dp_delta, sites, dp.client_dp_epsilon, method)
        super().__init__(inner, sigma, dp.client_dp_clip, sites, accountant=books)
        self.max_num_examples = max_num_examples
        self.rounds: dict[int, dict] = {}
        self._global: ArrayRecord | None = None
        self._sent: list[Message] = []
        self.stopped: str | None = None  # why the run ended early (the budget), if it did

    @property
    def books(self) -> PrivacyAccountant:
        """The run's accountant (always set: the wrapper is built with one)."""
        if self.accountant is None:
            raise RuntimeError("client-level DP without an accountant")
        return self.accountant

    @property
    def _glob(self) -> ArrayRecord:
        """The current global adapter (set by ``start`` before any round)."""
        if self._global is None:
            raise RuntimeError("no global adapter yet: call start()")
        return self._global

    def restore(self, records: list[dict]) -> None:
        """Continue the books of a resumed run: the accountant state of its last kept round (a
        state of another accountant or config is refused by ``load_state_dict``)."""
        states = [r[RECORD]["accountant"] for r in records if RECORD in r]
        if states:
            self.books.load_state_dict(states[-1])

    def start(self, grid: Grid, initial_arrays: ArrayRecord, *args: Any, **kwargs: Any) -> Result:
        """``ResumableStart.start`` (the same arguments) until ``num_rounds`` or until the next
        release would pass the budget (then a ``Result`` holding the last released adapter, and
        ``stopped`` says why)."""
        self._global = initial_arrays
        try:
            return super().start(grid, initial_arrays, *args, **kwargs)
        except PrivacyBudgetExhausted as err:
            self.stopped = f"client-level DP budget reached: {err}"
            log(WARNING, "%s; the run ends with the last released adapter", self.stopped)
            return Result(arrays=self._glob)

    @property
    def global_arrays(self) -> ArrayRecord | None:
        """The last released global adapter (the initial one before any release)."""
        return self._global

    def spent(self) -> dict:
        """The run's client-level (ε, δ) so far, with the mechanism's parameters."""
        spent = self.books.get_privacy_spent()
        return {
            "epsilon": spent.epsilon,
            "delta": spent.delta,
            "releases": spent.num_releases,
            "accounting": spent.accounting_method,
            **{f"epsilon-{m}": e for m, e in self.epsilon_by_method(spent.delta).items()},
            "noise-multiplier": self.noise_multiplier,
            "clip": self.clipping_norm,
            "sites-per-round": self.num_sampled_clients,
            "max-epsilon": self.books.config.max_epsilon,
        }

    def epsilon_by_method(self, delta: float) -> dict[str, float]:
        """The same booked releases' ε by each accountant (``pld``, ``rdp``), for the report; the
        run's own accountant's is ``epsilon``, the other one's is only reported."""
        state = self.books.state_dict()
        out = {}
        events = [
            (GaussianPrivacyEvent(**c["event"]), int(c["count"]))
            for c in cast(list[dict], state["compositions"])
        ]
        for method in ACCOUNTANTS:
            if method == "pld" and any(e.noise_multiplier < MIN_NOISE_MULTIPLIER for e, _ in events):
                continue  # below what the PLD accountant books (the run books with rdp)
            other = accountant(delta, self.books.config.population_size, method=method)
            for event, count in events:
                other.compose(event, count)
            out[method] = other.get_epsilon(delta) if other.num_releases else 0.0
        return out

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The wrapper's messages for the run's real round; raises ``PrivacyBudgetExhausted``."""
        self._global = arrays
        self._sent = list(super().configure_train(server_round + self.round_offset, arrays, config, grid))
        return self._sent

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Means of the sites' checked evaluation metrics weighted by their counts (bad replies are
        left out and recorded), under the run's real round number."""
        server_round += self.round_offset
        record = self.rounds.setdefault(server_round, {"train-failures": [], "sites": {}, "clipped": []})
        record["evaluate-failures"], checked = [], []
        for m in canonical(replies):
            try:
                if m.has_error():
                    raise ReplyError(site_reason(m.error.reason, m.error.code))
                if list(m.content.metric_records) != ["metrics"]:
                    raise ReplyError("expected one MetricRecord 'metrics'")
                metrics = check_metrics(
                    dict(m.content.metric_records["metrics"]), EVALUATE_METRICS, self.max_num_examples
                )
            except ReplyError as err:
                record["evaluate-failures"].append(
                    {"node": m.metadata.src_node_id, "reason": clean_reason(str(err))}
                )
                continue
            content = RecordDict({"metrics": MetricRecord({**metrics, WEIGHT: metrics["num-examples"]})})
            checked.append(make_message(m.metadata, content))
        return super().aggregate_evaluate(server_round, checked) if checked else None

    def _clipped(self, record: dict, node: int, arrays: dict[str, np.ndarray]) -> ArrayRecord:
        """The global plus the site's update clipped to L2 ≤ C (Flower's ``compute_clip_model_update``).

        Flower's function divides by the update's norm; an update of exactly 0 needs no clipping.
        """
        names = list(arrays)
        mine = [np.asarray(arrays[k], np.float32) for k in names]
        glob = [self._glob[k].numpy() for k in names]
        norm = get_norm([a - g for a, g in zip(mine, glob, strict=True)])
        if norm > 0:
            compute_clip_model_update(mine, glob, self.clipping_norm)
        if norm > self.clipping_norm:
            record["clipped"].append(node)
        return ArrayRecord({k: Array(np.asarray(v, np.float32)) for k, v in zip(names, mine, strict=True)})

    def _checked(self, record: dict, replies: list[Message]) -> list[Message]:
        """Exactly one reply per sent message: the valid ones (weight 1), stand-ins for the rest."""
        sent, nodes = destinations(self._sent), [m.metadata.dst_node_id for m in self._sent]
        spec = adapter_spec({k: v.numpy() for k, v in self._glob.items()})
        out: dict[int, Message] = {}
        for m in canonical(replies):
            node = reply_node(m, sent)
            if node in out or node not in nodes:  # a duplicate or a stranger
                continue
            try:
                if m.has_error():
                    raise ReplyError(site_reason(m.error.reason, m.error.code))
                valid = check_train_reply(node, m.content, spec, self.max_num_examples)
            except ReplyError as err:
                record["train-failures"].append({"node": node, "reason": clean_reason(str(err))})
                log(WARNING, "train reply from node %s replaced by the global adapter: %s", node, err)
                continue
            arrays = self._clipped(record, node, valid.arrays)
            content = RecordDict({"arrays": arrays, "metrics": MetricRecord({WEIGHT: 1.0})})
            out[node] = make_message(m.metadata, content)
            record["sites"][str(node)] = dict(valid.metrics)
        missing = [n for n in nodes if n not in out]
        record["stand-ins"] = sorted(missing)
        by_node = {m.metadata.dst_node_id: m for m in self._sent}
        out.update({n: _stand_in(n, self._glob, by_node.get(n)) for n in missing})
        return [out[n] for n in sorted(out)]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate, pad to m with stand-ins, then Flower's wrapper: clip, mean, noise, book."""
        server_round += self.round_offset
        record = self.rounds.setdefault(server_round, {"train-failures": [], "sites": {}, "clipped": []})
        record["aggregator"] = "client-dp"
        checked = self._checked(record, list(replies))
        record["train-replies"] = len(record["sites"])
        if not record["sites"]:
            self._pending_events.pop(server_round, None)  # nothing is released: nothing is booked
            record["global-unchanged"] = "no valid train reply"
            record[RECORD] = {**self.spent(), "accountant": self.books.state_dict()}
            return None, None
        arrays, metrics = super().aggregate_train(server_round, checked)
        if arrays is not None:
            self._global = ArrayRecord(
                {k: Array(np.asarray(v.numpy(), np.float32)) for k, v in arrays.items()}
            )
        else:
            record["global-unchanged"] = "Flower's wrapper released nothing"
        record[RECORD] = {**self.spent(), "accountant": self.books.state_dict()}
        log(
            INFO,
            "round %s: client-level ε %.4f at δ %g",
            server_round,
            record[RECORD]["epsilon"],
            record[RECORD]["delta"],
        )
        return self._global if arrays is not None else None, metrics

    def round_summary(self, server_round: int) -> dict:
        """What this round received, replaced and released, with the books after it."""
        return self.rounds.get(server_round, {})


def describe(strategy: ClientDPFedAvg, num_rounds: int) -> str:
    """One line for the server's log: the mechanism, the accountant and the budget."""
    config = strategy.books.config
    method = "pld" if isinstance(strategy.books, PldAccountant) else "rdp"
    planned = epsilon_after(strategy.noise_multiplier, num_rounds, config.target_delta, method)
    return (
        f"client-level DP (Flower's fixed-clipping wrapper + {ACCOUNTANT_NAMES[method]}, the server clips): "
        f"{strategy.num_sampled_clients} sites a round, clip {strategy.clipping_norm:g}, "
        f"σ {strategy.noise_multiplier:.4g}; "
        f"{num_rounds} rounds would spend ε {planned:.3f} at δ {config.target_delta:g} "
        f"(budget {config.max_epsilon:g})"
    )
