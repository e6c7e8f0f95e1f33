"""The frozen encoder's pooled outputs, computed once per data set: the fast path of ``head``.

With ``trainable = "head"`` nothing below the classification head trains, so every example's
pooled encoder output is fixed: it is computed once (``pooled_features``) and kept in a small
in-process cache keyed by the encoder and the token ids, and the head trains on those features
in the one training loop (``HeadOnFeatures``). Training the head this way is the same model as
training it inside BERT (dropout aside: cached features are taken without dropout), in seconds
instead of minutes. DP-SGD on it is the *DP linear probe*.

With ``FEDLLM_FEATURE_CACHE`` set to a folder, the features are also kept there, one
safetensors file per data set, keyed by every encoder weight, the pooling and the token ids, so
another process (the next point of a sweep, the next round's ClientApp process) reads them
instead of running the encoder again. The files hold what the encoder makes of the texts: keep
the folder where the texts themselves may be (``simulations.run`` keeps it in its output
folder; a site that sets it, beside its data: docs/deployment.md).
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedllm.model import base_of, centred, feature_center, mean_pool

_CACHE: OrderedDict[str, torch.Tensor] = OrderedDict()
_CACHE_ENTRIES = 64
FEATURE_CACHE_ENV = "FEDLLM_FEATURE_CACHE"  # a folder: the features kept on disk as well (above)
_FILE_FORMAT = "fedllm pooled features 1"  # change it when _encode changes what it computes


def _key(model: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor, every_weight: bool = False) -> str:
    """The cache key: the encoder (its name and a few embedding rows, or ``every_weight``: all of
    its weights, for a file another process may read), the pooling and the token ids."""
    base = base_of(model)
    digest = hashlib.sha256()
    digest.update(str(getattr(base.config, "_name_or_path", "")).encode())
    digest.update(type(base).__name__.encode())
    digest.update(str(getattr(base.config, "normalize_pooled", False)).encode())
    digest.update(str(getattr(base.config, "pool_layers", 1)).encode())
    if every_weight:  # where the file was made: the features' format and the device computing them
        digest.update(f"{_FILE_FORMAT} {next(base.parameters()).device.type}".encode())
    for name, value in base.bert.named_parameters():  # the encoder's weights identify it
        if every_weight:
            digest.update(name.encode())
            digest.update(value.detach().float().cpu().numpy().tobytes())
        elif name.endswith("embeddings.word_embeddings.weight"):
            digest.update(value.detach()[:4].cpu().numpy().tobytes())
    digest.update(input_ids.cpu().numpy().tobytes())
    digest.update(mask.cpu().numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def pooled_features(model: nn.Module, dataset: TensorDataset, batch_size: int = 64) -> TensorDataset:
    """(features, labels): the pooled encoder output of every example, as the classifier sees it.

    Mean pooling for ``BertMeanPoolForSequenceClassification``, BERT's pooler otherwise. The
    encoder must be frozen (``trainable = "head"``: LoRA B = 0, no bias trained), which is
    what makes the features fixed. Cached in-process by encoder and token ids.
    """
    input_ids, mask, labels = dataset.tensors
    key = _key(model, input_ids, mask)
    if key not in _CACHE:
        _CACHE[key] = _from_disk_or_encode(model, input_ids, mask, batch_size)
        while len(_CACHE) > _CACHE_ENTRIES:
            _CACHE.popitem(last=False)
    _CACHE.move_to_end(key)
    return TensorDataset(_CACHE[key], labels)


def _from_disk_or_encode(
    model: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """The features from ``FEDLLM_FEATURE_CACHE`` when a file holds them, else encoded (and
    written there, atomically, when the folder is set). A file that does not load is encoded
    again and replaced: it is a cache."""
    folder = os.environ.get(FEATURE_CACHE_ENV, "")
    if not folder:
        return _encode(model, input_ids, mask, batch_size)
    path = Path(folder) / f"{_key(model, input_ids, mask, every_weight=True)}.safetensors"
    kept = _read_kept(path, len(input_ids))
    if kept is not None:
        return kept
    features = _encode(model, input_ids, mask, batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.partial")
    save_file({"features": features.contiguous()}, str(partial))
    os.replace(partial, path)
    return features


def _read_kept(path: Path, rows: int) -> torch.Tensor | None:
    """The features a cache file holds, or None when there is none or it does not load as
    ``rows`` rows (a partial write, another format): the caller encodes again and replaces it."""
    if not path.is_file():
        return None
    try:
        features = load_file(str(path))["features"]
    except (SafetensorError, KeyError, OSError):
        return None
    return features if len(features) == rows else None


def _encode(model: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor, batch_size: int) -> torch.Tensor:
    base = base_of(model)
    device = next(base.parameters()).device
    was_training = base.training
    base.eval()
    out = []
    loader = DataLoader(TensorDataset(input_ids, mask), batch_size=batch_size)
    layers = getattr(base.config, "pool_layers", 1)
    for ids, attention in loader:
        length = max(1, int(attention.sum(1).max()))
        ids, attention = ids[:, :length].to(device), attention[:, :length].to(device)
        hidden = base.bert(input_ids=ids, attention_mask=attention, output_hidden_states=layers > 1)
        if type(base).__name__ == "BertMeanPoolForSequenceClassification":  # as its own forward
            states = hidden.hidden_states[-layers:] if layers > 1 else (hidden.last_hidden_state,)
            pooled = mean_pool(states, attention, getattr(base.config, "normalize_pooled", False))
        else:
            pooled = hidden.pooler_output
        out.append(pooled.float().cpu())
    base.train(was_training)
    width = base.config.hidden_size * layers
    return torch.cat(out) if out else torch.zeros((0, width))


class HeadOnFeatures(nn.Module):
    """The model's own classification head, applied to cached features (shares its weights),
    which are centred on the model's feature centre first, as its own forward does."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.classifier = base_of(model).classifier
        self.center = feature_center(model)  # a plain attribute: not a parameter, not a buffer

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.classifier(centred(features, self.center))


def mean_features(model: nn.Module, dataset: TensorDataset) -> torch.Tensor:
    """The mean of ``dataset``'s pooled features under ``model``'s frozen encoder (not centred):
    the feature centre of ``center-features = "validation"``, from the server's validation split."""
    if len(dataset) == 0:
        raise ValueError(
            "center-features = 'validation' needs the server's validation split, which is empty: "
            "set validation-fraction > 0 or center-features = 'none'"
        )
    return pooled_features(model, dataset).tensors[0].mean(0)
