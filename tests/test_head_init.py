"""The zero-shot head (head-init = label-names): public, deterministic, and a real classifier."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from fedllm.config import Settings
from fedllm.data import tokenize
from fedllm.features import pooled_features
from fedllm.head_init import informative, label_text, start_centred
from fedllm.model import base_of, build_model
from fedllm.train import evaluate

from .conftest import DEVICE

NEWS = ["business", "sport", "tech"]


def _head(model) -> torch.Tensor:
    return base_of(model).classifier.modules_to_save["default"].weight.detach().clone()


def test_informative_names_only():
    assert informative(["business", "entertainment", "politics", "sports", "tech"])
    assert informative(["negative", "neutral", "positive"])
    assert not informative(["0", "1", "2"])  # ratings, ids: nothing to embed
    assert not informative(["1.5", "x"])
    assert not informative(["Sport", "sport "])  # equal once normalised
    assert label_text("heart_failure", "A note about {}.") == "A note about heart failure."


@pytest.mark.parametrize("value", ["none", ""])
def test_a_bad_head_init_names_the_key(value):
    key = "head-init" if value == "none" else "head-init-template"
    changes = {"head_init": value} if value == "none" else {"head_init_template": value}
    with pytest.raises(ValueError, match=key):
        Settings().replace(**changes)


def test_label_names_head_is_the_zero_shot_classifier_and_the_same_everywhere(tokenizer):
    """Server and site build the same head from public facts alone; unit rows times the scale;
    it already classifies plain sentences before any training."""
    s = Settings(trainable="head", target_epsilon=1.0, head_init="label-names", head_init_scale=7.0, seed=0)
    server, site = (
        build_model(s.resolved(), NEWS, DEVICE),
        build_model(s.replace(seed=5).resolved(), NEWS, DEVICE),
    )
    head = _head(server)
    assert torch.equal(head, _head(site))  # independent of the seed: nothing random in it
    assert torch.allclose(head.norm(dim=1), torch.full((3,), 7.0), atol=1e-4)
    assert torch.count_nonzero(base_of(server).classifier.modules_to_save["default"].bias) == 0
    texts = {
        "business": "Shares in the bank fell after its quarterly profits missed forecasts.",
        "sport": "The striker scored twice as the club won the league final.",
        "tech": "The new smartphone chip runs software faster and uses less battery.",
    }
    frame = pd.DataFrame({"text": list(texts.values()), "label": list(texts)})
    scores = evaluate(server, tokenize(frame, tokenizer, NEWS, 64), NEWS, head_only=True)
    assert scores["accuracy"] == 1.0


def test_uninformative_names_keep_the_random_head():
    s = Settings(trainable="head", target_epsilon=1.0, seed=3)
    random_head = _head(build_model(s.resolved(), ["0", "1", "2"], DEVICE))
    fallback = _head(build_model(s.replace(head_init="label-names").resolved(), ["0", "1", "2"], DEVICE))
    assert torch.equal(random_head, fallback)


def test_normalize_features_is_the_same_in_the_model_and_in_the_cached_features(tokenizer, frame):
    """normalize-features: the head sees unit vectors, in the model's forward (encoder trainables,
    evaluation) and in the cached features of the head's fast path alike."""
    s = Settings(trainable="head", target_epsilon=1.0, normalize_features=True, max_length=32, seed=0)
    model = build_model(s.resolved(), NEWS, DEVICE).eval()
    data = tokenize(frame.head(6).assign(label="tech"), tokenizer, NEWS, 32)
    features = pooled_features(model, data).tensors[0]
    assert torch.allclose(features.norm(dim=1), torch.ones(6), atol=1e-5)
    ids, mask, _ = data.tensors
    with torch.no_grad():
        logits = model(input_ids=ids.to(DEVICE), attention_mask=mask.to(DEVICE)).logits.cpu()
    assert torch.allclose(logits, base_of(model).classifier(features.to(DEVICE)).cpu(), atol=1e-5)
    raw = pooled_features(
        build_model(s.replace(normalize_features=False).resolved(), NEWS, DEVICE), data
    ).tensors[0]
    assert raw.norm(dim=1).min() > 1.5  # the cache told the two apart
    with pytest.raises(ValueError, match="normalize-features"):
        s.replace(pooling="cls")


def test_the_zero_shot_prior_weighs_less_as_the_budget_grows():
    """head-init-scale 0 = auto: 10/sqrt(ε) under a target ε (public), 1 without DP; explicit stays."""
    assert Settings(target_epsilon=4.0).resolved().head_init_scale == pytest.approx(5.0)
    assert Settings(target_epsilon=1.0).resolved().head_init_scale == pytest.approx(10.0)
    assert Settings(target_epsilon=float("inf")).resolved().head_init_scale == 1.0
    assert Settings(noise_multiplier=1.0).resolved().head_init_scale == 1.0
    assert Settings(target_epsilon=4.0, head_init_scale=7.0).resolved().head_init_scale == 7.0


def test_a_centred_model_starts_from_the_centred_label_embeddings(tokenizer):
    """center-features: the zero-shot head is redone from the label embeddings minus the centre
    (as the head sees every text), still unit rows times the scale."""
    s = Settings(trainable="head", target_epsilon=1.0, head_init="label-names", head_init_scale=7.0, seed=0)
    model = build_model(s.resolved(), NEWS, DEVICE)
    texts = pd.DataFrame({"text": [label_text(n, s.head_init_template) for n in NEWS], "label": NEWS})
    names = pooled_features(model, tokenize(texts, tokenizer, NEWS, s.resolved().max_length)).tensors[0]
    center = names.mean(0)
    start_centred(model, center, s.resolved(), NEWS)
    rows = names - center
    expected = 7.0 * rows / rows.norm(dim=1, keepdim=True)
    assert torch.allclose(_head(model).cpu(), expected, atol=1e-4)
    assert not torch.allclose(_head(model).cpu(), 7.0 * names / names.norm(dim=1, keepdim=True), atol=1e-2)
