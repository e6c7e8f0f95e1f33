"""The ceiling of a linear head on the frozen encoder: logistic regression, no noise, all data pooled.

    python bench/linear_probe.py --dataset drug-reviews --max-length 256 --seeds 0,1,2 \\
        --pool-layers 1,3 --csv docs/linear-probe-ceiling.csv

Embeds every training text (all sites' data pooled, as one centralized site would hold it) and
the server's held-out split with the embedded MiniLM (``fedllm.features.pooled_features``, the
DP head's own mean-pooled features of the top ``--pool-layers`` layers, no training),
fits a multinomial logistic regression for each regularisation ``C`` and class weighting
(``None`` or ``balanced``), chooses per seed the pair with the best **validation** macro-F1 and
reports it on the **test** split, next to the majority class. No DP and no federation: what the
DP head could reach at best on these features, the bar a private head cannot pass.
"""

from __future__ import annotations

import argparse
import csv
import itertools
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score

from fedllm.config import Settings
from fedllm.data import load_splits, tokenize
from fedllm.features import pooled_features
from fedllm.model import build_model, load_tokenizer

GRID = {"class_weight": [None, "balanced"], "C": [0.01, 0.1, 1.0, 10.0]}


def seed_rows(dataset: str, max_length: int, seed: int, tokenizer, pool_layers: int = 1) -> list[dict]:
    """Every grid point of one seed, scored on validation and test; the chosen one marked."""
    settings = Settings(
        dataset=dataset, max_length=max_length, seed=seed, trainable="head", pool_layers=pool_layers
    ).resolved()
    splits = load_splits(settings)
    model = build_model(settings, splits.labels, torch.device("cpu"))  # the library's mean pool
    parts = {name: tokenize(getattr(splits, name), tokenizer, splits.labels, max_length)
             for name in ("train", "validation", "test")}  # fmt: skip
    x = {name: pooled_features(model, data).tensors[0].numpy() for name, data in parts.items()}
    y = {name: data.tensors[2].numpy() for name, data in parts.items()}
    rows = []
    for weight, c in itertools.product(GRID["class_weight"], GRID["C"]):
        probe = LogisticRegression(C=c, class_weight=weight, max_iter=3000).fit(x["train"], y["train"])
        scores = {
            f"{part}_{metric}": round(float(fn(y[part], probe.predict(x[part]))), 4)
            for part in ("validation", "test")
            for metric, fn in (("accuracy", accuracy_score), ("macro_f1", _macro_f1))
        }
        rows.append({"dataset": dataset, "max_length": max_length, "pool_layers": pool_layers, "seed": seed,
                     "class_weight": weight or "none", "C": c, **scores, "chosen": False})  # fmt: skip
    best = max(rows, key=lambda r: r["validation_macro_f1"])
    best["chosen"] = True
    majority = np.full_like(y["test"], np.bincount(y["train"]).argmax())
    print(
        f"seed {seed}: {len(y['train'])} train texts; chosen class_weight {best['class_weight']} "
        f"C {best['C']}: validation macro-F1 {best['validation_macro_f1']:.3f}, test accuracy "
        f"{best['test_accuracy']:.3f} macro-F1 {best['test_macro_f1']:.3f} (majority class: "
        f"{_macro_f1(y['test'], majority):.3f})",
        flush=True,
    )
    return rows


def _macro_f1(truth: np.ndarray, predicted: np.ndarray) -> float:
    return float(f1_score(truth, predicted, average="macro"))


def main() -> None:
    """Each seed's chosen probe, the mean over seeds, and every row in ``--csv``."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default="bbc-news")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--pool-layers", default="1", help="the features' pool-layers, one or more: 1,3")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--csv", type=Path, default=None, help="write every grid point here")
    args = parser.parse_args()
    tokenizer = load_tokenizer("")
    rows = []
    for layers in (int(k) for k in args.pool_layers.split(",")):
        found = [
            row
            for seed in (int(s) for s in args.seeds.split(","))
            for row in seed_rows(args.dataset, args.max_length, seed, tokenizer, layers)
        ]
        chosen = [r for r in found if r["chosen"]]
        print(
            f"{args.dataset}, max length {args.max_length}, pool-layers {layers}, mean of "
            f"{len(chosen)} seeds: test accuracy {np.mean([r['test_accuracy'] for r in chosen]):.3f}, "
            f"macro-F1 {np.mean([r['test_macro_f1'] for r in chosen]):.3f}"
        )
        rows += found
    if args.csv:
        with args.csv.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
