"""The real path of client-level DP: one Flower simulation of many BBC sites, few rounds.

    python bench/client_dp_flower.py [--sites 100] [--rounds 3] [--epsilon 8] [--out runs/client-dp-flower]

This project's ServerApp and ClientApp in Flower's Simulation Engine: ``--sites`` virtual sites
(BBC News dealt IID, ~15 articles each at 100), every site every round (``client-dp-sites`` =
``--sites``), client-level DP at the server (server/client_dp.py: Flower's fixed-clipping
wrapper and the run's accountant, dp-accounting's PLD behind Flower's protocol by default or
Flower's RDP with ``--accountant rdp``, σ calibrated by it for ``--rounds`` releases within
``--epsilon``). The
sites train the head on the frozen MiniLM without per-example DP (15 texts a site cannot carry
it), with the settings chosen on validation by ``python -m simulations.many_sites --tune``.
Prints the server's test accuracy per round, the run's client-level (ε, δ) from its
``result.json`` (with the same releases' ε by the other accountant), the wall seconds, and the
peak RSS of the whole process tree (SuperLink, simulation runtime, Ray workers) sampled every
0.5 s; writes one CSV row per round (``--csv``, default ``<out>/client-dp-flower-<sites>.csv``).
"""

from __future__ import annotations

import argparse
import csv
import json
import threading
import time
from pathlib import Path

import psutil

from fedllm.contract import round_records
from simulations.superlink import SimulationLink, virtual_site_policy


def run_config(args: argparse.Namespace, run_dir: Path) -> dict:
    """BBC, IID sites, the head with plain SGD at the harness's settings, client-level DP."""
    return {
        "dataset": "bbc-news",
        "partitioning": "iid",
        "target-epsilon": float("inf"),
        "trainable": "head",
        "optimizer": "sgd",
        "lr": args.lr,
        "schedule": "constant",
        "batch-size": 64,  # > a site's texts: full-batch steps, as the in-process harness takes them
        "epochs": args.local_steps,
        "max-steps": args.local_steps,
        "num-server-rounds": args.rounds,
        "min-train-nodes": args.sites,
        "min-available-nodes": args.sites,
        "client-dp-epsilon": args.epsilon,
        "client-dp-clip": args.clip,
        "client-dp-sites": args.sites,
        "client-dp-accountant": args.accountant,
        **virtual_site_policy(float("inf")),
        "run-dir": str(run_dir),
        "run-name": f"client-dp-{args.sites}",
    }


def peak_rss(stop: threading.Event, peak: list[float]) -> None:
    """The largest RSS of this process and all its children, sampled every 0.5 s."""
    me = psutil.Process()
    while not stop.is_set():
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                continue
        peak[0] = max(peak[0], total / 2**20)
        stop.wait(0.5)


def write_csv(path: Path, rows: list[dict]) -> None:
    """One row per round of the run log: accuracy, replies, the books after it (both ε)."""
    columns = ["round", "wall-seconds", "test-accuracy", "valid-replies", "stand-ins", "clipped"]
    columns += [
        "epsilon-flower-rdp",
        "delta",
        "releases",
        "noise-multiplier",
        "clip",
        "epsilon-pld",
        "accounting",
    ]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, columns)
        writer.writeheader()
        for r in rows:
            dp = r.get("client-dp", {})
            writer.writerow(
                {
                    "round": r["round"],
                    "wall-seconds": r.get("wall-seconds"),
                    "test-accuracy": r["server"].get("accuracy"),
                    "valid-replies": r.get("train-replies"),
                    "stand-ins": len(r.get("stand-ins", [])),
                    "clipped": len(r.get("clipped", [])),
                    "epsilon-flower-rdp": dp.get("epsilon-rdp"),
                    "delta": dp.get("delta"),
                    "releases": dp.get("releases"),
                    "noise-multiplier": dp.get("noise-multiplier"),
                    "clip": dp.get("clip"),
                    "epsilon-pld": dp.get("epsilon-pld"),
                    "accounting": dp.get("accounting"),
                }
            )
    print(f"CSV: {path}")


def main(argv: list[str] | None = None) -> None:
    """Run the federation, print its rounds and its books."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sites", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--out", default="runs/client-dp-flower")
    parser.add_argument("--accountant", choices=("pld", "rdp"), default="pld")
    parser.add_argument(
        "--csv", default="", help="per-round CSV (default <out>/client-dp-flower-<sites>.csv)"
    )
    parser.add_argument(
        "--chosen",
        default="runs/many-sites/chosen-bbc-news.json",
        help="the harness's choice on validation (lr, local-steps, clip), used when present",
    )
    args = parser.parse_args(argv)
    if Path(args.chosen).exists():
        chosen = json.loads(Path(args.chosen).read_text())
        args.lr, args.local_steps, args.clip = chosen["lr"], chosen["local-steps"], chosen["clip"]
        print(f"settings chosen on validation by the harness: {chosen}")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    stop, peak = threading.Event(), [0.0]
    sampler = threading.Thread(target=peak_rss, args=(stop, peak), daemon=True)
    sampler.start()
    start = time.perf_counter()
    with SimulationLink(out / ".flwr") as link:
        config = run_config(args, out / "points")
        outcome = link.simulate(config, num_supernodes=args.sites, cpus_per_site=1)
        (out / "run.log").write_text(link.log(outcome.run_id))
    stop.set()
    if not outcome.ok:
        raise SystemExit(f"the run failed: {outcome}; log {out / 'run.log'}")
    run_dir = out / "points" / config["run-name"]
    rows = round_records(run_dir)
    for r in rows:
        dp = r.get("client-dp", {})
        print(
            f"round {r['round']}: test accuracy {r['server'].get('accuracy', float('nan')):.3f}; "
            f"valid replies {r.get('train-replies', '-')}, stand-ins {len(r.get('stand-ins', []))}, "
            f"clipped {len(r.get('clipped', []))}; ε so far {dp.get('epsilon', 0.0):.3f}"
        )
    result = json.loads((run_dir / "result.json").read_text())
    dp = result["client-dp"]
    write_csv(Path(args.csv or out / f"client-dp-flower-{args.sites}.csv"), rows)
    print(
        f"{args.sites} sites, {args.rounds} rounds: client-level ε {dp['epsilon']:.3f} at δ {dp['delta']:g} "
        f"by the {dp['accounting']} books (PLD {dp.get('epsilon-pld', float('nan')):.3f}, Flower's RDP "
        f"{dp.get('epsilon-rdp', float('nan')):.3f}; σ {dp['noise-multiplier']:.3f}, clip {dp['clip']:g}, "
        f"{dp['releases']} releases); "
        f"stopped early: {result['stopped']}; {time.perf_counter() - start:.0f} s wall; "
        f"peak RSS of the process tree {peak[0]:,.0f} MB"
    )
    print(f"run dir: {run_dir}")


if __name__ == "__main__":
    main()
