"""Privacy: the one door to DP-SGD (Opacus), noise calibration over the whole plan, accounting.

``attach`` wraps a model, optimizer and loader for one local training; its ``finish()`` removes
the hooks and returns the site's history and epsilon. A history is Opacus' accountant history,
``[(noise_multiplier, sample_rate, steps), ...]`` (lists once in JSON), restored only through
Opacus' ``load_state_dict`` (``restore_accountant``).

- Sampling is Poisson (Opacus ``DPDataLoader``), with sample rate ``q = settings.sample_rate`` when
  set (up to 1: full-batch DP-GD), else ``q = 1 / ceil(n / batch_size)``; an epoch is ``ceil(1 / q)``
  steps, one expected pass. The accountant books exactly this ``q`` for every optimizer step.
- With a target (epsilon, delta) the noise multiplier is calibrated once, for *all* local
  steps of all rounds the client may train in (``planned_steps``), never per round.
- One accountant per site: its history (noise, q, steps) is saved after each local training and
  restored before the next, so the epsilon reported is the site's cumulative spend.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
from opacus import PrivacyEngine
from opacus.accountants import IAccountant, create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.data_loader import DPDataLoader
from opacus.grad_sample import AbstractGradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch.utils.data import DataLoader

from fedllm import known_warnings
from fedllm.config import Settings


class BudgetExhaustedError(RuntimeError):
    """Training once more would spend more than the site's privacy budget."""


def resolve_delta(settings: Settings, num_examples: int) -> float:
    """The configured delta, or min(1e-5, 1/(10 n)) so that delta stays well below 1/n."""
    if settings.delta > 0:
        if settings.delta >= 1.0 / max(num_examples, 1):
            raise ValueError(
                f"delta={settings.delta} is not below 1/n = 1/{num_examples}: "
                "a mechanism may then publish a whole record; lower delta"
            )
        return settings.delta
    return min(1e-5, 1.0 / (10 * max(num_examples, 1)))


def _check_rate(rate: float) -> None:
    """A rate outside [0, 1] (e.g. an unresolved 'auto' -1) must not silently become ``1 / ceil(n / B)``."""
    if not 0 <= rate <= 1:
        raise ValueError(f"sample rate {rate} is not in [0, 1]: resolve 'auto' settings before planning")


def steps_per_epoch(num_examples: int, batch_size: int, rate: float = 0.0) -> int:
    """Optimizer steps in one epoch: ``ceil(1 / rate)`` for a set rate, else ``ceil(n / B)``.

    An epoch is one expected pass over the data. The small tolerance keeps ``1 / (1 / 49)``
    (``49.00000000000001`` in floating point) at 49 steps.
    """
    _check_rate(rate)
    if rate > 0:
        return max(1, math.ceil((1.0 / rate) * (1 - 1e-12)))
    return max(1, math.ceil(num_examples / batch_size))


def sample_rate(num_examples: int, batch_size: int, rate: float = 0.0) -> float:
    """Poisson sampling rate q: ``rate`` when set (> 0), else ``1 / ceil(n / B)`` as Opacus derives it."""
    _check_rate(rate)
    if rate > 0:
        return float(rate)
    return 1.0 / steps_per_epoch(num_examples, batch_size)


def local_steps(settings: Settings, num_examples: int) -> int:
    """Optimizer (logical) steps in one local training: ``max_steps`` when set, else ``epochs`` epochs."""
    if settings.max_steps > 0:
        return settings.max_steps
    return steps_per_epoch(num_examples, settings.batch_size, settings.sample_rate) * settings.epochs


@dataclass
class PrivacyPlan:
    """The DP parameters of one site, fixed for its whole planned training."""

    noise_multiplier: float
    sample_rate: float
    delta: float
    planned_steps: int
    target_epsilon: float
    accountant: str
    local_steps: int = 0  # steps per local training; 0 = as the settings say (``local_steps``)

    def to_dict(self) -> dict:
        """Plain values (for JSON, Flower ConfigRecords and the site ledger)."""
        return dict(self.__dict__)


def plan_privacy(
    settings: Settings, num_examples: int, planned_rounds: int = 1, dimension: int = 0
) -> PrivacyPlan:
    """Calibrate the noise for ``planned_rounds`` local trainings of ``settings`` on n examples.

    ``dimension``: the number of noisy coordinates (trainable parameters). With it and
    ``max-step-noise`` > 0 the plan takes fewer local steps per round when the configured number
    would make each step noisier than that: the Gaussian noise on an averaged step has norm
    about ``sigma * C * sqrt(d) / (q * n)`` against a signal of at most ``C``, and sigma grows
    with the number of steps for a fixed budget. At small n * epsilon few, less noisy steps beat
    many noisy ones (docs/dp-recipe.md). At least one step per round is kept.
    """
    settings = settings.resolved()
    q = sample_rate(num_examples, settings.batch_size, settings.sample_rate)
    rounds = max(planned_rounds, 1)
    per_round = local_steps(settings, num_examples)
    delta = resolve_delta(settings, num_examples)
    if settings.noise_multiplier > 0:
        sigma = settings.noise_multiplier
        steps = per_round * rounds
        return PrivacyPlan(
            sigma,
            q,
            delta,
            steps,
            epsilon_for([(sigma, q, steps)], delta, settings.accountant),
            settings.accountant,
            per_round,
        )

    def sigma_for(steps_per_round: int) -> float:
        return _calibrate(settings.target_epsilon, delta, q, steps_per_round * rounds, settings.accountant)

    if settings.max_step_noise > 0 and dimension > 0:
        ceiling = settings.max_step_noise * q * num_examples / math.sqrt(dimension)  # on sigma
        low, high = 1, per_round  # sigma grows with the steps: the most steps under the ceiling
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if sigma_for(middle) <= ceiling else (low, middle - 1)
        per_round = low
    sigma = sigma_for(per_round)
    return PrivacyPlan(
        sigma, q, delta, per_round * rounds, settings.target_epsilon, settings.accountant, per_round
    )


@lru_cache(maxsize=256)
def _calibrate(epsilon: float, delta: float, q: float, steps: int, mechanism: str) -> float:
    """Opacus' noise calibration, memoised: every site of a simulation plans the same (q, steps)."""
    with known_warnings():  # the RDP order search at its edge; the PRV accountant's log(1 - q) at q = 1
        return float(
            get_noise_multiplier(
                target_epsilon=epsilon, target_delta=delta, sample_rate=q, steps=steps, accountant=mechanism
            )
        )


def epsilon_for(history: list, delta: float, mechanism: str = "prv") -> float:
    """Epsilon of a history (Opacus' accountant history: ``(noise_multiplier, sample_rate, steps)``).

    The history is merged first (``compact``): the same composition, and the PRV accountant's cost
    grows with the number of entries (a site's eight rounds of three steps: 2.9 s as eight entries,
    0.4 s as one). Results are memoised.
    """
    if not history:
        return 0.0
    return _epsilon(tuple(tuple(h) for h in compact(history)), float(delta), mechanism)


@lru_cache(maxsize=1024)
def _epsilon(history: tuple, delta: float, mechanism: str) -> float:
    with known_warnings():  # as in _calibrate; sigma = 0 (no noise) ends the RDP search at its edge
        return float(restore_accountant(mechanism, history).get_epsilon(delta=delta))


def restore_accountant(mechanism: str, history: Iterable[Sequence]) -> IAccountant:
    """An Opacus accountant of ``mechanism`` holding ``history``, loaded as Opacus' own state dict.

    The one way fedllm restores a history: for ε, and before a site trains again.
    """
    accountant = create_accountant(mechanism)
    accountant.load_state_dict({"history": [tuple(h) for h in history], "mechanism": mechanism})
    return accountant


def compact(history: Iterable[Sequence]) -> list[list]:
    """Merge consecutive entries with the same (sigma, q): the same epsilon, a shorter history.

    Opacus' accountants merge a step into the last entry as they book it (``IAccountant.step``),
    but offer nothing that merges a concatenation (rounds restored from a ledger, runs composed);
    this does, so an epsilon costs one composition per distinct (sigma, q), not one per round.
    """
    merged: list[list] = []
    for sigma, q, steps in history:
        if merged and merged[-1][0] == sigma and merged[-1][1] == q:
            merged[-1][2] += int(steps)
        else:
            merged.append([float(sigma), float(q), int(steps)])
    return merged


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
    calibrated to 8). The mean-reduced gradient is divided by the expected batch size ``n * q``
    for the same reason (only the step size depends on it, not the privacy).
    """
    criterion = criterion if criterion is not None else torch.nn.CrossEntropyLoss()
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
    if settings.sample_rate > 0:  # Opacus derives q = 1 / len(loader); draw with the configured q
        dp_loader = DPDataLoader(
            loader.dataset,
            sample_rate=settings.sample_rate,
            collate_fn=loader.collate_fn,
            generator=dp_loader.generator,
        )
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


def zero_sum_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Give the DP optimizer the gradients of a Poisson batch that sampled no example: a sum of zero.

    Skipping an empty batch would change the mechanism that was accounted, so each is a step that
    adds noise to a zero sum and is booked. Both forms Opacus reads are set: per-example modes clip
    and sum ``p.grad_sample`` (zero rows here); ghost clipping sums ``p.grad`` itself (and fails on
    ``None``). Each mode's optimizer ignores the other form and overwrites ``p.grad`` with the noise.
    """
    for p in params:
        p.grad = torch.zeros_like(p)
        p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)


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
    optimizer.expected_batch_size = len(loader.dataset) * plan.sample_rate


def check_budget(plan: PrivacyPlan, history: list, next_steps: int) -> float:
    """Epsilon after ``next_steps`` more steps; ``BudgetExhaustedError`` if above the target."""
    after = epsilon_for(
        [*history, (plan.noise_multiplier, plan.sample_rate, next_steps)],
        plan.delta,
        plan.accountant,
    )
    if after > plan.target_epsilon * (1 + 1e-6):
        raise BudgetExhaustedError(
            f"training {next_steps} more steps would spend epsilon={after:.3f} > "
            f"target {plan.target_epsilon} (delta={plan.delta:g}); this site stops training"
        )
    return after
