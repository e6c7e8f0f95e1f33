"""Weights the server chooses that overflow for some examples only: a site's DP update stays
finite and tells the server nothing more than DP allows (``fedllm.privacy.finite_examples_only``).

A NaN update would answer "does this site hold an example that overflows?": Opacus' clipping
keeps a non-finite per-example gradient non-finite, and one such example turns the whole sum NaN.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from torch import nn
from torch.utils.data import TensorDataset

from clients.app import app
from fedllm.accounting import PrivacyPlan
from fedllm.config import Settings
from fedllm.train import train_local

from .conftest import flower_context
from .sites import message

HUGE = 3e38  # near float32's largest: any input of size > ~1 on this weight overflows the logit


def _step(x: torch.Tensor, y: torch.Tensor, mode: str = "hooks") -> torch.Tensor:
    """One noise-free full-batch DP step of a linear head whose last input weight is HUGE; the
    divisor is the public n̂ = 6 whatever the rows."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    with torch.no_grad():
        model.weight[:, 3] = torch.tensor([HUGE, -HUGE, 0.0])
    settings = Settings(
        trainable="lora", optimizer="sgd", lr=0.5, sample_rate=1.0, max_steps=1, grad_sample_mode=mode
    )
    plan = PrivacyPlan(0.0, 1.0, 1e-5, 1, float("inf"), "rdp", public_n=6)
    train_local(model, TensorDataset(x, y), settings.resolved(), plan=plan)
    return model.weight.detach().clone()


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_an_example_whose_gradient_is_not_finite_adds_nothing_to_the_step(mode):
    """With the one example that overflows, the step is the step without it (the clipped sum of
    the others over the same public divisor), not NaN."""
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    x[:, 3] = 0.0
    x[0, 3] = 10.0  # only example 0 reaches the huge weight
    with_it = _step(x, y, mode)
    assert torch.isfinite(with_it[:, :3]).all()
    without_it = _step(x[1:], y[1:], mode)
    assert torch.allclose(with_it, without_it, rtol=1e-6, atol=1e-7)  # the sum's order aside
    x[0, 3] = 0.0  # the same example without the overflow does move the step
    assert not torch.allclose(_step(x, y, mode)[:, :3], without_it[:, :3], rtol=1e-3, atol=1e-4)


def test_a_site_answers_weights_that_overflow_with_a_finite_update(site, run_config):
    """The real ClientApp, sent a head whose weights overflow on the features: no failure, and a
    trained reply (the head moved) whose every value is finite (every example's gradient zeroed:
    the update is the noise)."""
    sent = message(run_config)
    arrays = sent.content.array_records["arrays"]
    crafted = {}
    for name in arrays:
        values = arrays[name].numpy().copy()
        if "classifier" in name and values.ndim == 2:
            values[:, :] = HUGE
        crafted[name] = Array(values)
    assert any(np.all(v.numpy() == HUGE) for v in crafted.values())
    sent.content.array_records["arrays"] = ArrayRecord(crafted)
    reply = app(sent, flower_context(site, run_config))
    assert not reply.has_error(), reply.error
    returned = reply.content.array_records["arrays"]
    changed = [
        name
        for name in returned
        if "classifier" in name and not np.array_equal(returned[name].numpy(), crafted[name].numpy())
    ]
    assert changed and all(np.all(np.isfinite(returned[name].numpy())) for name in returned)
