"""Shared fixtures: a tiny random BERT (fast) with the embedded model's real tokenizer."""

from __future__ import annotations

import os

import pandas as pd
import pytest
from transformers import BertConfig

from fedllm.config import Settings
from fedllm.model import load_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY = BertConfig(
    vocab_size=30522,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=64,
)
LABELS = ["negative", "neutral", "positive"]


@pytest.fixture(scope="session")
def tiny_config() -> BertConfig:
    return TINY


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer("")


@pytest.fixture
def settings() -> Settings:
    return Settings(max_length=32, batch_size=8, epochs=1, lr=1e-2, seed=0, device="cpu")


@pytest.fixture
def frame() -> pd.DataFrame:
    words = {
        "negative": "awful terrible pain",
        "neutral": "okay fine average",
        "positive": "great relief happy",
    }
    rows = [
        {"text": f"{words[label]} review number {i}", "label": label, "condition": f"c{i % 5}"}
        for i in range(60)
        for label in [LABELS[i % 3]]
    ]
    return pd.DataFrame(rows)
