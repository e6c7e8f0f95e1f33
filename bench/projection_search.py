"""A public projection of the head's features under DP, searched fast (numpy), on BBC News.

    python bench/projection_search.py --cache runs/bbc-features.pkl --csv docs/projection-search.csv

The default BBC federation (5 sites, Dirichlet 1.0, 8 rounds of up to 3 full-batch DP-GD steps,
SGD, clip 1, the DP count n̂, ``plan_privacy`` with the step cap on the noisy dimension, linear
lr decay, FedAvg by n̂, the zero-shot head at ``head-init-scale``) replayed on the frozen
encoder's cached pooled features, with the head's input first mapped by a fixed public basis P
(r × 384, orthonormal rows; ``basis``): the span of the label prototypes, then seeded random
directions (``random``) or the principal directions of the encoder's features of its own
vocabulary's words (``vocab``: public, the model and its tokenizer only); ``none`` is today's
head. The head then has 5·r + 5 noisy coordinates instead of 1,925. The same grid varies the
recipe's other levers (``lr``, ``steps`` per round, ``step_noise`` = ``max-step-noise``,
``scale`` = ``head-init-scale``, 0 = auto 10/√ε, ``rounds``). Scores: the server's validation
split (to choose) and test split (to report), mean of ``--seeds`` × ``--draws`` noise draws.
A search tool only: confirm with ``python -m simulations.run`` (Opacus, Flower).
"""

from __future__ import annotations

import functools
import itertools
import json
import pickle

import numpy as np
from feature_search import cached_features, search_parser, write_rows
from sklearn.metrics import accuracy_score, f1_score

TEMPLATE = "This is a news article about {}."


def extract(seeds: list[int], max_length: int = 128) -> dict:
    """Every BBC text's pooled features (encoded once, the first ``max_length`` tokens), and per
    seed the sites' training rows, the validation / test rows, the random head; the label prototypes."""
    import pandas as pd
    import torch

    from fedllm.config import Settings
    from fedllm.data import load_splits, partition_sites, tokenize
    from fedllm.features import pooled_features
    from fedllm.head_init import label_prototypes
    from fedllm.model import build_model, load_tokenizer

    out: dict = {"seeds": {}}
    s0 = Settings(
        dataset="bbc-news", seed=0, trainable="head", head_init_template=TEMPLATE, max_length=max_length
    ).resolved()
    splits, tokenizer = load_splits(s0), load_tokenizer(s0.model)
    model = build_model(s0, splits.labels, torch.device("cpu"))
    every = pd.concat([splits.train, splits.validation, splits.test], ignore_index=True)
    every = every.drop_duplicates("text").reset_index(drop=True)
    x = pooled_features(model, tokenize(every, tokenizer, splits.labels, s0.max_length)).tensors[0].numpy()
    row = {t: i for i, t in enumerate(every["text"])}
    label = {name: i for i, name in enumerate(splits.labels)}
    out.update(x=x, y=every["label"].map(label).to_numpy(), labels=splits.labels)
    out["prototypes"] = label_prototypes(model, tokenizer, splits.labels, s0).numpy()
    for seed in seeds:
        s = Settings(dataset="bbc-news", seed=seed, trainable="head").resolved()
        sp = load_splits(s, splits.labels)
        sites = partition_sites(s, splits.labels, 5, "dirichlet", alpha=1.0)
        head = build_model(s, splits.labels, torch.device("cpu")).get_base_model().classifier
        out["seeds"][seed] = {
            "sites": [np.array([row[t] for t in site.train["text"]]) for site in sites],
            "validation": np.array([row[t] for t in sp.validation["text"]]),
            "test": np.array([row[t] for t in sp.test["text"]]),
            "W": head.weight.detach().numpy().copy(),
            "b": head.bias.detach().numpy().copy(),
        }
    return out


def vocabulary_features(batch_size: int = 512) -> np.ndarray:
    """The pooled features of every whole-word token of the encoder's vocabulary, each alone:
    public (the model and its tokenizer), a sample of the encoder's output space."""
    import pandas as pd
    import torch

    from fedllm.config import Settings
    from fedllm.data import tokenize
    from fedllm.features import pooled_features
    from fedllm.model import build_model, load_tokenizer

    s = Settings(dataset="bbc-news", trainable="head").resolved()
    tokenizer = load_tokenizer(s.model)
    words = [w for w in tokenizer.get_vocab() if w.isalpha() and len(w) > 2]
    model = build_model(s, ["a", "b"], torch.device("cpu"))
    frame = pd.DataFrame({"text": words, "label": "a"})
    data = tokenize(frame, tokenizer, ["a", "b"], 8)
    return pooled_features(model, data, batch_size).tensors[0].numpy()


def basis(data: dict, rank: int, kind: str, seed: int = 0) -> np.ndarray | None:
    """(rank, hidden) orthonormal rows: the prototypes' span first, then ``kind`` directions:
    ``random`` (seeded Gaussian) or ``vocab`` (principal directions of the vocabulary's features)."""
    if kind == "none":
        return None
    prototypes = data["prototypes"]
    hidden, more = prototypes.shape[1], max(rank - len(prototypes), 0)
    if kind == "vocab":
        v = data["vocab"] - data["vocab"].mean(0)
        extra = np.linalg.svd(v, full_matrices=False)[2][:more]
    elif kind == "vocab-only":
        v = data["vocab"] - data["vocab"].mean(0)
        q = np.linalg.svd(v, full_matrices=False)[2][:rank]
        return q
    else:
        extra = np.random.default_rng(seed).normal(size=(more, hidden))
    q, _ = np.linalg.qr(np.concatenate([prototypes, extra]).T)
    return q[:, :rank].T


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


@functools.cache
def plan(
    epsilon: float, n: int, rounds: int, steps: int, dimension: int, step_noise: float
) -> tuple[float, int]:
    """(noise multiplier, local steps) as a site plans them from its DP count n̂."""
    from fedllm.accounting import plan_privacy
    from fedllm.config import Settings

    if not np.isfinite(epsilon):
        return 0.0, steps
    s = Settings(dataset="bbc-news", target_epsilon=epsilon, max_steps=steps, max_step_noise=step_noise)
    s = s.resolved()  # once, here: plan_privacy takes resolved settings
    p = plan_privacy(s, n, rounds, dimension, count_noise=20.0)
    return p.noise_multiplier, p.local_steps


def federate(data: dict, seed: int, lever: dict, epsilon: float, draw: int) -> dict:
    """One federation of the zero-shot head on projected features; validation / test scores."""
    run, k = data["seeds"][seed], len(data["labels"])
    rng = np.random.default_rng([seed, draw])
    P = basis(data, lever["rank"], lever["basis"], lever["basis_seed"])
    feats = data["x"] if P is None else data["x"] @ P.T
    if lever["center"] and P is not None:
        feats = feats - (data["prototypes"].mean(0) @ P.T)
    r = feats.shape[1]
    protos = data["prototypes"] if P is None else data["prototypes"] @ P.T
    scale = lever["scale"] if lever["scale"] > 0 else (10 / np.sqrt(epsilon) if np.isfinite(epsilon) else 1.0)
    w, b = scale * protos, np.zeros(k)
    if lever["init"] == "random":
        w = run["W"] if P is None else run["W"] @ P.T
    dim = k * r + k
    sites = []
    for i, idx in enumerate(run["sites"]):
        count_noise = np.random.default_rng([seed, draw, 99, i]).normal(0, 20.0)  # the same for every lever
        n_hat = max(1, round(len(idx) + (count_noise if np.isfinite(epsilon) else 0)))
        sigma, steps = plan(epsilon, n_hat, lever["rounds"], lever["steps"], dim, lever["step_noise"])
        sites.append((feats[idx], data["y"][idx], n_hat, sigma, steps))
    for rnd in range(lever["rounds"]):
        updates = []
        for x, y, n_hat, sigma, steps in sites:
            wl, bl = w.copy(), b.copy()
            for step in range(steps):
                factor = 1 - (rnd * steps + step) / (steps * lever["rounds"])
                g = _softmax(x @ wl.T + bl) - np.eye(k)[y]
                norm = np.sqrt((g**2).sum(1) * ((x**2).sum(1) + 1))
                g = g * np.minimum(1.0, lever["clip"] / np.maximum(norm, 1e-12))[:, None]
                noise = sigma * lever["clip"]
                wl = wl - lever["lr"] * factor * (g.T @ x + rng.normal(0, noise, wl.shape)) / n_hat
                bl = bl - lever["lr"] * factor * (g.sum(0) + rng.normal(0, noise, k)) / n_hat
            updates.append((wl, bl, n_hat))
        total = sum(u[2] for u in updates)
        w = sum(u[0] * u[2] / total for u in updates)
        b = sum(u[1] * u[2] / total for u in updates)
    out = {}
    for part in ("validation", "test"):
        idx = run[part]
        predicted = (feats[idx] @ w.T + b).argmax(1)
        out[f"{part}_accuracy"] = accuracy_score(data["y"][idx], predicted)
        out[f"{part}_macro_f1"] = f1_score(data["y"][idx], predicted, average="macro")
    return out


BASE = {
    "basis": "none", "rank": 384, "basis_seed": 0, "center": False, "init": "label-names",
    "scale": 0.0, "lr": 10.0, "clip": 1.0, "rounds": 8, "steps": 3, "step_noise": 2.0,
}  # fmt: skip


def main() -> None:
    """Every combination of ``--grid`` at every ε: one JSON line each, and the CSV."""
    parser = search_parser(__doc__, '{"basis": ["none", "random"], "rank": [16, 64]}')
    parser.add_argument("--max-length", type=int, default=128, help="tokens encoded per text (the cache's)")
    args = parser.parse_args()
    seeds = args.seeds
    data = cached_features(args.cache, lambda: extract(seeds, args.max_length))
    if "vocab" not in data:
        data["vocab"] = vocabulary_features()
        args.cache.write_bytes(pickle.dumps(data))
    grid, rows = json.loads(args.grid), []
    for epsilon in args.epsilons:
        for values in itertools.product(*grid.values()):
            lever = {**BASE, **dict(zip(grid, values, strict=True))}
            runs = [
                federate(data, seed, lever, epsilon, draw) for seed in seeds for draw in range(args.draws)
            ]
            row = {"epsilon": epsilon, "max_length": args.max_length, **lever, "runs": len(runs)}
            row.update({key: round(float(np.mean([r[key] for r in runs])), 4) for key in runs[0]})
            rows.append(row)
            print(json.dumps(row), flush=True)
    write_rows(args.csv, rows, append=True)


if __name__ == "__main__":
    main()
