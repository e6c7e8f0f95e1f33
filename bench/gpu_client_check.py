"""GPU check of the client path: the ClientApp's own train/evaluate functions on a CUDA device.

    python bench/gpu_client_check.py [--model PATH] [--rounds 2] [--dataset drug-reviews]

Calls ``clients.app.train`` once per round with one site's Context (its privacy state kept in
``context.state`` between rounds, as Flower does), DP-SGD on, ``device = auto``; then
``clients.app.evaluate_global``. Checks and prints: the model trained on CUDA, the adapter
changed every round, the reply is float32 on the CPU (the wire), epsilon grew and equals the
accountant's value for the steps taken, and seconds per round. Exits non-zero on a failed check.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, Metadata, RecordDict

from clients.app import evaluate_global, train
from clients.books import STATE_KEY
from fedllm.accounting import epsilon_for
from fedllm.adapters import adapter_to_record
from fedllm.config import settings_from
from fedllm.contract import SERVER_ROUND, evaluate_config, train_config
from fedllm.data import load_splits
from fedllm.model import build_model, pick_device

ROOT = Path(__file__).resolve().parents[1]


def _check(ok: bool, what: str) -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {what}")
    if not ok:
        sys.exit(1)


def _instruction(content: RecordDict, message_type: str) -> Message:
    """A message as the SuperLink would deliver it to the site (node 1 of run 1)."""
    meta = Metadata(
        run_id=1,
        message_id=f"{message_type}-{time.time_ns()}",
        src_node_id=0,
        dst_node_id=1,
        reply_to_message_id="",
        group_id="",
        created_at=time.time(),
        ttl=3600.0,
        message_type=message_type,
    )
    return Message(content, metadata=meta)


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="", help="BERT path or hub id ('' = the embedded MiniLM)")
    parser.add_argument("--dataset", default="drug-reviews")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--target-epsilon", type=float, default=8.0)
    parser.add_argument("--cpu", action="store_true", help="dry run of the same checks on a CPU-only machine")
    return parser.parse_args()


def _site(args: argparse.Namespace) -> tuple[Context, list[str], ArrayRecord]:
    """Site 0 of ``--sites`` (a virtual site), the run's labels and the initial global adapter."""
    run_config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    run_config.update(
        {
            "model": args.model,
            "dataset": args.dataset,
            "target-epsilon": args.target_epsilon,
            "num-server-rounds": args.rounds,
            "device": "cpu" if args.cpu else "auto",
            "sim-site-release-evaluation": True,  # the check's virtual site scores its test split
        }
    )
    settings = settings_from(run_config).resolved()
    labels = load_splits(settings).labels
    context = Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 0, "num-partitions": args.sites},
        state=RecordDict(),
        run_config=run_config,
    )
    global_model = build_model(settings, labels, torch.device("cpu"))
    return context, labels, adapter_to_record(global_model)


def _train_rounds(
    args: argparse.Namespace, context: Context, labels: list[str], arrays: ArrayRecord
) -> tuple[list[float], float, ArrayRecord]:
    """Every round through ``clients.app.train``: the run's ε after each, its δ, the last adapter."""
    gpu, epsilons, delta = not args.cpu, [], 0.0
    for server_round in range(1, args.rounds + 1):
        config = train_config(labels, args.rounds, str(context.run_id))  # as the server sends it
        config[SERVER_ROUND] = server_round  # as Flower's strategy adds it
        msg = _instruction(RecordDict({"arrays": arrays, "config": config}), "train")
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        reply = train(msg, context)
        seconds = time.perf_counter() - start
        metrics = reply.content.metric_records["metrics"]
        new = reply.content.array_records["arrays"].to_numpy_ndarrays()
        old = arrays.to_numpy_ndarrays()
        peak_mb = torch.cuda.max_memory_allocated() / 2**20 if gpu else 0.0
        print(
            f"round {server_round}: {metrics['steps']} DP steps on {metrics['num-examples']} texts, "
            f"{seconds:.1f} s (model load included), peak GPU memory {peak_mb:.0f} MiB, "
            f"epsilon so far {metrics['epsilon']:.3f}"
        )
        if gpu:
            _check(peak_mb > 50, f"round {server_round} trained on the GPU")
        _check(all(a.dtype == np.float32 for a in new), "reply arrays are float32 numpy (CPU)")
        _check(any(not np.array_equal(a, b) for a, b in zip(new, old, strict=True)), "the adapter changed")
        epsilons.append(float(str(metrics["epsilon"])))
        delta = float(str(metrics["delta"]))
        arrays = reply.content.array_records["arrays"]
    return epsilons, delta, arrays


def main() -> None:
    """The checks above; exits 1 at the first that fails."""
    args = _arguments()
    if not args.cpu:
        _check(torch.cuda.is_available(), "CUDA is available")
        _check(pick_device("auto").type == "cuda", "device 'auto' picks the GPU")
        print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    context, labels, arrays = _site(args)
    epsilons, delta, arrays = _train_rounds(args, context, labels, arrays)
    _check(all(a < b for a, b in zip(epsilons, epsilons[1:], strict=False)), f"epsilon grows: {epsilons}")
    history = json.loads(str(context.state.config_records[STATE_KEY]["history"]))
    settings = settings_from(context.run_config)
    reference = epsilon_for(history, delta, settings.accountant)
    _check(abs(reference - epsilons[-1]) < 1e-9, f"epsilon {epsilons[-1]:.4f} = accountant {reference:.4f}")
    _check(epsilons[-1] <= args.target_epsilon + 1e-6, f"epsilon within the target {args.target_epsilon}")
    config = evaluate_config(labels, str(context.run_id))
    msg = _instruction(RecordDict({"arrays": arrays, "config": config}), "evaluate")
    scores = evaluate_global(msg, context).content.metric_records["metrics"]
    print(f"local test split: accuracy {scores['accuracy']:.3f}, macro-F1 {scores['macro-f1']:.3f}")
    print("GPU client-path check passed")


if __name__ == "__main__":
    main()
