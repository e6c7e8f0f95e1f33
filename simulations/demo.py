"""The short demo: a federated DP fine-tune of the embedded MiniLM on real drug reviews.

    python -m simulations.demo [--rounds 3] [--out runs/demo]

Three virtual hospitals (the drugs.com reviews split by ``condition``), FedAvg over LoRA
adapters, DP-SGD at epsilon = 8 per site, in Flower's Simulation Engine with the project's own
ServerApp and ClientApp. Prints the per-round scores and where the results are.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from simulations.engine import SimulationLink, virtual_site_policy


def main(argv: list[str] | None = None) -> None:
    """Run the demo federation and print where its results are."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    args = parser.parse_args(argv)
    out = args.out.resolve()
    config = {
        "dataset": "drug-reviews",
        "partitioning": "natural",
        "partition-column": "condition",
        "num-server-rounds": args.rounds,
        "min-train-nodes": args.sites,
        "min-available-nodes": args.sites,
        "epochs": 1,
        "target-epsilon": args.epsilon,
        **virtual_site_policy(args.epsilon),
        "run-dir": str(out),
        "run-name": time.strftime("%Y%m%d-%H%M%S"),
    }
    print(
        f"fedllm demo: {args.sites} sites x {args.rounds} rounds, DP-SGD epsilon={args.epsilon} "
        "per site, embedded MiniLM + LoRA, drug reviews split by condition"
    )
    with SimulationLink(out / ".flwr") as link:
        outcome = link.simulate(config, num_supernodes=args.sites)
        if not outcome.ok:
            print(link.log(outcome.run_id)[-5000:])
            raise SystemExit(f"the demo run failed: {outcome.status} {outcome.details}")
    run_dir = max(out.glob(f"{config['run-name']}*"), key=lambda p: p.stat().st_mtime)
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        eps = row.get("train", {}).get("epsilon-max")
        eps_text = f"  epsilon max over sites {eps:.2f}" if isinstance(eps, float) else ""
        print(
            f"round {row['round']}: server test accuracy {row['server']['accuracy']:.3f} "
            f"macro-F1 {row['server']['macro-f1']:.3f}{eps_text}"
        )
    print(f"done in {outcome.seconds:.0f} s. Results in {run_dir}:")
    print("  metrics.jsonl / metrics.csv  per-round scores, bytes, per-site epsilon")
    print("  final-adapter/               the global LoRA adapter (peft format) + labels.json")
    print("  round-NNN/, config.json, result.json")


if __name__ == "__main__":
    main()
