"""The audit's report: ``audit.csv``, ``audit.md`` and ``audit.png`` from its finished points,
and the soundness check (a finite-ε lower bound above the accountant's ε is a bug).

``python -m simulations.audit`` (simulations/audit.py) runs the points and calls ``report``.
"""

from __future__ import annotations

import csv
import math
import os
import platform
import sys
from pathlib import Path

import numpy as np

from simulations.sweep import eps_label

COLUMNS = [
    "target_epsilon", "seed", "accounted_epsilon", "delta", "accuracy", "gradient_canaries",
    "gradient_inserted", "epsilon_lb_gradient", "gradient_guesses", "gradient_correct",
    "canary_auc_gradient", "canaries", "inserted", "epsilon_lb", "guesses", "correct",
    "epsilon_lb_blackbox", "canary_auc_whitebox",
    "canary_auc_blackbox", "mia_auc", "mia_auc_low", "mia_auc_high", "mia_tpr_at_1pct_fpr",
    "mia_tpr_at_0.1pct_fpr", "mia_whitebox_auc", "mia_whitebox_auc_low", "mia_whitebox_auc_high",
    "mia_whitebox_tpr_at_1pct_fpr", "mia_whitebox_tpr_at_0.1pct_fpr", "trainable", "wall_seconds",
]  # fmt: skip


def violations(rows: list[dict]) -> list[str]:
    """Finite-ε points whose audited lower bound exceeds the accountant's ε."""
    bad = []
    for r in rows:
        if math.isfinite(r["target_epsilon"]):
            for key in ("epsilon_lb_gradient", "epsilon_lb", "epsilon_lb_blackbox"):
                if r.get(key, math.nan) > r["accounted_epsilon"]:
                    bad.append(
                        f"eps {eps_label(r['target_epsilon'])} seed {r['seed']}: {key} {r[key]:.3f} > "
                        f"accounted epsilon {r['accounted_epsilon']:.3f}"
                    )
    return bad


def plot_audit(rows: list[dict], path: Path, title: str) -> Path:
    """Audited lower bounds vs accounted ε (with the line y = x), and MIA AUC vs ε (95% CIs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = sorted({r["accounted_epsilon"] for r in rows if math.isfinite(r["accounted_epsilon"])})
    at_inf = 2.5 * max(finite) if finite else 1.0  # where ε = ∞ sits on the axis

    def xs(group: list[dict]) -> list[float]:
        return [r["accounted_epsilon"] if math.isfinite(r["accounted_epsilon"]) else at_inf for r in group]

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    bounds = ("epsilon_lb_gradient", "epsilon_lb", "epsilon_lb_blackbox")
    names = ("gradient canaries (pre-registered)", "text canaries, white-box", "text canaries, black-box")
    for key, label in zip(bounds, names, strict=True):
        left.plot(xs(rows), [r.get(key, math.nan) for r in rows], "o", label=f"audited lower bound, {label}")
    if finite:
        left.plot([0, max(finite)], [0, max(finite)], "k--", label="accountant's ε (upper bound)")
    top = max([*finite, *(r.get(k, 0.0) for r in rows for k in bounds), 1.0])
    left.set_ylim(0, 1.1 * top)
    left.set_ylabel("ε lower bound (95% confidence)")
    for key, label in (("mia", "loss threshold"), ("mia_whitebox", "white-box update alignment")):
        group = [r for r in rows if not math.isnan(r.get(f"{key}_auc", math.nan))]
        auc = np.array([r[f"{key}_auc"] for r in group])
        low = auc - np.array([r[f"{key}_auc_low"] for r in group])
        high = np.array([r[f"{key}_auc_high"] for r in group]) - auc
        right.errorbar(xs(group), auc, yerr=[low, high], fmt="o", capsize=4, label=f"MIA AUC, {label}")
    right.axhline(0.5, color="gray", linestyle=":", label="chance")
    right.set_ylabel("MIA AUC on real records (95% CI)")
    ticks = finite + [at_inf]
    for ax in (left, right):
        ax.set_xlim(0, 1.1 * at_inf)
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t:.2g}" for t in finite] + ["∞"])
        ax.set_xlabel("accounted ε per site")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def cell(value: object) -> str:
    """A table cell: ∞ and - for the non-finite floats, 3 significant digits for the others."""
    if isinstance(value, float):
        return "∞" if math.isinf(value) else ("-" if math.isnan(value) else f"{value:.3g}")
    return str(value)


def report(out: Path, rows: list[dict], config: dict, wall: float | None = None) -> None:
    """``audit.csv``, ``audit.md`` and ``audit.png`` from the finished points."""
    rows = sorted(rows, key=lambda r: (r["target_epsilon"], r["seed"]))
    with (out / "audit.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS, restval=math.nan)
        writer.writeheader()
        writer.writerows(rows)
    gradient = max((int(r.get("gradient_canaries", 0)) for r in rows), default=0)
    title = (
        f"{config['dataset']} · {config['sites']} sites · {config['partitioning']} · "
        f"{gradient} gradient + {config['canaries']} text canaries"
    )
    plot_audit(rows, out / "audit.png", title)
    head = [
        "target ε", "seed", "accounted ε", "ε lower bound (gradient canaries)", "correct / guesses",
        "canary AUC (gradient)", "ε lower bound (text, white-box)", "correct / guesses",
        "ε lower bound (black-box)", "canary AUC white / black", "MIA AUC (loss) [95% CI]",
        "MIA TPR @1% / 0.1% FPR", "MIA AUC (white-box) [95% CI]", "accuracy", "s",
    ]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        g = r.get
        cells = [
            cell(r["target_epsilon"]), r["seed"], cell(r["accounted_epsilon"]),
            cell(g("epsilon_lb_gradient", math.nan)),
            f"{g('gradient_correct', '-')} / {g('gradient_guesses', '-')}",
            cell(g("canary_auc_gradient", math.nan)), cell(r["epsilon_lb"]),
            f"{r['correct']} / {r['guesses']}", cell(r["epsilon_lb_blackbox"]),
            f"{cell(r['canary_auc_whitebox'])} / {cell(r['canary_auc_blackbox'])}",
            f"{cell(r['mia_auc'])} [{cell(r['mia_auc_low'])}, {cell(r['mia_auc_high'])}]",
            f"{cell(r['mia_tpr_at_1pct_fpr'])} / {cell(r['mia_tpr_at_0.1pct_fpr'])}",
            f"{cell(g('mia_whitebox_auc', math.nan))} [{cell(g('mia_whitebox_auc_low', math.nan))}, "
            f"{cell(g('mia_whitebox_auc_high', math.nan))}]",
            cell(r["accuracy"]), f"{r['wall_seconds']:.0f}",
        ]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    bad = violations(rows)
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {sys.version.split()[0]}"
    timing = f" This invocation: {wall:.0f} s." if wall else ""
    trained = sum(r["wall_seconds"] for r in rows)
    text = [
        f"# Privacy audit: {title}",
        "",
        f"Command: `python -m simulations.audit {' '.join(sys.argv[1:])}`".rstrip(),
        "",
        f"Machine: {machine}. Wall time summed over the points: {trained:.0f} s.{timing}",
        "",
        f"{config['rounds']} rounds × {config['max-steps']} local steps, {config['canaries']} "
        f"{config['canary-kind']} canaries; lower bounds at {config['confidence']:.0%} confidence "
        "(Steinke, Nasr, Jagielski 2023), δ of the run. See docs/audit.md for the method.",
        "",
        "\n".join(lines),
        "",
        ("**SOUNDNESS VIOLATION** (accounting or implementation bug): " + "; ".join(bad)) if bad else
        "Every finite-ε lower bound is at most the accountant's ε.",
        "",
        "![audit](audit.png)",
        "",
    ]  # fmt: skip
    (out / "audit.md").write_text("\n".join(text))
