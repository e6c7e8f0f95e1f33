"""The inner loop of one local training: physical batches, their loss, and the steps taken.

A *logical* batch is what one optimizer step consumes; it runs through the model as one or more
*physical* batches (``fedllm.train``'s module docstring). This module holds the pieces of that
loop after set-up (``fedllm.train.train_local`` builds a ``LoopState`` and calls ``run_steps``
and ``finish``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from fedllm.precision import autocast
from fedllm.privacy import PrivateTraining, zero_sum_gradients


def trim_padding(input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut padding columns that no text in the batch uses."""
    if mask.numel() == 0:
        return input_ids, mask
    length = max(1, int(mask.sum(1).max()))
    return input_ids[:, :length], mask[:, :length]


def forward_batch(
    net: nn.Module, batch: list[torch.Tensor], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of one physical batch: ``(input_ids, attention_mask, labels)``, or cached
    float inputs and labels: ``(features, labels)`` for the head (``fedllm.features``),
    ``(hidden states, attention_mask, labels)`` for the top layers (``fedllm.prefix``)."""
    if batch[0].is_floating_point():
        return net(*(t.to(device) for t in batch[:-1])), batch[-1].to(device)
    input_ids, mask, labels = batch
    input_ids, mask = trim_padding(input_ids.to(device), mask.to(device))
    return net(input_ids=input_ids, attention_mask=mask).logits, labels.to(device)


def chunks(loader: DataLoader, size: int) -> Iterator[tuple[list[torch.Tensor], int, bool]]:
    """One pass over the shuffled (non-private) batches, each split in chunks of at most ``size``
    (0 = unsplit): ``(chunk, logical batch size, last chunk of its batch)``."""
    for batch in loader:
        count = len(batch[-1])
        chunks = list(zip(*(t.split(size) for t in batch), strict=True)) if 0 < size < count else [batch]
        for i, chunk in enumerate(chunks):
            yield list(chunk), count, i == len(chunks) - 1


def private_batches(
    batches: Callable[[], Iterable[list[torch.Tensor]]],
) -> Iterator[tuple[list[torch.Tensor], int, bool]]:
    """Private physical batches as ``chunks`` yields them: divisor 1 (the loss is already their
    mean), each one "last" (the DP optimizer itself skips the step until a Poisson batch's end)."""
    for batch in batches():
        yield batch, 1, True


class ExampleLoss(nn.CrossEntropyLoss):
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


class StepWatch:
    """Counts the steps an optimizer really takes (a DP optimizer skips them between chunks)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.count = 0
        self._handle = optimizer.register_step_post_hook(self._taken)

    def _taken(self, *_: object) -> None:
        self.count += 1

    def remove(self) -> None:
        self._handle.remove()


def call_before_noise(optimizer: DPOptimizer, hook: Callable[[list], None]) -> None:
    """Make the DP optimizer call ``hook(params)`` on the clipped sums right before its noise."""
    add_noise = optimizer.add_noise

    def wrapped() -> None:
        hook(list(optimizer.params))
        add_noise()

    setattr(optimizer, "add_noise", wrapped)  # noqa: B010 - an instance attribute over the method


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


@dataclass
class LoopState:
    """One local training's loop state, shared by ``train_local``'s phases."""

    net: nn.Module  # what the batches run through (the DP wrapper under a plan)
    optimizer: torch.optim.Optimizer
    criterion: Callable[..., torch.Tensor]
    batches: Callable[[], Iterable[tuple[list[torch.Tensor], int, bool]]]
    params: list[torch.nn.Parameter]
    watch: StepWatch
    private: PrivateTraining | None = None
    weight: torch.Tensor | None = None
    device: torch.device = torch.device("cpu")
    precision: str = "fp32"
    steps_goal: int = 0
    n: int = 0
    scheduler: Any = None
    before: list[torch.Tensor] | None = None
    pending: int = 0  # physical batches since the last step
    loss_sum: float = 0.0


def run_steps(loop: LoopState, result: TrainResult, bar: tqdm) -> None:
    """Physical batches until ``loop.steps_goal`` optimizer steps are taken."""
    while result.steps < loop.steps_goal:
        for batch, divisor, last in loop.batches():
            _physical(loop, result, batch, divisor)
            if not last:  # a non-private chunk: accumulate, step after the batch's last one
                continue
            if not _step(loop, result):
                continue
            bar.update(1)
            bar.set_postfix(loss=f"{loop.loss_sum / max(result.examples_seen, 1):.3f}")
            if result.steps >= loop.steps_goal:
                break


def _physical(loop: LoopState, result: TrainResult, batch: list[torch.Tensor], divisor: int) -> None:
    """Forward and backward one physical batch (an empty Poisson batch: a zero gradient sum)."""
    if len(batch[-1]) == 0:  # an empty Poisson batch: still a noisy step, still accounted
        zero_sum_gradients(loop.params)
        result.empty_batches += 1
    else:
        with autocast(loop.precision, loop.device):
            logits, labels = forward_batch(loop.net, batch, loop.device)
        (loop.criterion(logits, labels) / divisor).backward()
        loop.loss_sum += float(
            F.cross_entropy(logits.detach(), labels, weight=loop.weight, reduction="none").sum()
        )
        result.examples_seen += len(labels)
    result.physical_batches += 1
    loop.pending += 1


def _step(loop: LoopState, result: TrainResult) -> bool:
    """One optimizer step after a logical batch's last physical batch; False when the DP
    optimizer only clipped and summed a chunk (it steps at the Poisson batch's end)."""
    taken = loop.watch.count
    loop.optimizer.step()
    loop.optimizer.zero_grad(set_to_none=True)  # a DP optimizer keeps its summed clipped gradients
    if loop.watch.count == taken:
        if loop.pending > loop.n:  # a Poisson batch has at most n examples
            raise RuntimeError(f"{loop.pending} physical batches without an optimizer step")
        return False
    loop.pending = 0
    loop.scheduler.step()
    if loop.before is not None:
        if all(torch.equal(b, p.detach()) for b, p in zip(loop.before, loop.params, strict=True)):
            raise FrozenTrainingError(
                "the first training step left all trainable weights unchanged: check that the "
                "model was on its device before get_peft_model and that lr > 0"
            )
        loop.before = None
    result.steps += 1
    return True


def finish(loop: LoopState, result: TrainResult, start: float) -> TrainResult:
    """The mean loss and time; under DP the plain model back (evaluation needs no per-sample
    gradients) and the site's history and cumulative epsilon."""
    result.mean_loss = loop.loss_sum / max(result.examples_seen, 1)
    result.seconds = time.perf_counter() - start
    if loop.private is not None:
        result.history, result.epsilon = loop.private.finish(result.steps)
        result.noise_multiplier = loop.private.plan.noise_multiplier
    return result
