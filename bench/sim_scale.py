"""Does simulating more sites cost more memory? 10, 100, 1000 virtual sites, few per round.

    python bench/sim_scale.py [--sites 10,100,1000] [--per-round 5] [--rounds 2]

Each setting is one real Flower simulation (this project's apps) with a tiny random BERT and
the BBC News articles cut into sentences (about 40k real texts, so even 1000 sites have data).
Prints seconds per round and the peak RSS of the whole simulation process tree (SuperLink,
simulation runtime, Ray workers), sampled every 0.5 s.
"""

from __future__ import annotations

import argparse
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import psutil
import torch
from transformers import BertConfig, BertModel

from fedllm.contract import round_records
from fedllm.data import read_bbc_news
from fedllm.model import embedded_model_path
from simulations.superlink import SimulationLink, virtual_site_policy


def tiny_checkpoint(path: Path) -> Path:
    """A tiny random BERT with the embedded model's tokenizer."""
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    BertModel(config).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(embedded_model_path() / name, path / name)
    return path


def sentence_csv(path: Path) -> Path:
    """BBC News articles split into sentences (label = the article's desk)."""
    rows = []
    for text, label in read_bbc_news()[["text", "label"]].itertuples(index=False):
        rows += [(s, label) for s in re.split(r"(?<=[.!?])\s+", text) if len(s) > 40]
    pd.DataFrame(rows, columns=["text", "label"]).to_csv(path, index=False)
    return path


class PeakRSS:
    """Samples the summed RSS of a process and all its descendants."""

    def __init__(self, pid: int):
        self.root = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            for proc in [self.root, *self.root.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:  # a process ended between listing and reading
                    continue
            self.peak = max(self.peak, total)
            time.sleep(0.5)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sites", default="10,100,1000")
    parser.add_argument("--per-round", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedllm-scale-"))
    model = tiny_checkpoint(work / "tiny-bert")
    data = sentence_csv(work / "bbc-sentences.csv")
    print(f"data: {sum(1 for _ in data.open()) - 1} sentences; model: tiny random BERT")
    results = []
    for n in [int(x) for x in args.sites.split(",")]:
        config = {
            "model": str(model),
            "dataset": str(data),
            "partitioning": "iid",
            "num-server-rounds": args.rounds,
            "fraction-train": args.per_round / n,
            "fraction-evaluate": args.per_round / n,
            "min-train-nodes": args.per_round,
            "min-available-nodes": n,
            "max-steps": 1,
            "max-length": 32,
            "batch-size": 8,
            "server-eval": False,
            "run-dir": str(work / "runs"),
            "run-name": f"sites-{n}",
            # the virtual sites release their local scores (a real site must opt in)
            **virtual_site_policy(8.0, release_evaluation=True),
        }
        with SimulationLink(work / f"flwr-{n}") as link, PeakRSS(link.proc.pid) as rss:
            outcome = link.simulate(config, num_supernodes=n, timeout=3600)
        if not outcome.ok:
            raise SystemExit(f"{n} sites: {outcome.status} {outcome.details}")
        rows = round_records(work / "runs" / f"sites-{n}")
        per_round = (rows[-1]["wall-seconds"] - rows[0]["wall-seconds"]) / args.rounds
        results.append((n, per_round, rss.peak / 2**20, outcome.seconds))
        print(
            f"{n:5d} sites: {per_round:6.1f} s/round, peak RSS {rss.peak / 2**20:7.0f} MB, "
            f"run {outcome.seconds:.0f} s",
            flush=True,
        )
    print(f"\n{args.per_round} sites per round, {args.rounds} rounds, tiny BERT, 1 local step")
    print(f"{'sites':>6s} {'s/round':>8s} {'peak RSS MB':>12s} {'run s':>7s}")
    for n, per_round, peak, total in results:
        print(f"{n:6d} {per_round:8.1f} {peak:12.0f} {total:7.0f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
