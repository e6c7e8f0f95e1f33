"""The frozen bottom of the encoder, computed once per data set: the fast path of ``lora-layers``.

With adapters on the top k encoder layers only (``lora-layers = k``, ``lora`` / ``ffa-lora``),
the embeddings and the bottom L - k layers never change and, with dropout off (always under DP),
map each example to the same hidden states every step. ``frozen_prefix`` counts those layers,
``prefix_view`` computes their output once per (encoder prefix, token ids, precision) and keeps it
in a small in-process cache (as ``fedllm.features`` keeps the head's pooled features), and
``TopLayers`` runs the top k layers, the pooling and the head on the cached states in the one
training loop: the same logits (to float rounding) at a fraction of the cost.

The cache key hashes the prefix layers' weights themselves, so a changed prefix is never served
stale. Padding is cut per batch to its longest real text; masked positions get exactly zero
attention and pooling weight, so an example's logits and per-example gradient do not depend on
which other examples share its batch.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

import torch
from peft.tuners.lora import LoraLayer
from torch import nn
from torch.utils.data import TensorDataset

from fedllm.model import base_of, centred, feature_center, mean_pool
from fedllm.precision import autocast

_CACHE: OrderedDict[str, torch.Tensor] = OrderedDict()
_CACHE_BYTES = 2 * 1024**3  # hidden states are large: keep at most this much


def frozen_prefix(model: nn.Module) -> int:
    """How many bottom encoder layers are frozen and adapter-free, 0 when the prefix cannot be cached.

    A layer counts while it holds no LoRA module and no trainable parameter; the embeddings must
    be frozen, and every dropout in them and in the counted layers must be off when the model is
    in training mode (cached states are taken without dropout). The top ``pool-layers`` layers
    never count (at least the top one): their outputs are pooled, so they run on the cached states.
    """
    bert = getattr(base_of(model), "bert", None)
    if bert is None or any(p.requires_grad for p in bert.embeddings.parameters()):
        return 0
    count, pooled = 0, getattr(base_of(model).config, "pool_layers", 1)
    for layer in bert.encoder.layer[:-pooled]:
        if any(isinstance(m, LoraLayer) for m in layer.modules()):
            break
        if any(p.requires_grad for p in layer.parameters()):
            break
        count += 1
    if model.training:
        scope = [bert.embeddings, *bert.encoder.layer[:count]]
        if any(isinstance(m, nn.Dropout) and m.p > 0 for part in scope for m in part.modules()):
            return 0
    return count


def _key(bert: Any, layers: int, input_ids: torch.Tensor, mask: torch.Tensor, precision: str) -> str:
    digest = hashlib.sha256(f"{layers}:{precision}".encode())
    for _, value in bert.embeddings.named_parameters():
        digest.update(value.detach()[:4].float().cpu().numpy().tobytes())
    for layer in bert.encoder.layer[:layers]:
        for value in layer.parameters():
            digest.update(value.detach().float().cpu().numpy().tobytes())
    digest.update(input_ids.cpu().numpy().tobytes())
    digest.update(mask.cpu().numpy().tobytes())
    return digest.hexdigest()


def _store(key: str, value: torch.Tensor) -> None:
    _CACHE[key] = value
    while len(_CACHE) > 1 and sum(v.numel() * v.element_size() for v in _CACHE.values()) > _CACHE_BYTES:
        _CACHE.popitem(last=False)


@torch.no_grad()
def _encode_prefix(
    bert: Any, layers: int, input_ids: torch.Tensor, mask: torch.Tensor, precision: str, batch_size: int
) -> torch.Tensor:
    device = next(bert.parameters()).device
    was_training = bert.training
    bert.eval()
    out = torch.zeros((*input_ids.shape, bert.config.hidden_size))
    for start in range(0, len(input_ids), batch_size):
        ids, attention = input_ids[start : start + batch_size], mask[start : start + batch_size]
        length = max(1, int(attention.sum(1).max()))
        ids, attention = ids[:, :length].to(device), attention[:, :length].to(device)
        with autocast(precision, device):
            hidden = bert.embeddings(input_ids=ids)
            extended = _extended_mask(bert, attention, hidden)
            for layer in bert.encoder.layer[:layers]:
                hidden = layer(hidden, extended)
        out[start : start + len(ids), :length] = hidden.float().cpu()
    bert.train(was_training)
    return out


def _extended_mask(bert: Any, mask: torch.Tensor, hidden: torch.Tensor) -> Any:
    """The attention mask each layer takes, made by the model itself (as ``BertModel.forward``)."""
    extended, _ = bert._create_attention_masks(
        attention_mask=mask,
        encoder_attention_mask=None,
        embedding_output=hidden,
        encoder_hidden_states=None,
        cache=None,
    )
    return extended


def prefix_view(
    model: nn.Module, dataset: TensorDataset, precision: str = "fp32", batch_size: int = 64
) -> tuple[nn.Module, TensorDataset] | None:
    """``(TopLayers(model, k), (hidden states, mask, labels))``, or None when no prefix is frozen.

    ``dataset`` holds ``(input_ids, attention_mask, labels)``; the hidden states after the
    frozen bottom k layers (``frozen_prefix``) are computed under ``precision`` once and cached.
    """
    layers = frozen_prefix(model)
    if layers == 0:
        return None
    bert = base_of(model).bert
    input_ids, mask, labels = dataset.tensors
    key = _key(bert, layers, input_ids, mask, precision)
    if key not in _CACHE:
        _store(key, _encode_prefix(bert, layers, input_ids, mask, precision, batch_size))
    _CACHE.move_to_end(key)
    return TopLayers(model, layers), TensorDataset(_CACHE[key], mask, labels)


class TopLayers(nn.Module):
    """The model above its first ``start`` encoder layers: layers, pooling and head (shared weights)."""

    def __init__(self, model: nn.Module, start: int):
        super().__init__()
        base = base_of(model)
        self._bert = [base.bert]  # in a list: not a submodule (only the top's weights belong here)
        self.layers = base.bert.encoder.layer[start:]
        self.pooler = base.bert.pooler
        self.dropout = base.dropout
        self.classifier = base.classifier
        self.mean_pool = type(base).__name__ == "BertMeanPoolForSequenceClassification"
        self.normalize = self.mean_pool and getattr(base.config, "normalize_pooled", False)
        self.pool_layers = getattr(base.config, "pool_layers", 1)
        self.center = feature_center(model)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits of cached hidden states ``hidden`` (batch, length, width) under ``mask``."""
        length = max(1, int(mask.sum(1).max())) if mask.numel() else 1
        hidden, mask = hidden[:, :length], mask[:, :length]
        extended = _extended_mask(self._bert[0], mask, hidden)
        states = []
        for layer in self.layers:
            hidden = layer(hidden, extended)
            states.append(hidden)
        if self.mean_pool:  # as the model's own forward
            pooled = centred(mean_pool(states[-self.pool_layers :], mask, self.normalize), self.center)
        else:
            pooled = self.pooler(hidden)
        return self.classifier(self.dropout(pooled))
