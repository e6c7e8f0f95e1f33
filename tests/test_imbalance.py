"""Imbalanced labels under DP: the DP label histogram is booked as the count was, before its
noise, and what training makes of it (logit adjustment) moves predictions as it should."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import clients.handlers
from clients.app import app
from clients.policy import DP_REPLY_KEYS
from fedllm.accounting import count_entry, epsilon_for
from fedllm.config import Settings, settings_from
from fedllm.imbalance import (
    histogram_count,
    label_ids,
    label_prior,
    logit_offset,
    personalized_offset,
    private_histogram,
)
from fedllm.ledger import PrivacyLedger, total_steps
from fedllm.train import evaluate, train_local
from server.noise import MIN_NOISE_RATIO, NoiseModel, too_clean

from .conftest import LABELS
from .conftest import flower_context as _context
from .sites import COUNT_NOISE, message
from .sites import ask as _ask
from .sites import ledger_path as _ledger_path


def test_one_added_row_moves_one_bin_by_one(monkeypatch):
    """L2 sensitivity 1 under add/remove: noise off, a row added changes one bin (its class, or
    the unlisted bin) by exactly 1, and n̂ is the rounded sum of the bins."""
    monkeypatch.setattr(random.SystemRandom, "gauss", lambda self, mu, sigma: 0.0)
    ids = np.array([0, 0, 1, 2, 2, 2])
    before = np.array(private_histogram(ids, 3, 20.0))
    for extra in (0, 1, 2, 3):  # 3: a label the run does not list
        after = np.array(private_histogram(np.append(ids, extra), 3, 20.0))
        assert np.linalg.norm(after - before) == 1.0 and after[extra] - before[extra] == 1
    assert histogram_count(list(before)) == len(ids)
    assert label_ids(__import__("pandas").DataFrame({"label": ["b", "zz", "a"]}), ["a", "b"]).tolist() == [
        1,
        2,
        0,
    ]


def test_the_histogram_is_booked_before_its_noise_is_drawn(site, run_config, monkeypatch):
    """A draw that fails leaves the histogram's entry booked in the ledger (and no DP-SGD step)."""

    def broken(*args, **kwargs):
        raise RuntimeError("the entropy source failed")

    monkeypatch.setattr(clients.handlers, "private_histogram", broken)
    reply = _ask(site, {**run_config, "imbalance": "logit-adjust"})
    assert reply.has_error() and reply.error.reason == "site-declined"
    run = PrivacyLedger(_ledger_path(site)).runs["1"]
    assert run["history"] == [count_entry(COUNT_NOISE)] and run["public-n"] is None
    assert run["epsilon"] == pytest.approx(epsilon_for([count_entry(COUNT_NOISE)], 1e-5))


def _fail_one_draw(site: dict, config: dict, monkeypatch) -> None:
    """One round whose histogram draw fails (booked, not drawn); the next round draws again."""
    original = clients.handlers.private_histogram
    monkeypatch.setattr(clients.handlers, "private_histogram", lambda *a: (_ for _ in ()).throw(OSError("x")))
    _ask(site, config)
    monkeypatch.setattr(clients.handlers, "private_histogram", original)


def test_a_retried_draw_books_a_second_histogram_and_the_epsilon_includes_both(site, run_config, monkeypatch):
    config = {**run_config, "imbalance": "logit-adjust"}
    _fail_one_draw(site, config, monkeypatch)
    reply = _ask(site, config)
    assert not reply.has_error(), reply.error
    run = PrivacyLedger(_ledger_path(site)).runs["1"]
    assert run["count-draws"] == 2 and total_steps(run) == 2 + 2  # two draws, then the round's steps
    assert len(run["label-histogram"]) == len(LABELS) + 1
    sigma = run["plan"]["noise_multiplier"]
    history = [count_entry(COUNT_NOISE), count_entry(COUNT_NOISE), [sigma, run["plan"]["sample_rate"], 2]]
    assert reply.content["metrics"]["epsilon"] == pytest.approx(epsilon_for(history, 1e-5))


def test_a_site_that_drew_twice_passes_the_servers_noise_check(site, run_config, monkeypatch):
    """A second booked draw calibrates a larger σ; the reply declares it, and the server's noise
    check (``server.noise.too_clean``, σ, q, steps and n̂ as declared) expects what the site added:
    the real reply passes, the same update at half its size is too clean."""
    config = {**run_config, "imbalance": "logit-adjust"}
    _fail_one_draw(site, config, monkeypatch)
    sent = message(config)
    reply = app(sent, _context(site, config))
    run = PrivacyLedger(_ledger_path(site)).runs["1"]
    assert run["count-draws"] == 2
    before = sent.content.array_records["arrays"]
    after = reply.content.array_records["arrays"]
    delta = np.concatenate([(after[k].numpy() - before[k].numpy()).ravel() for k in before])
    metrics, model = dict(reply.content["metrics"]), NoiseModel.of(settings_from(config).resolved(), 1)
    assert metrics["noise-multiplier"] == run["plan"]["noise_multiplier"]  # the two-draw plan's σ
    norm = float(np.linalg.norm(delta))
    assert too_clean(metrics, norm, delta.size, model, 1, MIN_NOISE_RATIO) is None
    assert too_clean(metrics, float(np.linalg.norm(delta / 2)), delta.size, model, 1, MIN_NOISE_RATIO)


def test_the_histogram_replaces_the_count_at_the_same_epsilon(site, run_config, monkeypatch):
    """With ``imbalance`` the site books one histogram in place of the count: the same entry, the
    same ε; n̂ is the sum of the noisy bins (each +3 here), and the reply carries n̂, no bins."""
    monkeypatch.setattr(random.SystemRandom, "gauss", lambda self, mu, sigma: 3.0)
    reply = _ask(site, {**run_config, "imbalance": "logit-adjust"})
    run = PrivacyLedger(_ledger_path(site)).runs["1"]
    settings = Settings(model=run_config["model"])
    n = len(clients.handlers._site_data(_context(site, run_config), settings, LABELS).train)
    assert run["history"][0] == count_entry(COUNT_NOISE)
    assert run["public-n"] == n + 3 * (len(LABELS) + 1) == reply.content["metrics"]["num-examples"]
    assert set(reply.content["metrics"]) == set(DP_REPLY_KEYS)


def test_a_site_over_budget_refuses_before_reading_its_data(site, run_config):
    missing = {**site, "data-file": site["data-file"] + ".gone", "max-epsilon": 0.01}
    reply = _ask(missing, {**run_config, "imbalance": "logit-adjust"})
    assert reply.error.reason == "site-refused-lifetime-budget"
    assert not _ledger_path(site).exists()


def test_logit_adjustment_raises_the_rare_class_where_the_data_says_nothing():
    """Features that carry no information: the plain loss learns the prior (predicts the majority);
    the logit-adjusted loss learns the balanced posterior, so the rare class gets predicted."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([0] * 90 + [1] * 10)
    data = TensorDataset(torch.randn(100, 4, generator=generator), labels)
    settings = Settings(
        trainable="head",
        target_epsilon=float("inf"),
        optimizer="sgd",
        lr=1.0,
        max_steps=300,
        sample_rate=1.0,
        imbalance="logit-adjust",
        imbalance_tau=1.0,
        schedule="constant",
    )
    histogram = [90.0, 10.0, 0.0]

    def trained(offset):
        head = torch.nn.Linear(4, 2)
        torch.nn.init.zeros_(head.weight), torch.nn.init.zeros_(head.bias)
        train_local(
            _FeatureModel(head), data, settings.replace(trainable="lora").resolved(), logit_offset=offset
        )
        return head

    plain, adjusted = trained(None), trained(logit_offset(settings, histogram, 2))
    assert float(plain.bias[0] - plain.bias[1]) == pytest.approx(np.log(9), abs=0.2)  # the prior's log-odds
    assert abs(float(adjusted.bias[0] - adjusted.bias[1])) < 0.2  # balanced
    site = personalized_offset(histogram, 2, 1.0)
    scores = evaluate(_FeatureModel(adjusted), data, ["a", "b"], logit_offset=site)
    assert scores["per_class"]["a"]["predicted"] > 50  # the site's own prior put back
    assert label_prior([-5.0, 10.0, 0.0], 2)[0] == pytest.approx(1 / 11)  # a negative bin floors at 1


class _FeatureModel(torch.nn.Module):
    """A head on given features with the (features, labels) batches ``train_local`` takes."""

    def __init__(self, head: torch.nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.head(features)


def test_a_site_that_releases_evaluation_scores_its_personalized_prediction_too(site, run_config):
    opted = {**site, "release-evaluation": True}
    config = {**run_config, "imbalance": "logit-adjust"}
    context = _context(opted, config)
    assert not _ask(opted, config, context=context).has_error()
    reply = _ask(opted, config, kind="evaluate", context=context)
    assert not reply.has_error(), reply.error
    metrics = reply.content["metrics"]
    assert 0 <= metrics["personal-macro-f1"] <= 1 and 0 <= metrics["personal-accuracy"] <= 1


def test_the_drugs_preset_adjusts_logits_on_three_centred_layers_and_the_bbc_presets_do_not():
    """Chosen on validation for the skewed drug reviews only (docs/imbalance.md): a preset that
    lost a key would train the drugs sweep without it, and BBC (near balanced, topics) stays as it was."""
    from simulations.sweep_config import PRESETS, parse_args, sweep_settings

    for name in PRESETS:
        settings = sweep_settings(parse_args(["--preset", name]))
        expected = ("logit-adjust", 1.0, 3, "validation") if name == "drugs" else ("none", 1.0, 1, "none")
        got = (settings.imbalance, settings.imbalance_tau, settings.pool_layers, settings.center_features)
        assert got == expected, name
