"""The encoder's fast paths under DP: the cached frozen prefix, length order, bf16 autocast.

Each fast path must leave the model and the mechanism as they were: the same logits after the
same noise-free DP training, the same per-example gradients whatever shares the batch, float32
trainable weights and per-example gradients under bf16.
"""

from __future__ import annotations

import copy

import pytest
import torch
from opacus import GradSampleModule
from torch.utils.data import TensorDataset
from transformers import BertConfig

from fedllm import precision as precision_module
from fedllm import prefix as prefix_module
from fedllm.accounting import PrivacyPlan
from fedllm.config import Settings
from fedllm.model import build_model, set_feature_center
from fedllm.precision import (
    FP32_ATTENTION,
    attention_in_fp32,
    autocast,
    keep_trainable_fp32,
    resolve_precision,
)
from fedllm.prefix import frozen_prefix, prefix_view
from fedllm.train import train_local

CONFIG = BertConfig(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=512,
)
LABELS = ["a", "b", "c"]


def _data(n: int = 24, length: int = 20, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (n, length), generator=generator)
    mask = torch.zeros_like(ids)
    for i, real in enumerate(torch.randint(3, length + 1, (n,), generator=generator).tolist()):
        mask[i, :real] = 1
    return TensorDataset(ids * mask, mask, torch.randint(0, 3, (n,), generator=generator))


def _settings(**changes) -> Settings:
    base = Settings(
        trainable="ffa-lora",
        lora_layers=2,
        target_epsilon=8.0,
        sample_rate=1.0,
        max_steps=3,
        physical_batch_size=8,
        precision="fp32",
        device="cpu",
        seed=3,
    )
    return base.replace(**changes)


def _model(settings: Settings):
    model = build_model(settings.resolved(), LABELS, torch.device("cpu"), CONFIG)
    with torch.no_grad():  # B away from 0, so the top layers' adapters matter from the first step
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    return model


def _logits(model, data: TensorDataset) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=data.tensors[0], attention_mask=data.tensors[1]).logits


def test_prefix_counts_only_frozen_adapter_free_layers():
    assert frozen_prefix(_model(_settings())) == 2
    assert frozen_prefix(_model(_settings(lora_layers=0))) == 0
    assert frozen_prefix(_model(_settings(trainable="bias"))) == 0  # biases train below the top
    assert frozen_prefix(_model(_settings(pool_layers=3))) == 1  # the pooled layers run on the cache


@pytest.mark.parametrize(
    ("normalize", "pool_layers", "centred"),
    [(False, 1, False), (True, 1, False), (True, 3, False), (False, 3, True)],
)
def test_cached_prefix_trains_the_same_model_as_the_full_pass(normalize, pool_layers, centred):
    """Noise off, full batches: training on the cached prefix gives the uncached logits (1e-5),
    the head's input centred (``center-features``) or not."""
    data, plan = _data(), PrivacyPlan(0.0, 1.0, 1e-5, 3, float("inf"), "rdp")

    def model_of(settings):
        model = _model(settings)
        if centred:
            width = model.config.hidden_size * pool_layers
            set_feature_center(model, torch.linspace(-0.5, 0.5, width))
        return model

    trained = {}
    for cached in (False, True):
        prefix_module._CACHE.clear()
        settings = _settings(prefix_cache=cached, normalize_features=normalize, pool_layers=pool_layers)
        model = model_of(settings)
        train_local(model, data, settings.resolved(), plan=plan)
        trained[cached] = model
        assert len(prefix_module._CACHE) == int(cached)  # the cached run trained on the cache
    before = _logits(model_of(_settings(normalize_features=normalize, pool_layers=pool_layers)), data)
    after = _logits(trained[True], data)
    assert (after - before).abs().max() > 1e-3  # the training moved the logits
    assert torch.allclose(after, _logits(trained[False], data), atol=1e-5, rtol=0)
    net, cached = prefix_view(trained[True], data)  # and the top layers alone agree too
    with torch.no_grad():
        assert torch.allclose(net(*cached.tensors[:2]), after, atol=1e-5, rtol=0)


def _per_example_grads(model, data: TensorDataset) -> dict[str, torch.Tensor]:
    net, cached = prefix_view(model, data)
    wrapped = GradSampleModule(net, loss_reduction="sum")
    logits = wrapped(*cached.tensors[:2])
    torch.nn.functional.cross_entropy(logits, cached.tensors[2], reduction="sum").backward()
    grads = {n: p.grad_sample[0].clone() for n, p in wrapped.named_parameters() if p.requires_grad}
    wrapped._close()
    return grads


def test_an_examples_gradient_does_not_depend_on_its_batch_companions():
    """Example 0 (6 real tokens) alone, beside short texts and beside long ones: same gradient."""
    model = _model(_settings())
    model.train()
    data = _data(n=8, length=20)
    mask = data.tensors[1].clone()
    mask[0] = 0
    mask[0, :6] = 1
    ids = data.tensors[0] * mask
    alone = TensorDataset(ids[:1], mask[:1], data.tensors[2][:1])
    short = mask.clone()
    short[1:, 8:] = 0
    long = mask.clone()
    long[1:] = 1
    reference = _per_example_grads(model, alone)
    for companions in (short, long):
        grads = _per_example_grads(model, TensorDataset(ids, companions, data.tensors[2]))
        for name, value in reference.items():
            assert torch.allclose(grads[name], value, atol=1e-6), name


def test_bf16_keeps_trainable_weights_and_per_example_gradients_float32():
    model = _model(_settings())
    model.train()
    net, data = prefix_view(model, _data())
    wrapped = GradSampleModule(net)
    restore = keep_trainable_fp32(wrapped)
    with autocast("bf16", torch.device("cpu")):
        logits = wrapped(*data.tensors[:2])
    assert logits.dtype == torch.float32
    torch.nn.functional.cross_entropy(logits, data.tensors[2]).backward()
    trained = [p for p in wrapped.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    assert all(p.grad_sample.dtype == torch.float32 for p in trained)
    restore()
    assert all("forward" not in vars(m) for m in wrapped.modules())
    wrapped._close()


def test_bf16_dp_training_stays_close_to_fp32():
    data, plan = _data(), PrivacyPlan(0.0, 1.0, 1e-5, 3, float("inf"), "rdp")
    logits = {}
    for precision in ("fp32", "bf16"):
        settings = _settings(precision=precision)
        model = _model(settings)
        train_local(model, data, copy.deepcopy(settings).resolved(), plan=plan)
        logits[precision] = _logits(model, data)
        assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.allclose(logits["bf16"], logits["fp32"], atol=0.1)


@pytest.mark.parametrize(
    ("name", "flags", "expected"),
    [
        ("auto", {"avx512_bf16"}, "bf16"),
        ("auto", {"amx_bf16"}, "bf16"),
        ("auto", {"avx2"}, "fp32"),
        ("fp32", {"amx_bf16"}, "fp32"),
        ("bf16", set(), "bf16"),
    ],
)
def test_auto_precision_follows_the_cpu_flags(monkeypatch, name, flags, expected):
    monkeypatch.setattr(precision_module, "cpu_flags", lambda: flags)
    assert resolve_precision(name, torch.device("cpu")) == expected


def test_bad_precision_names_the_key():
    with pytest.raises(ValueError, match="precision"):
        Settings(precision="fp16").validate()


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"target_epsilon": 8.0}, ("head", 0)),  # devices not declared: the slowest site decides
        ({"target_epsilon": 8.0, "site_devices": "cpu"}, ("head", 0)),  # the fast encoder did not win
        ({"target_epsilon": 3.0, "site_devices": "cuda"}, ("ffa-lora", 0)),
        ({"target_epsilon": 8.0, "site_devices": "cuda", "lora_layers": 3}, ("ffa-lora", 3)),
        ({"target_epsilon": 1.0, "site_devices": "cuda"}, ("head", 0)),  # the head wins at ε 1
        ({"noise_multiplier": 1.0, "site_devices": "cuda"}, ("head", 0)),  # ε unknown before training
        ({"target_epsilon": float("inf"), "site_devices": "cpu"}, ("lora", 0)),
    ],
)
def test_auto_trainable_decides_from_the_run_config(changes, expected):
    resolved = Settings(**changes).validate().resolved()
    assert (resolved.trainable, resolved.lora_layers) == expected
    assert resolved.resolved() == resolved  # idempotent


def test_bad_site_devices_names_the_key():
    with pytest.raises(ValueError, match="site-devices"):
        Settings(site_devices="tpu").validate()


def test_cpu_attention_runs_in_fp32_under_bf16_and_is_restored():
    model = _model(_settings())
    data = _data()
    config = model.get_base_model().config
    assert config._attn_implementation == "sdpa"
    restore = attention_in_fp32(model)
    assert config._attn_implementation == FP32_ATTENTION
    with autocast("bf16", torch.device("cpu")):
        bf16 = _logits(model, data).float()
    restore()
    assert config._attn_implementation == "sdpa"
    assert torch.allclose(bf16, _logits(model, data), atol=0.1)
