"""The sweep's two figures: accuracy per round per budget; final scores vs epsilon."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator, NullFormatter  # noqa: E402

from simulations.sweep import eps_label  # noqa: E402


def _mean(values):
    return statistics.mean(values) if values else math.nan


def plot_rounds(curves: dict[float, list[list[float]]], central: list[float], path: Path, title: str) -> Path:
    """Server test accuracy vs round, one line per target epsilon (mean ± std over seeds)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for eps in sorted(curves, key=lambda e: (math.isinf(e), e)):
        runs = curves[eps]
        length = min(len(c) for c in runs)
        mean = [_mean([c[i] for c in runs]) for i in range(length)]
        label = "federated, no DP" if math.isinf(eps) else f"federated, ε = {eps_label(eps)}"
        if len(runs) > 1:  # mean over seeds, with a ±1 std band
            label += f" ({len(runs)} seeds)"
        (line,) = ax.plot(range(length), mean, marker="o", label=label)
        if len(runs) > 1:
            std = [statistics.stdev([c[i] for c in runs]) for i in range(length)]
            low = [m - s for m, s in zip(mean, std, strict=True)]
            high = [m + s for m, s in zip(mean, std, strict=True)]
            ax.fill_between(range(length), low, high, color=line.get_color(), alpha=0.15)
    if central:
        ax.axhline(_mean(central), color="black", linestyle="--", label="centralized, no DP")
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("test accuracy (server, held-out split)")
    ax.set_title(title)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_budget(rows: list[dict], path: Path, title: str) -> Path:
    """Final accuracy and macro-F1 vs target epsilon, with the non-private baselines as lines."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    private = [r for r in rows if r["kind"] in ("federated", "probe") and math.isfinite(r["target_epsilon"])]
    finite = sorted({r["target_epsilon"] for r in private})
    series: dict[str, list[dict]] = {}
    for r in private:  # the head alone is the DP linear probe, whichever point trained it
        probe = r["kind"] == "probe" or r.get("trainable") == "head"
        trains = r.get("trainable") or "adapter"
        name = "DP linear probe (head on the frozen encoder)" if probe else f"federated, DP-SGD ({trains})"
        series.setdefault(name, []).append(r)
    for ax, metric, name in ((axes[0], "accuracy", "accuracy"), (axes[1], "macro_f1", "macro-F1")):
        for label, group in series.items():
            xs = sorted({r["target_epsilon"] for r in group})
            vals = [[r[metric] for r in group if r["target_epsilon"] == eps] for eps in xs]
            means = [_mean(v) for v in vals]
            stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals]
            ax.errorbar(xs, means, yerr=stds, marker="o", capsize=4, label=f"{label}, mean ± std")
        for kind, style, label in (
            ("federated", ":", "federated, no DP"),
            ("centralized", "--", "centralized, no DP"),
        ):
            vals = [r[metric] for r in rows if r["kind"] == kind and math.isinf(r["target_epsilon"])]
            if vals:
                ax.axhline(
                    _mean(vals),
                    color="black" if kind == "centralized" else "gray",
                    linestyle=style,
                    label=label,
                )
        ax.set_xscale("log")
        ax.set_xticks(finite or [1])
        ax.set_xticklabels([eps_label(e) for e in finite] or ["1"])
        ax.xaxis.set_minor_formatter(NullFormatter())  # only the budgets swept are labelled
        ax.set_xlabel("target ε per site (δ ≤ 1e-5)")
        ax.set_ylabel(f"final test {name}")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
