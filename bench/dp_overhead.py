"""What does DP-SGD cost per step? Same batches, same model, non-private vs Opacus modes.

    python bench/dp_overhead.py [--steps 6] [--batch-size 32] [--max-length 128] [--device cuda]

Each mode runs in its own child process (so each peak RSS is its own) on the same BBC News
batches and the embedded MiniLM + LoRA; the first step is a warm-up and is not timed.
Prints samples/s, seconds per step, the time ratio DP / non-DP and the peak RSS per mode.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time
import warnings

MODES = ["non-private", "hooks", "functorch", "ghost"]


def _run(mode: str, steps: int, batch_size: int, max_length: int, device: str, dataset: str, queue) -> None:
    import torch
    from opacus import PrivacyEngine
    from torch.nn import functional as F
    from torch.utils.data import DataLoader, Subset

    from fedllm.config import Settings
    from fedllm.data import load_splits, tokenize
    from fedllm.model import build_model, load_tokenizer

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    settings = Settings(dataset=dataset, max_length=max_length, batch_size=batch_size)
    splits = load_splits(settings)
    data = tokenize(
        splits.train.head(batch_size * (steps + 1)), load_tokenizer(""), splits.labels, max_length
    )
    loader = DataLoader(Subset(data, range(len(data))), batch_size=batch_size, shuffle=False)
    model = build_model(settings, splits.labels, torch.device(device))
    cuda = torch.device(device).type == "cuda"
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    criterion = torch.nn.CrossEntropyLoss()
    net = model
    if mode != "non-private":
        engine = PrivacyEngine(accountant="prv")
        out = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            poisson_sampling=False,  # same batches for every mode
            grad_sample_mode=mode,
            criterion=criterion,
        )
        net, optimizer = out[0], out[1]
        criterion = out[2] if mode == "ghost" else criterion
    net.train()  # Opacus records activations in training mode only
    times = []
    for input_ids, mask, labels in loader:
        input_ids, mask, labels = input_ids.to(device), mask.to(device), labels.to(device)
        start = time.perf_counter()
        logits = net(input_ids=input_ids, attention_mask=mask).logits
        loss = criterion(logits, labels) if mode == "ghost" else F.cross_entropy(logits, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    timed = times[1:]
    step = sum(timed) / len(timed)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu_mb = torch.cuda.max_memory_allocated() / 2**20 if cuda else 0.0
    queue.put(
        {
            "mode": mode,
            "step_s": step,
            "samples_s": batch_size / step,
            "peak_rss_mb": peak_mb,
            "gpu_mb": gpu_mb,
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=6, help="timed steps per mode")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1")
    parser.add_argument("--dataset", default="bbc-news", help="bbc-news, drug-reviews or a data file")
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    results = []
    for mode in args.modes.split(","):
        queue = ctx.Queue()
        proc = ctx.Process(
            target=_run,
            args=(mode, args.steps, args.batch_size, args.max_length, args.device, args.dataset, queue),
        )
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            print(f"{mode:12s} failed (exit code {proc.exitcode})")
            continue
        results.append(queue.get())
    base = next((r for r in results if r["mode"] == "non-private"), None)
    print(
        f"{args.device}, batch {args.batch_size}, max length {args.max_length}, "
        f"{args.steps} timed steps per mode"
    )
    print(
        f"{'mode':12s} {'samples/s':>10s} {'s/step':>8s} {'DP/non-DP':>10s} "
        f"{'peak RSS MB':>12s} {'GPU MB':>8s}"
    )
    for r in results:
        ratio = r["step_s"] / base["step_s"] if base else float("nan")
        print(
            f"{r['mode']:12s} {r['samples_s']:10.2f} {r['step_s']:8.3f} {ratio:10.2f} "
            f"{r['peak_rss_mb']:12.0f} {r['gpu_mb']:8.0f}"
        )


if __name__ == "__main__":
    main()
