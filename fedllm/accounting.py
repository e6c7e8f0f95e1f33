"""Accounting: the privacy plan, noise calibration over the whole plan, ε, the DP count.

A history is Opacus' accountant history, ``[(noise_multiplier, sample_rate, steps), ...]``
(lists once in JSON), restored only through Opacus' ``load_state_dict`` (``restore_accountant``).

- Sampling is Poisson, with sample rate ``q = settings.sample_rate`` when set (up to 1:
  full-batch DP-GD), else ``q = 1 / ceil(n̂ / batch_size)``; an epoch is ``ceil(1 / q)`` steps.
- With a target (epsilon, delta) the noise multiplier is calibrated once, for *all* local
  steps of all rounds the site may train in (``planned_steps``) and the run's DP count of n
  (``count_entry``), never per round; n is public only as that count (docs/privacy.md).
- One history per site and run: saved after each local training and restored before the next,
  so the epsilon reported is the site's cumulative spend.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import TYPE_CHECKING

from fedllm import known_warnings
from fedllm.config import ResolvedSettings, Settings, require_resolved

if TYPE_CHECKING:
    from opacus.accountants import IAccountant


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
    """A rate outside [0, 1] must not silently become ``1 / ceil(n / B)``."""
    if not 0 <= rate <= 1:
        raise ValueError(f"sample rate {rate} is not in [0, 1]: use a rate in (0, 1] or 0 (from batch-size)")


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


def local_steps(settings: ResolvedSettings, num_examples: int) -> int:
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
    settings: ResolvedSettings,
    num_examples: int,
    planned_rounds: int = 1,
    dimension: int = 0,
    count_noise: float = 0.0,
    count_draws: int = 1,
) -> PrivacyPlan:
    """Calibrate the noise for ``planned_rounds`` local trainings of ``settings`` on n examples.

    ``num_examples`` must be public: at a site, its DP count n̂ (docs/privacy.md), never the exact
    n. ``count_noise`` > 0: that count (``count_entry``) is part of the run's release, so the
    steps' noise is calibrated for the count and every planned step together to meet the target;
    ``count_draws`` such counts when a failed draw was booked and drawn again (``clients.handlers``).

    ``dimension``: the number of noisy coordinates (trainable parameters). With it and
    ``max-step-noise`` > 0 the plan takes fewer local steps per round when the configured number
    would make each step noisier than that: the Gaussian noise on an averaged step has norm
    about ``sigma * C * sqrt(d) / (q * n)`` against a signal of at most ``C``, and sigma grows
    with the number of steps for a fixed budget. At small n * epsilon few, less noisy steps beat
    many noisy ones (docs/dp-recipe.md). At least one step per round is kept.
    """
    settings = require_resolved(settings, "plan_privacy")
    q = sample_rate(num_examples, settings.batch_size, settings.sample_rate)
    rounds = max(planned_rounds, 1)
    per_round = local_steps(settings, num_examples)
    delta = resolve_delta(settings)
    prior = ((float(count_noise), 1.0, int(count_draws)),) if count_noise > 0 else ()
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
    settings: ResolvedSettings, num_examples: int, planned_rounds: int = 1, dimension: int = 0
) -> tuple[PrivacyPlan, list]:
    """A site's plan as the privacy statement has it: n̂ drawn, the plan made from n̂.

    Returns the plan and the site's history so far (the DP count's entry, to pass to the first
    ``train_local``). For drivers that hold the data themselves (centralized, in-process, bench);
    the ClientApp books the count before it draws it (``clients.handlers``).
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
                _opacus().utils.get_noise_multiplier(
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
    accountant = _opacus().create_accountant(mechanism)
    accountant.load_state_dict({"history": [tuple(h) for h in history], "mechanism": mechanism})
    return accountant


def _opacus():
    """Opacus' accountants, imported on first use: Opacus imports torch, seconds a process, and a
    ClientApp process that answers a SecAgg+ stage never composes a history.
    Importing Opacus installs a root log handler; ``fedllm.opacus_logging`` drops it."""
    import opacus.accountants.utils

    from fedllm import opacus_logging  # noqa: F401  (drops Opacus' root log handler)

    return opacus.accountants


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
