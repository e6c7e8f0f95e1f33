"""Empirical privacy audit: canaries in one training run, and membership inference on real records.

- **Canaries** (``draw_canaries``): m records, each assigned to one site at random and inserted
  there with probability ½, independently, from a seeded numpy generator (the audit seed). The
  inclusion draw is the secret the attacker guesses.
- **Scores**, higher = "in": black-box, minus the final model's loss on the canary
  (``per_example_losses``); white-box (``UpdateLog``, ``alignment_scores``), the alignment of
  the canary's site's updates with the canary's negative loss gradient at the model the site
  started from, summed over rounds, in the metric ``whitener`` makes of the features' second
  moment (the head only).
- **Lower bound** (``epsilon_lower_bound``, ``audit_from_scores``): Steinke, Nasr and Jagielski,
  "Privacy auditing with one (1) training run" (NeurIPS 2023), Theorem 3.1 with its δ term: the
  attacker guesses "in" for the k+ highest scores, "out" for the k- lowest, abstains on the
  rest; from r guesses with v correct, the largest ε that an (ε, δ)-DP mechanism would make
  this unlikely (p-value ≤ β) is a lower bound on ε at confidence 1 − β.
- **Membership inference** (``membership_inference``): any score (the loss-threshold attack:
  minus the loss), ROC AUC with a bootstrap interval, TPR at 1% and 0.1% FPR.

Everything after training works on saved scores too: an operator who holds a run's canary
scores and inclusion draw calls ``audit_from_scores``. The method: docs/audit.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import torch
from scipy import stats
from sklearn.metrics import roc_auc_score, roc_curve
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset
from transformers import PreTrainedTokenizerBase

from fedllm.adapters import set_adapter_arrays, wire_parameters
from fedllm.features import HeadOnFeatures, pooled_features

CANARY_KINDS = ("random-tokens", "mislabeled")
# Guess r = fraction * m canaries (half "in" from the top, half "out" from the bottom); the bound
# is the best of these options, each tested at beta / len(options) (a union bound). Fixed in advance.
GUESS_FRACTIONS = (0.05, 0.1, 0.2, 0.5, 1.0)
RIDGE = 0.1  # the white-box metric's ridge, relative to the features' mean eigenvalue (docs/audit.md)
CANARY_WEIGHT = 0.5  # a canary's weight in that metric: its probability of being in the data


# ---------------------------------------------------------------- canaries


@dataclass
class Canaries:
    """m canary records, the site each would join, and whether it did (the secret)."""

    texts: list[str]
    labels: list[str]
    sites: np.ndarray  # int, the site each canary is assigned to
    included: np.ndarray  # bool, inserted at its site or not (probability 1/2, independent)
    kind: str
    seed: int

    def __len__(self) -> int:
        return len(self.texts)

    def rows(self, site: int) -> pd.DataFrame:
        """The canaries inserted at ``site``: a ``text``/``label`` table to add to its training data."""
        keep = (self.sites == site) & self.included
        return self.frame()[keep][["text", "label"]].reset_index(drop=True)

    def frame(self) -> pd.DataFrame:
        """Every canary with its site and inclusion (for saving next to the scores)."""
        return pd.DataFrame(
            {"text": self.texts, "label": self.labels, "site": self.sites, "included": self.included}
        )


def vocabulary_words(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The tokenizer's whole-word, alphabetic vocabulary entries (no ``##`` pieces, no specials)."""
    words = [w for w in tokenizer.get_vocab() if w.isalpha() and w.isascii() and len(w) > 1]
    return sorted(set(words) - set(tokenizer.all_special_tokens))


def draw_canaries(
    m: int,
    num_sites: int,
    seed: int,
    *,
    kind: str,
    labels: Sequence[str],
    vocabulary: Sequence[str] = (),
    source: pd.DataFrame | None = None,
    label: str = "",
    length: int = 32,
) -> Canaries:
    """Draw m canaries, their sites and their inclusion from ``seed`` alone.

    ``random-tokens``: ``length`` words drawn uniformly from ``vocabulary``, labelled ``label``
    (``""``: each canary a label drawn uniformly from ``labels``). ``mislabeled``: m distinct
    rows of ``source`` (``text``, ``label``; e.g. the held-out split), each with a label drawn
    uniformly from the others. Three independent streams spawned from ``seed`` draw the
    contents, the sites (uniform over ``num_sites``) and the inclusions (each 1/2,
    independently): the secret does not depend on what the canaries are.
    """
    if m < 0 or num_sites < 1:
        raise ValueError(f"canaries={m}, sites={num_sites}: use canaries >= 0 and sites >= 1")
    content, placing, secret = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    if kind == "random-tokens":
        if m and not vocabulary:
            raise ValueError("random-tokens canaries need a vocabulary (see vocabulary_words)")
        if label and label not in labels:
            raise ValueError(f"canary label {label!r} is not one of the labels {list(labels)}: use one or ''")
        words = np.asarray(vocabulary)
        texts = [" ".join(content.choice(words, size=length)) for _ in range(m)]
        names = [label or labels[int(content.integers(len(labels)))] for _ in range(m)]
    elif kind == "mislabeled":
        if source is None or len(source) < m:
            have = 0 if source is None else len(source)
            raise ValueError(f"mislabeled canaries: {m} wanted, {have} source rows; use fewer canaries")
        rows = source.iloc[content.choice(len(source), size=m, replace=False)]
        texts = [str(t) for t in rows["text"]]
        names = []
        for true in rows["label"]:
            others = [name for name in labels if name != true]
            names.append(others[int(content.integers(len(others)))])
    else:
        raise ValueError(f"unknown canary kind {kind!r}: use one of {CANARY_KINDS}")
    sites = placing.integers(0, num_sites, size=m)
    included = secret.random(m) < 0.5
    return Canaries(texts, names, sites, included, kind, seed)


# ---------------------------------------------------------------- scores


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


def per_example_gradients(model: nn.Module, dataset: TensorDataset, head_only: bool = False) -> torch.Tensor:
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
    model: nn.Module,
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


# ---------------------------------------------------------------- the lower bound


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[at least v of r guesses correct] if the mechanism were (ε, δ)-DP: Steinke et al.'s
    Theorem 3.1, f(v) + 2 m δ max_{1≤i≤v} (f(v − i) − f(v)) / i with f(u) = P[Bin(r, e^ε/(1+e^ε)) ≥ u].
    """
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got m={m}, r={r}, v={v}")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and delta in [0, 1], got {epsilon}, {delta}")
    q = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(stats.binom.sf(v - 1, r, q))
    alpha = 0.0
    if delta > 0 and v > 0:  # (f(v - i) - f(v)) = P[v - i <= Bin < v], for i = 1 .. v
        below = np.cumsum(stats.binom.pmf(np.arange(v - 1, -1, -1), r, q))
        alpha = float(np.max(below / np.arange(1, v + 1)))
    return min(1.0, tail + 2 * m * delta * alpha)


def epsilon_lower_bound(
    m: int, r: int, v: int, delta: float = 0.0, confidence: float = 0.95, tolerance: float = 1e-6
) -> float:
    """The largest ε whose p-value (``p_value``) for v of r correct guesses is ≤ 1 − confidence.

    With confidence ``1 - beta`` the mechanism is not (ε', δ)-DP for any ε' below it. 0 when
    even ε = 0 explains the guesses. Found by bisection as in the paper (p grows with ε).
    """
    beta = 1.0 - confidence
    if not 0 < beta < 1:
        raise ValueError(f"confidence {confidence} must be in (0, 1)")
    if p_value(m, r, v, 0.0, delta) > beta:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) <= beta:
        low, high = high, 2 * high
        if high > 1e4:  # numerically every epsilon is ruled out: report the largest one tried
            return low
    while high - low > tolerance:
        middle = (low + high) / 2
        if p_value(m, r, v, middle, delta) <= beta:
            low = middle
        else:
            high = middle
    return low


def guesses(scores: np.ndarray, k_plus: int, k_minus: int) -> np.ndarray:
    """+1 ("in") for the k+ highest scores, -1 ("out") for the k- lowest, 0 (abstain) otherwise.

    Ties are broken by position (a stable sort), which does not depend on the secret.
    """
    scores = np.asarray(scores, dtype=float)
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus > len(scores):
        raise ValueError(f"k+={k_plus}, k-={k_minus} for {len(scores)} scores: need k+ + k- <= m")
    order = np.argsort(scores, kind="stable")
    out = np.zeros(len(scores), dtype=int)
    out[order[len(scores) - k_plus :]] = 1
    out[order[:k_minus]] = -1
    return out


@dataclass
class AuditResult:
    """The lower bound and the guesses that gave it (one entry per pre-registered option)."""

    epsilon: float  # the lower bound at ``confidence`` (the best option, union-bounded)
    confidence: float
    delta: float
    m: int
    k_plus: int
    k_minus: int
    r: int
    v: int
    options: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        """Plain values (JSON)."""
        return asdict(self)


def audit_from_scores(
    scores: Sequence[float],
    included: Sequence[bool],
    delta: float,
    confidence: float = 0.95,
    fractions: Sequence[float] = GUESS_FRACTIONS,
) -> AuditResult:
    """The ε lower bound from canary scores (higher = "in") and the true inclusions.

    For each fraction f the attacker guesses on r = round(f m) canaries, half "in" (highest)
    and half "out" (lowest); each option is tested at β / len(fractions) so that reporting the
    best is still a lower bound at ``confidence`` (union bound). ``delta``: the run's δ (the
    largest of the sites').
    """
    scores, truth = np.asarray(scores, dtype=float), np.asarray(included, dtype=bool)
    if scores.shape != truth.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and included {truth.shape} must be 1-D of one length")
    if not np.all(np.isfinite(scores)):
        raise ValueError("canary scores hold NaN or inf: the run or the scoring failed")
    m = len(scores)
    each = 1.0 - (1.0 - confidence) / max(len(fractions), 1)
    best = AuditResult(0.0, confidence, delta, m, 0, 0, 0, 0)
    for fraction in fractions:
        r = min(m, max(0, round(fraction * m)))
        k_plus = r // 2 + r % 2
        guess = guesses(scores, k_plus, r - k_plus)
        v = int(np.sum((guess == 1) & truth) + np.sum((guess == -1) & ~truth))
        eps = epsilon_lower_bound(m, r, v, delta, each) if r else 0.0
        best.options.append(
            {"fraction": fraction, "k_plus": k_plus, "k_minus": r - k_plus, "r": r, "v": v, "epsilon": eps}
        )
        if eps > best.epsilon:
            best.epsilon, best.k_plus, best.k_minus, best.r, best.v = eps, k_plus, r - k_plus, r, v
    return best


# ---------------------------------------------------------------- membership inference


def membership_inference(
    member_scores: Sequence[float],
    nonmember_scores: Sequence[float],
    confidence: float = 0.95,
    bootstrap: int = 1000,
    seed: int = 0,
) -> dict:
    """An attack's success at telling members from non-members (higher score = member): ROC AUC
    with a bootstrap interval, TPR at 1% and 0.1% FPR. The loss-threshold attack passes minus
    the losses.

    The interval resamples members and non-members separately (``bootstrap`` times, percentile
    method). With fewer than 1 / FPR non-members a TPR at that FPR is the TPR at FPR 0 (the
    counts are returned next to it).
    """
    members, others = np.asarray(member_scores, float), np.asarray(nonmember_scores, float)
    if len(members) == 0 or len(others) == 0:
        raise ValueError(f"{len(members)} members and {len(others)} non-members: need both")
    truth = np.r_[np.ones(len(members)), np.zeros(len(others))]
    scores = np.r_[members, others]
    auc = float(roc_auc_score(truth, scores))
    rng = np.random.default_rng(seed)
    samples = [
        roc_auc_score(truth, np.r_[rng.choice(members, len(members)), rng.choice(others, len(others))])
        for _ in range(bootstrap)
    ]
    tail = (1 - confidence) / 2
    low, high = (float(x) for x in np.quantile(samples, [tail, 1 - tail])) if samples else (auc, auc)
    fpr, tpr, _ = roc_curve(truth, scores)
    return {
        "auc": auc,
        "auc_low": low,
        "auc_high": high,
        "tpr_at_1pct_fpr": float(tpr[fpr <= 0.01].max()),
        "tpr_at_0.1pct_fpr": float(tpr[fpr <= 0.001].max()),
        "members": len(members),
        "nonmembers": len(others),
    }
