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
from collections.abc import Callable
from contextlib import nullcontext
from functools import partial

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from fedllm import known_warnings
from fedllm.accounting import PrivacyPlan, check_budget, local_steps, sample_rate
from fedllm.config import ResolvedSettings, Settings, require_resolved
from fedllm.features import HeadOnFeatures, pooled_features
from fedllm.loop import (
    ExampleLoss,
    LoopState,
    StepWatch,
    TrainResult,
    call_before_noise,
    chunks,
    finish,
    forward_batch,
    private_batches,
    run_steps,
)
from fedllm.precision import attention_in_fp32, keep_trainable_fp32, resolve_precision
from fedllm.prefix import prefix_view
from fedllm.privacy import attach, entropy_generator


def _fast_path(
    model: nn.Module, dataset: TensorDataset, settings: Settings, precision: str
) -> tuple[nn.Module, TensorDataset]:
    """The model and data the loop runs on: the head on cached pooled features (``head``), the
    top layers on the cached frozen prefix (``lora-layers``, ``prefix-cache``), else as given.
    Under DP the examples are ordered by length, so each Poisson batch (drawn in index order) is,
    and its physical chunks carry little padding; Poisson sampling does not depend on the order."""
    if settings.trainable == "head":
        return HeadOnFeatures(model), pooled_features(model, dataset)
    if settings.prefix_cache and (view := prefix_view(model, dataset, precision)) is not None:
        model, dataset = view
    if settings.private and len(dataset.tensors) == 3:
        order = torch.argsort(dataset.tensors[1].sum(1), stable=True)
        dataset = TensorDataset(*(t[order] for t in dataset.tensors))
    return model, dataset


def _bf16_setup(net: nn.Module, model: nn.Module, device: torch.device) -> Callable[[], None]:
    """Trainable modules of ``net`` in fp32; on CPU, ``model``'s attention too. Returns the undo."""
    undo = [keep_trainable_fp32(net)]
    if device.type == "cpu":
        undo.append(attention_in_fp32(model))

    def undo_all() -> None:
        for step in undo:
            step()

    return undo_all


def _trainable(model: nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


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

    Raises ``ValueError`` for any other name (resolved settings hold a learning rate > 0).
    """
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


def train_local(
    model: nn.Module,
    dataset: TensorDataset,
    settings: ResolvedSettings,
    *,
    plan: PrivacyPlan | None = None,
    history: list | None = None,
    round_of: tuple[int, int] | None = None,
    class_weight: torch.Tensor | None = None,
    logit_offset: torch.Tensor | None = None,
    before_noise: Callable[[list[torch.nn.Parameter]], None] | None = None,
    progress: bool = False,
) -> TrainResult:
    """Train ``model`` on ``dataset`` for ``settings.epochs`` (or ``max_steps``) logical steps.

    ``settings`` are resolved once where the run starts (``Settings.resolved()``). With a
    ``plan``, DP-SGD is attached (Poisson sampling with ``plan.sample_rate``, clipping, noise)
    over the site's accountant ``history``, so the returned ``epsilon`` is cumulative;
    ``BudgetExhaustedError`` before training when the budget would be exceeded. One optimizer,
    accounted and scheduler step per logical batch (the module docstring). ``round_of`` = (this
    round, planned rounds) of a federation places the training in the federated learning-rate
    schedule (``lr_schedule``) and seeds non-private shuffling with ``seed + round``; ``None``
    (one standalone fine-tune) = ``seed`` and one round. Private sampling and noise use OS
    entropy. ``trainable = "head"`` trains the head on cached pooled features
    (``fedllm.features``). ``class_weight`` under DP only when public (``class-weights``) or from
    the DP label histogram; ``logit_offset`` is added to the logits in the training loss only
    (``imbalance``). ``before_noise`` (under a plan; audits only) is called at every step with the
    DP optimizer's parameters when each ``p.summed_grad`` holds the clipped sum, before the noise
    (``fedllm.gradient_canaries``).
    """
    settings = require_resolved(settings, "train_local")
    device = next(model.parameters()).device
    precision = resolve_precision(settings.precision, device)
    original = model
    model, dataset = _fast_path(model, dataset, settings, precision)
    steps_goal = _steps_goal(dataset, settings, plan, class_weight)
    history = [tuple(h) for h in (history or [])]
    seed_offset, schedule = (round_of[0], round_of) if round_of is not None else (0, (1, 1))
    loader = _loader(dataset, settings, plan, history, steps_goal, seed_offset)
    weight = class_weight.to(device) if class_weight is not None else None
    loss = ExampleLoss(weight=weight, offset=logit_offset)
    loop = _loop(model, loader, settings, plan, history, loss, before_noise)
    loop.weight, loop.device, loop.precision = weight, device, precision
    loop.steps_goal, loop.n = steps_goal, len(dataset)
    loop.scheduler = torch.optim.lr_scheduler.LambdaLR(
        loop.optimizer, lr_schedule(settings, steps_goal, *schedule)
    )
    loop.net.train()
    result, start = TrainResult(0, 0, 0.0, 0.0), time.perf_counter()
    # a frozen first step is a silent LoRA / device failure worth one clear error, but only without
    # DP: under DP "did the noisy step move the weights" is a question about the noise and the data
    # that the server could pose for free (a post-noise branch); a site answers none (privacy.md)
    loop.before = [p.detach().clone() for p in loop.params] if plan is None else None
    _run(loop, result, (model, original), progress)
    return finish(loop, result, start)


def _run(loop: LoopState, result: TrainResult, models: tuple[nn.Module, nn.Module], progress: bool) -> None:
    """``run_steps`` inside the progress bar, Opacus' known warnings quieted (its hooks warn at
    every backward pass that the frozen embeddings need no grad) and, under bf16, the trainable
    modules of ``models`` = (the net, the original model) kept in fp32."""
    bar = tqdm(total=loop.steps_goal, desc="train", unit="step", disable=not progress, leave=False)
    quiet = known_warnings() if loop.private is not None else nullcontext()
    net, original = models
    fp32_back = _bf16_setup(net, original, loop.device) if loop.precision == "bf16" else (lambda: None)
    with quiet:
        run_steps(loop, result, bar)
    bar.close()
    loop.watch.remove()
    fp32_back()


def _steps_goal(
    dataset: TensorDataset,
    settings: ResolvedSettings,
    plan: PrivacyPlan | None,
    class_weight: torch.Tensor | None,
) -> int:
    """The logical steps to take (the plan's, else ``local_steps``); refuses an empty split and
    class weights computed from private labels."""
    n = len(dataset)
    if n == 0:
        raise ValueError("no training examples: this site's training split is empty")
    dp_weights = settings.class_weights or settings.imbalance == "balanced"
    if plan is not None and class_weight is not None and not dp_weights:
        raise ValueError("class weights from the private labels would leak them; see loss_weights()")
    return plan.local_steps if plan is not None and plan.local_steps > 0 else local_steps(settings, n)


def _loader(
    dataset: TensorDataset,
    settings: ResolvedSettings,
    plan: PrivacyPlan | None,
    history: list,
    steps_goal: int,
    seed_offset: int,
) -> DataLoader:
    """The logical-batch loader: under a plan (budget checked first) shuffled from OS entropy
    (``attach`` replaces it with Poisson sampling), else seeded by ``seed + seed_offset``."""
    if plan is not None:
        check_budget(plan, history, steps_goal)
        generator = entropy_generator()
    else:
        generator = torch.Generator().manual_seed(settings.seed + seed_offset)
    return DataLoader(
        dataset, batch_size=logical_batch_size(settings, len(dataset)), shuffle=True, generator=generator
    )


def _loop(
    model: nn.Module,
    loader: DataLoader,
    settings: ResolvedSettings,
    plan: PrivacyPlan | None,
    history: list,
    loss: ExampleLoss,
    before_noise: Callable[[list[torch.nn.Parameter]], None] | None,
) -> LoopState:
    """The optimizer and the physical batches: plain, or wrapped by DP-SGD under a plan.

    A physical batch back-propagates criterion(logits, labels) / divisor: non-private, the sum of
    a chunk's example losses over its logical batch's size (the chunks add up to the logical
    batch's mean); private, Opacus' convention, the mean over the physical batch (divisor 1).
    """
    params = _trainable(model)
    optimizer = build_optimizer(params, settings)
    watch = StepWatch(optimizer)  # the optimizer itself: its DP wrapper may skip steps
    if plan is None:
        loss.reduction = "sum"
        batches = partial(chunks, loader, settings.physical_batch_size)
        return LoopState(model, optimizer, loss, batches, params, watch)
    private = attach(model, optimizer, loader, settings, plan, history, loss)
    if before_noise is not None:
        call_before_noise(private.optimizer, before_noise)
    batches = partial(private_batches, private.batches)
    return LoopState(private.model, private.optimizer, private.criterion, batches, params, watch, private)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: TensorDataset,
    labels: list[str],
    batch_size: int = 64,
    head_only: bool = False,
    logit_offset: torch.Tensor | None = None,
) -> dict:
    """Loss, accuracy, macro-F1 and per-class counts (support, predicted, correct).

    ``head_only``: the encoder is frozen at its initial weights (``trainable = "head"``), so the
    head is applied to the cached pooled features (``fedllm.features``): the same predictions,
    and after the first call on a data set no encoder pass at all. ``logit_offset``: added to
    the logits before scoring (a site's own prior, ``imbalance.personalized_offset``).
    """
    if len(dataset) == 0:
        return classification_metrics(np.zeros(0, int), np.zeros(0, int), labels)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    net = model
    if head_only:
        dataset, net = pooled_features(model, dataset), HeadOnFeatures(model)
    elif (view := prefix_view(model, dataset)) is not None:
        net, dataset = view
    loss_sum, y_true, y_pred = 0.0, [], []
    for batch in DataLoader(dataset, batch_size=batch_size):
        logits, target = forward_batch(net, list(batch), device)
        if logit_offset is not None:
            logits = logits + logit_offset.to(logits)
        loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
        y_true.append(target.cpu().numpy())
        y_pred.append(logits.argmax(-1).cpu().numpy())
    model.train(was_training)
    truth, predicted = np.concatenate(y_true), np.concatenate(y_pred)
    listed = truth >= 0  # rows with a label the run does not list (UNLISTED_LABEL) are not scored
    return classification_metrics(truth[listed], predicted[listed], labels, loss_sum)


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, labels: list[str], loss_sum: float = 0.0
) -> dict:
    """Loss, accuracy, macro-F1 and per-class counts (support, predicted, correct), by scikit-learn.

    Class ``i`` is ``labels[i]``. Macro-F1 averages over the classes present in the truth or the
    predictions (as scikit-learn's default does), counting only classes in ``labels``. An empty
    set scores 0.
    """
    n, k = len(y_true), len(labels)
    support, predicted = (np.bincount(y, minlength=k)[:k] for y in (y_true, y_pred))
    correct = np.bincount(y_true[y_true == y_pred], minlength=k)[:k]
    present = [i for i in range(k) if support[i] or predicted[i]]
    return {
        "loss": loss_sum / max(n, 1),
        "accuracy": float(accuracy_score(y_true, y_pred)) if n else 0.0,
        "macro_f1": float(f1_score(y_true, y_pred, labels=present, average="macro")) if present else 0.0,
        "num_examples": n,
        "per_class": {
            name: {"support": int(support[i]), "predicted": int(predicted[i]), "correct": int(correct[i])}
            for i, name in enumerate(labels)
        },
    }
