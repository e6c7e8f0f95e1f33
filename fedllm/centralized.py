"""Centralized (single-site) fine-tune: the baseline every federated number is compared with.

python -m fedllm.centralized --dataset bbc-news --target-epsilon inf --out runs/central-bbc
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from fedllm.accounting import counted_plan
from fedllm.adapters import save_adapter
from fedllm.config import Settings, add_settings_arguments, settings_from
from fedllm.data import load_splits, loss_weights, tokenize
from fedllm.head_init import centre_on_validation
from fedllm.model import build_model, count_parameters, load_tokenizer, pick_device
from fedllm.train import evaluate, train_local


def run_centralized(configured: Settings, out_dir: str | Path, progress: bool = True) -> dict:
    """Fine-tune on the whole training split, score the validation and test splits, save adapter + JSON.

    The entry of one centralized run: 'auto' is resolved once here; the JSON records the settings
    as ``configured``.
    """
    settings = configured.resolved()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)
    start = time.perf_counter()
    splits = load_splits(settings)
    for report in splits.reports:
        print(f"data: {report}")
    tokenizer = load_tokenizer(settings.model)
    train_ds = tokenize(splits.train, tokenizer, splits.labels, settings.max_length, settings.truncation)
    test_ds = tokenize(splits.test, tokenizer, splits.labels, settings.max_length, settings.truncation)
    device = pick_device(settings.device)
    model = build_model(settings, splits.labels, device)
    validation_ds = tokenize(
        splits.validation, tokenizer, splits.labels, settings.max_length, settings.truncation
    )
    centre_on_validation(model, validation_ds, settings, splits.labels)  # as the server does
    trainable, total = count_parameters(model)
    print(f"model: {trainable:,} trainable of {total:,} parameters on {device}")
    plan, history = (
        counted_plan(settings, len(train_ds), dimension=trainable) if settings.private else (None, [])
    )
    if plan:
        print(
            f"privacy: noise multiplier {plan.noise_multiplier:.3f}, q={plan.sample_rate:.4f}, "
            f"{plan.planned_steps} steps, delta={plan.delta:g}, DP count n̂={plan.public_n}"
        )
    weight = loss_weights(settings, splits.train, splits.labels)
    result = train_local(
        model, train_ds, settings, plan=plan, history=history, class_weight=weight, progress=progress
    )
    head_only = settings.trainable == "head"
    metrics = evaluate(model, test_ds, splits.labels, head_only=head_only)
    validation = evaluate(model, validation_ds, splits.labels, head_only=head_only)
    save_adapter(model, out_dir / "adapter", splits.labels, {"settings": configured.to_dict()})
    summary = {
        "settings": configured.to_dict(),
        "train_examples": len(train_ds),
        "test_examples": len(test_ds),
        "steps": result.steps,
        "train_loss": result.mean_loss,
        "epsilon": result.epsilon if plan else None,  # None: no DP
        "delta": plan.delta if plan else 0.0,
        "noise_multiplier": result.noise_multiplier,
        "test": metrics,
        "validation": validation,  # the held-out part settings are chosen on (validation-fraction)
        "wall_seconds": time.perf_counter() - start,
    }
    (out_dir / "result.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def main(argv: list[str] | None = None) -> None:
    """Command-line entry: every setting is a flag (see ``--help``)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="runs/centralized", help="output folder")
    add_settings_arguments(parser)
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    try:
        settings = settings_from(args, source="command line")
    except ValueError as err:  # one line naming the key and the fix
        parser.error(str(err))
    summary = run_centralized(settings, out)
    test = summary["test"]
    eps = summary["epsilon"] if summary["epsilon"] is not None else math.inf
    print(
        f"test: accuracy {test['accuracy']:.4f}  macro-F1 {test['macro_f1']:.4f}  "
        f"loss {test['loss']:.4f}  "
        f"({summary['test_examples']} texts)"
    )
    print(
        f"privacy: epsilon {eps:.3f} at delta {summary['delta']:g}"
        if math.isfinite(eps)
        else "privacy: none (non-private run)"
    )
    print(f"results: {Path(out) / 'result.json'}  adapter: {Path(out) / 'adapter'}")


if __name__ == "__main__":
    main()
