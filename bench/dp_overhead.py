"""What does DP-SGD cost per step, for each trainable set? Non-private vs DP, side by side.

    python bench/dp_overhead.py [--trainables lora,ffa-lora,bias,head] [--modes hooks,ghost]
                                [--examples 256] [--batch-size 32] [--steps 6] [--device cuda]

Each (trainable, mode) runs in its own child process (so each peak RSS is its own) with the
library's one training loop (``train_local``) on the same BBC News examples and the embedded
MiniLM: non-private with batches of ``--batch-size``, DP-SGD (Opacus, ``grad-sample-mode`` =
each of ``--modes``) with Poisson sampling at the same expected batch (q = batch / examples),
noise multiplier 1, clip 1. A first ``train_local`` call is the warm-up (for ``head`` it also
encodes the examples once: ``setup s``); the second, ``--steps`` logical steps, is timed.
Prints examples/s, seconds per step, the DP / non-DP time ratio and the peak RSS per row.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time
import warnings

TRAINABLES = ["lora", "ffa-lora", "bias", "head"]


def _run(trainable: str, mode: str, args: argparse.Namespace, queue) -> None:
    import math

    import torch

    from fedllm.accounting import PrivacyPlan
    from fedllm.config import Settings
    from fedllm.data import load_splits, tokenize
    from fedllm.model import build_model, load_tokenizer
    from fedllm.train import train_local

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    private = mode != "non-private"
    settings = Settings(
        dataset=args.dataset,
        max_length=args.max_length,
        batch_size=args.batch_size,
        trainable=trainable,
        optimizer="sgd",
        lr=0.1,
        max_steps=args.steps,
        target_epsilon=8.0 if private else math.inf,
        sample_rate=args.batch_size / args.examples if private else 0.0,
        grad_sample_mode=mode if private else "hooks",
        device=args.device,
    )
    splits = load_splits(settings)
    data = tokenize(splits.train.head(args.examples), load_tokenizer(""), splits.labels, args.max_length)
    model = build_model(settings, splits.labels, torch.device(args.device))
    plan = None
    if private:  # a fixed noise multiplier: the cost per step does not depend on the budget
        plan = PrivacyPlan(1.0, settings.sample_rate, 1e-5, 4 * args.steps, 1e9, "prv")
    start = time.perf_counter()
    train_local(model, data, settings, plan=plan)
    setup = time.perf_counter() - start
    start = time.perf_counter()
    result = train_local(model, data, settings, plan=plan)
    if torch.device(args.device).type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    queue.put(
        {
            "trainable": trainable,
            "mode": mode,
            "setup_s": setup,
            "step_s": seconds / result.steps,
            "examples_s": result.examples_seen / seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trainables", default=",".join(TRAINABLES))
    parser.add_argument("--modes", default="hooks", help="Opacus grad-sample modes: hooks, functorch, ghost")
    parser.add_argument("--steps", type=int, default=6, help="timed logical steps per row")
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1")
    parser.add_argument("--dataset", default="bbc-news", help="bbc-news, drug-reviews or a data file")
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    print(
        f"{args.device}, {args.examples} examples, batch {args.batch_size} (DP: Poisson q = "
        f"{args.batch_size / args.examples:g}), max length {args.max_length}, {args.steps} timed steps"
    )
    print(
        f"{'trainable':10s} {'mode':12s} {'examples/s':>11s} {'s/step':>8s} {'DP/non-DP':>10s} "
        f"{'setup s':>8s} {'peak RSS MB':>12s}"
    )
    for trainable in args.trainables.split(","):
        base = None
        for mode in ["non-private", *args.modes.split(",")]:
            queue = ctx.Queue()
            proc = ctx.Process(target=_run, args=(trainable, mode, args, queue))
            proc.start()
            proc.join()
            if proc.exitcode != 0:
                print(f"{trainable:10s} {mode:12s} failed (exit code {proc.exitcode})")
                continue
            r = queue.get()
            base = r if mode == "non-private" else base
            ratio = r["step_s"] / base["step_s"] if base else float("nan")
            print(
                f"{trainable:10s} {mode:12s} {r['examples_s']:11.1f} {r['step_s']:8.3f} {ratio:10.2f} "
                f"{r['setup_s']:8.1f} {r['peak_rss_mb']:12.0f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
