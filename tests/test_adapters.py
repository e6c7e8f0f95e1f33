"""The adapter boundary: the wire record, its validation, peft's own on-disk format."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from peft import PeftModel, get_peft_model_state_dict

from fedllm.adapters import (
    AdapterMismatchError,
    adapter_from_record,
    adapter_state,
    adapter_to_record,
    save_adapter,
    set_adapter_arrays,
)
from fedllm.model import build_base_model, build_model, count_parameters, load_trained, set_feature_center

from .conftest import DEVICE

pytestmark = pytest.mark.gpu  # they train and load on DEVICE (FEDLLM_TEST_DEVICE=cuda: the GPU)


@pytest.fixture
def model(settings, tiny_model):
    return tiny_model(settings)


def _randomize(model, seed: int) -> None:
    rng = np.random.default_rng(seed)
    set_adapter_arrays(
        model, {k: rng.normal(size=v.shape).astype(np.float32) for k, v in adapter_state(model).items()}
    )


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


def _numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in record.items()}


def test_round_trip_is_bit_exact(settings, model, tiny_model):
    _randomize(model, 0)
    sent = adapter_to_record(model)
    other = tiny_model(settings.replace(seed=1))
    adapter_from_record(other, sent)
    received = adapter_to_record(other)
    assert list(received) == list(sent)
    for name, array in sent.items():
        assert (received[name].data, received[name].dtype, received[name].shape) == (
            array.data,
            array.dtype,
            array.shape,
        )


def test_the_record_is_peft_state_dict_in_order_as_float32(model):
    record = adapter_to_record(model)
    assert list(record) == list(get_peft_model_state_dict(model))  # trainable = lora: all of it
    assert "classifier" in list(record)[-1]
    assert {a.dtype for a in record.values()} == {"float32"}


@pytest.mark.parametrize("mode", ["lora", "ffa-lora", "bias", "head"])
def test_the_record_carries_exactly_the_dp_dimension(settings, mode, tiny_model):
    """The trainable count a site plans its noise for is the number of values it sends."""
    model = tiny_model(settings.replace(trainable=mode))
    sent = sum(int(np.prod(a.shape)) for a in adapter_to_record(model).values())
    assert sent == count_parameters(model)[0]


def test_wrong_shape_is_refused_with_name(model):
    arrays = _numpy(adapter_to_record(model))
    name = next(iter(arrays))
    arrays[name] = np.zeros((3, 3), dtype=np.float32)
    with pytest.raises(AdapterMismatchError, match=f"{name!r} has shape"):
        adapter_from_record(model, _record(arrays))


def test_nan_is_refused_and_model_untouched(model):
    before = adapter_to_record(model)
    arrays = _numpy(before)
    name = list(arrays)[-1]
    arrays[name].flat[0] = np.nan
    with pytest.raises(AdapterMismatchError, match="NaN"):
        adapter_from_record(model, _record(arrays))
    assert [a.data for a in adapter_to_record(model).values()] == [a.data for a in before.values()]


def test_missing_names_and_int_dtype_are_refused(model):
    arrays = _numpy(adapter_to_record(model))
    last = list(arrays)[-1]
    with pytest.raises(AdapterMismatchError, match="names differ"):
        adapter_from_record(model, _record({k: v for k, v in arrays.items() if k != last}))
    arrays[last] = arrays[last].astype(np.int64)
    with pytest.raises(AdapterMismatchError, match="dtype"):
        adapter_from_record(model, _record(arrays))


def test_an_oversized_array_is_refused_before_it_is_decoded(model, monkeypatch):
    """A record whose payload does not fit its declaration is never decoded (issue 22, 3)."""
    arrays = {k: Array(v) for k, v in _numpy(adapter_to_record(model)).items()}
    name = list(arrays)[-1]
    shape = tuple(arrays[name].shape)
    payload = Array(np.zeros(5_000_000, np.float32)).data  # 20 MB under a head-sized declaration
    arrays[name] = Array(dtype="float32", shape=shape, stype="numpy.ndarray", data=payload)
    monkeypatch.setattr(Array, "numpy", lambda self: pytest.fail("an array was decoded"))
    with pytest.raises(AdapterMismatchError, match=f"{name!r} cannot be read: its payload is 20000128"):
        adapter_from_record(model, ArrayRecord(arrays))


def test_wrong_count_is_refused(model):
    arrays = list(_numpy(adapter_to_record(model)).values())
    with pytest.raises(AdapterMismatchError, match="arrays"):
        set_adapter_arrays(model, arrays[:-1])


def test_saved_adapter_loads_with_plain_peft(settings, tiny_config, model, tmp_path, labels):
    _randomize(model, 1)
    save_adapter(model, tmp_path, labels)
    base = build_base_model(settings, labels, tiny_config)
    loaded = PeftModel.from_pretrained(base.to(DEVICE), str(tmp_path))
    ids = torch.randint(0, 1000, (2, 10), device=DEVICE)
    mask = torch.ones_like(ids)
    model.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids, attention_mask=mask).logits,
            loaded(input_ids=ids, attention_mask=mask).logits,
        )


@pytest.mark.parametrize("centred", [False, True])
def test_load_trained_rebuilds_the_scored_model(settings, tiny_checkpoint, tmp_path, labels, centred):
    s = settings.replace(model=str(tiny_checkpoint))
    model = build_model(s.resolved(), labels, DEVICE)
    _randomize(model, 2)
    if centred:  # center-features: the centre is not in peft's state dict, labels.json keeps it
        set_feature_center(
            model, torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
        )
    save_adapter(model, tmp_path / "adapter", labels)
    loaded, loaded_labels = load_trained(tmp_path / "adapter", s)
    assert loaded_labels == labels
    ids = torch.randint(0, 1000, (2, 12), device=DEVICE)
    mask = torch.ones_like(ids)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids, attention_mask=mask).logits,
            loaded(input_ids=ids, attention_mask=mask).logits,
        )
