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
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
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
from fedllm.config import Settings
from fedllm.features import HeadOnFeatures, pooled_features
from fedllm.precision import attention_in_fp32, autocast, keep_trainable_fp32, resolve_precision
from fedllm.prefix import prefix_view
from fedllm.privacy import attach, entropy_generator, zero_sum_gradients


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
    return lambda: [step() for step in undo]


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
    """Logits and labels of one physical batch: ``(input_ids, attention_mask, labels)``, or cached
    float inputs and labels: ``(features, labels)`` for the head (``fedllm.features``),
    ``(hidden states, attention_mask, labels)`` for the top layers (``fedllm.prefix``)."""
    if batch[0].is_floating_point():
        return net(*(t.to(device) for t in batch[:-1])), batch[-1].to(device)
    input_ids, mask, labels = batch
    input_ids, mask = _trim(input_ids.to(device), mask.to(device))
    return net(input_ids=input_ids, attention_mask=mask).logits, labels.to(device)


def _chunks(loader: DataLoader, size: int) -> Iterator[tuple[list[torch.Tensor], int, bool]]:
    """One pass over the shuffled (non-private) batches, each split in chunks of at most ``size``
    (0 = unsplit): ``(chunk, logical batch size, last chunk of its batch)``."""
    for batch in loader:
        count = len(batch[-1])
        chunks = list(zip(*(t.split(size) for t in batch), strict=True)) if 0 < size < count else [batch]
        for i, chunk in enumerate(chunks):
            yield list(chunk), count, i == len(chunks) - 1


def _private_batches(
    batches: Callable[[], Iterable[list[torch.Tensor]]],
) -> Iterator[tuple[list[torch.Tensor], int, bool]]:
    """Private physical batches as ``_chunks`` yields them: divisor 1 (the loss is already their
    mean), each one "last" (the DP optimizer itself skips the step until a Poisson batch's end)."""
    for batch in batches():
        yield batch, 1, True


class _ExampleLoss(nn.CrossEntropyLoss):
    """Class-weighted cross-entropy per example, reduced by the *number* of examples.

    ``reduction``: ``"none"`` (the example losses), ``"sum"``, or ``"mean"`` (their sum over the
    count, not over the summed class weights as ``nn.CrossEntropyLoss`` does). Opacus' ghost
    clipping sets ``reduction = "none"`` on it to get the example losses, then takes their mean.
    ``offset`` (a public per-class vector, e.g. ``imbalance.logit_offset``) is added to the logits
    first: the logit-adjusted loss. The model itself is unchanged, so inference uses raw logits.
    """

    def __init__(self, weight: torch.Tensor | None = None, offset: torch.Tensor | None = None) -> None:
        super().__init__(weight=weight)
        self.offset = offset

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The example losses of ``logits`` against ``labels``, reduced by ``self.reduction``."""
        if self.offset is not None:
            logits = logits + self.offset.to(logits)
        losses = F.cross_entropy(logits, labels, weight=self.weight, reduction="none")
        if self.reduction == "none":
            return losses
        return losses.sum() if self.reduction == "sum" else losses.mean()


class _StepWatch:
    """Counts the steps an optimizer really takes (a DP optimizer skips them between chunks)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.count = 0
        self._handle = optimizer.register_step_post_hook(self._taken)

    def _taken(self, *_: object) -> None:
        self.count += 1

    def remove(self) -> None:
        self._handle.remove()


def _call_before_noise(optimizer: torch.optim.Optimizer, hook: Callable[[list], None]) -> None:
    """Make the DP optimizer call ``hook(params)`` on the clipped sums right before its noise."""
    add_noise = optimizer.add_noise

    def wrapped() -> None:
        hook(list(optimizer.params))
        add_noise()

    optimizer.add_noise = wrapped


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
    before_noise: Callable[[list[torch.nn.Parameter]], None] | None = None,
    logit_offset: torch.Tensor | None = None,
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
    ``before_noise`` (under a plan; audits only): called at every step with the DP optimizer's
    parameters when each ``p.summed_grad`` holds the step's clipped gradient sum, before the
    noise is added (``fedllm.gradient_canaries`` adds its canaries there). ``logit_offset``:
    added to the logits in the training loss only (``imbalance.logit_offset``; public or DP).
    ``class_weight`` under DP only when public (``class-weights``) or from the DP label histogram
    (``imbalance = balanced``, ``imbalance.prior_weights``).
    """
    settings = settings.resolved()
    device = next(model.parameters()).device
    precision = resolve_precision(settings.precision, device)
    original = model
    model, dataset = _fast_path(model, dataset, settings, precision)
    n = len(dataset)
    if n == 0:
        raise ValueError("no training examples: this site's training split is empty")
    dp_weights = settings.class_weights or settings.imbalance == "balanced"
    if plan is not None and class_weight is not None and not dp_weights:
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
    # a physical batch back-propagates criterion(logits, labels) / divisor: non-private, the sum
    # of a chunk's example losses over its logical batch's size (the chunks add up to the logical
    # batch's mean); private, Opacus' convention, the mean over the physical batch (divisor 1)
    private = None
    if plan is None:
        net, criterion = model, _ExampleLoss(weight=weight, offset=logit_offset)
        criterion.reduction = "sum"
        batches = partial(_chunks, loader, settings.physical_batch_size)
    else:
        loss = _ExampleLoss(weight=weight, offset=logit_offset)
        private = attach(model, optimizer, loader, settings, plan, history, loss)
        net, optimizer, criterion = private.model, private.optimizer, private.criterion
        if before_noise is not None:
            _call_before_noise(optimizer, before_noise)
        batches = partial(_private_batches, private.batches)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(settings, steps_goal, *round_of))
    net.train()
    result = TrainResult(0, 0, 0.0, 0.0)
    loss_sum, start = 0.0, time.perf_counter()
    # a frozen first step is a silent LoRA / device failure worth one clear error, but only without
    # DP: under DP "did the noisy step move the weights" is a question about the noise and the data
    # that the server could pose for free (a post-noise branch); a site answers none (privacy.md)
    before: list[torch.Tensor] | None = [p.detach().clone() for p in params] if plan is None else None
    pending = 0  # physical batches since the last step
    bar = tqdm(total=steps_goal, desc="train", unit="step", disable=not progress, leave=False)
    # Opacus' hooks warn at every backward pass that the inputs need no grad: frozen embeddings
    quiet = known_warnings() if private is not None else nullcontext()
    fp32_back = _bf16_setup(model, original, device) if precision == "bf16" else (lambda: None)
    with quiet:
        while result.steps < steps_goal:
            for batch, divisor, last in batches():
                if len(batch[-1]) == 0:  # an empty Poisson batch: still a noisy step, still accounted
                    zero_sum_gradients(params)
                    result.empty_batches += 1
                else:
                    with autocast(precision, device):
                        logits, labels = _forward(net, batch, device)
                    (criterion(logits, labels) / divisor).backward()
                    loss_sum += float(
                        F.cross_entropy(logits.detach(), labels, weight=weight, reduction="none").sum()
                    )
                    result.examples_seen += len(labels)
                result.physical_batches += 1
                pending += 1
                if not last:  # a non-private chunk: accumulate, step after the batch's last one
                    continue
                taken = watch.count
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)  # a DP optimizer keeps its summed clipped gradients
                if watch.count == taken:  # the DP optimizer clipped and summed a chunk, skipped the step
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
    fp32_back()
    result.mean_loss = loss_sum / max(result.examples_seen, 1)
    result.seconds = time.perf_counter() - start
    if private is not None:  # back to the plain model: evaluation needs no per-sample gradients
        result.history, result.epsilon = private.finish(result.steps)
        result.noise_multiplier = plan.noise_multiplier
    return result


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
        logits, target = _forward(net, list(batch), device)
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
