"""The zero-shot head with no training: accuracy of each label-name template, to choose one.

    python bench/zero_shot.py --dataset bbc-news --seeds 0,1,2 \\
        --templates '{}' '{} news' 'This is a news article about {}.'

For each template, the head ``head-init = label-names`` builds (``fedllm/head_init.py``: the
label names in the template, embedded by the frozen encoder) scores the server's validation
split (``--score-on validation``, the default: choose the template there) of each seed, with
raw or unit-normalised features (the same argmax: each row of the head is a unit vector). No
site data and no privacy budget are used. Prints one line per template, mean over the seeds.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import torch

from fedllm.config import Settings
from fedllm.data import load_splits, tokenize
from fedllm.model import build_model, load_tokenizer
from fedllm.train import evaluate


def zero_shot(dataset: str, template: str, seed: int, part: str) -> dict:
    """Scores of the zero-shot head of ``template`` on one seed's ``part`` of the held-out data."""
    settings = Settings(
        dataset=dataset, seed=seed, trainable="head", head_init="label-names", head_init_template=template
    ).resolved()
    splits = load_splits(settings)
    model = build_model(settings, splits.labels, torch.device("cpu"))
    frame = splits.validation if part == "validation" else splits.test
    data = tokenize(frame, load_tokenizer(settings.model), splits.labels, settings.max_length)
    return evaluate(model, data, splits.labels, head_only=True)


def main() -> None:
    """Each template's mean accuracy / macro-F1 over the seeds; CSV rows with ``--csv``."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default="bbc-news")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--templates", nargs="+", default=["{}"])
    parser.add_argument("--score-on", choices=("validation", "test"), default="validation")
    parser.add_argument("--csv", default="", help="write one row per template to this CSV")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for template in args.templates:
        runs = [zero_shot(args.dataset, template, seed, args.score_on) for seed in seeds]
        acc, f1 = np.mean([r["accuracy"] for r in runs]), np.mean([r["macro_f1"] for r in runs])
        print(f"{template!r}: accuracy {acc:.3f}  macro-F1 {f1:.3f}  ({args.score_on}, seeds {args.seeds})")
        rows.append(
            {"template": template, "score_on": args.score_on, "seeds": args.seeds, "accuracy": round(acc, 4),
             "macro_f1": round(f1, 4)}
        )  # fmt: skip
    if args.csv:
        with Path(args.csv).open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
