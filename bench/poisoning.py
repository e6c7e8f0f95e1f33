"""One poisoning site of five: server test accuracy for each attack under each aggregator setting.

    python bench/poisoning.py --seeds 0,1,2                      # the full table (BBC News)
    python bench/poisoning.py --rounds 1 --seeds 0 --attacks sign-flip --settings plain,robust

A federation in one process, as bench/dp_recipe.py runs it (the sites' shards, the one training
loop with each site's DP plan, the adapter wire), but every round's replies are Flower messages
handed to the server's own strategy (``server.strategy.AdapterFedAvg.aggregate_train``: reply
validation, norm clipping, weight cap, aggregator), so the numbers measure what the server does.
Defaults: BBC News, 5 sites, Dirichlet α = 1.0, 8 rounds × 3 local steps, target ε 8, the DP
recipe's head; site ``--attacker`` (0) is the malicious one.

Per run it counts the rounds in which the attacker's reply was dropped, clipped, capped or
discounted (``cosine``), the honest site-rounds discounted, the min / mean / max of the
attacker's and the honest sites' per-round direction scores, and their direction evidence after
the last round (``server.robust.direction_weights``).

Attacks: ``none``; ``sign-flip`` (its trained update × -1e6); ``random`` (a random update of norm
``--random-norm``); ``label-flip`` (it trains honestly on labels shifted by one class);
``inflated`` (honest update, ``num-examples`` 1e12); ``inflated-valid`` (honest update, the
largest ``num-examples`` the validation accepts: just under 1/δ and ``max-num-examples``, so
only the weight cap stands against it). Settings: ``plain`` (FedAvg, no norm bound, no weight
cap; replies are still validated, as the server always does), ``robust`` (the server default:
``cosine``), ``fedavg`` (the default before ``cosine``: FedAvg with the bounds), ``median``,
``trimmed-mean``, ``krum`` (each with the default bounds), ``bulyan`` on request
(it needs 7 sites for f = 1). ``--robust '{"max-update-norm": "1x"}'`` changes the run config of
every setting but ``plain``. DP sampling and noise draw from OS entropy (fedllm.train), so a
rerun differs by the DP noise: compare means over ``--seeds``.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from replies import train_reply

from fedllm.accounting import counted_plan
from fedllm.adapters import adapter_state, set_adapter_arrays
from fedllm.config import settings_from
from fedllm.data import load_splits, loss_weights, partition_sites, tokenize
from fedllm.model import build_model, load_tokenizer
from fedllm.train import evaluate, train_local
from server.robust import RobustSettings
from server.strategy import AdapterFedAvg

ATTACKS = ("none", "sign-flip", "random", "label-flip", "inflated", "inflated-valid")
SETTINGS = {  # run config keys, as the server reads them (RobustSettings.from_run_config)
    "plain": {"aggregator": "fedavg", "max-update-norm": 0, "max-site-weight": 0},
    "robust": {},
    "fedavg": {"aggregator": "fedavg"},
    "median": {"aggregator": "median"},
    "trimmed-mean": {"aggregator": "trimmed-mean"},
    "krum": {"aggregator": "krum"},
    "bulyan": {"aggregator": "bulyan"},
}


def _reply(node: int, arrays: dict[str, np.ndarray], metrics: dict) -> Message:
    """A train reply as the SuperLink hands it to the ServerApp."""
    record = ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})
    return train_reply(node, RecordDict({"arrays": record, "metrics": MetricRecord(metrics)}))


def _flip_labels(frame, column: str, labels: list[str]):
    """The same texts with every label moved to the next class."""
    shifted = {name: labels[(i + 1) % len(labels)] for i, name in enumerate(labels)}
    return frame.assign(**{column: frame[column].map(shifted)})


class Federation:
    """One seed's data, sites and model, reused by every (attack, setting) pair."""

    def __init__(
        self,
        config: dict,
        seed: int,
        sites: int,
        rounds: int,
        scheme: dict,
        attacker: int,
        random_norm: float,
    ):
        self.settings = settings_from({**config, "seed": seed}).resolved()
        splits = load_splits(self.settings)
        self.labels = splits.labels
        tok = load_tokenizer(self.settings.model)
        s = self.settings
        shards = partition_sites(s, self.labels, sites, **scheme)
        self.data = [tokenize(d.train, tok, self.labels, s.max_length, s.truncation) for d in shards]
        flipped = _flip_labels(shards[attacker].train, s.label_column, self.labels)
        self.flipped = tokenize(flipped, tok, self.labels, s.max_length, s.truncation)
        self.weights = [loss_weights(s, d.train, self.labels) for d in shards]
        self.flipped_weight = loss_weights(s, flipped, self.labels)
        self.test = tokenize(splits.test, tok, self.labels, s.max_length, s.truncation)
        self.model = build_model(s, self.labels, torch.device("cpu"))
        self.initial = {k: v.detach().cpu().numpy().copy() for k, v in adapter_state(self.model).items()}
        self.rounds, self.attacker, self.seed, self.random_norm = rounds, attacker, seed, random_norm

    def _train(self, dataset, weight, plan, history: list, server_round: int):
        result = train_local(
            self.model,
            dataset,
            self.settings,
            plan=plan,
            history=history,
            class_weight=weight,
            seed_offset=server_round,
            round_of=(server_round, self.rounds),
        )
        arrays = {k: v.detach().cpu().numpy().copy() for k, v in adapter_state(self.model).items()}
        metrics = {
            "num-examples": plan.public_n if plan is not None else len(dataset),
            "steps": int(result.steps),
            "epsilon": float(result.epsilon) if plan else math.inf,
            "delta": float(plan.delta) if plan else 0.0,
            "noise-multiplier": float(result.noise_multiplier),
            "sample-rate": float(plan.sample_rate) if plan else 1.0,
        }
        return arrays, metrics, result.history

    def _attack(self, attack: str, g: dict, arrays: dict, metrics: dict, rng, robust: RobustSettings):
        if attack == "sign-flip":
            arrays = {k: (g[k] - 1e6 * (arrays[k] - g[k])).astype(np.float32) for k in g}
        elif attack == "random":
            noise = {k: rng.normal(size=v.shape) for k, v in g.items()}
            norm = math.sqrt(sum(float(np.sum(v**2)) for v in noise.values()))
            arrays = {k: (g[k] + self.random_norm / norm * noise[k]).astype(np.float32) for k in g}
        elif attack == "inflated":
            metrics = {**metrics, "num-examples": 1e12}
        elif attack == "inflated-valid":
            below_delta = math.ceil(1 / metrics["delta"]) - 1 if metrics["delta"] > 0 else math.inf
            metrics = {**metrics, "num-examples": float(min(below_delta, robust.max_num_examples))}
        return arrays, metrics

    def run(self, attack: str, robust: RobustSettings) -> dict:
        """One federation: server test accuracy at the end and what the strategy did."""
        s = self.settings
        strategy = AdapterFedAvg(robust=robust)
        counted = [counted_plan(s, len(d), self.rounds) if s.private else (None, []) for d in self.data]
        plans, histories = [p for p, _ in counted], [list(h) for _, h in counted]
        g = {k: v.copy() for k, v in self.initial.items()}
        rng = np.random.default_rng(self.seed)
        counts = {
            "dropped": 0,
            "clipped": 0,
            "capped": 0,
            "discounted": 0,
            "honest-discounted": 0,
            "unchanged": 0,
        }
        direction: dict[str, list[float]] = {"attacker": [], "honest": []}
        evidence: dict[str, list[float]] = {"attacker": [], "honest": []}
        for server_round in range(1, self.rounds + 1):
            strategy.remember_global(ArrayRecord({k: Array(v) for k, v in g.items()}))
            replies = []
            for i, plan in enumerate(plans):
                set_adapter_arrays(self.model, g)
                flip = attack == "label-flip" and i == self.attacker
                dataset, weight = (
                    (self.flipped, self.flipped_weight) if flip else (self.data[i], self.weights[i])
                )
                arrays, metrics, histories[i] = self._train(dataset, weight, plan, histories[i], server_round)
                if i == self.attacker:
                    arrays, metrics = self._attack(attack, g, arrays, metrics, rng, robust)
                replies.append(_reply(i + 1, arrays, metrics))
            aggregate, _ = strategy.aggregate_train(server_round, replies)
            record = strategy.round_summary(server_round)
            bad = self.attacker + 1
            counts["dropped"] += bad in record["dropped"]
            counts["clipped"] += bad in {c["node"] for c in record.get("clipped", [])}
            counts["capped"] += bad in {c["node"] for c in record.get("capped", [])}
            counts["discounted"] += bad in record.get("discounted", [])
            counts["honest-discounted"] += len(set(record.get("discounted", [])) - {bad})
            counts["unchanged"] += "global-unchanged" in record
            for node, c in record.get("direction-score", {}).items():
                direction["attacker" if int(node) == bad else "honest"].append(c)
            if server_round == self.rounds:
                for node, e in record.get("direction-evidence", {}).items():
                    evidence["attacker" if int(node) == bad else "honest"].append(e)
            if aggregate is not None:
                g = dict(zip(aggregate.keys(), aggregate.to_numpy_ndarrays(), strict=True))
        set_adapter_arrays(self.model, g)
        scores = evaluate(self.model, self.test, self.labels, head_only=s.trainable == "head")
        spread = {
            f"{who}-score": [round(min(c), 2), round(float(np.mean(c)), 2), round(max(c), 2)]
            for who, c in direction.items()
            if c
        }
        spread |= {f"{who}-evidence": [round(e, 2) for e in sorted(c)] for who, c in evidence.items() if c}
        return {"accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"], **counts, **spread}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default="bbc-news")
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--partitioning", default="dirichlet")
    parser.add_argument("--dirichlet-alpha", type=float, default=1.0)
    parser.add_argument("--partition-column", default="")
    parser.add_argument("--target-epsilon", type=float, default=8.0)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--settings", default="plain,robust,fedavg,median,trimmed-mean,krum")
    parser.add_argument("--attacker", type=int, default=0, help="index of the malicious site")
    parser.add_argument("--random-norm", type=float, default=1e3)
    parser.add_argument("--set", default="{}", help='fixed settings, JSON: {"max-steps": 3}')
    parser.add_argument(
        "--robust",
        default="{}",
        help='run config keys for every setting but plain, JSON: {"max-update-norm": "1x"}',
    )
    parser.add_argument("--out", default="", help="write every run's numbers to this JSON file")
    args = parser.parse_args()
    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    names = [n.strip() for n in args.settings.split(",") if n.strip()]
    unknown = sorted(set(attacks) - set(ATTACKS)) + sorted(set(names) - set(SETTINGS))
    if unknown:
        parser.error(f"unknown attack or setting {unknown}: choose from {ATTACKS} and {tuple(SETTINGS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    overrides = json.loads(args.robust)
    robust = {
        name: RobustSettings.from_run_config(
            SETTINGS[name] if name == "plain" else {**overrides, **SETTINGS[name]}
        )
        for name in names
    }
    config = {
        "dataset": args.dataset,
        "max-steps": 3,
        "target-epsilon": args.target_epsilon,
        **json.loads(args.set),
    }
    scheme = {"scheme": args.partitioning, "alpha": args.dirichlet_alpha, "column": args.partition_column}
    print(f"{args.dataset}: {args.sites} sites, {args.rounds} rounds, {config}; site {args.attacker} attacks")
    for name in names:
        print(f"  {name}: {robust[name].describe()}")
    runs = []
    start = time.perf_counter()
    for seed in seeds:
        fed = Federation(config, seed, args.sites, args.rounds, scheme, args.attacker, args.random_norm)
        for attack in attacks:
            for name in names:
                result = fed.run(attack, robust[name])
                runs.append({"seed": seed, "attack": attack, "setting": name, **result})
                print(json.dumps(runs[-1]), flush=True)
    print(f"\nserver test accuracy, mean over seeds {seeds} ({time.perf_counter() - start:.0f} s)")
    print(f"{'attack':<16}" + "".join(f"{n:>14}" for n in names))
    for attack in attacks:
        cells = []
        for name in names:
            acc = [r["accuracy"] for r in runs if r["attack"] == attack and r["setting"] == name]
            cells.append(f"{np.mean(acc):>14.3f}")
        print(f"{attack:<16}" + "".join(cells))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"config": {**vars(args), **config}, "runs": runs}, fh, indent=2)


if __name__ == "__main__":
    main()
