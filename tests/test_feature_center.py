"""center-features: the server centres the head's input on its validation mean and sends it; a
site applies what was sent, and refuses, before reading its data, a centre that is missing or
does not fit its model."""

from __future__ import annotations

import torch

from clients.app import app
from fedllm.config import settings_from
from fedllm.data import load_splits, tokenize
from fedllm.features import pooled_features
from fedllm.model import build_model, feature_center, load_tokenizer
from server.app import _feature_center

from .conftest import LABELS, flower_context
from .sites import ask, ledger_path, message


def test_the_server_centres_its_model_on_its_validation_mean_and_sends_that(run_config):
    settings = settings_from({**run_config, "center-features": "validation", "trainable": "head"}).resolved()
    splits = load_splits(settings)
    model = build_model(settings, splits.labels, torch.device("cpu"))
    sent = _feature_center(settings, splits, splits.labels, model)
    validation = tokenize(
        splits.validation, load_tokenizer(settings.model), splits.labels, settings.max_length
    )
    expected = pooled_features(model, validation).tensors[0].mean(0)  # raw: the centre is the head's
    assert sent is not None and torch.allclose(torch.tensor(sent), expected, atol=1e-6)
    assert torch.equal(feature_center(model), expected)
    plain = settings_from({**run_config, "trainable": "head"}).resolved()
    assert _feature_center(plain, splits, splits.labels, build_model(plain, splits.labels)) is None


def test_a_site_refuses_a_missing_or_misfit_centre_before_its_data_and_trains_on_a_good_one(site, run_config):
    centred = {**run_config, "center-features": "validation", "trainable": "head"}
    width = build_model(settings_from(centred).resolved(), LABELS).config.hidden_size
    missing = ask(site, centred)
    misfit = app(message(centred, center=[0.0] * (width + 1)), flower_context(site, centred))
    for reply in (missing, misfit):
        assert reply.has_error() and reply.error.reason == "site-declined"
    assert not ledger_path(site).exists()  # nothing booked: refused before the data was read
    good = app(message(centred, center=[0.1] * width), flower_context(site, centred))
    assert not good.has_error(), good.error
    assert ledger_path(site).exists()
