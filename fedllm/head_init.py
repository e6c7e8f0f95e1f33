"""The zero-shot head: the classification head started from the label names, public facts only.

With ``head-init = label-names`` every class's row of the head's weight is the frozen encoder's
pooled embedding of ``head-init-template`` filled with that class's name, unit-normalised and
multiplied by ``head-init-scale``; the bias is 0. Before any training the model then predicts
the label whose name's embedding is nearest (by cosine) to the text's: zero-shot classification.
DP-SGD starts from there instead of from a random head, which is what a small budget needs.

The init reads only public facts — the run's label names, the model and the template — and is
deterministic, so the server and every site compute the same head (the server also sends it as
the initial global). Label names that say nothing (``informative`` is false: a name without
two letters in a row, such as ``0``, ``1``, ``4.5``, or two names equal once lower-cased) keep
the random init of ``head-init = random``.
"""

from __future__ import annotations

import re

import pandas as pd
import torch
from torch import nn
from torch.utils.data import TensorDataset
from transformers import PreTrainedTokenizerBase

from fedllm.config import Settings
from fedllm.data import tokenize
from fedllm.features import mean_features, pooled_features
from fedllm.model import base_of, centred, feature_center, load_tokenizer, set_feature_center

HEAD_INITS = ("random", "label-names")


def informative(labels: list[str]) -> bool:
    """Whether the label names can seed a zero-shot head: each holds a word (two letters in a
    row) and no two are equal once lower-cased and stripped."""
    words = [re.sub(r"[\s_\-]+", " ", name).strip().lower() for name in labels]
    return all(re.search(r"[^\W\d_]{2}", w) for w in words) and len(set(words)) == len(words)


def label_text(name: str, template: str) -> str:
    """``template`` with ``{}`` replaced by the label name (underscores and hyphens as spaces)."""
    return template.replace("{}", re.sub(r"[_\-]+", " ", name).strip())


def label_prototypes(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, labels: list[str], settings: Settings
) -> torch.Tensor:
    """(classes, hidden) unit-normalised pooled embeddings of each label's templated name, centred
    on the model's feature centre first when it has one (``center-features``), as the head sees them."""
    texts = [label_text(name, settings.head_init_template) for name in labels]
    data = tokenize(pd.DataFrame({"text": texts, "label": labels}), tokenizer, labels, settings.max_length)
    features = centred(pooled_features(model, data).tensors[0], feature_center(model))
    return features / features.norm(dim=1, keepdim=True).clamp(min=1e-12)


@torch.no_grad()
def init_head(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, labels: list[str], settings: Settings
) -> bool:
    """Set the head to the zero-shot head of ``labels`` when ``head-init = label-names`` and the
    names are ``informative``; return whether it did (False: the random init stays)."""
    if settings.head_init != "label-names" or not informative(labels):
        return False
    prototypes = label_prototypes(model, tokenizer, labels, settings)
    classifier = base_of(model).get_submodule("classifier")
    for layer in _head_layers(model, classifier):
        layer.weight.copy_(settings.head_init_scale * prototypes.to(layer.weight))
        layer.bias.zero_()
    return True


def _head_layers(model: nn.Module, classifier: nn.Module) -> list[nn.Linear]:
    """The head's Linear layers: peft's trained copy and its original (both start equal)."""
    layers = [
        m for m in (getattr(classifier, "modules_to_save", {}) or {}).values() if isinstance(m, nn.Linear)
    ]
    original = getattr(classifier, "original_module", classifier)
    return layers + ([original] if isinstance(original, nn.Linear) else [])


def start_centred(model: nn.Module, center: torch.Tensor, settings: Settings, labels: list[str]) -> None:
    """``set_feature_center``, then the zero-shot head again (``head-init = label-names``), now
    from the centred label embeddings. A site only sets the centre: its head comes from the
    server's global arrays."""
    set_feature_center(model, center)
    if settings.head_init == "label-names":
        init_head(model, load_tokenizer(settings.model), labels, settings)


def centre_on_validation(
    model: nn.Module, validation: TensorDataset, settings: Settings, labels: list[str]
) -> torch.Tensor | None:
    """With ``center-features = "validation"``: ``start_centred`` on the mean of ``validation``'s
    features (the server's validation split) and return that centre; else None, nothing changed.
    The start of the server's, the in-process and the centralized run alike."""
    if settings.center_features == "none":
        return None
    center = mean_features(model, validation)
    start_centred(model, center, settings, labels)
    return center
