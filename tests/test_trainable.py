"""What trains, and so travels, under each ``trainable`` mode: lora, ffa-lora, bias, head.

The expected sets are spelled out here from the tiny BERT's structure (2 layers, LoRA on
query/value), not taken from ``fedllm.model``, so that a change in what trains shows up.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import MetricRecord
from peft import get_peft_model_state_dict
from peft.tuners.lora import LoraLayer

from fedllm.accounting import plan_privacy
from fedllm.adapters import (
    adapter_from_record,
    adapter_state,
    adapter_to_record,
    save_adapter,
    set_adapter_arrays,
)
from fedllm.data import tokenize
from fedllm.model import build_model, load_trained
from fedllm.train import train_local
from server.strategy import AdapterFedAvg

from .conftest import DEVICE, LABELS
from .replies import reply

HEAD = {
    "base_model.model.classifier.modules_to_save.default.weight",
    "base_model.model.classifier.modules_to_save.default.bias",
}
LAYER = "base_model.model.bert.encoder.layer.{i}."
LORA_A = {LAYER + f"attention.self.{t}.lora_A.default.weight" for t in ("query", "value")}
LORA_B = {LAYER + f"attention.self.{t}.lora_B.default.weight" for t in ("query", "value")}
BIASES = {
    LAYER + suffix
    for suffix in (
        "attention.self.query.base_layer.bias",
        "attention.self.key.bias",
        "attention.self.value.base_layer.bias",
        "attention.output.dense.bias",
        "attention.output.LayerNorm.bias",
        "intermediate.dense.bias",
        "output.dense.bias",
        "output.LayerNorm.bias",
    )
}


def _per_layer(templates: set[str], layers=(0, 1)) -> set[str]:
    return {t.format(i=i) for t in templates for i in layers}


EXPECTED = {
    "lora": HEAD | _per_layer(LORA_A | LORA_B),
    "ffa-lora": HEAD | _per_layer(LORA_B),
    "bias": HEAD | _per_layer(BIASES),
    "head": HEAD,
}


def _peft_name(parameter_name: str) -> str:
    """peft's state-dict name for a parameter: without the adapter name and the head's wrapper."""
    return parameter_name.replace(".modules_to_save.default", "").replace(".default", "")


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _lora_a(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_A." in n}


def _one_dp_step(model, settings, tokenizer, frame) -> None:
    data = tokenize(frame, tokenizer, LABELS, settings.max_length)
    s = settings.replace(max_steps=1, target_epsilon=8.0)
    assert train_local(model, data, s.resolved(), plan=plan_privacy(s.resolved(), len(data))).steps == 1


@pytest.mark.parametrize("mode", ["lora", "ffa-lora", "bias", "head"])
def test_what_trains_is_what_travels(settings, tiny_config, mode):
    model = build_model(settings.replace(trainable=mode).resolved(), LABELS, DEVICE, tiny_config)
    trainable = _trainable(model)
    assert trainable == EXPECTED[mode]
    assert not any(".embeddings." in n for n in trainable)
    wire = list(adapter_state(model))
    assert sorted(wire) == sorted(_peft_name(n) for n in trainable)
    assert wire[-2:] == ["base_model.model.classifier.weight", "base_model.model.classifier.bias"]
    if mode == "lora":  # the old wire: peft's whole adapter state dict, same order, same tensors
        old = get_peft_model_state_dict(model)
        assert wire == list(old)
        assert all(torch.equal(adapter_state(model)[k], v) for k, v in old.items())


def test_bias_mode_trains_the_pooler_bias_only_when_cls_pools(settings, tiny_config):
    cls = build_model(
        settings.replace(trainable="bias", pooling="cls").resolved(), LABELS, DEVICE, tiny_config
    )
    pooler = "base_model.model.bert.pooler.dense.bias"
    assert _trainable(cls) == EXPECTED["bias"] | {pooler}
    assert _peft_name(pooler) in adapter_state(cls)


def test_ffa_lora_a_is_shared_frozen_and_stays_home(settings, tiny_config, tokenizer, frame):
    s = settings.replace(trainable="ffa-lora")
    site = build_model(s.resolved(), LABELS, DEVICE, tiny_config)
    a = _lora_a(site)
    assert len(a) == 4
    # an independent build (here even with other labels, so the global RNG drew differently)
    other = build_model(s.resolved(), ["x", "y"], DEVICE, tiny_config)
    assert all(torch.equal(v, _lora_a(other)[n]) for n, v in a.items())
    reseeded = _lora_a(build_model(s.replace(seed=1).resolved(), LABELS, DEVICE, tiny_config))
    assert all(not torch.equal(v, reseeded[n]) for n, v in a.items())
    # B is on the wire, A is not; loading a global update leaves A as it was
    wire = list(adapter_state(site))
    assert not any("lora_A" in k for k in wire) and sum("lora_B" in k for k in wire) == 4
    rng = np.random.default_rng(0)
    set_adapter_arrays(site, {k: rng.normal(size=v.shape) for k, v in adapter_state(site).items()})
    b = {n: p.detach().clone() for n, p in site.named_parameters() if ".lora_B." in n}
    _one_dp_step(site, s, tokenizer, frame)
    assert all(torch.equal(v, _lora_a(site)[n]) for n, v in a.items()), "A moved"
    moved = {n: p for n, p in site.named_parameters() if ".lora_B." in n}
    assert all(not torch.equal(v, moved[n]) for n, v in b.items()), "B did not train"


def _delta_weights(model) -> dict[str, torch.Tensor]:
    """Per adapted layer, the LoRA update B @ A * scaling, as peft merges it."""
    return {
        n: m.get_delta_weight("default").detach().clone()
        for n, m in model.named_modules()
        if isinstance(m, LoraLayer)
    }


def _fedavg_delta(settings, tiny_config, mode: str, seed: int) -> tuple[dict, dict]:
    """(ΔW of the FedAvg'd adapter, weighted mean of the three sites' ΔW) for random site updates."""
    s = settings.replace(trainable=mode)
    rng = np.random.default_rng(seed)
    sizes = [10, 20, 30]
    replies, site_deltas = [], []
    for node, n in enumerate(sizes, start=1):
        site = build_model(s.resolved(), LABELS, DEVICE, tiny_config)
        update = {k: rng.normal(size=v.shape) for k, v in adapter_state(site).items()}
        set_adapter_arrays(site, update)
        site_deltas.append(_delta_weights(site))
        records = {"arrays": adapter_to_record(site), "metrics": MetricRecord({"num-examples": n})}
        replies.append(reply(node, {}, records=records))
    arrays, _ = AdapterFedAvg().aggregate_train(1, replies)
    server = build_model(s.resolved(), LABELS, DEVICE, tiny_config)
    adapter_from_record(server, arrays)
    weights = [n / sum(sizes) for n in sizes]
    mean = {k: sum(w * d[k] for w, d in zip(weights, site_deltas, strict=True)) for k in site_deltas[0]}
    return _delta_weights(server), mean


def test_fedavg_of_ffa_lora_b_averages_the_updates_exactly(settings, tiny_config):
    aggregated, mean = _fedavg_delta(settings, tiny_config, "ffa-lora", seed=0)
    assert len(aggregated) == 4
    for name, delta in aggregated.items():
        assert torch.allclose(delta, mean[name], atol=1e-6), name
    # plain LoRA with different A per site: mean(B) @ mean(A) is not mean(B @ A)
    aggregated, mean = _fedavg_delta(settings, tiny_config, "lora", seed=0)
    gaps = [float((delta - mean[name]).abs().max()) for name, delta in aggregated.items()]
    assert min(gaps) > 1e-2, gaps


@pytest.mark.parametrize("mode", ["bias", "head"])
def test_dp_step_moves_only_what_trains_and_the_saved_adapter_reproduces_it(
    settings, tiny_checkpoint, tokenizer, frame, tmp_path, mode
):
    s = settings.replace(trainable=mode, model=str(tiny_checkpoint))
    model = build_model(s.resolved(), LABELS, DEVICE)
    before = _snapshot(model)
    _one_dp_step(model, s, tokenizer, frame)
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed == EXPECTED[mode]
    save_adapter(model, tmp_path / "adapter", LABELS)
    loaded, labels = load_trained(tmp_path / "adapter", s)
    assert labels == LABELS
    fresh = build_model(s.resolved(), LABELS, DEVICE).eval()
    ids = torch.randint(0, 1000, (4, 12), device=DEVICE)
    mask = torch.ones_like(ids)
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=ids, attention_mask=mask).logits
        reloaded = loaded(input_ids=ids, attention_mask=mask).logits
        untrained = fresh(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(reloaded, trained, rtol=0, atol=1e-6)
    assert not torch.allclose(untrained, trained, atol=1e-4), "the DP step changed nothing visible"


@pytest.mark.parametrize("mode", ["lora", "ffa-lora"])
def test_lora_layers_adapts_only_the_top_layers(settings, tiny_config, mode):
    model = build_model(
        settings.replace(trainable=mode, lora_layers=1).resolved(), LABELS, DEVICE, tiny_config
    )
    adapted = {n for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert adapted == {LAYER.format(i=1) + f"attention.self.{t}" for t in ("query", "value")}
    assert _trainable(model) == HEAD | _per_layer(
        LORA_B if mode == "ffa-lora" else LORA_A | LORA_B, layers=(1,)
    )
    with pytest.raises(ValueError, match="lora-layers=3"):
        build_model(settings.replace(trainable=mode, lora_layers=3).resolved(), LABELS, DEVICE, tiny_config)
