"""Shared fixtures: a tiny random BERT (fast) with the embedded model's real tokenizer."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers/huggingface_hub are imported
import shutil

import pandas as pd
import pytest
import torch
from transformers import BertConfig, BertModel

from fedllm.config import Settings
from fedllm.model import embedded_model_path, load_tokenizer
from fedllm.site_state import HIGH_WATER_ENV, init_state

TINY = BertConfig(
    vocab_size=30522,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=64,
)
LABELS = ["negative", "neutral", "positive"]
# The library tests run on the CPU; FEDLLM_TEST_DEVICE=cuda runs the ones marked `gpu` on a GPU
# (`FEDLLM_TEST_DEVICE=cuda python -m pytest -m gpu`).
DEVICE = torch.device(os.environ.get("FEDLLM_TEST_DEVICE", "cpu"))


@pytest.fixture(autouse=True)
def high_water_dir(tmp_path, monkeypatch):
    """Every test's high-water marks in its own folder (never the user's ~/.local/state)."""
    folder = tmp_path / "high-water"
    monkeypatch.setenv(HIGH_WATER_ENV, str(folder))
    return folder


def init_site(state_dir) -> str:
    """``python -m clients.site init`` for a test site's state folder; its absolute path."""
    return str(init_state(state_dir, new_site=True)[0].folder)


@pytest.fixture(scope="session")
def tiny_config() -> BertConfig:
    return TINY


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer("")


@pytest.fixture
def settings() -> Settings:
    # the LoRA path with AdamW and batches of batch-size, whatever the DP recipe's 'auto' picks
    return Settings(
        max_length=32,
        batch_size=8,
        epochs=1,
        lr=1e-2,
        seed=0,
        device=str(DEVICE),
        trainable="lora",
        optimizer="adamw",
        sample_rate=0.0,
    )


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


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random BERT saved as a HF checkpoint, with the embedded model's tokenizer files.

    The Flower apps load models by path, exactly as they do the real checkpoint.
    """
    path = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    BertModel(TINY).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(embedded_model_path() / name, path / name)
    return path
