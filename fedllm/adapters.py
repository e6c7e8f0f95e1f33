"""The adapter boundary: trainable state (LoRA A/B + head) <-> named numpy arrays.

Order on the wire: the order of peft's ``get_peft_model_state_dict`` for the model, i.e. the
model's own parameter order (layer by layer, ``lora_A`` before ``lora_B``, the classification
head last). ``adapter_spec`` names and shapes that order; both sides build the same model from
the same settings, so they agree on it, and ``set_adapter_arrays`` checks every array against it.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict


class AdapterMismatchError(ValueError):
    """An incoming adapter does not fit the local model (names, shapes, dtype or values)."""


def adapter_state(model: PeftModel) -> OrderedDict[str, torch.Tensor]:
    """peft's adapter state dict (LoRA A/B and ``modules_to_save`` head), in wire order."""
    return OrderedDict(get_peft_model_state_dict(model))


def adapter_spec(model: PeftModel) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, dtype) of each adapter array, in wire order."""
    return [(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in adapter_state(model).items()]


def get_adapter_arrays(model: PeftModel) -> OrderedDict[str, np.ndarray]:
    """The adapter as named float32 numpy arrays (copies, on the CPU)."""
    return OrderedDict(
        (k, v.detach().to("cpu", torch.float32).numpy().copy()) for k, v in adapter_state(model).items()
    )


def set_adapter_arrays(model: PeftModel, arrays: dict[str, np.ndarray] | list[np.ndarray]) -> None:
    """Load named (or positional, in wire order) arrays into the model, after validation.

    Raises ``AdapterMismatchError`` naming the first offending array when a name is missing or
    unexpected, a shape or dtype differs, or a value is NaN/inf; the model is untouched then.
    """
    expected = adapter_state(model)
    if isinstance(arrays, list):
        if len(arrays) != len(expected):
            raise AdapterMismatchError(
                f"adapter has {len(arrays)} arrays, the model expects {len(expected)}: "
                "were server and site built with the same lora-r / lora-targets / labels?"
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
    result = set_peft_model_state_dict(model, new_state)
    unexpected = getattr(result, "unexpected_keys", []) or []
    if unexpected:
        raise AdapterMismatchError(f"peft did not accept adapter keys {unexpected[:3]}")


def nbytes(arrays: dict[str, np.ndarray] | list[np.ndarray]) -> int:
    """Total payload bytes of a set of arrays."""
    values = arrays.values() if isinstance(arrays, dict) else arrays
    return int(sum(np.asarray(a).nbytes for a in values))


def full_model_nbytes(model: PeftModel) -> int:
    """Bytes of the whole model's state dict (what sending the full model would cost)."""
    base = model.get_base_model()
    return int(sum(t.numel() * t.element_size() for t in base.state_dict().values()))


def save_adapter(
    model: PeftModel, directory: str | Path, labels: list[str], extra: dict | None = None
) -> Path:
    """Save in peft's own format (``save_pretrained``) plus ``labels.json`` with the label map."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory))
    meta = {"labels": labels, "id2label": dict(enumerate(labels)), **(extra or {})}
    (directory / "labels.json").write_text(json.dumps(meta, indent=2))
    return directory
