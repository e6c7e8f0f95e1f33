"""What does secure aggregation cost? Plain vs SecAgg+ rounds, side by side, in one invocation.

    python bench/secagg.py [--rounds 3] [--sites 5] [--out runs/bench-secagg]

Two real Flower simulations on one simulation SuperLink, the same settings but ``aggregation``:
BBC News, the embedded MiniLM, the DP recipe (head only, full-batch DP-SGD, ε 8), IID sites.
Per round it reads each run's log: seconds (the difference of ``wall-seconds``; the server's
test evaluation is in both) and bytes the sites uploaded (``bytes-received``: plain = the
adapters; secagg+ = public keys, encrypted shares, masked vectors and unmask shares). Writes
``secagg-bench.csv`` and prints a markdown table and both uploads' totals side by side.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from statistics import mean

from fedllm.contract import round_records
from simulations.superlink import SimulationLink, virtual_site_policy


def run_config(aggregation: str, sites: int, rounds: int, run_dir: Path) -> dict:
    """One point: BBC, the DP recipe's defaults, ``aggregation`` plain or secagg+."""
    return {
        "dataset": "bbc-news",
        "partitioning": "iid",
        "target-epsilon": 8.0,
        "num-server-rounds": rounds,
        "min-train-nodes": sites,
        "min-available-nodes": sites,
        "aggregation": aggregation,
        "aggregator": "fedavg",
        **virtual_site_policy(8.0, 0.0, False),
        "run-dir": str(run_dir),
        "run-name": aggregation.replace("+", "-plus"),
    }


def per_round(run_dir: Path) -> list[dict]:
    """Seconds, uploaded bytes and server accuracy of each round of one run."""
    rows = round_records(run_dir)
    return [
        {
            "round": r["round"],
            "seconds": r["wall-seconds"] - prev["wall-seconds"],
            "uploaded-bytes": r.get("bytes-received", 0),
            "accuracy": r["server"].get("accuracy", float("nan")),
            "stage-seconds": r.get("secagg", {}).get("stage-seconds", {}),
            "stage-bytes": r.get("secagg", {}).get("stage-bytes", {}),
        }
        for prev, r in zip(rows, rows[1:], strict=False)
    ]


def main(argv: list[str] | None = None) -> None:
    """Run both federations, write the CSV, print the comparison."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--out", default="runs/bench-secagg")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {}
    with SimulationLink(out / ".flwr") as link:
        for aggregation in ("plain", "secagg+"):
            config = run_config(aggregation, args.sites, args.rounds, out / "points")
            outcome = link.simulate(config, num_supernodes=args.sites, cpus_per_site=1)
            if not outcome.ok:
                raise SystemExit(f"{aggregation} failed: {outcome}\n{link.log(outcome.run_id)[-3000:]}")
            results[aggregation] = per_round(out / "points" / config["run-name"])
            (out / f"{config['run-name']}.log").write_text(link.log(outcome.run_id))
    with (out / "secagg-bench.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(
            fh,
            ["aggregation", "round", "seconds", "uploaded-bytes", "accuracy", "stage-seconds", "stage-bytes"],
        )
        writer.writeheader()
        for aggregation, rows in results.items():
            writer.writerows({"aggregation": aggregation, **r} for r in rows)
    print("| aggregation | s / round (mean) | uploaded B / round | final accuracy |")
    print("|---|---|---|---|")
    for aggregation, rows in results.items():
        seconds, uploaded = mean(r["seconds"] for r in rows), mean(r["uploaded-bytes"] for r in rows)
        print(f"| {aggregation} | {seconds:.2f} | {uploaded:,.0f} | {rows[-1]['accuracy']:.3f} |")
    plain = mean(r["uploaded-bytes"] for r in results["plain"])
    secure = mean(r["uploaded-bytes"] for r in results["secagg+"])
    print(
        f"uploaded per round, all sites, all stages: plain {plain:,.0f} B, secagg+ {secure:,.0f} B "
        f"= {secure / plain:.3f}x plain"
    )
    for r in results["secagg+"]:
        print(
            f"secagg+ round {r['round']}: stage seconds {r['stage-seconds']}; stage bytes {r['stage-bytes']}"
        )
    vector = mean(r["stage-bytes"].get("collect", 0) for r in results["secagg+"])
    key_bytes = secure - vector
    print(f"masked vectors {vector / plain:.3f}x the plain upload; key stages {key_bytes / plain:.3f}x it")
    extra = mean(r["seconds"] for r in results["secagg+"]) - mean(r["seconds"] for r in results["plain"])
    print(f"seconds per round, secagg+ minus plain: {extra:+.2f} s (mean of {len(results['plain'])} rounds)")
    keys = ("setup", "share-keys", "unmask")
    protocol = mean(sum(r["stage-seconds"].get(k, 0.0) for k in keys) for r in results["secagg+"])
    print(f"key stages (setup + share-keys + unmask): {protocol:.2f} s per round on average")
    clipped = [line for line in (out / "secagg-plus.log").read_text().splitlines() if "clipped to" in line]
    print(f"{len(clipped)} site log lines on clipping, e.g. {clipped[:2]}")
    print(f"CSV: {out / 'secagg-bench.csv'}")


if __name__ == "__main__":
    main()
