"""The encoder's features kept on disk (``FEDLLM_FEATURE_CACHE``): read back by another
process instead of encoding again, never for another encoder, and re-encoded when unreadable."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset
from transformers import BertConfig

from fedllm import features as features_module
from fedllm.config import Settings
from fedllm.features import FEATURE_CACHE_ENV, pooled_features
from fedllm.model import build_model

CONFIG = BertConfig(
    vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
)
LABELS = ["a", "b", "c"]


def _model(pool_layers: int = 1):
    settings = Settings(trainable="head", pool_layers=pool_layers).resolved()
    return build_model(settings, LABELS, torch.device("cpu"), CONFIG)


def _data() -> TensorDataset:
    ids = torch.randint(1, 64, (10, 12), generator=torch.Generator().manual_seed(0))
    return TensorDataset(ids, torch.ones_like(ids), torch.zeros(10, dtype=torch.long))


def _fresh_process(monkeypatch) -> list[int]:
    """Forget the in-process cache (as a new process would) and count the encoder's runs."""
    features_module._CACHE.clear()
    runs: list[int] = []
    encode = features_module._encode

    def counted(*args, **kwargs):
        runs.append(1)
        return encode(*args, **kwargs)

    monkeypatch.setattr(features_module, "_encode", counted)
    return runs


def test_another_process_reads_the_features_instead_of_encoding(tmp_path, monkeypatch):
    monkeypatch.setenv(FEATURE_CACHE_ENV, str(tmp_path / "features"))
    model, data = _model(), _data()
    runs = _fresh_process(monkeypatch)
    first = pooled_features(model, data).tensors[0]
    assert len(runs) == 1 and len(list((tmp_path / "features").glob("*.safetensors"))) == 1
    runs = _fresh_process(monkeypatch)
    again = pooled_features(_model(), data).tensors[0]  # the same encoder, built again
    assert runs == [] and torch.equal(again, first)


def test_another_encoder_or_another_pooling_does_not_read_them(tmp_path, monkeypatch):
    """Each call as in a process of its own: the file is keyed by every encoder weight."""
    monkeypatch.setenv(FEATURE_CACHE_ENV, str(tmp_path / "features"))
    data = _data()
    _fresh_process(monkeypatch)
    first = pooled_features(_model(), data).tensors[0]
    other = _model()  # the same name and embeddings, another weight in the top layer
    with torch.no_grad():
        other.base_model.model.bert.encoder.layer[-1].output.dense.weight.add_(0.1)
    runs = _fresh_process(monkeypatch)
    assert not torch.equal(pooled_features(other, data).tensors[0], first) and len(runs) == 1
    runs = _fresh_process(monkeypatch)
    assert pooled_features(_model(pool_layers=2), data).tensors[0].shape[1] == 2 * first.shape[1]
    assert len(runs) == 1 and len(list((tmp_path / "features").glob("*.safetensors"))) == 3


def test_an_unreadable_file_is_encoded_again_and_replaced(tmp_path, monkeypatch):
    monkeypatch.setenv(FEATURE_CACHE_ENV, str(tmp_path / "features"))
    model, data = _model(), _data()
    _fresh_process(monkeypatch)
    first = pooled_features(model, data).tensors[0]
    (kept,) = (tmp_path / "features").glob("*.safetensors")
    kept.write_bytes(b"half a file")
    runs = _fresh_process(monkeypatch)
    assert torch.equal(pooled_features(model, data).tensors[0], first) and len(runs) == 1
    runs = _fresh_process(monkeypatch)
    pooled_features(model, data)
    assert runs == []  # the replaced file reads


def test_without_the_folder_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.delenv(FEATURE_CACHE_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    _fresh_process(monkeypatch)
    pooled_features(_model(), _data())
    assert list(tmp_path.iterdir()) == []
