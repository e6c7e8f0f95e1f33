"""A privacy-budget sweep: its points, their results, the table (no training here)."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from fedllm.contract import VALIDATION_PREFIX, round_records

RESULT_COLUMNS = [
    "point",
    "kind",
    "trainable",
    "target_epsilon",
    "seed",
    "accuracy",
    "macro_f1",
    "loss",
    "epsilon_max",
    "epsilon_mean",
    "rounds",
    "wall_seconds",
    "validation_accuracy",  # the held-out part settings are chosen on (validation-fraction)
    "validation_macro_f1",
    # --site-eval: the global model on the sites' local test splits (weighted mean over the sites),
    # and with each site's own DP label prior added to its logits (imbalance set; fedllm.imbalance)
    "site_macro_f1",
    "site_personal_macro_f1",
]


def eps_label(epsilon: float) -> str:
    """``8.0`` -> ``8``, ``inf`` -> ``inf`` (for names and tables)."""
    return "inf" if math.isinf(epsilon) else f"{epsilon:g}"


@dataclass(frozen=True)
class Point:
    """One sweep point: a centralized or federated run at one budget and seed."""

    kind: str  # "centralized" | "federated" | "probe" (federated DP linear probe: the head alone)
    epsilon: float
    seed: int

    @property
    def name(self) -> str:
        """Folder name of this point's run directory."""
        return f"{self.kind}-eps{eps_label(self.epsilon)}-seed{self.seed}"


def plan_points(
    epsilons: list[float], seeds: list[int], centralized: bool = True, probe: bool = False
) -> list[Point]:
    """The first seed's baselines (centralized and federated non-private), then every private
    point of every seed, then the other seeds' baselines.

    The private points come before the later seeds' baselines because they are the sweep's
    subject and cheap (the head), while a non-private LoRA point costs several minutes: a sweep
    stopped early still holds every budget over all seeds. ``probe``: also the DP linear probe
    (``trainable = head`` with the DP recipe) at every finite budget, the floor a private
    fine-tune must beat; not needed when the private points already train the head alone (the
    default).
    """
    finite = sorted(e for e in epsilons if math.isfinite(e))

    def baselines(seed: int) -> list[Point]:
        return ([Point("centralized", math.inf, seed)] if centralized else []) + [
            Point("federated", math.inf, seed)
        ]

    points = baselines(seeds[0]) if seeds else []
    for seed in seeds:
        points += [Point("federated", e, seed) for e in finite]
        points += [Point("probe", e, seed) for e in finite] if probe else []
    for seed in seeds[1:]:
        points += baselines(seed)
    return points


def _trainable(run_dir: Path) -> str:
    """What trained at this point (the resolved ``trainable``), from the settings it saved."""
    from fedllm.config import settings_from  # the library, only for a finished point's settings

    saved = run_dir / "config.json"
    if saved.exists():
        settings = json.loads(saved.read_text())["settings"]
    else:
        settings = json.loads((run_dir / "result.json").read_text()).get("settings", {})
    return settings_from(settings).resolved().trainable if settings else ""


def is_done(run_dir: Path) -> bool:
    """A point is finished when its run directory holds ``result.json``."""
    return (run_dir / "result.json").exists()


def _float(value) -> float:
    """Run logs write non-finite values as "inf"/"nan"; centralized results write null for no DP."""
    return math.inf if value is None else float(value)


def read_point(point: Point, run_dir: Path) -> dict:
    """The results row of a finished point, read from its run directory."""
    result = json.loads((run_dir / "result.json").read_text())
    row = {
        "point": point.name,
        "kind": point.kind,
        "trainable": _trainable(run_dir),
        "target_epsilon": point.epsilon,
        "seed": point.seed,
    }
    if point.kind == "centralized":
        test = result["test"]
        eps = _float(result["epsilon"])
        row.update(
            accuracy=test["accuracy"],
            macro_f1=test["macro_f1"],
            loss=test["loss"],
            epsilon_max=eps,
            epsilon_mean=eps,
            rounds=0,
            wall_seconds=result["wall_seconds"],
            validation_accuracy=result.get("validation", {}).get("accuracy", math.nan),
            validation_macro_f1=result.get("validation", {}).get("macro_f1", math.nan),
        )
        return row
    rows = round_records(run_dir)
    site_eps: dict[str, float] = {}
    for r in rows:
        for node, site in r.get("sites", {}).items():
            site_eps[node] = max(site_eps.get(node, 0.0), _float(site["epsilon"]))
    final = rows[-1]["server"]
    values = list(site_eps.values()) or [math.nan]
    row.update(
        accuracy=final["accuracy"],
        macro_f1=final["macro-f1"],
        loss=final["loss"],
        epsilon_max=max(values),
        epsilon_mean=sum(values) / len(values),
        rounds=len(rows) - 1,
        wall_seconds=result["wall-seconds"],
        validation_accuracy=final.get(VALIDATION_PREFIX + "accuracy", math.nan),
        validation_macro_f1=final.get(VALIDATION_PREFIX + "macro-f1", math.nan),
    )
    local: dict = next((r["evaluate"] for r in reversed(rows) if r.get("evaluate")), {})
    row.update(
        site_macro_f1=local.get("macro-f1", math.nan),
        site_personal_macro_f1=local.get("personal-macro-f1", math.nan),
    )
    return row


def round_curve(run_dir: Path) -> list[float]:
    """Server test accuracy after each round (index 0 = the seeded start)."""
    return [row["server"]["accuracy"] for row in round_records(run_dir)]


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {std:.3f}"


def summary_table(rows: list[dict]) -> str:
    """Markdown table, mean ± std over seeds for each (kind, target epsilon, what trained).

    Rows: the non-private baselines first, then each budget; a private point that trains the head
    alone is the DP linear probe, named so.
    """
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["kind"], row["target_epsilon"], row.get("trainable", "")), []).append(row)
    rank = {"centralized": 0, "federated": 1, "probe": 2}
    order = sorted(groups, key=lambda k: (math.isfinite(k[1]), k[1], rank.get(k[0], 3)))
    lines = [
        "| setting | trains | target ε | seeds | accuracy | macro-F1 | ε spent (max over sites) "
        "| wall s / run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind, eps, trainable in order:
        g = groups[(kind, eps, trainable)]
        probe = kind == "probe" or (kind == "federated" and trainable == "head" and math.isfinite(eps))
        name = "federated, DP linear probe" if probe else kind
        spent = [r["epsilon_max"] for r in g if math.isfinite(r["epsilon_max"])]
        spent_text = f"{max(spent):.2f}" if spent else "∞ (no DP)"
        lines.append(
            f"| {name} | {trainable or '-'} | {eps_label(eps)} | {len(g)} | "
            f"{_mean_std([r['accuracy'] for r in g])} | "
            f"{_mean_std([r['macro_f1'] for r in g])} | {spent_text} | "
            f"{statistics.mean(r['wall_seconds'] for r in g):.0f} |"
        )
    return "\n".join(lines)
