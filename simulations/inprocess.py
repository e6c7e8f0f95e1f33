"""FedAvg in one process, built from the library's own pieces: a federation in seconds for the head.

The sites' shards and local splits (``partition_sites``), the one training loop (``train_local``)
with each site's privacy plan (``plan_privacy``: Opacus DP-SGD, PRV accountant) and its
accountant history carried from round to round, the adapter wire (``adapter_state`` /
``set_adapter_arrays``), FedAvg weighted by the sites' example counts as Flower's FedAvg does
it, and the server's evaluation on its held-out validation and test parts — without the Flower
runtime. Every site trains every round. ``bench/dp_recipe.py`` searches recipes with it; ``simulations.audit``
audits it, through two hooks that are off by default: ``extra_rows`` (records added to a site's
training table, e.g. canaries) and ``on_update`` (called with each site's update every round).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import nn
from torch.utils.data import TensorDataset
from transformers import BertConfig, PreTrainedTokenizerBase

from fedllm.accounting import PrivacyPlan, counted_plan, local_steps, resolve_delta, sample_rate
from fedllm.adapters import adapter_state, set_adapter_arrays
from fedllm.config import Settings
from fedllm.data import SiteData, load_splits, partition_sites, tokenize
from fedllm.head_init import centre_on_validation
from fedllm.imbalance import exact_histogram, histogram_plan, label_ids, personalized_offset
from fedllm.model import build_model, count_parameters, load_tokenizer
from fedllm.site_round import reported_count, train_site_round
from fedllm.train import evaluate

State = dict[str, torch.Tensor]


@dataclass
class SiteUpdate:
    """What the server receives from one site in one round (and the global state it started from)."""

    round: int
    site: int
    start: State  # the global adapter the site started from
    state: State  # the site's trained adapter (its update is ``state - start``)
    num_examples: int
    epsilon: float  # the site's cumulative spend after this round (0 without DP)


@dataclass
class Federation:
    """A finished in-process federation: the final global model and what it was built from."""

    settings: Settings  # resolved
    labels: list[str]
    sites: list[SiteData]  # each site's local train / test tables, as partitioned (no extra rows)
    model: nn.Module  # holds the final global adapter
    tokenizer: PreTrainedTokenizerBase
    test: TensorDataset  # the server's held-out split, tokenized
    scores: dict  # ``evaluate`` on ``test`` after the last round
    epsilons: list[float] = field(default_factory=list)  # per site, cumulative (0 without DP)
    deltas: list[float] = field(default_factory=list)  # per site (0 without DP)
    validation_scores: dict = field(default_factory=dict)  # ``evaluate`` on the validation split
    label_counts: list = field(default_factory=list)  # per site: its (DP) label histogram, or None

    def scores_on(self, part: str) -> dict:
        """The final scores on ``part``: ``validation`` (to choose settings) or ``test`` (to report)."""
        if part not in ("validation", "test"):
            raise ValueError(f"score-on={part!r}: use 'validation' or 'test'")
        return self.validation_scores if part == "validation" else self.scores

    def tokenized(self, frame: pd.DataFrame) -> TensorDataset:
        """``frame`` tokenized as the sites tokenize their data."""
        s = self.settings
        return tokenize(frame, self.tokenizer, self.labels, s.max_length, s.truncation)


def noise_free_plan(settings: Settings, num_examples: int, rounds: int) -> PrivacyPlan:
    """DP-SGD's mechanism without its noise: Poisson sampling with the same q, clipping, σ = 0.

    The ε = ∞ point of an audit that changes only the noise along the ε axis. Booked by the RDP
    accountant, which reports ε = ∞ for σ = 0 (the PRV accountant cannot represent it), so the
    budget check passes and the spend reads ∞.
    """
    settings = settings.resolved()
    return PrivacyPlan(
        noise_multiplier=0.0,
        sample_rate=sample_rate(num_examples, settings.batch_size, settings.sample_rate),
        delta=resolve_delta(settings),
        planned_steps=local_steps(settings, num_examples) * max(rounds, 1),
        target_epsilon=math.inf,
        accountant="rdp",
    )


def _copy(state: State) -> State:
    return {k: v.detach().clone() for k, v in state.items()}


def _load(model: nn.Module, state: State) -> None:
    set_adapter_arrays(model, {k: v.numpy() for k, v in state.items()})


def _site_hook(
    hook: Callable[[int, PrivacyPlan, list[nn.Parameter]], None] | None, site: int, plan: PrivacyPlan | None
) -> Callable[[list[nn.Parameter]], None] | None:
    """``hook`` bound to one site and its plan (None without a hook or without DP-SGD)."""
    if hook is None or plan is None:
        return None
    return lambda params: hook(site, plan, params)


def federate(
    settings: Settings,
    num_sites: int,
    rounds: int,
    scheme: dict,
    *,
    extra_rows: Sequence[pd.DataFrame | None] | None = None,
    on_update: Callable[[SiteUpdate], None] | None = None,
    noise_free: bool = False,
    exclude_from_test: Sequence[str] = (),
    bert_config: BertConfig | None = None,
    progress: Callable[[str], None] | None = None,
    training_sites: int = 0,
    before_noise: Callable[[int, PrivacyPlan, list[nn.Parameter]], None] | None = None,
) -> Federation:
    """Train one federation: every site every round, FedAvg, the server's scores at the end.

    ``scheme``: ``partition_sites``' ``scheme``, ``alpha`` and ``column``. ``extra_rows[i]``
    (``text``, ``label``) is appended to site ``i``'s training table (None or empty: nothing);
    ``on_update`` sees every site's update as the server receives it. ``noise_free``: train
    non-private settings with DP-SGD's mechanism at σ = 0 (``noise_free_plan``) instead of the
    non-private loop. ``exclude_from_test``: texts dropped from the server's test split (e.g.
    records an audit reuses with other labels). ``bert_config``: a (tiny, test) BERT instead of
    the checkpoint. ``progress`` receives one line per finished round. ``training_sites``: only
    the first this many sites train (0 = all); with ``iid`` partitioning and 1, a centralized run
    at one site's data size. ``before_noise(site, plan, params)``: ``train_local``'s hook on
    the clipped gradient sums before the noise, under DP or ``noise_free`` (e.g. gradient canaries).
    """
    settings = settings.resolved()
    splits = load_splits(settings)
    labels = splits.labels
    tokenizer = load_tokenizer(settings.model)
    sites, frames = _site_tables(settings, labels, num_sites, scheme, training_sites, extra_rows)
    data = [tokenize(f, tokenizer, labels, settings.max_length, settings.truncation) for f in frames]
    model = build_model(settings, labels, torch.device("cpu"), bert_config)
    validation = tokenize(splits.validation, tokenizer, labels, settings.max_length, settings.truncation)
    centre_on_validation(model, validation, settings, labels)  # as the server does (server/app.py)
    global_state = _copy(adapter_state(model))
    plans, histories, label_counts = _site_plans(settings, data, frames, labels, rounds, model, noise_free)
    sites_state = _Sites(data, plans, histories, label_counts, [0.0] * len(data), len(labels))
    for server_round in range(1, rounds + 1):
        global_state = _one_round(
            model, settings, global_state, sites_state, (server_round, rounds), on_update, before_noise
        )
        if progress is not None:
            progress(f"round {server_round}/{rounds}: spent ε max {max(sites_state.epsilons):.2f}")
    _load(model, global_state)
    test_frame = splits.test
    if exclude_from_test:
        test_frame = test_frame[~test_frame["text"].isin(set(exclude_from_test))].reset_index(drop=True)
    test = tokenize(test_frame, tokenizer, labels, settings.max_length, settings.truncation)
    head_only = settings.trainable == "head"
    run = Federation(settings, labels, sites, model, tokenizer, test, {})
    run.scores = evaluate(model, test, labels, head_only=head_only)
    run.validation_scores = evaluate(model, validation, labels, head_only=head_only)
    run.epsilons = list(sites_state.epsilons)
    run.deltas = [p.delta if p is not None else 0.0 for p in plans]
    run.label_counts = label_counts
    return run


def _site_tables(
    settings: Settings,
    labels: list[str],
    num_sites: int,
    scheme: dict,
    training_sites: int,
    extra_rows: Sequence[pd.DataFrame | None] | None,
) -> tuple[list[SiteData], list[pd.DataFrame]]:
    """The partitioned sites (the first ``training_sites``, 0 = all) and each one's training
    table with its ``extra_rows`` appended."""
    sites = partition_sites(settings, labels, num_sites, **scheme)
    if training_sites:
        sites = sites[:training_sites]
    extra = list(extra_rows) if extra_rows is not None else [None] * len(sites)
    if len(extra) != len(sites):
        raise ValueError(f"extra_rows has {len(extra)} entries for {len(sites)} sites: give one per site")
    frames = [
        s.train if e is None or e.empty else pd.concat([s.train, e[["text", "label"]]], ignore_index=True)
        for s, e in zip(sites, extra, strict=True)
    ]
    return sites, frames


@dataclass
class _Sites:
    """Every site's training set, plan, accountant history, label histogram and spend so far."""

    data: list[TensorDataset]
    plans: list[PrivacyPlan | None]
    histories: list[list]
    label_counts: list
    epsilons: list[float]
    num_classes: int


def _one_round(
    model: nn.Module,
    settings: Settings,
    global_state: State,
    sites: _Sites,
    rounds: tuple[int, int],
    on_update: Callable[[SiteUpdate], None] | None,
    before_noise: Callable[[int, PrivacyPlan, list[nn.Parameter]], None] | None,
) -> State:
    """Round ``rounds[0]``: every site's round (``fedllm.site_round``, as the ClientApp runs it)
    from ``global_state``, then FedAvg weighted by the counts the sites report.

    One difference is kept so earlier in-process results stand: no ``class_weight`` is passed,
    so without DP the loss is not weighted by inverse class frequency as a ClientApp's is with
    ``class-weighting`` on (``fedllm.data.loss_weights``; under DP it is unweighted in both)."""
    updates, weights = [], []
    for i, (dataset, plan) in enumerate(zip(sites.data, sites.plans, strict=True)):
        _load(model, global_state)
        result = train_site_round(
            model,
            dataset,
            settings,
            rounds,
            plan=plan,
            history=sites.histories[i],
            histogram=sites.label_counts[i],
            num_classes=sites.num_classes,
            before_noise=_site_hook(before_noise, i, plan),
        )
        sites.histories[i], sites.epsilons[i] = result.history, result.epsilon
        state = _copy(adapter_state(model))
        if on_update is not None:
            on_update(SiteUpdate(rounds[0], i, global_state, state, len(dataset), result.epsilon))
        updates.append(state)
        weights.append(reported_count(plan, len(dataset)))
    total = float(sum(weights))
    return {k: sum(w / total * u[k] for w, u in zip(weights, updates, strict=True)) for k in global_state}


def _site_plans(
    settings: Settings,
    data: list[TensorDataset],
    frames: list[pd.DataFrame],
    labels: list[str],
    rounds: int,
    model: nn.Module,
    noise_free: bool,
) -> tuple[list, list[list], list]:
    """Each site's privacy plan, accountant history and label histogram, as a site makes them:
    under DP the DP count, or with ``imbalance`` the DP label histogram in its place (the same
    entry); without DP the exact histogram (nothing is released), or None without ``imbalance``."""
    exact = settings.imbalance != "none"
    counts = [exact_histogram(label_ids(f, labels), len(labels)) if exact else None for f in frames]
    if settings.private:
        dimension = count_parameters(model)[0]  # as a site plans it (clients/handlers.py)
        if settings.imbalance != "none":
            made = [
                histogram_plan(settings, label_ids(f, labels), len(labels), rounds, dimension) for f in frames
            ]
            return [m[0] for m in made], [m[1] for m in made], [m[2] for m in made]
        counted = [counted_plan(settings, len(d), rounds, dimension) for d in data]
        return [p for p, _ in counted], [h for _, h in counted], counts
    if noise_free:
        return [noise_free_plan(settings, len(d), rounds) for d in data], [[] for _ in data], counts
    return [None] * len(data), [[] for _ in data], counts


def site_scores(run: Federation, tau: float) -> list[dict]:
    """Each site's local test split scored by the global model and by the global model with the
    site's own prior put back (``imbalance.personalized_offset`` at ``tau``; needs the run's
    label histograms, ``imbalance`` set): ``{"site", "n", "global", "personalized"}``, each score
    ``evaluate``'s dict. Virtual sites opt in: a simulation's researcher owns every site's data."""
    head_only = run.settings.trainable == "head"
    rows = []
    for i, site in enumerate(run.sites):
        test = run.tokenized(site.test)
        counts = run.label_counts[i] if run.label_counts else None
        offset = personalized_offset(counts, len(run.labels), tau) if counts is not None else None
        rows.append(
            {
                "site": i,
                "n": len(test),
                "global": evaluate(run.model, test, run.labels, head_only=head_only),
                "personalized": evaluate(
                    run.model, test, run.labels, head_only=head_only, logit_offset=offset
                ),
            }
        )
    return rows
