"""The sweep's plan and summary: the DP linear probe is a baseline of every private sweep."""

from __future__ import annotations

import json
import math
from pathlib import Path

from fedllm.config import settings_from
from simulations.plots import plot_budget
from simulations.run import point_run_config, report
from simulations.sweep import Point, plan_points, read_point, summary_table
from simulations.sweep_config import SweepOptions, parse_args, sweep_settings


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


def _finished_point(run: Path) -> Path:
    """The run directory of a finished federated point at epsilon 8 (one round)."""
    run.mkdir(parents=True)
    settings = {"target-epsilon": 8.0, "trainable": "auto"}
    (run / "config.json").write_text(json.dumps({"run-config": {}, "settings": settings}))
    (run / "result.json").write_text(json.dumps({"wall-seconds": 1.0}))
    lines = [{"round": 0, "server": {"accuracy": 0.2, "macro-f1": 0.1, "loss": 1.0}}]
    lines.append({"round": 1, "server": {"accuracy": 0.9, "macro-f1": 0.8, "loss": 0.3}, "sites": {}})
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    return run


def test_a_point_reports_what_it_trained(tmp_path):
    run = _finished_point(tmp_path / "federated-eps8-seed0")
    row = read_point(Point("federated", 8.0, 0), run)
    assert row["trainable"] == "head" and row["accuracy"] == 0.9


def test_sites_per_round_of_a_preset_is_capped_at_sites_in_the_runs_and_the_summary(tmp_path):
    """``--sites 4`` on the default preset (which samples 5 a round): each round samples the 4,
    and the summary says so (it said "5 of 4 sites per round")."""
    config = parse_args(["--sites", "4"])
    options, settings = SweepOptions.from_config(config), sweep_settings(config)
    point = Point("federated", 8.0, 0)
    run_config = point_run_config(point, settings, options, tmp_path / "points")
    assert (run_config["min-train-nodes"], run_config["min-available-nodes"]) == (4, 4)
    assert run_config["fraction-train"] == 1.0
    _finished_point(tmp_path / "points" / point.name)
    report(tmp_path, [point], options, settings)
    summary = (tmp_path / "summary.md").read_text()
    assert "4 of 4 sites per round" in summary and "3 local steps per round" in summary


def test_the_non_private_point_trains_what_the_private_points_train(tmp_path):
    """With ``trainable = auto`` the ε = ∞ point trains the DP recipe's head (noise off), not
    LoRA: the default sweep compares like with like. An explicit trainable is left alone."""
    config = parse_args([])
    options, settings = SweepOptions.from_config(config), sweep_settings(config)
    points = tmp_path / "points"
    public = settings_from(point_run_config(Point("federated", math.inf, 0), settings, options, points))
    private = settings_from(point_run_config(Point("federated", 8.0, 0), settings, options, points))
    assert not public.private and private.private
    mine, theirs = public.resolved(), private.resolved()
    assert mine.trainable == theirs.trainable == "head"
    assert (mine.optimizer, mine.lr, mine.sample_rate) == (theirs.optimizer, theirs.lr, theirs.sample_rate)
    assert not mine.class_weighting
    lora = parse_args(["--trainable", "lora"])
    run_config = point_run_config(Point("federated", math.inf, 0), sweep_settings(lora), options, points)
    assert settings_from(run_config).resolved().trainable == "lora"
