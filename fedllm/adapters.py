"""The adapter boundary: the trainable state <-> Flower's ``ArrayRecord`` on the wire.

What travels is exactly what trains (``requires_grad``; see ``fedllm.model`` for each
``trainable`` mode), named as in peft's ``get_peft_model_state_dict`` and in its order (layer by
layer, ``lora_A`` before ``lora_B``, the classification head last). For ``trainable = lora``
that is peft's whole adapter state dict, as it always was; frozen tensors that peft saves
(ffa-lora's shared A, the zero-B LoRA placeholder of ``bias``/``head``, frozen biases) stay home.
``adapter_to_record`` sends that state dict as Flower's LLM example sends peft's
(``ArrayRecord(state_dict)``: float32, on the CPU); ``adapter_from_record`` loads a received record.
Both sides build the same model from the same settings, so they agree on names and shapes, and
every received array is checked against the local model before any is written.
``save_adapter`` saves peft's full adapter, frozen parts included, for ``load_trained``.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord
from peft import PeftModel, get_peft_model_state_dict
from torch import nn

from fedllm.model import FEATURE_CENTER_KEY, feature_center
from fedllm.wire import declared_problem


class AdapterMismatchError(ValueError):
    """An incoming adapter does not fit the local model (names, shapes, dtype or values)."""


def wire_parameters(model: PeftModel) -> OrderedDict[str, nn.Parameter]:
    """The trainable parameters under their peft state-dict names, in peft's order.

    Each entry of peft's state dict is matched to the parameter whose storage it is. A parameter
    peft lists twice (the head's bias under ``bias="all"``) keeps its last, canonical name
    (``...classifier.bias``) and place. Raises ``RuntimeError`` when a trainable parameter is not
    in peft's state dict: ``save_pretrained`` would then drop what was trained.
    """
    trainable = {(p.data_ptr(), tuple(p.shape)): p for p in model.parameters() if p.requires_grad}
    wire: OrderedDict[str, nn.Parameter] = OrderedDict()
    named: dict[int, str] = {}
    for key, tensor in get_peft_model_state_dict(model).items():
        param = trainable.get((tensor.data_ptr(), tuple(tensor.shape)))
        if param is None:  # frozen: saved with the adapter, never sent
            continue
        if id(param) in named:
            del wire[named[id(param)]]
        wire[key] = param
        named[id(param)] = key
    if len(wire) != len(trainable):
        unsaved = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in named]
        raise RuntimeError(f"trainable parameters that peft would not save: {unsaved[:3]}")
    return wire


def adapter_state(model: PeftModel) -> OrderedDict[str, torch.Tensor]:
    """The tensors that train, in wire order (for ``trainable = lora``: peft's adapter state dict)."""
    return OrderedDict((k, p.detach()) for k, p in wire_parameters(model).items())


def adapter_to_record(model: PeftModel) -> ArrayRecord:
    """The adapter as it goes on the wire: ``adapter_state`` in an ``ArrayRecord`` (CPU copies)."""
    return ArrayRecord(adapter_state(model))


def adapter_from_record(model: PeftModel, record: ArrayRecord) -> None:
    """Load a received adapter record into ``model``, validated by ``set_adapter_arrays``.

    The names and each array's declaration (float dtype, the model's shape, a payload of that
    size: ``fedllm.wire.declared_problem``) are checked before any array is decoded, so an
    oversized payload is refused without being copied. Raises ``AdapterMismatchError`` (names,
    shapes, dtype, NaN/inf); the model is untouched then.
    """
    expected = wire_parameters(model)
    missing = [k for k in expected if k not in record]
    extra = [k for k in record if k not in expected]
    if missing or extra:
        raise AdapterMismatchError(
            f"adapter names differ from the model's: missing {missing[:3]}, unexpected {extra[:3]}"
        )
    for name, param in expected.items():
        if problem := declared_problem(name, record[name], tuple(param.shape), dtypes=None):
            raise AdapterMismatchError(problem)
    set_adapter_arrays(model, {name: array.numpy() for name, array in record.items()})


def set_adapter_arrays(model: PeftModel, arrays: dict[str, np.ndarray] | list[np.ndarray]) -> None:
    """Load named (or positional, in wire order) arrays into the model, after validation.

    Only the trainable tensors are written (frozen ones, e.g. ffa-lora's A, are never touched).
    Raises ``AdapterMismatchError`` naming the first offending array when a name is missing or
    unexpected, a shape or dtype differs, or a value is NaN/inf; the model is untouched then.
    """
    expected = wire_parameters(model)
    if isinstance(arrays, list):
        if len(arrays) != len(expected):
            raise AdapterMismatchError(
                f"adapter has {len(arrays)} arrays, the model expects {len(expected)}: were server and "
                "site built with the same trainable / lora-r / lora-targets / lora-layers / labels?"
            )
        arrays = dict(zip(expected.keys(), arrays, strict=True))
    missing = [k for k in expected if k not in arrays]
    extra = [k for k in arrays if k not in expected]
    if missing or extra:
        raise AdapterMismatchError(
            f"adapter names differ from the model's: missing {missing[:3]}, unexpected {extra[:3]}"
        )
    new_state = OrderedDict()
    for name, ref in expected.items():
        arr = np.asarray(arrays[name])
        if tuple(arr.shape) != tuple(ref.shape):
            raise AdapterMismatchError(
                f"adapter array {name!r} has shape {tuple(arr.shape)}, expected {tuple(ref.shape)}"
            )
        if not np.issubdtype(arr.dtype, np.floating):
            raise AdapterMismatchError(
                f"adapter array {name!r} has dtype {arr.dtype}, expected a float array"
            )
        if not np.all(np.isfinite(arr)):
            raise AdapterMismatchError(f"adapter array {name!r} contains NaN or inf values")
        new_state[name] = torch.from_numpy(np.ascontiguousarray(arr)).to(ref.device, ref.dtype)
    with torch.no_grad():
        for name, param in expected.items():
            param.copy_(new_state[name])


def full_model_nbytes(model: PeftModel) -> int:
    """Bytes of the whole model's state dict (what sending the full model would cost)."""
    base = model.get_base_model()
    return int(sum(t.numel() * t.element_size() for t in base.state_dict().values()))


def save_adapter(
    model: PeftModel, directory: str | Path, labels: list[str], extra: dict | None = None
) -> Path:
    """Save in peft's own format (``save_pretrained``) plus ``labels.json`` with the label map.

    peft saves its whole adapter, not just what travels: frozen LoRA A (ffa-lora), the trained
    biases (``bias``, via peft's ``bias="all"``) and the head, so ``load_trained`` rebuilds it;
    ``labels.json`` also keeps the feature centre (``center-features``) where the model has one.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory))
    meta = {"labels": labels, "id2label": dict(enumerate(labels)), **(extra or {})}
    if (center := feature_center(model)) is not None:  # center-features: not in peft's state dict
        meta[FEATURE_CENTER_KEY] = center.cpu().tolist()
    (directory / "labels.json").write_text(json.dumps(meta, indent=2))
    return directory
