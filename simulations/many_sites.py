"""Client-level DP over many small sites: 100 to 1,000 virtual sites, in-process, through the
real server strategy (server/client_dp.py: validation, server-side clipping, Flower's wrapper and
the run's accountant: dp-accounting's PLD behind Flower's protocol, or Flower's RDP).

    python -m simulations.many_sites [--sites 100,500,1000] [--epsilons 1,3,8,inf] [--rounds 10]
        [--dataset bbc-news] [--seeds 0,1,2] [--out runs/many-sites] [--tune] [--accountant pld|rdp]

The frozen MiniLM's pooled features of every text are computed once (fedllm/features.py) and
kept in ``--out``; 15% of the training split is held out as validation (settings are chosen
there), the rest is dealt IID over N sites. Each round every site starts from the global head, takes
``--local-steps`` full-batch gradient steps at ``--lr`` on its own texts (all sites at once, as
one batched tensor: the only in-process shortcut) and answers a train reply; a scripted grid
hands the replies to ``ClientDPFedAvg.start`` — Flower's own round loop — which validates,
clips to ``--clip``, averages uniformly and adds Flower's noise σC/N, with σ calibrated so
``--rounds`` releases spend the target ε by ``--accountant`` (add/remove one site, δ 1e-5, no
amplification: every
site takes part every round). ε = inf is the same federation without client-level DP (no
clipping, no noise). Writes ``many-sites.csv``: validation and test accuracy, the ε of the same
releases by Flower's RDP and by dp-accounting's PLD (one of them the run's books), seconds, and
the process RSS (psutil) after each point and its peak. ``--tune`` scores a small (lr, steps,
clip) grid on validation at ε 3 first and sweeps with the best (chosen on validation, never on
test).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import logging
import math
import resource
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedllm.config import Settings
from fedllm.data import load_splits, stratified_split, tokenize
from fedllm.features import pooled_features
from fedllm.model import build_model, load_tokenizer
from server.client_dp import WEIGHT, ClientDPFedAvg, UniformFedAvg
from server.settings import ClientDPSettings

DELTA = 1e-5
TUNE_EPSILON = 3.0  # the middle budget; settings chosen there serve all three
VALIDATION_FRACTION = 0.15  # of the training split, held out to choose the settings


def features(dataset: str, cache: Path) -> dict:
    """Pooled encoder features and labels of the train / validation / test splits (cached)."""
    path = cache / f"features-{dataset}.pt"
    if path.exists():
        return torch.load(path)
    settings = Settings(dataset=dataset, trainable="head", target_epsilon=math.inf).resolved()
    splits = load_splits(settings)
    model = build_model(settings, splits.labels, torch.device("cpu"))
    tokenizer = load_tokenizer(settings.model)
    out: dict = {"labels": splits.labels}
    train, validation = stratified_split(splits.train, VALIDATION_FRACTION, settings.seed)  # choose here
    for name, frame in (("train", train), ("validation", validation), ("test", splits.test)):
        data = tokenize(frame, tokenizer, splits.labels, settings.max_length, settings.truncation)
        out[name] = pooled_features(model, data).tensors
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    return out


class Sites:
    """N sites' training texts (features), padded into one tensor, trained all at once."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, num_sites: int, seed: int):
        order = np.random.default_rng(seed).permutation(len(y))
        parts = np.array_split(order, num_sites)
        width = max(len(p) for p in parts)
        self.x = torch.zeros(num_sites, width, x.shape[1])
        self.y = torch.zeros(num_sites, width, dtype=torch.long)
        self.mask = torch.zeros(num_sites, width)
        for i, p in enumerate(parts):
            self.x[i, : len(p)], self.y[i, : len(p)], self.mask[i, : len(p)] = x[p], y[p], 1.0
        self.counts = [len(p) for p in parts]

    def train(self, weight: torch.Tensor, bias: torch.Tensor, steps: int, lr: float):
        """Each site's head after ``steps`` full-batch gradient steps on its mean cross-entropy."""
        n = len(self.counts)
        w = weight.expand(n, *weight.shape).clone().requires_grad_(True)
        b = bias.expand(n, *bias.shape).clone().requires_grad_(True)
        for _ in range(steps):
            logits = torch.einsum("skd,scd->skc", self.x, w) + b[:, None, :]
            loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), self.y, reduction="none")
            per_site = (loss * self.mask).sum(1) / self.mask.sum(1)
            gw, gb = torch.autograd.grad(per_site.sum(), (w, b))
            with torch.no_grad():
                w -= lr * gw
                b -= lr * gb
        return w.detach(), b.detach()


def _reply(node: int, arrays: dict[str, np.ndarray], metrics: dict) -> Message:
    meta = Metadata(1, f"reply-{node}-{time.time_ns()}", node, 1, "", "", time.time(), 3600.0, "train")
    content = {
        "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
        "metrics": MetricRecord(metrics),
    }
    return Message(RecordDict(content), metadata=meta)


class SitesGrid:
    """The part of a Grid that ``Strategy.start`` uses: every message answered by its site."""

    def __init__(self, sites: Sites, steps: int, lr: float):
        self.sites, self.steps, self.lr = sites, steps, lr

    def get_node_ids(self) -> list[int]:
        return list(range(1, len(self.sites.counts) + 1))

    def send_and_receive(self, messages, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        if not messages:
            return []
        glob = messages[0].content["arrays"]
        w, b = (torch.from_numpy(glob[k].numpy()) for k in ("classifier.weight", "classifier.bias"))
        ws, bs = self.sites.train(w, b, self.steps, self.lr)
        replies = []
        for m in messages:
            i = m.metadata.dst_node_id - 1
            metrics = {
                "num-examples": self.sites.counts[i],
                "steps": self.steps,
                "epsilon": math.inf,
                WEIGHT: 1.0,
            }
            arrays = {"classifier.weight": ws[i].numpy(), "classifier.bias": bs[i].numpy()}
            replies.append(_reply(m.metadata.dst_node_id, arrays, metrics))
        return replies


def accuracy(arrays: ArrayRecord, x: torch.Tensor, y: torch.Tensor) -> float:
    """The head's accuracy on (features, labels)."""
    w, b = (torch.from_numpy(arrays[k].numpy()) for k in ("classifier.weight", "classifier.bias"))
    return float(((x @ w.T + b).argmax(1) == y).float().mean())


def run_point(data: dict, num_sites: int, epsilon: float, args) -> dict:
    """One federation of ``num_sites`` sites at client-level ``epsilon``: its row of the CSV."""
    start = time.perf_counter()
    sites = Sites(*data["train"], num_sites, args.seed)
    grid = SitesGrid(sites, args.local_steps, args.lr)
    kw = {"min_train_nodes": num_sites, "min_available_nodes": num_sites, "fraction_evaluate": 0.0}
    if math.isinf(epsilon):
        strategy = UniformFedAvg(weighted_by_key=WEIGHT, **kw)
    else:
        dp = ClientDPSettings(epsilon, DELTA, args.clip, 0.0, num_sites, args.accountant)
        strategy = ClientDPFedAvg(dp, args.rounds, 1e6, **kw)
    classes, width = len(data["labels"]), data["train"][0].shape[1]
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)  # Flower's noise draws from numpy's global generator
    initial = ArrayRecord({"classifier.weight": Array(np.zeros((classes, width), np.float32)),
                           "classifier.bias": Array(np.zeros(classes, np.float32))})  # fmt: skip
    result = strategy.start(grid, initial, num_rounds=args.rounds, train_config=ConfigRecord())
    final = strategy.global_arrays if isinstance(strategy, ClientDPFedAvg) else result.arrays
    row = {"dataset": args.dataset, "sites": num_sites, "target-epsilon": epsilon, "rounds": args.rounds}
    row |= {"texts-per-site": f"{min(sites.counts)}-{max(sites.counts)}"}
    row |= {
        "validation-accuracy": accuracy(final, *data["validation"]),
        "test-accuracy": accuracy(final, *data["test"]),
    }
    if isinstance(strategy, ClientDPFedAvg):
        spent = strategy.spent()
        row |= {
            "noise-multiplier": spent["noise-multiplier"],
            "clip": args.clip,
            "epsilon-flower-rdp": spent["epsilon-rdp"],
        }
        row |= {
            "epsilon-pld": spent["epsilon-pld"],
            "releases": spent["releases"],
        }
    row |= {
        "seconds": round(time.perf_counter() - start, 2),
        "rss-mb": psutil.Process().memory_info().rss / 2**20,
    }
    row["peak-rss-mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sites", default="100,500,1000")
    parser.add_argument("--epsilons", default="1,3,8,inf")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--dataset", default="bbc-news")
    parser.add_argument("--seeds", default="0,1,2", help="one federation per seed (partition, noise)")
    parser.add_argument("--out", default="runs/many-sites")
    parser.add_argument("--tune", action="store_true")
    parser.add_argument(
        "--accountant", choices=("pld", "rdp"), default="pld", help="the run's books (σ calibrated by it)"
    )
    return parser.parse_args(argv)


def tune(data: dict, args: argparse.Namespace) -> dict:
    """The (lr, local steps, clip) with the best mean validation accuracy at the first seed,
    over ``--sites`` at ε 3; every point's line is printed, the choice is returned."""
    scores: dict[tuple, list[float]] = {}
    for num_sites in (int(s) for s in args.sites.split(",")):
        for lr, steps, clip in itertools.product((0.3, 1.0, 3.0), (1, 5), (0.3, 1.0, 3.0)):
            args.lr, args.local_steps, args.clip = lr, steps, clip
            row = run_point(data, num_sites, TUNE_EPSILON, args)
            scores.setdefault((lr, steps, clip), []).append(row["validation-accuracy"])
            print(f"tune: N {num_sites} ε {TUNE_EPSILON} lr {lr} steps {steps} clip {clip}: "
                  f"validation {row['validation-accuracy']:.3f}", flush=True)  # fmt: skip
    lr, steps, clip = max(scores, key=lambda k: sum(scores[k]) / len(scores[k]))
    return {"lr": lr, "local-steps": steps, "clip": clip, "validation-accuracy": scores[(lr, steps, clip)]}


def sweep(data: dict, args: argparse.Namespace) -> list[dict]:
    """One row per (sites, ε, seed)."""
    rows = []
    for num_sites in (int(s) for s in args.sites.split(",")):
        for epsilon in (float(e) for e in args.epsilons.split(",")):
            for seed in (int(s) for s in args.seeds.split(",")):
                args.seed = seed
                rows.append({"seed": seed, **run_point(data, num_sites, epsilon, args)})
                print(
                    {k: round(v, 4) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True
                )
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: test accuracy (mean ± sd over seeds) by sites × ε, with ε spent and the RSS."""
    epsilons = list(dict.fromkeys(r["target-epsilon"] for r in rows))
    head = " | ".join(f"ε {e:g}" if math.isfinite(e) else "no client-level DP" for e in epsilons)
    lines = [f"| sites | texts a site | {head} | RSS after (MB) |", "|---" * (len(epsilons) + 3) + "|"]
    for n in dict.fromkeys(r["sites"] for r in rows):
        cells = []
        for e in epsilons:
            acc = np.array([r["test-accuracy"] for r in rows if r["sites"] == n and r["target-epsilon"] == e])
            cells.append(f"{acc.mean():.3f} ± {acc.std(ddof=1) if len(acc) > 1 else 0:.3f}")
        mine = [r for r in rows if r["sites"] == n]
        rss = max(r["rss-mb"] for r in mine)
        lines.append(f"| {n} | {mine[0]['texts-per-site']} | {' | '.join(cells)} | {rss:,.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``--tune`` first (the choice is written to ``chosen-<dataset>.json`` and used), then the
    sweep; prints one line per point and writes ``many-sites-<dataset>.csv``."""
    args = _parse(argv)
    args.seed = int(args.seeds.split(",")[0])
    logging.getLogger("flwr").setLevel(logging.WARNING)  # Flower's per-round lines, x 1,000 sites
    TaskIdentity._task_id = TaskIdentity._run_id = TaskIdentity._node_id = 1  # as the ServerApp runtime
    out = Path(args.out)
    data = features(args.dataset, out)
    if args.tune:
        chosen = tune(data, args)
        (out / f"chosen-{args.dataset}.json").write_text(json.dumps(chosen, indent=1))
        print(f"chosen on validation: {chosen}", flush=True)
        args.lr, args.local_steps, args.clip = chosen["lr"], chosen["local-steps"], chosen["clip"]
    rows = sweep(data, args)
    path = out / f"many-sites-{args.dataset}.csv"
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
    summary = table(rows)
    path.with_suffix(".md").write_text(summary + "\n")
    print(summary)
    print(f"CSV: {path}")


if __name__ == "__main__":
    main()
