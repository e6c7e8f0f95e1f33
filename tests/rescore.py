"""Score a saved adapter again, as a user reloads it: for end-to-end tests of what a run reports."""

from __future__ import annotations

import json
from pathlib import Path

from fedllm.config import settings_from
from fedllm.data import load_splits, tokenize
from fedllm.model import load_tokenizer, load_trained
from fedllm.train import evaluate


def rescore(adapter_dir: Path) -> dict:
    """``evaluate``'s scores of the adapter saved in ``adapter_dir`` on its run's held-out test split.

    The settings are the ones the run saved with the adapter (``labels.json``), so the test split,
    tokenization and model are the run's own.
    """
    settings = settings_from(json.loads((adapter_dir / "labels.json").read_text())["settings"])
    model, labels = load_trained(adapter_dir, settings)
    test = tokenize(
        load_splits(settings, labels).test,
        load_tokenizer(settings.model),
        labels,
        settings.max_length,
        settings.truncation,
    )
    return evaluate(model, test, labels, head_only=settings.resolved().trainable == "head")
