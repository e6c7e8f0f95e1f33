"""The sweep's plan and summary: the DP linear probe is a baseline of every private sweep."""

from __future__ import annotations

import json
import math

from simulations.plots import plot_budget
from simulations.sweep import Point, plan_points, read_point, summary_table


def _row(kind: str, eps: float, trainable: str, accuracy: float, seed: int = 0) -> dict:
    return {
        "point": f"{kind}-{eps}-{seed}",
        "kind": kind,
        "trainable": trainable,
        "target_epsilon": eps,
        "seed": seed,
        "accuracy": accuracy,
        "macro_f1": accuracy - 0.01,
        "loss": 0.5,
        "epsilon_max": eps,
        "epsilon_mean": eps,
        "rounds": 3,
        "wall_seconds": 10.0,
    }


def test_the_probe_runs_at_every_finite_budget_only_when_asked():
    plain = plan_points([8.0, math.inf, 1.0], [0, 1])
    assert not [p for p in plain if p.kind == "probe"]
    with_probe = plan_points([8.0, math.inf, 1.0], [0, 1], probe=True)
    probes = sorted((p.epsilon, p.seed) for p in with_probe if p.kind == "probe")
    assert probes == [(1.0, 0), (1.0, 1), (8.0, 0), (8.0, 1)]
    assert len({p.name for p in with_probe}) == len(with_probe), "every point needs its own folder"


def test_the_summary_names_the_probe_and_what_trained(tmp_path):
    rows = [
        _row("centralized", math.inf, "lora", 0.97),
        _row("federated", math.inf, "lora", 0.95),
        _row("federated", 8.0, "ffa-lora", 0.90),
        _row("probe", 8.0, "head", 0.93),
    ]
    lines = summary_table(rows).splitlines()[2:]
    assert [line.split("|")[1:3] for line in lines] == [
        [" centralized ", " lora "],
        [" federated ", " lora "],
        [" federated ", " ffa-lora "],
        [" federated, DP linear probe ", " head "],
    ]
    default = summary_table([_row("federated", 8.0, "head", 0.93)])  # the default trains the head
    assert "| federated, DP linear probe | head | 8 |" in default
    assert plot_budget(rows, tmp_path / "budget.png", "t").stat().st_size > 0


def test_a_point_reports_what_it_trained(tmp_path):
    run = tmp_path / "federated-eps8-seed0"
    run.mkdir()
    settings = {"target-epsilon": 8.0, "trainable": "auto"}
    (run / "config.json").write_text(json.dumps({"run-config": {}, "settings": settings}))
    (run / "result.json").write_text(json.dumps({"wall-seconds": 1.0}))
    lines = [{"round": 0, "server": {"accuracy": 0.2, "macro-f1": 0.1, "loss": 1.0}}]
    lines.append({"round": 1, "server": {"accuracy": 0.9, "macro-f1": 0.8, "loss": 0.3}, "sites": {}})
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines))

    row = read_point(Point("federated", 8.0, 0), run)
    assert row["trainable"] == "head" and row["accuracy"] == 0.9
