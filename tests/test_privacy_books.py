"""The accountant books exactly the Poisson rate the sampler realises, and every step it takes.

Opacus' ``UniformWithReplacementSampler`` runs ``int(1 / q)`` batches per epoch; for some
``k = ceil(n / B)`` the float ``1 / (1 / k)`` is just below ``k`` (93, 99, 105, ...), so the
loader has ``k - 1`` batches and Opacus' ``make_private`` books ``q = 1 / (k - 1)`` although the
sampler draws every example with probability ``1 / k``. fedllm books the realised ``1 / k``, and
``finish()`` hands back exactly the steps taken, with the hooks removed.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from opacus.data_loader import DPDataLoader
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn
from torch.utils.data import DataLoader

from fedllm.accounting import plan_privacy, steps_per_epoch
from fedllm.config import Settings
from fedllm.data import tokenize
from fedllm.privacy import attach, zero_sum_gradients
from fedllm.train import train_local

from .conftest import LABELS

# these tests are about q = 1 / ceil(n / B): pinned, whatever a configured or 'auto' default is;
# unchunked, since some drive the optimizer one loader batch per step (chunking: test_batches.py)
_FROM_BATCH_SIZE = {"sample_rate": 0.0, "optimizer": "adamw", "trainable": "lora", "physical_batch_size": 0}


class TinyClassifier(nn.Module):
    """A bag-of-embeddings classifier with BERT's call signature (``.logits``): fast under Opacus."""

    def __init__(self, vocab: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 4)
        self.head = nn.Linear(4, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        mask = attention_mask.unsqueeze(-1).float()
        pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return SimpleNamespace(logits=self.head(pooled))


def _miscounted(n: np.ndarray, batch_size: int) -> np.ndarray:
    """Sizes whose Opacus sampler runs fewer batches than ``ceil(n / B)`` (Opacus' own formula)."""
    k = np.maximum(1, -(-n // batch_size))
    return np.array([int(1 / (1 / int(x))) != int(x) for x in k])


def test_planned_round_books_the_sampled_rate_and_stays_within_target(token_dataset):
    n, batch_size = 2960, 32  # k = 93, and int(1 / (1 / 93)) == 92
    s = Settings(batch_size=batch_size, epochs=1, target_epsilon=8.0, lr=1e-2, seed=0, **_FROM_BATCH_SIZE)
    plan = plan_privacy(s.resolved(), n, planned_rounds=1)
    assert plan.sample_rate == 1 / 93 and plan.planned_steps == 93
    result = train_local(TinyClassifier(), token_dataset(n), s.resolved(), plan=plan)
    assert result.steps == 93
    assert result.history == [[plan.noise_multiplier, 1 / 93, 93]]  # Opacus alone books 1/92
    assert 7.9 < result.epsilon <= 8.0 + 1e-6  # the plan spent; with 1/92 booked it reports 8.04


@pytest.mark.parametrize("batch_size", [1, 8, 32])
def test_every_miscounted_size_books_the_realised_rate_and_every_step(batch_size, token_dataset):
    sizes = np.arange(100, 3001)
    bad = sizes[_miscounted(sizes, batch_size)]
    assert len(bad) >= 32, "the sweep must contain sizes where Opacus' sampler miscounts"
    s = Settings(batch_size=batch_size, noise_multiplier=1.0, accountant="rdp", seed=0, **_FROM_BATCH_SIZE)
    for n in bad.tolist():
        k = steps_per_epoch(n, batch_size)
        plan = plan_privacy(s.resolved(), n)
        model = TinyClassifier()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
        loader = DataLoader(token_dataset(n), batch_size=batch_size)
        private = attach(model, optimizer, loader, s, plan)
        assert isinstance(private.loader, DPDataLoader)
        assert len(private.loader) == k - 1, f"n={n}: a size Opacus' sampler miscounts"
        realised = private.loader.batch_sampler.sample_rate  # the rate each example is drawn with
        assert realised == plan.sample_rate == 1 / k
        taken = 0
        for input_ids, mask, labels in private.batches():
            if len(labels) == 0:  # as train_local does for an empty Poisson batch
                zero_sum_gradients(model.parameters())
            else:
                logits = private.model(input_ids=input_ids, attention_mask=mask).logits
                private.criterion(logits, labels).backward()
            private.optimizer.step()
            private.optimizer.zero_grad(set_to_none=True)
            taken += 1
            if taken == 3:
                break
        assert private.optimizer.expected_batch_size == pytest.approx(n * realised)  # mean of the draws
        assert private.finish(taken)[0] == [[1.0, realised, taken]], f"n={n}"


def test_the_booked_rate_is_the_rate_the_sampler_draws_each_example_with(token_dataset):
    """Counted, not read from an attribute: 18,400 Poisson batches of n = 2960 at the booked q."""
    n, batch_size = 2960, 32  # k = 93: Opacus' loader runs 92 batches an epoch
    s = Settings(batch_size=batch_size, noise_multiplier=1.0, accountant="rdp", seed=0, **_FROM_BATCH_SIZE)
    plan = plan_privacy(s.resolved(), n)
    model = TinyClassifier()
    loader = DataLoader(token_dataset(n), batch_size=batch_size)
    private = attach(model, torch.optim.SGD(model.parameters(), lr=1e-2), loader, s, plan)
    sampler = private.loader.batch_sampler
    drawn = [len(batch) for _ in range(200) for batch in sampler]
    rate = sum(drawn) / (len(drawn) * n)
    spread = math.sqrt(plan.sample_rate * (1 - plan.sample_rate) / (len(drawn) * n))
    assert abs(rate - plan.sample_rate) < 4 * spread, (rate, plan.sample_rate)
    # Opacus' own booking, 1 / (k - 1), is more than 4 spreads away: the test tells the two apart
    assert abs(1 / (steps_per_epoch(n, batch_size) - 1) - plan.sample_rate) > 8 * spread
    private.finish(0)


def test_a_plan_for_another_sampling_rate_is_refused(token_dataset):
    s = Settings(batch_size=32, noise_multiplier=1.0, accountant="rdp", **_FROM_BATCH_SIZE)
    model = TinyClassifier()
    loader = DataLoader(token_dataset(2960), batch_size=32)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    with pytest.raises(RuntimeError, match="privacy plan assumes"):
        attach(model, optimizer, loader, s, plan_privacy(s.resolved(), 100))


def _one_private_step(model: nn.Module, settings: Settings, history: list, data) -> tuple[list, float]:
    """Attach, take one noisy step on a (possibly empty) Poisson batch of ``data``, finish."""
    loader = DataLoader(data, batch_size=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    private = attach(model, optimizer, loader, settings, plan_privacy(settings.resolved(), 40), history)
    input_ids, mask, labels = next(iter(private.batches()))
    if len(labels):
        private.criterion(private.model(input_ids=input_ids, attention_mask=mask).logits, labels).backward()
    else:
        zero_sum_gradients(model.parameters())
    private.optimizer.step()
    return private.finish(1)


def test_finish_removes_the_hooks_and_the_next_attach_books_on_top(token_dataset):
    s = Settings(batch_size=8, noise_multiplier=1.0, accountant="rdp", **_FROM_BATCH_SIZE)
    model = TinyClassifier()
    history, first = _one_private_step(model, s, [], token_dataset(40))
    assert history == [[1.0, 1 / 5, 1]]
    # the plain model again: a backward computes no per-example gradients
    for p in model.parameters():
        p.grad_sample = None
    ids, mask, labels = token_dataset(4).tensors
    nn.functional.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, labels).backward()
    assert all(getattr(p, "grad_sample", None) is None for p in model.parameters())
    history, second = _one_private_step(
        model, s, history, token_dataset(40)
    )  # attaching twice fails without finish()
    assert history == [[1.0, 1 / 5, 2]] and second > first


def test_attaching_a_model_that_was_not_finished_is_refused(token_dataset):
    s = Settings(batch_size=8, noise_multiplier=1.0, accountant="rdp", **_FROM_BATCH_SIZE)
    model = TinyClassifier()
    loader = DataLoader(token_dataset(40), batch_size=8)
    attach(model, torch.optim.SGD(model.parameters(), lr=1e-2), loader, s, plan_privacy(s.resolved(), 40))
    with pytest.raises(ValueError, match="hooks twice"):
        attach(model, torch.optim.SGD(model.parameters(), lr=1e-2), loader, s, plan_privacy(s.resolved(), 40))


def test_finish_refuses_steps_the_accountant_did_not_book(token_dataset):
    s = Settings(batch_size=8, noise_multiplier=1.0, accountant="rdp", **_FROM_BATCH_SIZE)
    model = TinyClassifier()
    loader = DataLoader(token_dataset(40), batch_size=8)
    private = attach(
        model, torch.optim.SGD(model.parameters(), lr=1e-2), loader, s, plan_privacy(s.resolved(), 40)
    )
    with pytest.raises(RuntimeError, match="1 logical steps, 0 accounted"):
        private.finish(1)  # no optimizer step was taken


def _lora_b(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}


def test_ghost_clipping_takes_empty_poisson_batches_as_noisy_accounted_steps(
    settings, tokenizer, frame, tiny_model
):
    data = tokenize(frame.head(20), tokenizer, LABELS, settings.max_length)
    s = settings.replace(batch_size=1, max_steps=30, noise_multiplier=1.0, grad_sample_mode="ghost")
    model = tiny_model(s)
    before = _lora_b(model)
    result = train_local(model, data, s.resolved(), plan=plan_privacy(s.resolved(), len(data)))
    assert result.steps == 30
    assert result.empty_batches > 0  # P(no empty batch in 30 steps at q = 1/20) < 1e-5
    assert result.history == [[1.0, 1 / 20, 30]]
    after = _lora_b(model)
    assert all(not torch.equal(before[n], after[n]) for n in before)


def test_ghost_clipping_step_on_an_empty_batch_is_noise_only(
    settings, tokenizer, frame, monkeypatch, tiny_model
):
    """Every batch empty: the LoRA B matrices (zero at start) can only move by the noise."""
    monkeypatch.setattr(UniformWithReplacementSampler, "__iter__", lambda self: iter([[]] * self.steps))
    data = tokenize(frame, tokenizer, LABELS, settings.max_length)
    s = settings.replace(max_steps=3, noise_multiplier=1.0, grad_sample_mode="ghost")
    model = tiny_model(s)
    before = _lora_b(model)
    assert all(not v.any() for v in before.values())
    result = train_local(model, data, s.resolved(), plan=plan_privacy(s.resolved(), len(data)))
    assert (result.steps, result.empty_batches, result.examples_seen) == (3, 3, 0)
    assert result.history == [[1.0, plan_privacy(s.resolved(), len(data)).sample_rate, 3]]
    assert all(v.any() for v in _lora_b(model).values()), "an empty batch must still add noise"
