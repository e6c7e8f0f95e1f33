"""Shared fixtures: a tiny random BERT (fast) with the embedded model's real tokenizer."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers/huggingface_hub are imported
import shutil
import tomllib
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import torch
from flwr.app import Context, RecordDict
from torch.utils.data import TensorDataset
from transformers import BertConfig, BertModel

from fedllm.config import Settings
from fedllm.model import build_model, embedded_model_path, load_tokenizer
from fedllm.site_state import HIGH_WATER_ENV, init_state

TINY = BertConfig(
    vocab_size=30522,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=512,
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


# ---------------------------------------------------------------- factories for repeated set-up


@pytest.fixture
def labels() -> list[str]:
    """The tiny data frame's labels, in the order the models are built with."""
    return list(LABELS)


@pytest.fixture
def tiny_model(settings, tiny_config) -> Callable[..., torch.nn.Module]:
    """``tiny_model(settings=None, labels=LABELS)``: the tiny random BERT with the settings'
    adapters and head, on DEVICE (``settings`` defaults to the ``settings`` fixture)."""

    def make(s: Settings | None = None, labels: list[str] | None = None) -> torch.nn.Module:
        return build_model((s or settings).resolved(), list(labels or LABELS), DEVICE, tiny_config)

    return make


@pytest.fixture
def token_dataset() -> Callable[[int], TensorDataset]:
    """``token_dataset(n)``: n seeded rows of 3 random token ids (1-15), a full mask and a label
    in 0-2; for the bag-of-embeddings classifiers that exercise Opacus fast."""

    def make(n: int) -> TensorDataset:
        generator = torch.Generator().manual_seed(n)
        ids = torch.randint(1, 16, (n, 3), generator=generator)
        return TensorDataset(ids, torch.ones_like(ids), torch.randint(0, 3, (n,), generator=generator))

    return make


def flower_context(node_config=None, run_config=None, run_id: int = 1, node_id: int = 7) -> Context:
    """A Flower Context as a SuperNode gives the ClientApp (node_id 0: as the ServerApp gets it)."""
    return Context(
        run_id=run_id,
        node_id=node_id,
        node_config=dict(node_config or {}),
        state=RecordDict(),
        run_config=dict(run_config or {}),
    )


# the DP count's noise, in rows, of the ``run_config`` fixture: small beside the ~47-row ``site``,
# so the plan made from n̂ (the head's step cap) takes the same steps whatever n̂ is drawn
COUNT_NOISE = 4.0


@pytest.fixture
def site(tmp_path, frame) -> dict:
    """A deployed site's node config: its own data file (the ``frame``) and an initialised state
    folder. Drive it with ``tests.sites.ask``."""
    data = tmp_path / "ward-7-private.csv"
    frame.to_csv(data, index=False)
    return {"data-file": str(data), "state-dir": init_site(tmp_path / "state")}


@pytest.fixture
def run_config(tiny_checkpoint) -> dict:
    """A small DP run on the tiny checkpoint (ε 7, 2 local steps) as the server sends it to a site."""
    return {
        "model": str(tiny_checkpoint),
        "max-length": 32,
        "batch-size": 16,
        "max-steps": 2,
        "lr": 0.05,
        "target-epsilon": 7.0,
        "count-noise": COUNT_NOISE,
    }


@pytest.fixture
def make_context() -> Callable[..., Context]:
    """``make_context(node_config=None, run_config=None, run_id=1, node_id=7)``: ``flower_context``."""
    return flower_context


@pytest.fixture
def server_context(tiny_checkpoint, make_context) -> Callable[..., Context]:
    """``server_context(run_dir, **keys)``: the ServerApp's Context with pyproject.toml's run config
    (what ``flwr run`` sends without overrides), the tiny checkpoint, max-length 32 and ``run_dir``."""
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    table = tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"]

    def make(run_dir: Path, **keys) -> Context:
        config = {**table, "model": str(tiny_checkpoint), "max-length": 32, "run-dir": str(run_dir), **keys}
        return make_context(run_config=config, run_id=5, node_id=0)

    return make
