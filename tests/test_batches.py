"""Logical (Poisson) batches decoupled from physical (memory) batches, sample rates up to 1, SGD.

One logical step is one optimizer step, one accounted step and one scheduler step, however many
physical batches it took. The instrumented model records every forward's batch size and the
optimizer records every real step, so the logical batches can be rebuilt from the outside.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from fedllm import train as train_module
from fedllm.accounting import local_steps, plan_privacy
from fedllm.auto import DP_SAMPLE_RATE
from fedllm.config import Settings
from fedllm.privacy import attach
from fedllm.train import build_optimizer, logical_batch_size, train_local

STEP = -1  # marks an optimizer step in the event list


class RecordingClassifier(nn.Module):
    """A bag-of-embeddings classifier with BERT's call signature that logs each batch size."""

    def __init__(self, events: list[int], vocab: int = 16, classes: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, 4)
        self.head = nn.Linear(4, classes)
        self.events = events

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        self.events.append(len(input_ids))
        mask = attention_mask.unsqueeze(-1).float()
        pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return SimpleNamespace(logits=self.head(pooled))


@pytest.fixture
def recorded(monkeypatch) -> SimpleNamespace:
    """Events (forward sizes, ``STEP`` per real optimizer step) and the optimizers train_local built."""
    log = SimpleNamespace(events=[], optimizers=[])
    real = train_module.build_optimizer

    def recording(params, settings):
        optimizer = real(params, settings)
        optimizer.register_step_post_hook(lambda *_: log.events.append(STEP))
        log.optimizers.append(optimizer)
        return optimizer

    monkeypatch.setattr(train_module, "build_optimizer", recording)
    return log


def _logical_batches(events: list[int]) -> list[list[int]]:
    """The physical batch sizes of each optimizer step (empty batches run no forward: [])."""
    batches, current = [], []
    for event in events:
        if event == STEP:
            batches.append(current)
            current = []
        else:
            current.append(event)
    assert not current, "physical batches after the last optimizer step"
    return batches


def _private(**changes) -> Settings:
    base = Settings(
        batch_size=8,
        noise_multiplier=1.0,
        accountant="rdp",
        lr=1e-2,
        optimizer="adamw",
        seed=0,
        trainable="lora",
    )
    return base.replace(**changes)


def test_plan_books_the_configured_rate_and_an_epoch_is_one_expected_pass():
    s = _private(sample_rate=0.3, epochs=2)
    plan = plan_privacy(s.resolved(), 60)
    assert plan.sample_rate == 0.3 and plan.planned_steps == 2 * 4  # ceil(1 / 0.3) = 4
    assert local_steps(s.replace(sample_rate=1 / 49, epochs=1), 60) == 49  # 1 / (1 / 49) > 49
    assert local_steps(s.replace(max_steps=5), 60) == 5
    assert plan_privacy(s.replace(sample_rate=0.0).resolved(), 60).sample_rate == 1 / 8  # ceil(60 / 8)
    assert logical_batch_size(s, 60) == 18 and logical_batch_size(s.replace(sample_rate=0.001), 60) == 1
    assert logical_batch_size(s.replace(sample_rate=0.0), 60) == 8
    with pytest.raises(ValueError, match="key 'sample-rate' = 1.5 is out of range"):
        dataclasses.replace(s, sample_rate=1.5).resolved()  # refused before anything plans with it
    # 'auto' (-1) is resolved where the run starts (the DP recipe's q), never a silent 1/ceil(n/B)
    assert plan_privacy(dataclasses.replace(s, sample_rate=-1.0).resolved(), 60).sample_rate == DP_SAMPLE_RATE
    for unresolved in (-1.0, 1.5):  # below the plan nothing resolves: refused, never a default
        with pytest.raises(ValueError, match="sample rate"):
            logical_batch_size(dataclasses.replace(s, sample_rate=unresolved), 60)


def test_realised_equals_booked_when_logical_and_physical_batches_differ(recorded, token_dataset):
    s = _private(sample_rate=0.5, physical_batch_size=8, max_steps=5)
    plan = plan_privacy(s.resolved(), 60)
    result = train_local(
        RecordingClassifier(recorded.events), token_dataset(60), s.resolved(), plan=plan, round_of=(1, 2)
    )
    assert result.history == [[1.0, 0.5, 5]]
    assert result.steps == 5
    logical = _logical_batches(recorded.events)
    assert len(logical) == 5, "the optimizer must step once per logical batch"
    assert all(size <= 8 for sizes in logical for size in sizes), logical
    assert any(len(sizes) > 1 for sizes in logical), f"no logical batch was split: {logical}"
    assert sum(map(sum, logical)) == result.examples_seen
    assert result.physical_batches == sum(max(len(sizes), 1) for sizes in logical)
    # linear decay over 2 planned rounds of 5 steps: after 5 scheduler steps the factor is 1/2
    assert recorded.optimizers[0].param_groups[0]["lr"] == pytest.approx(s.lr / 2)


def test_logical_batches_are_poisson_with_the_booked_rate(recorded, token_dataset):
    n, q, steps = 60, 0.5, 200
    s = _private(sample_rate=q, physical_batch_size=16, max_steps=steps)
    result = train_local(
        RecordingClassifier(recorded.events),
        token_dataset(n),
        s.resolved(),
        plan=plan_privacy(s.resolved(), n),
    )
    assert result.history == [[1.0, q, steps]]
    sizes = np.array([sum(batch) for batch in _logical_batches(recorded.events)])
    assert len(sizes) == steps and sizes.sum() == result.examples_seen
    # Binomial(n, q): mean 30 (std of the mean over 200 steps 0.27), variance 15 (a fixed-size
    # batch would have 0; the sample variance's std is about 1.5)
    assert abs(sizes.mean() - n * q) < 5 * math.sqrt(n * q * (1 - q) / steps)
    assert 7.5 < sizes.var(ddof=1) < 30


def test_sample_rate_one_is_full_batch_dp_gd(recorded, token_dataset):
    n = 60
    s = _private(sample_rate=1.0, physical_batch_size=16, max_steps=3)
    plan = plan_privacy(s.resolved(), n)
    assert plan.sample_rate == 1.0
    result = train_local(RecordingClassifier(recorded.events), token_dataset(n), s.resolved(), plan=plan)
    assert result.history == [[1.0, 1.0, 3]]
    assert _logical_batches(recorded.events) == [[15, 15, 15, 15]] * 3  # every example, every step
    assert result.examples_seen == 3 * n and result.empty_batches == 0
    assert local_steps(s.replace(max_steps=0, epochs=2), n) == 2


def test_physical_batch_size_does_not_change_the_accounting(token_dataset):
    s = Settings(
        sample_rate=0.3,
        max_steps=6,
        target_epsilon=4.0,
        accountant="rdp",
        lr=1e-2,
        optimizer="adamw",
        seed=0,
        trainable="lora",
    )
    data = token_dataset(60)  # 1 / 0.3 is no integer: no data loader length gives Opacus this q
    plan = plan_privacy(s.resolved(), len(data), planned_rounds=3)
    split = s.replace(physical_batch_size=8)
    assert plan_privacy(split.resolved(), len(data), planned_rounds=3) == plan
    whole = train_local(RecordingClassifier([]), data, s.resolved(), plan=plan)
    chunked = train_local(RecordingClassifier([]), data, split.resolved(), plan=plan)
    assert chunked.physical_batches > chunked.steps == whole.steps == whole.physical_batches == 6
    assert whole.history == chunked.history == [[plan.noise_multiplier, 0.3, 6]]
    assert 0 < whole.epsilon == chunked.epsilon
    # a continued training books on top of the restored history, still one entry per (sigma, q)
    again = train_local(RecordingClassifier([]), data, split.resolved(), plan=plan, history=chunked.history)
    assert again.history == [[plan.noise_multiplier, 0.3, 12]] and again.epsilon > chunked.epsilon


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_empty_poisson_batches_with_physical_batches(recorded, mode, token_dataset):
    s = _private(sample_rate=0.05, physical_batch_size=1, max_steps=30, grad_sample_mode=mode)
    model = RecordingClassifier(recorded.events)
    before = copy.deepcopy(model.state_dict())
    result = train_local(model, token_dataset(20), s.resolved(), plan=plan_privacy(s.resolved(), 20))
    assert result.steps == 30 and result.history == [[1.0, 0.05, 30]]
    logical = _logical_batches(recorded.events)
    # P(no empty batch in 30 steps at q = 0.05, n = 20) < 2e-6; P(none with 2+ examples) < 1e-4
    assert result.empty_batches == sum(1 for sizes in logical if not sizes) > 0
    assert any(len(sizes) > 1 for sizes in logical) and all(size == 1 for b in logical for size in b)
    assert all(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_non_private_physical_batches_accumulate_the_logical_mean(recorded, token_dataset):
    s = Settings(sample_rate=0.25, max_steps=4, optimizer="sgd", lr=0.5, target_epsilon=math.inf, seed=0)
    data = token_dataset(60)
    whole_model, split_model = RecordingClassifier([]), RecordingClassifier(recorded.events)
    whole = train_local(whole_model, data, s.resolved())
    recorded.events.clear()
    split = train_local(split_model, data, s.replace(physical_batch_size=4).resolved())
    assert _logical_batches(recorded.events) == [[4, 4, 4, 3]] * 4  # round(0.25 * 60) = 15
    assert whole.steps == split.steps == 4 and split.physical_batches == 16
    assert split.mean_loss == pytest.approx(whole.mean_loss, rel=1e-5)
    for a, b in zip(whole_model.parameters(), split_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_sgd_with_momentum_is_the_optimizer_used(recorded, token_dataset):
    n, lr, momentum = 60, 0.3, 0.9
    s = Settings(
        sample_rate=1.0,  # non-private: one full (shuffled) batch per step, deterministic
        max_steps=2,
        optimizer="sgd",
        momentum=momentum,
        lr=lr,
        schedule="constant",
        target_epsilon=math.inf,
        seed=0,
    )
    data = token_dataset(n)
    model = RecordingClassifier([])
    reference = copy.deepcopy(model)
    train_local(model, data, s.resolved())
    assert [type(o) for o in recorded.optimizers] == [torch.optim.SGD]
    assert recorded.optimizers[0].param_groups[0]["momentum"] == momentum
    # two steps of heavy-ball SGD by hand: v1 = g1, v2 = momentum v1 + g2, p -= lr v
    ids, mask, labels = next(iter(DataLoader(data, batch_size=n)))
    velocity = None
    for _ in range(2):
        reference.zero_grad()
        F.cross_entropy(reference(input_ids=ids, attention_mask=mask).logits, labels).backward()
        grads = [p.grad.clone() for p in reference.parameters()]
        velocity = (
            grads if velocity is None else [momentum * v + g for v, g in zip(velocity, grads, strict=True)]
        )
        with torch.no_grad():
            for p, v in zip(reference.parameters(), velocity, strict=True):
                p -= lr * v
    for got, want in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    params = list(nn.Linear(2, 2).parameters())
    assert type(build_optimizer(params, s.replace(optimizer="adamw"))) is torch.optim.AdamW
    for unresolved in ({"optimizer": "auto"}, {"lr": 0.0}):  # resolved settings never hold these
        with pytest.raises(ValueError, match="resolved settings hold no 'auto'"):
            s.resolved().replace(**unresolved)


def test_a_plan_for_another_configured_rate_is_refused(token_dataset):
    s = _private(sample_rate=0.25)
    model = RecordingClassifier([])
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    loader = DataLoader(token_dataset(60), batch_size=8)
    with pytest.raises(RuntimeError, match="privacy plan assumes"):
        attach(model, optimizer, loader, s, plan_privacy(s.replace(sample_rate=0.5).resolved(), 60))
