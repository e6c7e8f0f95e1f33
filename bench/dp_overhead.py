"""What does DP-SGD cost per step, and what do the encoder's fast paths buy? Side by side.

    python bench/dp_overhead.py [--trainables lora,ffa-lora,bias,head] [--modes hooks,ghost]
                                [--examples 256] [--batch-size 32] [--steps 6] [--device cuda]
    python bench/dp_overhead.py --speed [--lora-layers 2] [--profile] [--csv docs/encoder-speed-bench.csv]

Each row runs in its own child process (so each peak RSS is its own) with the library's one
training loop (``train_local``) on the same BBC News examples and the embedded MiniLM:
non-private with batches of ``--batch-size``, DP-SGD (Opacus, ``grad-sample-mode`` = each of
``--modes``) with Poisson sampling at the same expected batch (q = batch / examples), noise
multiplier 1, clip 1. A first ``train_local`` call is the warm-up (for ``head`` it also encodes
the examples once, for a cached prefix it computes the bottom layers once: ``setup s``); the
second, ``--steps`` logical steps, is timed. Prints examples/s, seconds per step, the DP /
non-DP time ratio and the peak RSS per row.

``--speed``: DP ``ffa-lora`` only, one row per fast path, with the CPU's bf16 flags: every layer
in fp32 (the reference) and bf16, then the top ``--lora-layers`` k layers uncached and on the
cached frozen prefix, each in fp32 and bf16; the last column is examples/s over the reference's.
``--profile`` prints torch.profiler's top operators of one DP step of each ``--speed`` row.
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing as mp
import resource
import time
import warnings

TRAINABLES = ["lora", "ffa-lora", "bias", "head"]


def speed_variants(lora_layers: int) -> list[tuple[str, dict]]:
    """The ``--speed`` rows: (label, settings changes) for DP ``ffa-lora``."""
    top = {"lora_layers": lora_layers}
    return [
        ("all layers, fp32", {"precision": "fp32"}),
        ("all layers, bf16", {"precision": "bf16"}),
        (f"top {lora_layers}, fp32", {**top, "precision": "fp32", "prefix_cache": False}),
        (f"top {lora_layers}, fp32, cached", {**top, "precision": "fp32"}),
        (f"top {lora_layers}, bf16", {**top, "precision": "bf16", "prefix_cache": False}),
        (f"top {lora_layers}, bf16, cached", {**top, "precision": "bf16"}),
    ]


def _profile(model, data, settings, plan) -> None:
    from torch.profiler import ProfilerActivity, profile

    from fedllm.train import train_local

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train_local(model, data, settings.replace(max_steps=1), plan=plan)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8), flush=True)


def _run(trainable: str, mode: str, args: argparse.Namespace, queue, variant: dict | None = None) -> None:
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
        precision="fp32",
    ).replace(**(variant or {}))
    settings = settings.resolved()  # once, where this bench run starts
    splits = load_splits(settings)
    data = tokenize(splits.train.head(args.examples), load_tokenizer(""), splits.labels, args.max_length)
    model = build_model(settings, splits.labels, torch.device(args.device))
    plan = None
    if private:  # a fixed noise multiplier: the cost per step does not depend on the budget
        plan = PrivacyPlan(1.0, settings.sample_rate, 1e-5, 8 * args.steps, 1e9, "prv")
    start = time.perf_counter()
    train_local(model, data, settings, plan=plan)
    setup = time.perf_counter() - start
    start = time.perf_counter()
    result = train_local(model, data, settings, plan=plan)
    if torch.device(args.device).type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if args.profile and private:
        _profile(model, data, settings, plan)
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


def _child(trainable: str, mode: str, args: argparse.Namespace, variant: dict | None = None) -> dict | None:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_run, args=(trainable, mode, args, queue, variant))
    proc.start()
    proc.join()
    return queue.get() if proc.exitcode == 0 else None


def _speed_table(args: argparse.Namespace) -> None:
    import torch

    from fedllm.precision import BF16_CPU_FLAGS, cpu_flags, resolve_precision

    found = sorted(f for f in cpu_flags() if f in BF16_CPU_FLAGS or f.startswith("amx"))
    auto = resolve_precision("auto", torch.device(args.device))
    print(f"CPU flags: {' '.join(found) or 'none of ' + ', '.join(BF16_CPU_FLAGS)}; precision auto = {auto}")
    print(
        f"{'ffa-lora, DP (hooks)':28s} {'examples/s':>11s} {'s/step':>8s} {'setup s':>8s} "
        f"{'peak RSS MB':>12s} {'speed-up':>9s}"
    )
    reference, rows = None, []
    for label, variant in speed_variants(args.lora_layers):
        r = _child("ffa-lora", "hooks", args, variant)
        if r is None:
            print(f"{label:28s} failed")
            continue
        reference = reference or r
        speedup = r["examples_s"] / reference["examples_s"]
        print(
            f"{label:28s} {r['examples_s']:11.1f} {r['step_s']:8.3f} {r['setup_s']:8.1f} "
            f"{r['peak_rss_mb']:12.0f} {speedup:8.2f}x",
            flush=True,
        )
        rows.append({"variant": label, **variant, **r, "speedup": speedup, "cpu_flags": " ".join(found)})
    if args.csv:
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=sorted({k for row in rows for k in row}))
            writer.writeheader()
            writer.writerows(rows)


def _overhead_table(args: argparse.Namespace) -> None:
    print(
        f"{'trainable':10s} {'mode':12s} {'examples/s':>11s} {'s/step':>8s} {'DP/non-DP':>10s} "
        f"{'setup s':>8s} {'peak RSS MB':>12s}"
    )
    for trainable in args.trainables.split(","):
        base = None
        for mode in ["non-private", *args.modes.split(",")]:
            r = _child(trainable, mode, args)
            if r is None:
                print(f"{trainable:10s} {mode:12s} failed")
                continue
            base = r if mode == "non-private" else base
            ratio = r["step_s"] / base["step_s"] if base else float("nan")
            print(
                f"{trainable:10s} {mode:12s} {r['examples_s']:11.1f} {r['step_s']:8.3f} {ratio:10.2f} "
                f"{r['setup_s']:8.1f} {r['peak_rss_mb']:12.0f}",
                flush=True,
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
    parser.add_argument("--speed", action="store_true", help="DP ffa-lora: fp32 / bf16 / cached prefix")
    parser.add_argument("--lora-layers", type=int, default=2, help="--speed: the top k layers adapted")
    parser.add_argument("--profile", action="store_true", help="--speed: torch.profiler on one DP step")
    parser.add_argument("--csv", default="", help="--speed: also write the rows to this CSV file")
    args = parser.parse_args()
    print(
        f"{args.device}, {args.examples} examples, batch {args.batch_size} (DP: Poisson q = "
        f"{args.batch_size / args.examples:g}), max length {args.max_length}, {args.steps} timed steps"
    )
    if args.speed:
        _speed_table(args)
    else:
        _overhead_table(args)


if __name__ == "__main__":
    main()
