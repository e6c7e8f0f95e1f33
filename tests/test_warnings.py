"""Opacus' known warnings stay inside fedllm's private training; the caller's own warnings show.

pyproject.toml's pytest filters hide these warnings in every other test; here every warning is
recorded (``simplefilter("always")``), as a user's terminal would show it.
"""

from __future__ import annotations

import math
import re
import warnings
from contextlib import nullcontext

import pytest

import fedllm.accounting
import fedllm.privacy
import fedllm.train
from fedllm import KNOWN_WARNINGS
from fedllm.accounting import PrivacyPlan, plan_privacy, resolve_delta, sample_rate
from fedllm.data import tokenize
from fedllm.model import build_model
from fedllm.train import train_local

from .conftest import DEVICE, LABELS

# what a private training emits (the transformers deprecation inside peft is model.py's, not here)
OPACUS = [p for p in KNOWN_WARNINGS if "gradient_checkpointing" not in p]


def _private_trainings(settings, tiny_config, tokenizer, frame) -> list[str]:
    """Two one-step private trainings, as a user runs them; every warning message they emit.

    The PRV accountant at q = 1 (the DP recipe's full batch) calibrated to a small epsilon, and a
    noise-free plan (sigma = 0, booked by the RDP accountant, as simulations/inprocess.py plans it).
    The memoised accountant results are cleared so that Opacus is really called.
    """
    data = tokenize(frame, tokenizer, LABELS, settings.max_length)
    full_batch = settings.replace(max_steps=1, target_epsilon=1.0, sample_rate=1.0, accountant="prv")
    n = len(data)
    noise_free = PrivacyPlan(
        0.0, sample_rate(n, settings.batch_size), resolve_delta(settings), 1, math.inf, "rdp", 1
    )
    fedllm.accounting._calibrate.cache_clear()
    fedllm.accounting._epsilon.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for s, plan in ((full_batch, None), (settings.replace(max_steps=1), noise_free)):
            plan = plan or plan_privacy(s.resolved(), n)
            result = train_local(
                build_model(s.resolved(), LABELS, DEVICE, tiny_config), data, s.resolved(), plan=plan
            )
            assert result.steps == 1 and result.history
        warnings.warn("the caller's own warning", UserWarning, stacklevel=1)
    return [str(w.message) for w in caught]


def _matching(messages: list[str], pattern: str) -> list[str]:
    return [m for m in messages if re.match(pattern, m)]


def test_known_warnings_do_not_escape_private_training(settings, tiny_config, tokenizer, frame):
    messages = _private_trainings(settings, tiny_config, tokenizer, frame)
    escaped = {p: _matching(messages, p)[:1] for p in OPACUS if _matching(messages, p)}
    assert not escaped, f"known warnings escaped fedllm's calls: {escaped}"
    assert "the caller's own warning" in messages


def test_every_known_warning_is_one_private_training_emits(
    settings, tiny_config, tokenizer, frame, monkeypatch: pytest.MonkeyPatch
):
    """Without fedllm's scoping each known message shows: no entry of KNOWN_WARNINGS is stale,
    and the test above checks something that would otherwise be seen."""
    monkeypatch.setattr(fedllm.privacy, "known_warnings", nullcontext)
    monkeypatch.setattr(fedllm.accounting, "known_warnings", nullcontext)
    monkeypatch.setattr(fedllm.train, "known_warnings", nullcontext)
    messages = _private_trainings(settings, tiny_config, tokenizer, frame)
    assert [p for p in OPACUS if not _matching(messages, p)] == []
    assert "the caller's own warning" in messages
