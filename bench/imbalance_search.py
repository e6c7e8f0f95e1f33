"""Imbalance levers for the DP linear probe on the drug reviews, searched fast (numpy).

    python bench/imbalance_search.py --cache runs/drugs-features.pkl --csv docs/imbalance-search.csv

The drugs preset's federation (3 sites by condition, 8 rounds x 3 full-batch local steps, SGD,
clip 1, FedAvg weighted by n̂) replayed on the frozen encoder's cached pooled features: each
site's DP label histogram (σ 20 per bin, n̂ its rounded sum), DP-GD on the head (per-example
clipping, Gaussian noise at the noise multiplier ``plan_privacy`` calibrates for the histogram
and every planned step), the linear learning-rate decay, and the levers of ``fedllm.imbalance``
(``logit-adjust`` / ``balanced`` from the site's DP prior, or from a public prior: the label
frequencies of the server's validation split). Scores: the server's validation split (to choose)
and test split (to report), and every site's local test split, global and with the site's own
prior added to the logits. A search tool only (a numpy replica of the head's DP-GD, seconds per
setting): confirm a choice with ``python -m simulations.run`` (Opacus, Flower).
"""

from __future__ import annotations

import itertools
import json

import numpy as np
from feature_search import cached_features, search_parser, write_rows
from sklearn.metrics import accuracy_score, f1_score

BUDGETS = (1.0, 3.0, 8.0)


def extract(seeds: list[int], max_length: int = 128) -> dict:
    """Pooled features (texts truncated to ``max_length`` tokens) of every site's train / local
    test split, the held-out split's, the head's random init per seed, the label-names prototypes
    and the validation / test indices."""
    import torch

    from fedllm.config import Settings
    from fedllm.data import load_splits, partition_sites, tokenize, validation_split
    from fedllm.features import pooled_features
    from fedllm.head_init import label_prototypes
    from fedllm.model import build_model, load_tokenizer

    out: dict = {"seeds": {}}
    for seed in seeds:
        s = Settings(
            dataset="drug-reviews",
            seed=seed,
            trainable="head",
            validation_fraction=0.0,
            max_length=max_length,
        ).resolved()
        splits, tokenizer = load_splits(s), load_tokenizer(s.model)
        model = build_model(s, splits.labels, torch.device("cpu"))

        def features(frame, model=model, tokenizer=tokenizer, s=s, labels=splits.labels):
            x, y = pooled_features(model, tokenize(frame, tokenizer, labels, s.max_length)).tensors
            return x.numpy(), y.numpy()

        sites = partition_sites(s, splits.labels, 3, "natural", column="condition")
        head = model.get_base_model().classifier
        held = splits.test.reset_index(drop=True).assign(_i=lambda f: range(len(f)))
        validation, test = validation_split(held, 0.5, seed)
        out["seeds"][seed] = {
            "sites": [(features(x.train), features(x.test)) for x in sites],
            "W": head.weight.detach().numpy().copy(),
            "b": head.bias.detach().numpy().copy(),
            "split": (validation["_i"].to_numpy(), test["_i"].to_numpy()),
        }
        out["held_out"] = features(held)
        out["prototypes"] = label_prototypes(model, tokenizer, splits.labels, s).numpy()
    return out


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _prior(counts: np.ndarray, k: int) -> np.ndarray:
    c = np.maximum(np.asarray(counts[:k], dtype=float), 1.0)  # as fedllm.imbalance.label_prior
    return c / c.sum()


def _local_steps(x, y, head, prior, lever, noise, rng) -> tuple[np.ndarray, np.ndarray]:
    """One site's local training: ``lever["steps"]`` full-batch DP-GD steps from the global head."""
    (w, b), k = (head[0].copy(), head[1].copy()), len(prior)
    mode, tau, r = lever["imbalance"], lever["tau"], lever["round"]
    offset = tau * np.log(prior) if mode == "logit-adjust" else 0.0
    weight = prior**-tau / np.mean(prior**-tau) if mode == "balanced" else np.ones(k)
    for step in range(lever["steps"]):
        factor = 1 - (r * lever["steps"] + step) / (lever["steps"] * lever["rounds"])
        g = (_softmax(x @ w.T + b + offset) - np.eye(k)[y]) * weight[y][:, None]
        norm = np.sqrt((g**2).sum(1) * ((x**2).sum(1) + 1))  # the per-example gradient of (W, b)
        g = g * np.minimum(1.0, 1.0 / np.maximum(norm, 1e-12))[:, None]
        w = w - lever["lr"] * factor * (g.T @ x + rng.normal(0, noise, w.shape)) / lever["n_hat"]
        b = b - lever["lr"] * factor * (g.sum(0) + rng.normal(0, noise, k)) / lever["n_hat"]
    return w, b


def federate(data: dict, seed: int, lever: dict, noise: float, rng: np.random.Generator) -> dict:
    """One federation; macro-F1 / accuracy on validation, test and the sites' local tests."""
    run, k = data["seeds"][seed], len(data["prototypes"])
    sites = [(tr, te) for tr, te in run["sites"]]
    head = (
        (10.0 * data["prototypes"], np.zeros(k)) if lever["init"] == "label-names" else (run["W"], run["b"])
    )
    hist_noise = 20.0 if noise > 0 else 0.0
    hists = [
        np.append(np.bincount(tr[1], minlength=k), 0) + rng.normal(0, hist_noise, k + 1) for tr, _ in sites
    ]
    n_hats = [max(1, round(h.sum())) for h in hists]
    priors = [_prior(h, k) for h in hists]
    if lever["prior"] == "public":  # the server's validation labels (+1 each): public to the sites
        counts = np.bincount(data["held_out"][1][run["split"][0]], minlength=k) + 1.0
        priors = [counts / counts.sum()] * len(sites)
    for r in range(lever["rounds"]):
        updates = [
            _local_steps(tr[0], tr[1], head, p, {**lever, "round": r, "n_hat": n}, noise, rng)
            for (tr, _), p, n in zip(sites, priors, n_hats, strict=True)
        ]
        total = sum(n_hats)
        head = tuple(sum(u[i] * n / total for u, n in zip(updates, n_hats, strict=True)) for i in (0, 1))
    x, y = data["held_out"]
    predicted = (x @ head[0].T + head[1]).argmax(1)
    scores = {}
    for part, index in zip(("validation", "test"), run["split"], strict=True):
        scores[f"{part}_accuracy"] = accuracy_score(y[index], predicted[index])
        scores[f"{part}_macro_f1"] = f1_score(y[index], predicted[index], average="macro")
    local = [(te, _prior(h, k)) for (_, te), h in zip(sites, hists, strict=True)]
    for name, tau in (("site_global", 0.0), ("site_personal", lever["tau"])):
        f1 = [
            f1_score(te[1], (te[0] @ head[0].T + head[1] + tau * np.log(p)).argmax(1), average="macro")
            for te, p in local
        ]
        scores[f"{name}_macro_f1"] = float(np.mean(f1))
    return scores


def noise_for(epsilon: float, rounds: int, steps: int) -> float:
    """The steps' noise multiplier of a site of ~160 rows: ``plan_privacy`` with the histogram."""
    from fedllm.accounting import plan_privacy
    from fedllm.config import Settings

    if not np.isfinite(epsilon):
        return 0.0
    s = Settings(dataset="drug-reviews", target_epsilon=epsilon, max_steps=steps, epochs=1).resolved()
    return plan_privacy(s, 160, rounds, 384 * 3 + 3, count_noise=20.0).noise_multiplier


def main() -> None:
    parser = search_parser(__doc__, '{"imbalance": ["none", "logit-adjust", "balanced"]}')
    parser.add_argument("--max-length", type=int, default=128, help="tokens per review when making the cache")
    args = parser.parse_args()
    seeds = args.seeds
    data = cached_features(args.cache, lambda: extract(seeds, args.max_length))
    base = {
        "imbalance": "none",
        "tau": 1.0,
        "prior": "site",
        "init": "random",
        "lr": 10.0,
        "rounds": 8,
        "steps": 3,
    }
    grid = json.loads(args.grid)
    rows = []
    for epsilon in args.epsilons:
        for values in itertools.product(*grid.values()):
            lever = {**base, **dict(zip(grid, values, strict=True))}
            noise = noise_for(epsilon, lever["rounds"], lever["steps"])
            runs = [
                federate(data, seed, lever, noise, np.random.default_rng([seed, draw]))
                for seed in seeds
                for draw in range(args.draws)
            ]
            row = {"epsilon": epsilon, **lever, "noise_multiplier": round(noise, 4), "runs": len(runs)}
            row.update({key: round(float(np.mean([r[key] for r in runs])), 4) for key in runs[0]})
            rows.append(row)
            print(json.dumps(row), flush=True)
    write_rows(args.csv, rows)


if __name__ == "__main__":
    main()
