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
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache, partial

import torch
from opacus import PrivacyEngine
from opacus.accountants import IAccountant, create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.data_loader import DPDataLoader
from opacus.grad_sample import AbstractGradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch.utils.data import DataLoader

from fedllm import known_warnings, opacus_logging  # noqa: F401  (drops Opacus' root log handler)
from fedllm.config import Settings


class BudgetExhaustedError(RuntimeError):
    """Training once more would spend more than the site's privacy budget."""


DEFAULT_DELTA = 1e-5


def resolve_delta(settings: Settings) -> float:
    """The run's delta: ``settings.delta`` when set, else ``DEFAULT_DELTA``; never a function of n.

    Under add/remove-one-row DP the exact n is private (docs/privacy.md), so delta may depend on
    public values only; ``check_delta`` compares it with the site's DP count.
    """
    return settings.delta if settings.delta > 0 else DEFAULT_DELTA


def check_delta(delta: float, public_n: int) -> None:
    """``ValueError`` when ``delta`` is not below 1/n̂ (a mechanism could publish a whole record).

    ``public_n`` is the site's DP count (or another public size), so the check is post-processing
    of a booked release and answers nothing about the exact n.
    """
    if delta >= 1.0 / max(public_n, 1):
        raise ValueError(f"delta={delta:g} is not below 1/n̂ = 1/{public_n}: lower delta")


def count_entry(count_noise: float) -> list:
    """The accountant entry of one DP count: a Gaussian of sensitivity 1, ``[σ_n, 1, 1]``.

    A count changes by at most 1 when a row is added or removed, so the count with noise
    ``N(0, σ_n²)`` is exactly one full-batch DP-SGD step with clipping norm 1 and noise multiplier
    ``σ_n``: it composes with the site's steps in the same accountant.
    """
    return [float(count_noise), 1.0, 1]


def private_count(n: int, count_noise: float) -> int:
    """n̂ = round(n + N(0, σ_n²)), at least 1, with noise from the OS's entropy (never a seed).

    Book ``count_entry(count_noise)`` before releasing the result.
    """
    return max(1, round(n + random.SystemRandom().gauss(0.0, count_noise)))


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
    public_n: int = 0  # the public size the plan was made for (the DP count n̂); 0 = len(dataset)
    count_noise: float = 0.0  # σ_n of the DP count composed into the target (0: no count)

    def to_dict(self) -> dict:
        """Plain values (for JSON, Flower ConfigRecords and the site ledger)."""
        return dict(self.__dict__)


def plan_privacy(
    settings: Settings,
    num_examples: int,
    planned_rounds: int = 1,
    dimension: int = 0,
    count_noise: float = 0.0,
) -> PrivacyPlan:
    """Calibrate the noise for ``planned_rounds`` local trainings of ``settings`` on n examples.

    ``num_examples`` must be public: at a site, its DP count n̂ (docs/privacy.md), never the exact
    n. ``count_noise`` > 0: that count (``count_entry``) is part of the run's release, so the
    steps' noise is calibrated for the count and every planned step together to meet the target.

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
    delta = resolve_delta(settings)
    prior = (tuple(count_entry(count_noise)),) if count_noise > 0 else ()
    plan = partial(
        PrivacyPlan,
        delta=delta,
        accountant=settings.accountant,
        public_n=num_examples,
        count_noise=count_noise,
    )
    if settings.noise_multiplier > 0:
        sigma, steps = settings.noise_multiplier, per_round * rounds
        spent = epsilon_for([*prior, (sigma, q, steps)], delta, settings.accountant)
        return plan(sigma, q, planned_steps=steps, target_epsilon=spent, local_steps=per_round)

    def sigma_for(steps_per_round: int) -> float:
        return _calibrate(
            settings.target_epsilon, delta, q, steps_per_round * rounds, settings.accountant, prior
        )

    if settings.max_step_noise > 0 and dimension > 0:
        ceiling = settings.max_step_noise * q * num_examples / math.sqrt(dimension)  # on sigma
        low, high = 1, per_round  # sigma grows with the steps: the most steps under the ceiling
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if sigma_for(middle) <= ceiling else (low, middle - 1)
        per_round = low
    return plan(
        sigma_for(per_round),
        q,
        planned_steps=per_round * rounds,
        target_epsilon=settings.target_epsilon,
        local_steps=per_round,
    )


def counted_plan(
    settings: Settings, num_examples: int, planned_rounds: int = 1, dimension: int = 0
) -> tuple[PrivacyPlan, list]:
    """A site's plan as the privacy statement has it: n̂ drawn, the plan made from n̂.

    Returns the plan and the site's history so far (the DP count's entry, to pass to the first
    ``train_local``). For drivers that hold the data themselves (centralized, in-process, bench);
    the ClientApp books the count before it draws it (``clients.app``).
    """
    public_n = private_count(num_examples, settings.count_noise)
    plan = plan_privacy(settings, public_n, planned_rounds, dimension, count_noise=settings.count_noise)
    return plan, [count_entry(settings.count_noise)]


@lru_cache(maxsize=256)
def _calibrate(
    epsilon: float, delta: float, q: float, steps: int, mechanism: str, prior: tuple = ()
) -> float:
    """The noise multiplier for ``steps`` steps at rate q that, after ``prior``, meets (ε, δ).

    Without a prior, Opacus' own calibration; with one (the DP count), the same search Opacus
    runs (double the upper bound, then bisect until ε is within 0.01 below the target), on the
    composition of ``prior`` and the steps. Memoised: every site of a simulation plans the same.
    """
    with known_warnings():  # the RDP order search at its edge; the PRV accountant's log(1 - q) at q = 1
        if not prior:
            return float(
                get_noise_multiplier(
                    target_epsilon=epsilon,
                    target_delta=delta,
                    sample_rate=q,
                    steps=steps,
                    accountant=mechanism,
                )
            )

        def spent(sigma: float) -> float:
            return epsilon_for([*prior, (sigma, q, steps)], delta, mechanism)

        low, high = 0.0, 10.0
        while spent(high) > epsilon:
            low, high = high, 2 * high
            if high > 1e6:
                raise ValueError(f"no noise multiplier reaches epsilon {epsilon} after {prior}")
        while epsilon - spent(high) > 0.01:
            middle = (low + high) / 2
            low, high = (low, middle) if spent(middle) <= epsilon else (middle, high)
        return float(high)


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
    calibrated to 8). The mean-reduced gradient is divided by the expected batch size
    ``q * plan.public_n`` (the DP count n̂ at a site): a public divisor, never the exact n or the
    realised batch, which would scale the released step by a private number.
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
    optimizer.expected_batch_size = (plan.public_n or len(loader.dataset)) * plan.sample_rate


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
