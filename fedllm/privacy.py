"""Privacy: the one door to DP-SGD (Opacus) for one local training.

``attach`` wraps a model, optimizer and loader for one local training; its ``finish()`` removes
the hooks and returns the site's history and epsilon (``fedllm.accounting`` plans the noise and
computes ε). Sampling is Poisson (Opacus ``DPDataLoader``) with the plan's ``q``, and the
accountant books exactly that ``q`` for every optimizer step.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sized
from dataclasses import dataclass
from typing import cast

import torch
from opacus import PrivacyEngine
from opacus.accountants import IAccountant
from opacus.data_loader import DPDataLoader
from opacus.grad_sample import AbstractGradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch.utils.data import DataLoader

from fedllm import known_warnings, opacus_logging  # noqa: F401  (drops Opacus' root log handler)
from fedllm.accounting import PrivacyPlan, compact, epsilon_for, restore_accountant
from fedllm.config import Settings


def entropy_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded from the operating system's entropy.

    DP-SGD's guarantee needs noise and Poisson sampling that nobody can predict: never derive
    them from a configured seed (which the server, who sees the updates, also knows). The noise
    generator must live on the device of the gradients it perturbs (a GPU at a GPU site).
    """
    return torch.Generator(device=device).manual_seed(int.from_bytes(os.urandom(8), "little"))


@dataclass
class PrivateTraining:
    """DP-SGD attached to one local training (``attach``): train with these, then ``finish()``.

    ``model`` wraps the model with Opacus' per-example hooks; ``optimizer`` clips, sums, adds noise
    and books each step in ``accountant`` (restored from the site's history); ``loader`` draws
    Poisson batches with ``plan.sample_rate``; ``criterion(logits, labels)`` is the loss of a
    physical batch to back-propagate: the mean of its example losses (ghost clipping: Opacus'
    wrapper, whose ``backward()`` runs its two passes).
    """

    model: AbstractGradSampleModule
    optimizer: DPOptimizer
    loader: DataLoader
    criterion: Callable
    plan: PrivacyPlan
    accountant: IAccountant
    physical_batch_size: int = 0
    restored_steps: int = 0

    def batches(self) -> Iterator[list[torch.Tensor]]:
        """One pass over the Poisson batches, each split in physical batches of at most
        ``physical_batch_size`` (0: unsplit) by Opacus' ``BatchMemoryManager``, which tells the
        optimizer to skip the step (clip and sum only) until a Poisson batch's last chunk."""
        if self.physical_batch_size <= 0:
            yield from (list(batch) for batch in self.loader)
            return
        with BatchMemoryManager(
            data_loader=self.loader,
            max_physical_batch_size=self.physical_batch_size,
            optimizer=self.optimizer,
        ) as physical:
            yield from (list(batch) for batch in physical)

    def finish(self, steps: int) -> tuple[list[list], float]:
        """Remove Opacus' hooks (the model is plain again); the site's history and ε after ``steps``.

        Raises ``RuntimeError`` when the accountant did not book exactly ``steps`` steps (the
        logical steps taken): the ε reported would not be the ε spent.
        """
        self.model.remove_hooks()
        history = compact(self.accountant.history)
        booked = sum(h[2] for h in history) - self.restored_steps
        if booked != steps:
            raise RuntimeError(
                f"{steps} logical steps, {booked} accounted: "
                "every optimizer step must be exactly one accounted step"
            )
        return history, epsilon_for(history, self.plan.delta, self.plan.accountant)


def attach(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    settings: Settings,
    plan: PrivacyPlan,
    history: list | None = None,
    criterion: torch.nn.Module | None = None,
) -> PrivateTraining:
    """Attach DP-SGD (Opacus): Poisson sampling, per-example clipping, noise, the site's accountant.

    ``history`` (the site's earlier steps) is restored into the accountant, so ``finish()``'s ε is
    cumulative. ``criterion`` (default: cross-entropy) must have a ``reduction`` attribute, as Opacus'
    ghost-clipping wrapper sets it to ``"none"`` to get the example losses. Noise (on the model's
    device) and sampling draw from OS entropy (``entropy_generator``).

    With ``settings.sample_rate > 0`` the Poisson loader draws every example with that rate
    (``loader``'s batch size is then unused); otherwise with ``1 / ceil(n / B)``, ``B`` the
    batch size of ``loader``. The accountant books ``plan.sample_rate``, which must be the rate
    the sampler draws with (else ``RuntimeError``). For ``1 / ceil(n / B)`` Opacus would book
    ``1 / len(loader)`` instead, and its sampler runs ``int(1 / q)`` batches per epoch: for some
    sizes (``ceil(n / B)`` = 93, 99, 105, ...) that float rounds down, so it would book
    ``1 / (k - 1)`` and overstate the spend (n = 2960, B = 32: epsilon 8.04 reported for a plan
    calibrated to 8). The mean-reduced gradient is divided by the expected batch size
    ``q * plan.public_n`` (the DP count n̂ at a site): a public divisor, never the exact n or the
    realised batch, which would scale the released step by a private number.
    """
    criterion = criterion if criterion is not None else torch.nn.CrossEntropyLoss()
    net, dp_optimizer, criterion, dp_loader = _make_private(
        model, optimizer, loader, settings, plan, criterion
    )
    if settings.grad_sample_mode != "ghost":  # ghost clipping has no per-example gradients to zero
        finite_examples_only(dp_optimizer)
    restored = compact(history or [])
    accountant = restore_accountant(plan.accountant, restored)
    _book_realised_rate(accountant, dp_optimizer, dp_loader, plan)
    return PrivateTraining(
        net,
        dp_optimizer,
        dp_loader,
        criterion,
        plan,
        accountant,
        settings.physical_batch_size,
        sum(h[2] for h in restored),
    )


def _make_private(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    settings: Settings,
    plan: PrivacyPlan,
    criterion: torch.nn.Module,
) -> tuple[torch.nn.Module, DPOptimizer, torch.nn.Module, DataLoader]:
    """Opacus' ``make_private`` with the plan's noise and OS-entropy noise, and a Poisson loader
    that draws with ``settings.sample_rate`` when it is set (Opacus derives q = 1 / len(loader))."""
    with known_warnings():  # "Secure RNG turned off": the noise comes from entropy_generator instead
        private = PrivacyEngine(accountant=plan.accountant).make_private(
            module=model,
            optimizer=optimizer,
            criterion=criterion,
            data_loader=loader,
            noise_generator=entropy_generator(next(model.parameters()).device),
            noise_multiplier=plan.noise_multiplier,
            max_grad_norm=settings.max_grad_norm,
            poisson_sampling=True,
            grad_sample_mode=settings.grad_sample_mode,
        )
    if settings.grad_sample_mode == "ghost":  # Opacus' loss wrapper runs the two backward passes
        net, dp_optimizer, criterion, dp_loader = private
    else:
        net, dp_optimizer, dp_loader = private
    if settings.sample_rate > 0:
        dp_loader = DPDataLoader(
            loader.dataset,
            sample_rate=settings.sample_rate,
            collate_fn=loader.collate_fn,
            generator=dp_loader.generator,
        )
    return net, dp_optimizer, criterion, dp_loader


def finite_examples_only(optimizer: DPOptimizer) -> None:
    """Count an example whose gradient is not finite as a zero gradient, before Opacus clips it.

    The server chooses the weights a site trains from, and weights can overflow for some inputs
    only (a huge weight on a feature few texts have): that example's gradient is then inf or NaN,
    Opacus' clipping keeps it so (C / NaN is NaN, 0 · inf is NaN), and the whole update becomes
    NaN, which tells the server such an example is there. Zeroing it is a map of each example's
    own gradient, so every example still moves the clipped sum by at most C: the step's
    sensitivity, and so the guarantee, are unchanged. (A finite gradient whose norm overflows is
    clipped to zero by Opacus itself.) Per-example modes only: ghost clipping back-propagates the
    batch's weighted loss, where 0 · inf is NaN again; a site refuses it under DP
    (``clients.policy``).
    """
    clip = optimizer.clip_and_accumulate

    def clip_finite() -> None:
        samples = optimizer.grad_samples  # each parameter's per-example gradients, one row each
        if samples and len(samples[0]):
            bad = torch.zeros(len(samples[0]), dtype=torch.bool, device=samples[0].device)
            for grads in samples:
                bad |= ~torch.isfinite(grads.reshape(len(grads), -1)).all(dim=1).to(bad.device)
            if bad.any():
                for p, grads in zip(optimizer.params, samples, strict=True):
                    # an attribute Opacus adds to parameters at run time (torch does not declare it)
                    rows = bad.view(-1, *[1] * (grads.dim() - 1))
                    setattr(p, "grad_sample", grads.masked_fill(rows, 0.0))  # noqa: B010
        clip()

    optimizer.clip_and_accumulate = clip_finite


def zero_sum_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Give the DP optimizer the gradients of a Poisson batch that sampled no example: a sum of zero.

    Skipping an empty batch would change the mechanism that was accounted, so each is a step that
    adds noise to a zero sum and is booked. Both forms Opacus reads are set: per-example modes clip
    and sum ``p.grad_sample`` (zero rows here); ghost clipping sums ``p.grad`` itself (and fails on
    ``None``). Each mode's optimizer ignores the other form and overwrites ``p.grad`` with the noise.
    """
    for p in params:
        p.grad = torch.zeros_like(p)
        # an attribute Opacus adds to parameters at run time (torch does not declare it)
        setattr(p, "grad_sample", torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype))  # noqa: B010


def _book_realised_rate(
    accountant: IAccountant, optimizer: DPOptimizer, loader: DataLoader, plan: PrivacyPlan
) -> None:
    """Make ``accountant`` book the sampler's rate, which ``plan`` was calibrated for.

    Raises ``RuntimeError`` when the sampler does not draw with ``plan.sample_rate``: training
    would then spend a different epsilon than the one planned and reported. The hook runs in
    ``DPOptimizer.pre_step`` after the skip check, so with Opacus' ``BatchMemoryManager`` it books
    one step per logical (Poisson) batch, never one per physical chunk; ``PrivateTraining.finish``
    checks that the steps booked equal the logical steps taken.
    """
    realised = getattr(loader.batch_sampler, "sample_rate", None)
    if realised != plan.sample_rate or getattr(loader, "sample_rate", None) != plan.sample_rate:
        raise RuntimeError(
            f"the Poisson sampler draws with q={realised}, the privacy plan assumes "
            f"q={plan.sample_rate}: refusing to train with an accounting that does not match"
        )
    # replaces the hook make_private attached (the engine's own accountant, booking 1 / len(loader))
    optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=plan.sample_rate))
    optimizer.expected_batch_size = (plan.public_n or len(cast(Sized, loader.dataset))) * plan.sample_rate
