"""What does privacy cost on my task? Sweep privacy budgets over many simulated sites.

    python -m simulations.run                         # default sweep (BBC News, embedded MiniLM)
    python -m simulations.run --preset drugs --out runs/sweep-drugs
    python -m simulations.run --config sweep.toml     # same keys as the flags, e.g. sites = 20

A preset is such a TOML file in simulations/presets/; sites-per-round is capped at --sites.

Each federated point is one real Flower simulation (Simulation Engine, this project's ServerApp
and ClientApp) with its own run directory under ``<out>/points/``; the centralized baseline uses
the same library training loop. Rerunning the same command skips finished points. Writes
``results.csv``/``results.json`` (one row per point), ``summary.md`` (mean ± std over seeds)
and ``accuracy_vs_round.png`` / ``accuracy_vs_epsilon.png``.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import platform
import shutil
import signal
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from fedllm.centralized import run_centralized
from fedllm.config import Settings
from fedllm.contract import RUN_LOG
from fedllm.features import FEATURE_CACHE_ENV
from simulations.plots import plot_budget, plot_rounds
from simulations.superlink import SimulationLink, virtual_site_policy
from simulations.sweep import (
    RESULT_COLUMNS,
    Point,
    is_done,
    plan_points,
    read_point,
    round_curve,
    summary_table,
)
from simulations.sweep_config import (
    PRESETS,
    SweepOptions,
    build_parser,
    check_config,
    parse_args,
    sweep_settings,
)

# PRESETS, build_parser, check_config and parse_args are the sweep's command line (sweep_config.py)
__all__ = [
    "PRESETS",
    "build_parser",
    "check_config",
    "main",
    "parse_args",
    "like_private",
    "point_run_config",
    "report",
    "run_sweep",
]

# the DP linear probe's point: the head alone, with the DP recipe's own 'auto' optimizer, lr and q
PROBE = {"trainable": "head", "optimizer": "auto", "lr": 0.0, "sample-rate": -1.0}


def _write_results(out: Path, rows: list[dict]) -> None:
    with (out / "results.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=RESULT_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (out / "results.json").write_text(json.dumps(rows, indent=2, default=str))


def _set_aside(run_dir: Path) -> None:
    """An interrupted point's folder is kept (renamed), never deleted."""
    if run_dir.exists():
        run_dir.rename(run_dir.with_name(f"{run_dir.name}.incomplete-{time.strftime('%Y%m%d-%H%M%S')}"))


def like_private(settings: Settings) -> dict:
    """The non-private federated point's settings when ``trainable = auto``: what the private
    points train and how (the DP recipe's trainable, optimizer, lr and q, no inverse-frequency
    class weights), with the noise and clipping off. Without this, ``auto`` would set non-private
    LoRA beside the private head, and the table would compare two models instead of the cost of
    privacy. An explicit ``trainable`` already trains the same thing at every point: nothing."""
    if settings.trainable != "auto":
        return {}
    recipe = settings.replace(target_epsilon=8.0, noise_multiplier=0.0).resolved()
    return {
        "trainable": recipe.trainable,
        "optimizer": recipe.optimizer,
        "lr": recipe.lr,
        "sample-rate": recipe.sample_rate,
        "class-weighting": False,
    }


def point_run_config(point: Point, settings: Settings, options: SweepOptions, points_dir: Path) -> dict:
    """The Flower run config of one federated point: the settings, its budget and seed, the
    federation's shape, and the virtual sites' own policy."""
    sites, per_round = options.sites, options.per_round
    return {
        **settings.to_dict(),
        "target-epsilon": point.epsilon,
        "seed": point.seed,
        "num-server-rounds": options.rounds,
        "fraction-train": per_round / sites,
        "fraction-evaluate": per_round / sites if options.site_eval else 0.0,
        # the virtual sites' own policy (clients.policy): this point's budget, DP off only for the
        # non-private point, local scores only with --site-eval
        **virtual_site_policy(point.epsilon, settings.delta, options.site_eval),
        "min-train-nodes": per_round,
        "min-available-nodes": sites,
        "partitioning": options.partitioning,
        "dirichlet-alpha": options.dirichlet_alpha,
        "partition-column": options.partition_column,
        "run-dir": str(points_dir),
        "run-name": point.name,
        **(PROBE if point.kind == "probe" else {}),
        **(like_private(settings) if point.kind == "federated" and math.isinf(point.epsilon) else {}),
    }


def run_sweep(config: dict) -> Path:
    """Run (or resume) the sweep described by ``config``; return the output folder."""
    out = Path(config.get("out") or f"runs/sweep-{config.get('preset', 'custom')}").resolve()
    options = SweepOptions.from_config(config)
    settings = sweep_settings(config)  # validates every fine-tune setting before anything runs
    points_dir = out / "points"
    points_dir.mkdir(parents=True, exist_ok=True)
    check_config(config, out / "sweep-config.json")
    # the DP linear probe is a baseline of its own only when the private points train more
    probe = settings.replace(target_epsilon=8.0).resolved().trainable != "head"
    points = plan_points(
        options.epsilon_list, options.seed_list, centralized=not options.no_centralized, probe=probe
    )
    todo = [p for p in points if not is_done(points_dir / p.name)]
    print(f"sweep: {len(points)} points ({len(points) - len(todo)} already done) -> {out}")
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(
            tqdm(total=len(points), initial=len(points) - len(todo), desc="sweep", unit="point")
        )
        link = None  # the simulation SuperLink: started for the first federated point
        try:
            for point in todo:
                run_dir = points_dir / point.name
                _set_aside(run_dir)
                if point.kind == "centralized":
                    central = settings.replace(
                        target_epsilon=math.inf,
                        noise_multiplier=0.0,
                        seed=point.seed,
                        epochs=options.central_epochs,
                        max_steps=0,
                    )
                    run_centralized(central, run_dir, progress=False)
                else:
                    if link is None:
                        link = stack.enter_context(SimulationLink(out / ".flwr", env=_feature_cache(out)))
                    _simulate(link, point_run_config(point, settings, options, points_dir), options, out)
                row = read_point(point, run_dir)
                bar.update(1)
                tqdm.write(
                    f"done {point.name}: accuracy {row['accuracy']:.3f}, "
                    f"macro-F1 {row['macro_f1']:.3f}, epsilon spent max {row['epsilon_max']:.2f}, "
                    f"{row['wall_seconds']:.0f} s"
                )
                report(out, points, options, settings)
        except KeyboardInterrupt:
            print("\ninterrupted: finished points are kept; rerun the same command to resume")
            raise SystemExit(130) from None
    # a rerun that trained nothing keeps no wall time of its own: the summary's point times stand
    report(out, points, options, settings, wall=time.perf_counter() - start if todo else None)
    return out


def _feature_cache(out: Path) -> dict[str, str]:
    """The folder every point's processes keep the encoder's features in (``fedllm.features``):
    ``FEDLLM_FEATURE_CACHE`` if set, else ``out/features``. The points of one seed share the
    splits, so all but the first read the features instead of running the encoder again."""
    return {FEATURE_CACHE_ENV: os.environ.get(FEATURE_CACHE_ENV) or str(out / "features")}


def _simulate(link: SimulationLink, run_config: dict, options: SweepOptions, out: Path) -> None:
    """One federated point through the Simulation Engine, a progress bar over its rounds."""
    name, rounds = run_config["run-name"], options.rounds
    log = Path(run_config["run-dir"]) / name / RUN_LOG
    with tqdm(total=rounds, desc=f"  {name}", unit="round", leave=False) as rounds_bar:

        def progress() -> None:
            done = max(0, len(log.read_text().splitlines()) - 1) if log.exists() else 0
            rounds_bar.update(done - rounds_bar.n)

        outcome = link.simulate(
            run_config,
            num_supernodes=options.sites,
            cpus_per_site=options.cpus_per_site,
            gpus_per_site=options.gpus_per_site,
            on_poll=progress,
        )
    if not outcome.ok:
        log_file = out / f"{name}.log"
        log_file.write_text(link.log(outcome.run_id))
        raise SystemExit(f"point {name} failed ({outcome.details}); see {log_file}")


def report(
    out: Path, points: list[Point], options: SweepOptions, settings: Settings, wall: float | None = None
) -> None:
    """Write results, summary and plots from every finished point (cheap; no training)."""
    points_dir = out / "points"
    done = [p for p in points if is_done(points_dir / p.name)]
    rows = [read_point(p, points_dir / p.name) for p in done]
    _write_results(out, rows)
    title = f"{settings.dataset} · {options.sites} sites · {options.partitioning}"
    curves: dict[float, list[list[float]]] = {}
    for p in done:
        if p.kind == "federated":
            curves.setdefault(p.epsilon, []).append(round_curve(points_dir / p.name))
    central = [r["accuracy"] for r in rows if r["kind"] == "centralized"]
    plot_rounds(curves, central, out / "accuracy_vs_round.png", title)
    plot_budget(rows, out / "accuracy_vs_epsilon.png", title)
    work = f"{settings.max_steps} local steps" if settings.max_steps else f"{settings.epochs} local epoch(s)"
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {sys.version.split()[0]}"
    trained = sum(r["wall_seconds"] for r in rows)
    timing = f" Wall time summed over the {len(rows)} finished points: {trained:.0f} s."
    if wall:
        timing += f" This invocation: {wall:.0f} s."
    if len(done) < len(points):
        timing += (
            f"\n\n**Partial: {len(done)} of {len(points)} planned points finished**; rerunning the "
            "same command runs the rest."
        )
    lines = [
        f"# Privacy sweep: {title}",
        "",
        f"Command: `python -m simulations.run {' '.join(sys.argv[1:])}`".rstrip(),
        "",
        f"Machine: {machine}.{timing}",
        "",
        f"Rounds {options.rounds}, {work} per round, batch size {settings.batch_size}, "
        f"{options.per_round} of {options.sites} sites per round; ε is per site, for its whole "
        "planned training (δ ≤ 1e-5). Scores: server-side, "
        f"held-out test split, after the last round.",
        "",
        summary_table(rows),
        "",
        "![accuracy vs round](accuracy_vs_round.png)",
        "",
        "![accuracy vs epsilon](accuracy_vs_epsilon.png)",
        "",
    ]
    (out / "summary.md").write_text("\n".join(lines))


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    """Command-line entry."""
    config = parse_args(argv, __doc__)
    # `kill` (or a CI timeout) stops a sweep as Ctrl-C does: finished points kept, the
    # simulation SuperLink and its Ray workers stopped
    signal.signal(signal.SIGTERM, _interrupt)
    out = run_sweep(config)
    print(
        f"results: {out / 'results.csv'}  summary: {out / 'summary.md'}  plots: "
        f"{out / 'accuracy_vs_round.png'}, {out / 'accuracy_vs_epsilon.png'}"
    )
    shutil.rmtree(out / ".flwr" / "apps", ignore_errors=True)


if __name__ == "__main__":
    main()
