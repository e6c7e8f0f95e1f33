"""Measure the leak, not just the bound: an empirical privacy audit of the federation per budget.

    python -m simulations.audit                                   # ε 1,3,8,inf on BBC News, 5 sites
    python -m simulations.audit --epsilons 8,inf --rounds 2 --canaries 50 --out runs/audit-smoke

For each ε (and seed) one in-process federation (``simulations.inprocess``: the library's own
sites, training loop, DP plans and FedAvg) trains once with m canaries, each inserted at a random
site with probability ½ (``fedllm.canaries``), and gradient canaries inserted in the clipped
gradient sums (``fedllm.gradient_canaries``). Then: lower bounds on ε at the stated confidence
(Steinke, Nasr, Jagielski 2023) from the gradient canaries (pre-registered, the design with
power) and from the text canaries' white-box and black-box scores, and membership inference on
the real records (members: the sites' training rows; non-members: their local test rows): the loss-threshold
attack on the final model and the white-box update-alignment attack. ε = ∞ trains the same
trainable, optimizer, lr and q with DP-SGD's sampling and clipping but no noise, so the ε axis
changes only the noise. Each finished point is saved under ``<out>/points/`` (scores included)
and skipped on a rerun of the same configuration; writes ``audit.csv``, ``audit.md`` and
``audit.png``. A finite-ε point whose lower bound exceeds the accountant's ε is an accounting or
implementation bug: it is printed loudly and the command exits with status 1. See docs/audit.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch.utils.data import TensorDataset
from transformers import AutoConfig

from fedllm.audit import audit_from_scores, membership_inference
from fedllm.audit_scores import (
    CANARY_WEIGHT,
    UpdateLog,
    alignment_scores,
    per_example_losses,
    second_moment,
    whitener,
)
from fedllm.canaries import CANARY_KINDS, draw_canaries, vocabulary_words
from fedllm.config import Settings, settings_from
from fedllm.data import load_splits
from fedllm.features import pooled_features
from fedllm.gradient_canaries import CanaryInserter, draw_gradient_canaries, gradient_canary_scores
from fedllm.model import load_tokenizer, resolve_model_path
from simulations.audit_report import cell, report, violations
from simulations.inprocess import federate
from simulations.run import PRESETS
from simulations.sweep import eps_label
from simulations.sweep_config import keep_or_refuse

_PRESET = PRESETS["default"]
DEFAULTS: dict = {
    **{k: _PRESET[k] for k in ("dataset", "sites", "rounds", "epochs", "max-steps")},
    "max-length": _PRESET.get("max-length", 0),  # 0 = auto, as in the preset
    "partitioning": _PRESET["partitioning"],
    "dirichlet-alpha": _PRESET["dirichlet-alpha"],
    "partition-column": "",
    "epsilons": "1,3,8,inf",
    "seeds": "0",
    "canaries": 500,
    "canary-kind": "random-tokens",
    "canary-label": "",
    "canary-length": 32,
    "confidence": 0.95,
    "gradient-canaries": -1,
}
EXTENDABLE = {"epsilons", "seeds", "out"}  # a resumed audit may add points, not change them
SET_BY_AUDIT = {"target-epsilon", "noise-multiplier", "seed"}


def parse_args(argv: list[str] | None = None) -> dict:
    """The command line as one flat config dict (hyphenated keys; ``set`` holds the overrides)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for key, value in DEFAULTS.items():
        kind = type(value) if not isinstance(value, str) else str
        parser.add_argument(f"--{key}", type=kind, default=value)
    parser.add_argument("--out", default="runs/audit", help="output folder")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a fine-tune setting (repeatable)"
    )
    args = vars(parser.parse_args(argv))
    overrides = dict(item.partition("=")[::2] for item in args.pop("set"))
    config = {k.replace("_", "-"): v for k, v in args.items()}
    config["set"] = {k.strip(): v.strip() for k, v in overrides.items()}
    return config


def check_config(config: dict, saved: Path) -> None:
    """Refuse bad keys and values, and resuming an audit with other settings; then save ``config``."""
    known = {f.replace("_", "-") for f in Settings.__dataclass_fields__}
    bad = sorted(set(config["set"]) - known)
    if bad:
        raise SystemExit(f"--set: unknown settings {bad}; see python -m simulations.run --help")
    fixed = sorted(set(config["set"]) & SET_BY_AUDIT)
    if fixed:
        raise SystemExit(f"--set {fixed}: the audit sets these itself; use --epsilons / --seeds")
    if config["canary-kind"] not in CANARY_KINDS:
        raise SystemExit(f"--canary-kind {config['canary-kind']!r}: use one of {CANARY_KINDS}")
    if config["canaries"] < 2 or not 0 < config["confidence"] < 1:
        raise SystemExit("--canaries must be >= 2 and --confidence in (0, 1)")
    if config["gradient-canaries"] < -1 or config["gradient-canaries"] == 1:
        raise SystemExit("--gradient-canaries: -1 (one per site and feature), 0 (none) or >= 2")
    keep_or_refuse(config, saved, EXTENDABLE, "an audit")


def point_settings(config: dict, epsilon: float, seed: int) -> Settings:
    """The fine-tune settings of one point: 'auto' resolved as under DP for every ε (ε = ∞ too)."""
    keys = ("dataset", "epochs", "max-steps", "max-length")
    base = settings_from({**{k: config[k] for k in keys}, **config["set"], "seed": seed})
    finite = epsilon if math.isfinite(epsilon) else 1.0
    return base.replace(target_epsilon=finite).resolved().replace(target_epsilon=epsilon)


def _stack(datasets: list[TensorDataset]) -> TensorDataset:
    return TensorDataset(*(torch.cat(parts) for parts in zip(*(d.tensors for d in datasets), strict=True)))


def gradient_canaries_for(config: dict, settings: Settings, seed: int):
    """The point's gradient canaries (``--gradient-canaries``; -1: every clean direction, one
    per site and feature of the head) and their inserter; (None, None) when there are none."""
    width = AutoConfig.from_pretrained(resolve_model_path(settings.model)).hidden_size * settings.pool_layers
    sites, wanted = int(config["sites"]), int(config["gradient-canaries"])
    m = sites * width if wanted < 0 else wanted
    if m == 0:
        return None, None
    if settings.trainable != "head":
        raise SystemExit("--gradient-canaries: the head only (trainable=head); use 0 with another trainable")
    canaries = draw_gradient_canaries(m, sites, width, seed)
    return canaries, CanaryInserter(canaries, settings.max_grad_norm)


def gradient_row(canaries, log: UpdateLog, delta: float, confidence: float) -> tuple[dict, dict]:
    """The gradient canaries' bound and AUC (row entries) and their audit (saved with the point)."""
    if canaries is None:
        return {"gradient_canaries": 0, "epsilon_lb_gradient": math.nan}, {}
    scores = gradient_canary_scores(log, canaries)
    audit = audit_from_scores(scores, canaries.included, delta, confidence)
    row = {
        "gradient_canaries": len(canaries),
        "gradient_inserted": int(canaries.included.sum()),
        "epsilon_lb_gradient": audit.epsilon,
        "gradient_guesses": audit.r,
        "gradient_correct": audit.v,
        "canary_auc_gradient": float(roc_auc_score(canaries.included, scores)),
    }
    return row, {**audit.to_dict(), "scores": scores.tolist(), "included": canaries.included.tolist()}


def audit_point(config: dict, epsilon: float, seed: int) -> dict:
    """Train one audited federation and score it: the point's row and everything it came from."""
    start = time.perf_counter()
    fed, canaries, log, gradient = _train_audited(config, epsilon, seed)
    name = f"eps {eps_label(epsilon)} seed {seed}"
    black, white, mia_loss, mia_white = _scores(fed, canaries, log, name, int(config["sites"]))
    delta, confidence = max(fed.deltas), float(config["confidence"])
    primary = audit_from_scores(white, canaries.included, delta, confidence)
    secondary = audit_from_scores(black, canaries.included, delta, confidence)
    gradient_entries, gradient_audit = gradient_row(gradient, log, delta, confidence)
    counts = ("members", "nonmembers")
    row = {
        "target_epsilon": epsilon,
        "seed": seed,
        "accounted_epsilon": max(fed.epsilons),
        "delta": delta,
        "accuracy": fed.scores["accuracy"],
        **gradient_entries,
        "canaries": len(canaries),
        "inserted": int(canaries.included.sum()),
        "epsilon_lb": primary.epsilon,
        "guesses": primary.r,
        "correct": primary.v,
        "epsilon_lb_blackbox": secondary.epsilon,
        "canary_auc_whitebox": float(roc_auc_score(canaries.included, white)),
        "canary_auc_blackbox": float(roc_auc_score(canaries.included, black)),
        **{f"mia_{k}": v for k, v in mia_loss.items() if k not in counts},
        **{f"mia_whitebox_{k}": v for k, v in mia_white.items() if k not in counts},
        "trainable": fed.settings.trainable,
        "wall_seconds": time.perf_counter() - start,
    }
    return {
        "row": row,
        "whitebox": primary.to_dict(),
        "blackbox": secondary.to_dict(),
        "gradient": gradient_audit,
        "mia": mia_loss,
        "mia_whitebox": mia_white,
        "canaries": {**canaries.frame().to_dict(orient="list"), "seed": seed, "kind": config["canary-kind"]},
        "scores": {"whitebox": white.tolist(), "blackbox": black.tolist()},
    }


def _train_audited(config: dict, epsilon: float, seed: int):
    """The point's federation, trained with its text and gradient canaries, and the sites'
    updates as the server saw them: (federation, text canaries, update log, gradient canaries)."""
    name = f"eps {eps_label(epsilon)} seed {seed}"
    settings = point_settings(config, epsilon, seed)
    splits = load_splits(settings)
    tokenizer = load_tokenizer(settings.model)
    sites, kind = int(config["sites"]), config["canary-kind"]
    canaries = draw_canaries(
        int(config["canaries"]),
        sites,
        seed,
        kind=kind,
        labels=splits.labels,
        vocabulary=vocabulary_words(tokenizer) if kind == "random-tokens" else (),
        source=splits.test,
        label=config["canary-label"],
        length=int(config["canary-length"]),
    )
    log = UpdateLog()
    gradient, inserter = gradient_canaries_for(config, settings, seed)
    scheme = {
        "scheme": config["partitioning"],
        "alpha": config["dirichlet-alpha"],
        "column": config["partition-column"],
    }
    fed = federate(
        settings,
        sites,
        int(config["rounds"]),
        scheme,
        extra_rows=[canaries.rows(i) for i in range(sites)],
        on_update=lambda u: log.observe(u.round, u.site, u.start, u.state),
        noise_free=not math.isfinite(epsilon),
        exclude_from_test=canaries.texts if kind == "mislabeled" else (),
        progress=lambda line: print(f"  [{name}] {line}", flush=True),
        before_noise=inserter,
    )
    return fed, canaries, log, gradient


def _scores(
    fed, canaries, log: UpdateLog, name: str, sites: int
) -> tuple[np.ndarray, np.ndarray, dict, dict]:
    """The canaries' black-box (final model's loss) and white-box (update alignment) scores, and
    membership inference on the real records by loss and (the head) by update alignment."""
    head = fed.settings.trainable == "head"
    canary_data = fed.tokenized(canaries.frame())
    members = [fed.tokenized(s.train) for s in fed.sites]
    others = [fed.tokenized(s.test) for s in fed.sites]
    black = -per_example_losses(fed.model, canary_data, head)  # the final model, before the replay
    loss = [
        np.concatenate([-per_example_losses(fed.model, d, head) for d in group])
        for group in (members, others)
    ]
    mia_loss = membership_inference(*loss)
    metric, site_metric = None, None
    if head:  # the auditor's public data: the real records, the server's test split, the canaries
        features = [pooled_features(fed.model, d).tensors[0] for d in [*members, fed.test, canary_data]]
        pool = [(f, 1.0) for f in features[:-1]] + [(features[-1], CANARY_WEIGHT)]
        metric = whitener(second_moment(pool))
        # a site's own records (members) never in the metric that scores them
        site_metric = {s: whitener(second_moment(pool[:s] + pool[s + 1 :])) for s in range(sites)}
    print(f"  [{name}] white-box scores ...", flush=True)
    white = alignment_scores(log, fed.model, canary_data, canaries.sites, head, metric)
    mia_white = {}
    if head:
        owner = np.concatenate(
            [np.full(len(d), i) for group in (members, others) for i, d in enumerate(group)]
        )
        scores = alignment_scores(log, fed.model, _stack(members + others), owner, head, site_metric)
        count = sum(len(d) for d in members)
        mia_white = membership_inference(scores[:count], scores[count:])
    return black, white, mia_loss, mia_white


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: run (or resume) the audit; 1 on a soundness violation."""
    config = parse_args(argv)
    out = Path(config["out"]).resolve()
    (out / "points").mkdir(parents=True, exist_ok=True)
    check_config(config, out / "audit-config.json")
    epsilons = [float(e) for e in str(config["epsilons"]).split(",") if e.strip()]
    seeds = [int(s) for s in str(config["seeds"]).split(",") if s.strip()]
    todo = [(e, s) for e in epsilons for s in seeds]
    start, rows, trained = time.perf_counter(), [], False
    print(f"audit: {len(todo)} points -> {out}", flush=True)
    for epsilon, seed in todo:
        path = out / "points" / f"eps-{eps_label(epsilon)}-seed-{seed}.json"
        if path.exists():
            rows.append(json.loads(path.read_text())["row"])
            print(f"done already: eps {eps_label(epsilon)} seed {seed}", flush=True)
            continue
        point, trained = audit_point(config, epsilon, seed), True
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(point))
        tmp.replace(path)
        r = point["row"]
        rows.append(r)
        print(
            f"done eps {eps_label(epsilon)} seed {seed}: accounted ε {cell(r['accounted_epsilon'])}, "
            f"lower bound {r.get('epsilon_lb_gradient', math.nan):.2f} gradient canaries, "
            f"{r['epsilon_lb']:.2f} text white-box, {r['epsilon_lb_blackbox']:.2f} black-box, "
            f"MIA AUC {r['mia_auc']:.3f} (white-box {r.get('mia_whitebox_auc', math.nan):.3f}), "
            f"accuracy {r['accuracy']:.3f}, {r['wall_seconds']:.0f} s",
            flush=True,
        )
        report(out, rows, config)
    report(out, rows, config, time.perf_counter() - start if trained else None)
    print(f"results: {out / 'audit.csv'}  summary: {out / 'audit.md'}  plot: {out / 'audit.png'}")
    bad = violations(rows)
    for line in bad:
        print(f"SOUNDNESS VIOLATION (accounting or implementation bug): {line}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
