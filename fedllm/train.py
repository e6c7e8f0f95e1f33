"""The one local training loop (private or not) and evaluation."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from fedllm.config import Settings
from fedllm.privacy import (
    PrivacyPlan,
    check_budget,
    compact,
    entropy_generator,
    local_steps,
    make_private,
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
    """Train ``model`` on ``dataset`` for ``settings.epochs`` (or ``max_steps``) steps.

    With a ``plan``, DP-SGD is attached (Poisson sampling, clipping, noise) and the site's
    accountant ``history`` is restored first, so the returned ``epsilon`` is cumulative.
    Raises ``BudgetExhaustedError`` before training when the budget would be exceeded.
    Non-private shuffling is seeded by ``settings.seed + seed_offset`` (pass the round);
    private sampling and noise use OS entropy. ``round_of`` = (this round, planned rounds)
    places this training in the federated learning-rate schedule (``lr_schedule``).
    """
    device = next(model.parameters()).device
    n = len(dataset)
    if n == 0:
        raise ValueError("no training examples: this site's training split is empty")
    if plan is not None and class_weight is not None and not settings.class_weights:
        raise ValueError("class weights from the private labels would leak them; see loss_weights()")
    steps_goal = local_steps(settings, n)
    history = [tuple(h) for h in (history or [])]
    if plan is not None:
        check_budget(plan, history, steps_goal)
        generator = entropy_generator()
    else:
        generator = torch.Generator().manual_seed(settings.seed + seed_offset)
    loader = DataLoader(dataset, batch_size=settings.batch_size, shuffle=True, generator=generator)
    params = _trainable(model)
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
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
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(settings, steps_goal, *round_of))
    net.train()
    steps, seen, empty, loss_sum, start = 0, 0, 0, 0.0, time.perf_counter()
    bar = tqdm(total=steps_goal, desc="train", unit="step", disable=not progress, leave=False)
    while steps < steps_goal:
        for input_ids, mask, labels in loader:
            input_ids, mask = _trim(input_ids.to(device), mask.to(device))
            labels = labels.to(device)
            before = [p.detach().clone() for p in params] if steps == 0 else None
            if len(labels) == 0:  # an empty Poisson batch: still a noisy step, still accounted
                _empty_batch_gradients(params, ghost=settings.grad_sample_mode == "ghost")
                loss_value = 0.0
                empty += 1
            else:
                logits = net(input_ids=input_ids, attention_mask=mask).logits
                if settings.grad_sample_mode == "ghost" and plan is not None:
                    loss = criterion(logits, labels)
                else:
                    loss = F.cross_entropy(logits, labels, weight=weight, reduction="none").mean()
                loss.backward()
                loss_value = float(loss.detach())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if before is not None and all(
                torch.equal(b, p.detach()) for b, p in zip(before, params, strict=True)
            ):
                raise FrozenTrainingError(
                    "the first training step left all trainable weights unchanged: check that the "
                    "model was on its device before get_peft_model and that lr > 0"
                )
            steps += 1
            seen += len(labels)
            loss_sum += loss_value * len(labels)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}")
            if steps >= steps_goal:
                break
    bar.close()
    result = TrainResult(steps, seen, loss_sum / max(seen, 1), time.perf_counter() - start)
    result.empty_batches = empty
    if engine is not None:
        result.history = compact(engine.accountant.history)
        result.epsilon = float(engine.get_epsilon(plan.delta))
        result.noise_multiplier = plan.noise_multiplier
        net.remove_hooks()  # back to the plain model: evaluation needs no per-sample grads
    return result


@torch.no_grad()
def evaluate(model: nn.Module, dataset: TensorDataset, labels: list[str], batch_size: int = 64) -> dict:
    """Loss, accuracy, macro-F1 and per-class counts (support, predicted, correct)."""
    if len(dataset) == 0:
        return classification_metrics(np.zeros(0, int), np.zeros(0, int), labels)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size)
    loss_sum, y_true, y_pred = 0.0, [], []
    for input_ids, mask, target in loader:
        input_ids, mask = _trim(input_ids.to(device), mask.to(device))
        logits = model(input_ids=input_ids, attention_mask=mask).logits
        loss_sum += float(F.cross_entropy(logits, target.to(device), reduction="sum"))
        y_true.append(target.numpy())
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
