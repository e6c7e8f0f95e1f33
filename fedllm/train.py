"""The one local training loop (private or not) and evaluation.

Logical and physical batches: one optimizer step consumes one *logical* batch (private: a
Poisson batch of expected size ``q n``; non-private: ``batch_size`` shuffled examples, or
``round(q n)`` with ``sample_rate`` set). With ``physical_batch_size > 0`` a logical batch is run
through the model in chunks of at most that many examples: private runs use Opacus'
``BatchMemoryManager`` (clipped per-example gradients are summed over the chunks, noise is added
once), non-private runs accumulate gradients of the logical batch's mean loss. Steps, the
learning-rate schedule, the accountant and ``max_steps`` all count logical steps.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from fedllm.config import Settings
from fedllm.features import HeadOnFeatures, pooled_features
from fedllm.privacy import (
    PrivacyPlan,
    check_budget,
    compact,
    entropy_generator,
    local_steps,
    make_private,
    sample_rate,
)


class FrozenTrainingError(RuntimeError):
    """A training step left every trainable weight unchanged (a silent LoRA/Opacus failure)."""


@dataclass
class TrainResult:
    """What one local training did."""

    steps: int
    examples_seen: int
    mean_loss: float
    seconds: float
    history: list = field(default_factory=list)  # accountant history after training (DP only)
    epsilon: float = 0.0  # cumulative epsilon after training (DP only)
    noise_multiplier: float = 0.0
    empty_batches: int = 0  # Poisson batches that sampled no example (noise-only steps)
    physical_batches: int = 0  # forward/backward passes (> steps when logical batches are split)


def _trim(input_ids: torch.Tensor, mask: torch.Tensor):
    """Cut padding columns that no text in the batch uses."""
    if mask.numel() == 0:
        return input_ids, mask
    length = max(1, int(mask.sum(1).max()))
    return input_ids[:, :length], mask[:, :length]


def _trainable(model: nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _empty_batch_gradients(params: list[torch.nn.Parameter], ghost: bool) -> None:
    """Give the DP optimizer the gradients of a batch that sampled no example: a sum of zero.

    Poisson sampling draws empty batches; skipping them would change the mechanism that was
    accounted, so each is a step that adds noise to a zero sum and is booked. Per-sample modes
    clip and sum ``p.grad_sample`` (here zero rows); ghost clipping sums ``p.grad`` itself
    (its optimizer copies ``p.grad`` into ``summed_grad`` and fails on ``None``).
    """
    for p in params:
        if ghost:
            p.grad = torch.zeros_like(p)
        else:
            p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)


def lr_schedule(settings: Settings, steps_per_round: int, round_index: int = 1, num_rounds: int = 1):
    """The learning-rate factor for each local step of round ``round_index`` of ``num_rounds``.

    ``linear`` decays to 0 over the steps of *all* planned rounds, as one centralized run decays
    over all its epochs; restarting the decay every round kept FedAvg on non-IID shards
    oscillating to the end. ``constant`` keeps the factor at 1.
    """
    if settings.schedule == "constant":
        return lambda step: 1.0
    done = (round_index - 1) * steps_per_round
    horizon = max(num_rounds * steps_per_round, 1)
    return lambda step: max(0.0, 1.0 - (done + step) / horizon)


def build_optimizer(params: list[torch.nn.Parameter], settings: Settings) -> torch.optim.Optimizer:
    """``settings.optimizer``: AdamW, or SGD with ``settings.momentum`` (both with weight decay).

    Raises ``ValueError`` for any other name or a learning rate <= 0 (e.g. unresolved 'auto').
    """
    if settings.lr <= 0:
        raise ValueError(f"learning rate {settings.lr} is not positive: resolve 'auto' settings first")
    if settings.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
        )
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    raise ValueError(f"invalid setting optimizer={settings.optimizer!r}: use 'adamw' or 'sgd'")


def logical_batch_size(settings: Settings, num_examples: int) -> int:
    """Non-private batch size: ``max(1, round(q n))`` with ``sample_rate`` set, else ``batch_size``.

    Private runs draw Poisson batches of this expected size (with ``sample_rate`` unset the
    data loader's batch size defines ``q = 1 / ceil(n / B)``).
    """
    rate = sample_rate(num_examples, settings.batch_size, settings.sample_rate)  # checks the rate
    if settings.sample_rate > 0:
        return max(1, round(rate * num_examples))
    return settings.batch_size


def _forward(
    net: nn.Module, batch: list[torch.Tensor], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of one physical batch: ``(input_ids, attention_mask, labels)``, or
    ``(features, labels)`` for the head on cached features (``fedllm.features``)."""
    if len(batch) == 2:
        features, labels = batch
        return net(features.to(device)), labels.to(device)
    input_ids, mask, labels = batch
    input_ids, mask = _trim(input_ids.to(device), mask.to(device))
    return net(input_ids=input_ids, attention_mask=mask).logits, labels.to(device)


def _physical_batches(
    loader: DataLoader, optimizer: torch.optim.Optimizer, size: int, private: bool
) -> Iterator[tuple[list[torch.Tensor], int, bool]]:
    """One pass over ``loader`` in physical batches of at most ``size`` (0 = no limit).

    Yields ``(batch, logical_size, last)``. Private: ``BatchMemoryManager`` splits each Poisson
    batch and tells the DP optimizer to skip the step until the last chunk; the logical size is
    unknown then (0) and ``last`` is not used (a step is detected when the optimizer takes it).
    Non-private: each shuffled batch is split here, ``last`` marks its final chunk.
    """
    if private:
        if size > 0:
            with BatchMemoryManager(
                data_loader=loader, max_physical_batch_size=size, optimizer=optimizer
            ) as physical:
                for batch in physical:
                    yield list(batch), 0, False
        else:
            for batch in loader:
                yield list(batch), 0, False
        return
    for batch in loader:
        count = len(batch[-1])
        chunks = list(zip(*(t.split(size) for t in batch), strict=True)) if 0 < size < count else [batch]
        for i, chunk in enumerate(chunks):
            yield list(chunk), count, i == len(chunks) - 1


def _backward(
    net: nn.Module,
    batch: list[torch.Tensor],
    device: torch.device,
    criterion: nn.Module,
    weight: torch.Tensor | None,
    ghost: bool,
    logical_size: int,
) -> float:
    """Forward and backward one non-empty physical batch; returns the sum of its example losses.

    Private (``logical_size == 0``): the mean over the physical batch, as Opacus expects (its
    per-example gradients undo the mean; the DP optimizer divides the noisy sum of clipped
    gradients by the expected logical batch ``n q``). Non-private: the sum over the chunk divided
    by the logical batch size, so the chunks' gradients add up to the logical batch's mean.
    """
    logits, labels = _forward(net, batch, device)
    if ghost:  # Opacus' loss wrapper: two backward passes, per-example clipping in between
        loss = criterion(logits, labels)
        loss.backward()
        return float(loss.detach()) * len(labels)
    losses = F.cross_entropy(logits, labels, weight=weight, reduction="none")
    (losses.mean() if logical_size == 0 else losses.sum() / logical_size).backward()
    return float(losses.detach().sum())


class _StepWatch:
    """Counts the steps an optimizer really takes (a DP optimizer skips them between chunks)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.count = 0
        self._handle = optimizer.register_step_post_hook(self._taken)

    def _taken(self, *_: object) -> None:
        self.count += 1

    def remove(self) -> None:
        self._handle.remove()


def _booked_steps(history: list) -> int:
    return int(sum(h[2] for h in history))


def train_local(
    model: nn.Module,
    dataset: TensorDataset,
    settings: Settings,
    *,
    plan: PrivacyPlan | None = None,
    history: list | None = None,
    class_weight: torch.Tensor | None = None,
    progress: bool = False,
    seed_offset: int = 0,
    round_of: tuple[int, int] = (1, 1),
) -> TrainResult:
    """Train ``model`` on ``dataset`` for ``settings.epochs`` (or ``max_steps``) logical steps.

    With a ``plan``, DP-SGD is attached (Poisson sampling with ``plan.sample_rate``, clipping,
    noise) and the site's accountant ``history`` is restored first, so the returned ``epsilon``
    is cumulative. Raises ``BudgetExhaustedError`` before training when the budget would be
    exceeded. ``settings.physical_batch_size`` bounds the examples in memory at once, private or
    not (see the module docstring); one optimizer step, one accounted step and one scheduler step
    happen per logical batch. ``settings.optimizer`` picks AdamW or SGD (``build_optimizer``).
    Non-private shuffling is seeded by ``settings.seed + seed_offset`` (pass the round); private
    sampling and noise use OS entropy. ``round_of`` = (this round, planned rounds) places this
    training in the federated learning-rate schedule (``lr_schedule``). 'auto' settings are
    resolved first (``Settings.resolved``); with ``trainable = "head"`` the head trains on the
    frozen encoder's cached pooled features (``fedllm.features``), the same model in seconds.
    """
    settings = settings.resolved()
    device = next(model.parameters()).device
    if settings.trainable == "head":
        dataset, model = pooled_features(model, dataset), HeadOnFeatures(model)
    n = len(dataset)
    if n == 0:
        raise ValueError("no training examples: this site's training split is empty")
    if plan is not None and class_weight is not None and not settings.class_weights:
        raise ValueError("class weights from the private labels would leak them; see loss_weights()")
    steps_goal = plan.local_steps if plan is not None and plan.local_steps > 0 else local_steps(settings, n)
    history = [tuple(h) for h in (history or [])]
    if plan is not None:
        check_budget(plan, history, steps_goal)
        generator = entropy_generator()
    else:
        generator = torch.Generator().manual_seed(settings.seed + seed_offset)
    loader = DataLoader(
        dataset, batch_size=logical_batch_size(settings, n), shuffle=True, generator=generator
    )
    params = _trainable(model)
    optimizer = build_optimizer(params, settings)
    watch = _StepWatch(optimizer)  # the optimizer itself: its DP wrapper may skip steps
    weight = class_weight.to(device) if class_weight is not None else None
    criterion = nn.CrossEntropyLoss(weight=weight)
    engine, net = None, model
    if plan is not None:
        engine, net, optimizer, *rest = make_private(
            model, optimizer, loader, settings, plan, history, criterion
        )
        if settings.grad_sample_mode == "ghost":
            criterion, loader = rest
        else:
            (loader,) = rest
    ghost = plan is not None and settings.grad_sample_mode == "ghost"
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(settings, steps_goal, *round_of))
    net.train()
    result = TrainResult(0, 0, 0.0, 0.0)
    loss_sum, start = 0.0, time.perf_counter()
    before: list[torch.Tensor] | None = [p.detach().clone() for p in params]
    pending = 0  # physical batches since the last step
    bar = tqdm(total=steps_goal, desc="train", unit="step", disable=not progress, leave=False)
    while result.steps < steps_goal:
        for batch, logical_size, last in _physical_batches(
            loader, optimizer, settings.physical_batch_size, private=plan is not None
        ):
            if len(batch[-1]) == 0:  # an empty Poisson batch: still a noisy step, still accounted
                _empty_batch_gradients(params, ghost=settings.grad_sample_mode == "ghost")
                result.empty_batches += 1
            else:
                loss_sum += _backward(net, batch, device, criterion, weight, ghost, logical_size)
                result.examples_seen += len(batch[-1])
            result.physical_batches += 1
            pending += 1
            if plan is None:  # accumulate the chunks' gradients, step after the last one
                if not last:
                    continue
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            else:  # the DP optimizer clips and sums each chunk, skips the step but on the last
                taken = watch.count
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)  # keeps the summed clipped gradients
                if watch.count == taken:
                    if pending > n:  # a Poisson batch has at most n examples
                        raise RuntimeError(f"{pending} physical batches without an optimizer step")
                    continue
            pending = 0
            scheduler.step()
            if before is not None:
                if all(torch.equal(b, p.detach()) for b, p in zip(before, params, strict=True)):
                    raise FrozenTrainingError(
                        "the first training step left all trainable weights unchanged: check that the "
                        "model was on its device before get_peft_model and that lr > 0"
                    )
                before = None
            result.steps += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / max(result.examples_seen, 1):.3f}")
            if result.steps >= steps_goal:
                break
    bar.close()
    watch.remove()
    result.mean_loss = loss_sum / max(result.examples_seen, 1)
    result.seconds = time.perf_counter() - start
    if engine is not None:
        booked = _booked_steps(engine.accountant.history) - _booked_steps(history)
        if booked != result.steps or watch.count != result.steps:
            raise RuntimeError(
                f"{result.steps} logical steps, {watch.count} optimizer steps, {booked} accounted: "
                "every optimizer step must be exactly one accounted step"
            )
        result.history = compact(engine.accountant.history)
        result.epsilon = float(engine.get_epsilon(plan.delta))
        result.noise_multiplier = plan.noise_multiplier
        net.remove_hooks()  # back to the plain model: evaluation needs no per-sample grads
    return result


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: TensorDataset,
    labels: list[str],
    batch_size: int = 64,
    head_only: bool = False,
) -> dict:
    """Loss, accuracy, macro-F1 and per-class counts (support, predicted, correct).

    ``head_only``: the encoder is frozen at its initial weights (``trainable = "head"``), so the
    head is applied to the cached pooled features (``fedllm.features``): the same predictions,
    and after the first call on a data set no encoder pass at all.
    """
    if len(dataset) == 0:
        return classification_metrics(np.zeros(0, int), np.zeros(0, int), labels)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    net = model
    if head_only:
        dataset, net = pooled_features(model, dataset), HeadOnFeatures(model)
    loss_sum, y_true, y_pred = 0.0, [], []
    for batch in DataLoader(dataset, batch_size=batch_size):
        logits, target = _forward(net, list(batch), device)
        loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
        y_true.append(target.cpu().numpy())
        y_pred.append(logits.argmax(-1).cpu().numpy())
    model.train(was_training)
    return classification_metrics(np.concatenate(y_true), np.concatenate(y_pred), labels, loss_sum)


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, labels: list[str], loss_sum: float = 0.0
) -> dict:
    """Accuracy and macro-F1 (over classes present in truth or prediction, as scikit-learn)."""
    n = len(y_true)
    per_class, f1s = {}, []
    for i, name in enumerate(labels):
        support = int((y_true == i).sum())
        predicted = int((y_pred == i).sum())
        correct = int(((y_true == i) & (y_pred == i)).sum())
        per_class[name] = {"support": support, "predicted": predicted, "correct": correct}
        if support or predicted:
            f1s.append(2 * correct / (support + predicted))
    return {
        "loss": loss_sum / max(n, 1),
        "accuracy": float((y_true == y_pred).mean()) if n else 0.0,
        "macro_f1": float(np.mean(f1s)) if f1s else 0.0,
        "num_examples": n,
        "per_class": per_class,
    }
