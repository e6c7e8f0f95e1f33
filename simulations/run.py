"""What does privacy cost on my task? Sweep privacy budgets over many simulated sites.

    python -m simulations.run                         # default sweep (BBC News, embedded MiniLM)
    python -m simulations.run --preset drugs --out runs/sweep-drugs
    python -m simulations.run --config sweep.toml     # same keys as the flags, e.g. sites = 20

Each federated point is one real Flower simulation (Simulation Engine, this project's ServerApp
and ClientApp) with its own run directory under ``<out>/points/``; the centralized baseline uses
the same library training loop. Rerunning the same command skips finished points. Writes
``results.csv``/``results.json`` (one row per point), ``summary.md`` (mean ± std over seeds)
and ``accuracy_vs_round.png`` / ``accuracy_vs_epsilon.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shutil
import signal
import sys
import time
import tomllib
from pathlib import Path

from tqdm.auto import tqdm

from fedllm.centralized import run_centralized
from fedllm.config import Settings, settings_from
from simulations.engine import SimulationLink, virtual_site_policy
from simulations.plots import plot_budget, plot_rounds
from simulations.sweep import (
    RESULT_COLUMNS,
    Point,
    is_done,
    plan_points,
    read_point,
    round_curve,
    summary_table,
)

PRESETS: dict[str, dict] = {
    # the default: under 20 minutes on 2 CPU cores (measured in docs/results.md)
    "default": {
        "dataset": "bbc-news",
        "sites": 5,
        "sites-per-round": 5,
        "rounds": 8,
        "epochs": 1,
        "max-steps": 3,  # local steps per round: whole local epochs drift on non-IID shards
        "partitioning": "dirichlet",
        "dirichlet-alpha": 1.0,
        "epsilons": "8,inf",
        "seeds": "0",
        "central-epochs": 1,
        "max-length": 128,
    },
    "drugs": {
        "dataset": "drug-reviews",
        "sites": 3,
        "sites-per-round": 3,
        "rounds": 5,
        "epochs": 1,
        "partitioning": "natural",
        "partition-column": "condition",
        "epsilons": "1,3,8,inf",
        "seeds": "0,1,2",
        "central-epochs": 5,
        "max-length": 128,
    },
}
# the paper-style BBC sweeps differ only in how the articles are split over the sites
_BBC_PAPER = {
    "dataset": "bbc-news",
    "sites": 5,
    "sites-per-round": 5,
    "rounds": 8,
    "epochs": 1,
    "max-steps": 3,
    "epsilons": "1,3,8,inf",
    "seeds": "0,1,2",
    "central-epochs": 2,
    "max-length": 128,
}
PRESETS["bbc-iid"] = {**_BBC_PAPER, "partitioning": "iid"}
PRESETS["bbc-dirichlet"] = {**_BBC_PAPER, "partitioning": "dirichlet", "dirichlet-alpha": 0.5}
# the DP linear probe's point: the head alone, with the DP recipe's own 'auto' optimizer, lr and q
PROBE = {"trainable": "head", "optimizer": "auto", "lr": 0.0, "sample-rate": -1.0}
SWEEP_KEYS = {
    "sites",
    "sites-per-round",
    "rounds",
    "epsilons",
    "seeds",
    "central-epochs",
    "partitioning",
    "dirichlet-alpha",
    "partition-column",
    "no-centralized",
    "site-eval",
    "preset",
    "cpus-per-site",
    "gpus-per-site",
}


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m simulations.run``."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--preset", default="default", choices=sorted(PRESETS))
    add("--config", type=Path, help="TOML file with the same keys as these flags")
    add("--out", default=None, help="output folder (default runs/sweep-<preset>)")
    add("--sites", type=int, help="number of virtual sites")
    add("--sites-per-round", type=int, help="sites sampled each round")
    add("--rounds", type=int, help="federated rounds")
    add("--epochs", type=int, help="local epochs per round")
    add(
        "--local-steps",
        type=int,
        dest="max_steps",
        metavar="N",
        help="local steps per round instead of whole epochs (0 = epochs); the centralized baseline "
        "always trains whole epochs",
    )
    add("--central-epochs", type=int, help="epochs of the centralized baseline")
    add(
        "--cpus-per-site",
        type=int,
        help="CPUs reserved for each site's ClientApp (default 2): Ray trains cores / this many "
        "sites at once",
    )
    add("--gpus-per-site", type=float, help="GPU share per site (0.25 puts four sites on a GPU)")
    add("--no-centralized", action="store_true", default=None, help="skip the centralized baseline")
    add(
        "--site-eval",
        action="store_true",
        default=None,
        help="also score the global adapter on every sampled site's local test split each round "
        "(off: the results use the server's held-out test split only, and rounds are ~15%% faster)",
    )
    add("--partitioning", choices=["iid", "dirichlet", "natural"])
    add("--dirichlet-alpha", type=float)
    add("--partition-column")
    add("--epsilons", help="comma-separated target epsilons per site, 'inf' = no DP")
    add("--delta", type=float, help="DP delta (default min(1e-5, 1/(10 n)) per site)")
    add("--max-grad-norm", type=float, help="per-sample clipping norm")
    add("--seeds", help="comma-separated seeds (each setting is repeated per seed)")
    add("--model", help="HF BERT path or hub id (default: the embedded MiniLM)")
    add("--dataset", help="bbc-news, drug-reviews, or a CSV/TSV/JSONL file or HF dataset folder")
    add("--test-file", help="held-out test file for the server (default: split of --dataset)")
    add("--text-column")
    add("--label-column")
    add("--max-length", type=int)
    add("--batch-size", type=int)
    add("--lr", type=float)
    add(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other fine-tune setting",
    )
    return parser


def parse_args(argv: list[str] | None) -> dict:
    """Preset, then TOML config, then flags; returns one flat dict of hyphenated keys."""
    args = vars(build_parser().parse_args(argv))
    preset = args.pop("preset")
    config = {"preset": preset, **PRESETS[preset]}
    if args.get("config"):
        config.update(tomllib.loads(args.pop("config").read_text()))
    args.pop("config", None)
    for item in args.pop("set"):
        key, _, value = item.partition("=")
        config[key.strip()] = value.strip()
    config.update({k.replace("_", "-"): v for k, v in args.items() if v is not None})
    return config


def _numbers(value, kind=float) -> list:
    """``"1,3,inf"`` or a TOML list -> numbers."""
    items = value if isinstance(value, list) else str(value).split(",")
    return [kind(x) for x in items if str(x).strip()]


def _write_results(out: Path, rows: list[dict]) -> None:
    with (out / "results.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=RESULT_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (out / "results.json").write_text(json.dumps(rows, indent=2, default=str))


# keys a resumed sweep may change: they only add or drop points, or say where the sites train
EXTENDABLE = {"out", "seeds", "epsilons", "no-centralized", "cpus-per-site", "gpus-per-site"}


def check_config(config: dict, saved: Path) -> None:
    """Refuse unknown keys, a fixed noise multiplier, and resuming a sweep with other settings."""
    known = {f.replace("_", "-") for f in Settings.__dataclass_fields__} | SWEEP_KEYS | {"out"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise SystemExit(f"unknown sweep keys {unknown}: see python -m simulations.run --help")
    if float(config.get("noise-multiplier", 0) or 0) > 0:
        raise SystemExit("a sweep sets the noise from each target epsilon: drop noise-multiplier")
    if saved.exists():
        old = json.loads(saved.read_text())
        changed = sorted(
            k for k in set(old) | set(config) if k not in EXTENDABLE and old.get(k) != config.get(k)
        )
        if changed:
            raise SystemExit(
                f"{saved.parent} holds a sweep with other settings ({', '.join(changed)}): its finished "
                "points would not match; use another --out (nothing was changed)"
            )
    saved.write_text(json.dumps(config, indent=2, default=str))


def _set_aside(run_dir: Path) -> None:
    """An interrupted point's folder is kept (renamed), never deleted."""
    if run_dir.exists():
        run_dir.rename(run_dir.with_name(f"{run_dir.name}.incomplete-{time.strftime('%Y%m%d-%H%M%S')}"))


def run_sweep(config: dict) -> Path:
    """Run (or resume) the sweep described by ``config``; return the output folder."""
    out = Path(config.get("out") or f"runs/sweep-{config.get('preset', 'custom')}").resolve()
    points_dir = out / "points"
    points_dir.mkdir(parents=True, exist_ok=True)
    check_config(config, out / "sweep-config.json")
    sites = int(config["sites"])
    per_round = min(int(config.get("sites-per-round", sites)), sites)
    rounds = int(config["rounds"])
    base = {k: v for k, v in config.items() if k not in SWEEP_KEYS and k not in ("out",)}
    settings = settings_from(base)  # validates every fine-tune setting before anything runs
    # the DP linear probe is a baseline of its own only when the private points train more
    probe = settings.replace(target_epsilon=8.0).resolved().trainable != "head"
    points = plan_points(
        _numbers(config["epsilons"]),
        _numbers(config["seeds"], int),
        centralized=not config.get("no-centralized"),
        probe=probe,
    )
    todo = [p for p in points if not is_done(points_dir / p.name)]
    print(f"sweep: {len(points)} points ({len(points) - len(todo)} already done) -> {out}")
    start = time.perf_counter()
    bar = tqdm(total=len(points), initial=len(points) - len(todo), desc="sweep", unit="point")
    link = None
    try:
        for point in todo:
            run_dir = points_dir / point.name
            _set_aside(run_dir)
            if point.kind == "centralized":
                central = settings.replace(
                    target_epsilon=math.inf,
                    noise_multiplier=0.0,
                    seed=point.seed,
                    epochs=int(config.get("central-epochs", 1)),
                    max_steps=0,
                )
                run_centralized(central, run_dir, progress=False)
            else:
                if link is None:
                    link = SimulationLink(out / ".flwr").__enter__()
                run_config = {
                    **{k: v for k, v in settings.to_dict().items()},
                    "target-epsilon": point.epsilon,
                    "seed": point.seed,
                    "num-server-rounds": rounds,
                    "fraction-train": per_round / sites,
                    "fraction-evaluate": per_round / sites if config.get("site-eval") else 0.0,
                    # the virtual sites' own policy (clients.policy): this point's budget, DP
                    # off only for the non-private point, local scores only with --site-eval
                    **virtual_site_policy(point.epsilon, settings.delta, bool(config.get("site-eval"))),
                    "min-train-nodes": per_round,
                    "min-available-nodes": sites,
                    "partitioning": config.get("partitioning", "iid"),
                    "dirichlet-alpha": float(config.get("dirichlet-alpha", 1.0)),
                    "partition-column": config.get("partition-column", ""),
                    "run-dir": str(points_dir),
                    "run-name": point.name,
                    **(PROBE if point.kind == "probe" else {}),
                }
                rounds_bar = tqdm(total=rounds, desc=f"  {point.name}", unit="round", leave=False)

                def progress(run_dir=run_dir, rounds_bar=rounds_bar):
                    log = run_dir / "metrics.jsonl"
                    done = max(0, len(log.read_text().splitlines()) - 1) if log.exists() else 0
                    rounds_bar.update(done - rounds_bar.n)

                outcome = link.simulate(
                    run_config,
                    num_supernodes=sites,
                    cpus_per_site=int(config.get("cpus-per-site", 2)),
                    gpus_per_site=float(config.get("gpus-per-site", 0.0)),
                    on_poll=progress,
                )
                rounds_bar.close()
                if not outcome.ok:
                    (out / f"{point.name}.log").write_text(link.log(outcome.run_id))
                    log_file = out / f"{point.name}.log"
                    raise SystemExit(f"point {point.name} failed ({outcome.details}); see {log_file}")
            row = read_point(point, run_dir)
            bar.update(1)
            tqdm.write(
                f"done {point.name}: accuracy {row['accuracy']:.3f}, "
                f"macro-F1 {row['macro_f1']:.3f}, epsilon spent max {row['epsilon_max']:.2f}, "
                f"{row['wall_seconds']:.0f} s"
            )
            report(out, points, config)
    except KeyboardInterrupt:
        print("\ninterrupted: finished points are kept; rerun the same command to resume")
        raise SystemExit(130) from None
    finally:
        bar.close()
        if link is not None:
            link.__exit__(None, None, None)
    # a rerun that trained nothing keeps no wall time of its own: the summary's point times stand
    report(out, points, config, wall=time.perf_counter() - start if todo else None)
    return out


def _local_work(config: dict) -> str:
    steps = int(config.get("max-steps", 0) or 0)
    return f"{steps} local steps" if steps else f"{config.get('epochs', 1)} local epoch(s)"


def report(out: Path, points: list[Point], config: dict, wall: float | None = None) -> None:
    """Write results, summary and plots from every finished point (cheap; no training)."""
    points_dir = out / "points"
    done = [p for p in points if is_done(points_dir / p.name)]
    rows = [read_point(p, points_dir / p.name) for p in done]
    _write_results(out, rows)
    title = f"{config.get('dataset')} · {config.get('sites')} sites · {config.get('partitioning')}"
    curves: dict[float, list[list[float]]] = {}
    for p in done:
        if p.kind == "federated":
            curves.setdefault(p.epsilon, []).append(round_curve(points_dir / p.name))
    central = [r["accuracy"] for r in rows if r["kind"] == "centralized"]
    plot_rounds(curves, central, out / "accuracy_vs_round.png", title)
    plot_budget(rows, out / "accuracy_vs_epsilon.png", title)
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
        f"Rounds {config.get('rounds')}, {_local_work(config)} per round, batch size "
        f"{config.get('batch-size', 32)}, {config.get('sites-per-round')} of "
        f"{config.get('sites')} sites per round; ε is per site, for its whole planned "
        "training (δ ≤ 1e-5). Scores: server-side, "
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
    config = parse_args(argv)
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
