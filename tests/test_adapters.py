"""The adapter boundary: exact round trip, validation, peft's own on-disk format."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import PeftModel

from fedllm.adapters import (
    AdapterMismatchError,
    adapter_spec,
    full_model_nbytes,
    get_adapter_arrays,
    nbytes,
    save_adapter,
    set_adapter_arrays,
)
from fedllm.model import build_base_model, build_model, load_trained

from .conftest import DEVICE, LABELS


@pytest.fixture
def model(settings, tiny_config):
    return build_model(settings, LABELS, DEVICE, tiny_config)


def test_round_trip_is_exact(settings, tiny_config, model):
    rng = np.random.default_rng(0)
    sent = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in get_adapter_arrays(model).items()}
    other = build_model(settings.replace(seed=1), LABELS, DEVICE, tiny_config)
    set_adapter_arrays(other, list(sent.values()))
    received = get_adapter_arrays(other)
    assert list(received) == list(sent)
    for name in sent:
        np.testing.assert_array_equal(received[name], sent[name])


def test_wire_order_is_lora_then_head(model):
    names = [name for name, _, _ in adapter_spec(model)]
    assert any("lora_A" in n for n in names) and any("lora_B" in n for n in names)
    assert "classifier" in names[-1]
    assert all(dtype == "float32" for _, _, dtype in adapter_spec(model))


def test_wrong_shape_is_refused_with_name(model):
    arrays = get_adapter_arrays(model)
    name = next(iter(arrays))
    arrays[name] = np.zeros((3, 3), dtype=np.float32)
    with pytest.raises(AdapterMismatchError, match="shape"):
        set_adapter_arrays(model, arrays)


def test_nan_is_refused_and_model_untouched(model):
    arrays = get_adapter_arrays(model)
    before = get_adapter_arrays(model)
    name = list(arrays)[-1]
    arrays[name] = arrays[name].copy()
    arrays[name].flat[0] = np.nan
    with pytest.raises(AdapterMismatchError, match="NaN"):
        set_adapter_arrays(model, arrays)
    for k, v in get_adapter_arrays(model).items():
        np.testing.assert_array_equal(v, before[k])


def test_wrong_count_and_dtype_are_refused(model):
    arrays = list(get_adapter_arrays(model).values())
    with pytest.raises(AdapterMismatchError, match="arrays"):
        set_adapter_arrays(model, arrays[:-1])
    arrays[0] = arrays[0].astype(np.int64)
    with pytest.raises(AdapterMismatchError, match="dtype"):
        set_adapter_arrays(model, arrays)


def test_saved_adapter_loads_with_plain_peft(settings, tiny_config, model, tmp_path):
    rng = np.random.default_rng(1)
    set_adapter_arrays(
        model,
        {k: rng.normal(size=v.shape).astype(np.float32) for k, v in get_adapter_arrays(model).items()},
    )
    save_adapter(model, tmp_path, LABELS)
    base = build_base_model(settings, LABELS, tiny_config)
    loaded = PeftModel.from_pretrained(base.to(DEVICE), str(tmp_path))
    ids = torch.randint(0, 1000, (2, 10), device=DEVICE)
    mask = torch.ones_like(ids)
    model.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids, attention_mask=mask).logits,
            loaded(input_ids=ids, attention_mask=mask).logits,
        )


def test_update_is_far_smaller_than_full_model(model):
    assert full_model_nbytes(model) > 20 * nbytes(get_adapter_arrays(model))


def test_load_trained_rebuilds_the_scored_model(settings, tiny_checkpoint, tmp_path):
    s = settings.replace(model=str(tiny_checkpoint))
    model = build_model(s, LABELS, DEVICE)
    rng = np.random.default_rng(2)
    set_adapter_arrays(
        model, {k: rng.normal(size=v.shape).astype(np.float32) for k, v in get_adapter_arrays(model).items()}
    )
    save_adapter(model, tmp_path / "adapter", LABELS)
    loaded, labels = load_trained(tmp_path / "adapter", s)
    assert labels == LABELS
    ids = torch.randint(0, 1000, (2, 12), device=DEVICE)
    mask = torch.ones_like(ids)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids, attention_mask=mask).logits,
            loaded(input_ids=ids, attention_mask=mask).logits,
        )
