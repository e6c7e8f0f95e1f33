"""Membership scores for the empirical privacy audit (``fedllm.audit``), higher = "in".

- **Black-box** (``per_example_losses``): minus the final model's loss on a record.
- **White-box** (``UpdateLog``, ``alignment_scores``): the alignment of the record's site's
  updates with the record's negative loss gradient at the model the site started from, summed
  over rounds, in the metric ``whitener`` makes of the features' second moment
  (``second_moment``; the head only).

The scores feed ``fedllm.audit.audit_from_scores`` (canaries) and
``fedllm.audit.membership_inference`` (real records). The method: docs/audit.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from peft import PeftModel
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from fedllm.adapters import set_adapter_arrays, wire_parameters
from fedllm.features import HeadOnFeatures, pooled_features

RIDGE = 0.1  # the white-box metric's ridge, relative to the features' mean eigenvalue (docs/audit.md)
CANARY_WEIGHT = 0.5  # a canary's weight in that metric: its probability of being in the data


def _net(model: nn.Module, dataset: TensorDataset, head_only: bool) -> tuple[nn.Module, TensorDataset]:
    if head_only:
        return HeadOnFeatures(model), pooled_features(model, dataset)
    return model, dataset


def _logits(net: nn.Module, batch: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    if len(batch) == 2:
        return net(batch[0].to(device))
    return net(input_ids=batch[0].to(device), attention_mask=batch[1].to(device)).logits


@torch.no_grad()
def per_example_losses(
    model: nn.Module, dataset: TensorDataset, head_only: bool = False, batch_size: int = 64
) -> np.ndarray:
    """Each example's cross-entropy loss under ``model`` (eval mode; the head on cached features
    when ``head_only``)."""
    if len(dataset) == 0:
        return np.zeros(0)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    net, data = _net(model, dataset, head_only)
    out = []
    for batch in DataLoader(data, batch_size=batch_size):
        batch = list(batch)
        out.append(F.cross_entropy(_logits(net, batch, device), batch[-1].to(device), reduction="none"))
    model.train(was_training)
    return torch.cat(out).cpu().double().numpy()


def per_example_gradients(model: PeftModel, dataset: TensorDataset, head_only: bool = False) -> torch.Tensor:
    """(n, P): each example's loss gradient w.r.t. the trainable (wire) parameters, flattened in
    wire order (``fedllm.adapters``), at the model's current weights (eval mode)."""
    params = list(wire_parameters(model).values())
    device = params[0].device
    was_training = model.training
    model.eval()
    net, data = _net(model, dataset, head_only)
    rows = []
    for batch in DataLoader(data, batch_size=1):
        batch = list(batch)
        loss = F.cross_entropy(_logits(net, batch, device), batch[-1].to(device))
        grads = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
        rows.append(torch.cat([g.flatten() for g in grads]))
    model.train(was_training)
    width = sum(p.numel() for p in params)
    return torch.stack(rows).detach().cpu().double() if rows else torch.zeros((0, width), dtype=torch.float64)


def flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """A state (wire order) as one float64 vector."""
    return torch.cat([v.detach().cpu().double().flatten() for v in state.values()])


class UpdateLog:
    """What the server sees of a federation: each round's global adapter and each site's update.

    Pass ``observe`` every site's reply (round, site, the global state it started from, its
    trained state); ``alignment_scores`` scores records against the log afterwards.
    """

    def __init__(self) -> None:
        self.starts: dict[int, dict[str, torch.Tensor]] = {}
        self.updates: dict[int, dict[int, torch.Tensor]] = {}

    def observe(
        self, round: int, site: int, start: dict[str, torch.Tensor], state: dict[str, torch.Tensor]
    ) -> None:
        """Record site ``site``'s update (``state - start``) of round ``round``."""
        self.starts.setdefault(round, {k: v.detach().cpu().clone() for k, v in start.items()})
        self.updates.setdefault(round, {})[site] = flat(state) - flat(start)


def second_moment(blocks: Sequence[tuple[torch.Tensor | np.ndarray, float]]) -> np.ndarray:
    """Σ w X^T X / Σ w n over (features X, weight w) blocks: the features' second moment."""
    width = np.asarray(blocks[0][0]).shape[1]
    total, count = np.zeros((width, width)), 0.0
    for features, weight in blocks:
        x = np.asarray(features, dtype=np.float64)
        total += weight * x.T @ x
        count += weight * len(x)
    return total / max(count, 1e-12)


def whitener(moment: np.ndarray, ridge: float = RIDGE) -> np.ndarray:
    """(M + ridge · tr(M)/d · I)^-1: the metric that weighs the directions where the data's
    gradients do not reach (the matched filter for the other records' interference)."""
    d = moment.shape[0]
    return np.linalg.inv(moment + ridge * np.trace(moment) / d * np.eye(d))


def _precondition(grads: torch.Tensor, shapes: list[torch.Size], metric: np.ndarray | None) -> torch.Tensor:
    """Each matrix block's input (feature) side times ``metric``; vector blocks (biases) left out."""
    if metric is None:
        return grads
    m = torch.as_tensor(metric, dtype=grads.dtype)
    blocks, at = [], 0
    for shape in shapes:
        size = int(np.prod(shape))
        block = grads[:, at : at + size]
        if len(shape) == 2 and shape[1] == m.shape[0]:
            blocks.append((block.reshape(len(grads), *shape) @ m).reshape(len(grads), size))
        else:
            blocks.append(torch.zeros_like(block))
        at += size
    return torch.cat(blocks, dim=1)


def alignment_scores(
    log: UpdateLog,
    model: PeftModel,
    dataset: TensorDataset,
    sites: np.ndarray,
    head_only: bool,
    metric: np.ndarray | Mapping[int, np.ndarray] | None = None,
) -> np.ndarray:
    """The white-box score of each record: Σ over rounds of ⟨Δ_s, d⟩, d = −g / ‖g‖.

    Δ_s is the round's update of the record's site ``sites[i]``, g the record's loss gradient
    at the global adapter that site started from (``model`` is loaded with each round's global
    adapter: pass a model of the federation's settings). With ``metric`` (the head only; one
    matrix, or one per site) g's weight block is preconditioned on its feature side first
    (``whitener``) and the bias block left out. A record trained on pushes Δ_s along −g.
    """
    sites = np.asarray(sites)
    scores = np.zeros(len(sites))
    shapes = [p.shape for p in wire_parameters(model).values()]
    for round_, start in sorted(log.starts.items()):
        set_adapter_arrays(model, {k: v.numpy() for k, v in start.items()})
        grads = -per_example_gradients(model, dataset, head_only)
        for site, update in log.updates[round_].items():
            mine = np.flatnonzero(sites == site)
            if len(mine) == 0:
                continue
            local = metric.get(site) if isinstance(metric, Mapping) else metric
            d = _precondition(grads[mine], shapes, local)
            d = d / d.norm(dim=1, keepdim=True).clamp(min=1e-12)
            scores[mine] += (d @ update).numpy()
    return scores
