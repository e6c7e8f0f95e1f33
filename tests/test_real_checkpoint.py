"""The embedded MiniLM checkpoint: loads offline and takes a real DP-SGD step."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from fedllm.accounting import plan_privacy
from fedllm.config import Settings
from fedllm.data import load_splits, tokenize
from fedllm.model import build_model, embedded_model_path, load_tokenizer
from fedllm.train import train_local

pytestmark = pytest.mark.slow

OFFLINE_LOAD = """
from fedllm.config import Settings
from fedllm.model import build_model, count_parameters, load_tokenizer
model = build_model(Settings(device="cpu").resolved(), ["a", "b", "c"])
print(count_parameters(model)[1], load_tokenizer("")("hello world")["input_ids"])
"""


def test_embedded_minilm_loads_with_the_hub_offline(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-hf-home")}
    out = subprocess.run(
        [sys.executable, "-c", OFFLINE_LOAD], env=env, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[0] == "22789254"  # MiniLM-L6-H384 + 3-label head + LoRA r=8 on query/value
    assert "[101, 7592, 2088, 102]" in out.stdout  # the uncased BERT vocabulary


def test_embedded_minilm_is_pretrained_and_trains_privately():
    settings = Settings(
        max_length=64,
        batch_size=8,
        max_steps=1,
        target_epsilon=8.0,
        device="cpu",
        trainable="lora",
        optimizer="adamw",
        lr=5e-3,
        sample_rate=0.0,
    )  # the DP-LoRA path on the real checkpoint
    splits = load_splits(settings)
    model = build_model(settings.resolved(), splits.labels, torch.device("cpu"))
    with safe_open(str(embedded_model_path() / "model.safetensors"), "pt") as ckpt:
        pretrained = ckpt.get_tensor("encoder.layer.0.attention.self.query.weight")
    loaded = model.get_base_model().bert.encoder.layer[0].attention.self.query.base_layer.weight
    torch.testing.assert_close(loaded, pretrained)  # real pretrained weights, not a random init

    data = tokenize(splits.train.head(64), load_tokenizer(""), splits.labels, 64)
    lora_b = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    result = train_local(model, data, settings.resolved(), plan=plan_privacy(settings.resolved(), len(data)))
    assert result.steps == 1 and 0 < result.epsilon <= 8.0
    after = dict(model.named_parameters())
    assert all(not torch.equal(before, after[n]) for n, before in lora_b.items())
