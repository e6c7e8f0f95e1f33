"""One poisoning site of five: server test accuracy for each attack under each aggregator setting.

    python bench/poisoning.py --seeds 0,1,2                      # the full table (BBC News)
    python bench/poisoning.py --rounds 1 --seeds 0 --attacks sign-flip --settings plain,robust

A federation in one process, as bench/dp_recipe.py runs it (the sites' shards, the one training
loop with each site's DP plan, the adapter wire), but every round's replies are Flower messages
handed to the server's own strategy (``server.strategy.AdapterFedAvg.aggregate_train``: reply
validation, norm clipping, weight cap, aggregator), so the numbers measure what the server does.
Defaults: BBC News, 5 sites, Dirichlet α = 1.0, 8 rounds × 3 local steps, target ε 8, the DP
recipe's head; site ``--attacker`` (0) is the malicious one.

Per run it counts the rounds in which the attacker's reply was dropped, left out as too clean
for its DP (``too-clean``: the noise check), clipped, capped or discounted (``cosine``), the
honest site-rounds discounted, too clean or clipped (out of ``honest-site-rounds``), the min /
mean / max of the attacker's and the honest sites' per-round direction scores, and their
direction evidence after the last round (``server.robust.direction_weights``).

Attacks: ``none``; ``sign-flip`` (its trained update × -1e6); ``random`` (a random update of norm
``--random-norm``); ``label-flip`` (it trains honestly on labels shifted by one class);
``inflated`` (honest update, ``num-examples`` 1e12); ``inflated-valid`` (honest update, the
largest ``num-examples`` the validation accepts: just under 1/δ and ``max-num-examples``, so
only the weight cap stands against it); ``build-flip`` (issue 22: it runs the DP code with the
noise removed and sends that noise-free update for the first half of the rounds, declaring its
plan's σ, q and steps, so its direction agrees with the others' far more than a noisy site's
can; then its noise-free update flipped and scaled to 1.99 × the round's median update norm,
just inside the auto bound); ``build-flip-noisy`` (the same, but it adds Gaussian noise of its
declared scale (``server.noise``) to every update, so the noise check cannot tell it: honest-like
for the first half, then the flipped update as large as the 1.99 × median norm leaves room for
beside that noise); ``build-flip-bound`` (the attacker that knows the server's bounds: an
honest-looking update, its noise-free one plus noise of its declared scale, for the first half,
then its noise-free update flipped at 0.99 × the lower of the auto bound and the noise model's
bound for it, ``server.noise.noise_bounds``, computed from every reply's declared plan as the
server will). Settings: ``plain`` (FedAvg, no norm bound, no weight
cap; replies are still validated, as the server always does), ``robust`` (the server default:
``cosine``), ``fedavg`` (the default before ``cosine``: FedAvg with the bounds), ``median``,
``trimmed-mean``, ``krum`` (each with the default bounds), ``bulyan`` on request
(it needs 7 sites for f = 1). ``--robust '{"max-update-norm": "1x"}'`` changes the run config of
every setting but ``plain``. DP sampling and noise draw from OS entropy (fedllm.train), so a
rerun differs by the DP noise: compare means over ``--seeds``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from contextlib import nullcontext

import numpy as np
import torch
from attacks import ATTACKS, NOISE_FREE, Attacker, flip_labels, noise_free
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from replies import train_reply

from fedllm.accounting import counted_plan
from fedllm.adapters import adapter_state, set_adapter_arrays
from fedllm.config import settings_from
from fedllm.contract import RoundRecord, site_entry
from fedllm.data import load_splits, loss_weights, partition_sites, tokenize
from fedllm.model import build_model, load_tokenizer
from fedllm.site_round import train_metrics, train_site_round
from fedllm.train import evaluate
from server.noise import NoiseModel, expected_noise_norm
from server.robust import RobustSettings, update_norm
from server.strategy import AdapterFedAvg

COUNTS = ("dropped", "too-clean", "clipped", "capped", "discounted", "honest-discounted")
COUNTS += ("honest-too-clean", "honest-clipped", "honest-site-rounds", "unchanged")
SETTINGS = {  # run config keys, as the server reads them (RobustSettings.from_run_config)
    "plain": {
        "aggregator": "fedavg",
        "max-update-norm": 0,
        "max-site-weight": 0,
        "min-noise-ratio": 0,
        "noise-bound-slack": 0,
    },
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
        flipped = flip_labels(shards[attacker].train, s.label_column, self.labels)
        self.flipped = tokenize(flipped, tok, self.labels, s.max_length, s.truncation)
        self.weights = [loss_weights(s, d.train, self.labels) for d in shards]
        self.flipped_weight = loss_weights(s, flipped, self.labels)
        self.test = tokenize(splits.test, tok, self.labels, s.max_length, s.truncation)
        self.model = build_model(s, self.labels, torch.device("cpu"))
        self.initial = {k: v.detach().cpu().numpy().copy() for k, v in adapter_state(self.model).items()}
        self.rounds, self.attacker, self.seed = rounds, attacker, seed
        self.noise = NoiseModel.of(self.settings, rounds)  # as the server builds it from its run config
        self.malicious = Attacker(attacker, rounds, self.noise, random_norm)

    def _train(self, dataset, weight, plan, history: list, server_round: int):
        """One site's round as a site runs it (``fedllm.site_round``); its reply carries the keys the
        server's round record keeps of each site (``fedllm.contract.SITE_RECORD_KEYS``)."""
        result = train_site_round(
            self.model,
            dataset,
            self.settings,
            (server_round, self.rounds),
            plan=plan,
            history=history,
            histogram=None,
            num_classes=len(self.labels),
            class_weight=weight,
        )
        arrays = {k: v.detach().cpu().numpy().copy() for k, v in adapter_state(self.model).items()}
        metrics = site_entry(train_metrics(result, plan, len(dataset), 0, 0.0))
        return arrays, metrics, result.history

    def _replies(
        self,
        attack: str,
        g: dict[str, np.ndarray],
        plans: list,
        histories: list[list],
        server_round: int,
        rng: np.random.Generator,
        robust: RobustSettings,
    ) -> list[Message]:
        """Every site's train reply of one round, the attacker's attacked."""
        arrays, metrics, bad = [], [], self.attacker
        for i, plan in enumerate(plans):
            set_adapter_arrays(self.model, g)
            flip = attack == "label-flip" and i == bad
            dataset, weight = (self.flipped, self.flipped_weight) if flip else (self.data[i], self.weights[i])
            with noise_free() if attack in NOISE_FREE and i == bad else nullcontext():
                site, m, histories[i] = self._train(dataset, weight, plan, histories[i], server_round)
            arrays.append(site)
            metrics.append(m)
        if attack in NOISE_FREE:
            arrays[bad] = self.malicious.build_flip(g, arrays, metrics, server_round, attack, rng)
        else:
            arrays[bad], metrics[bad] = self.malicious.attack(
                attack, g, arrays[bad], metrics[bad], rng, robust
            )
        return [_reply(i + 1, a, m) for i, (a, m) in enumerate(zip(arrays, metrics, strict=True))]

    def _tally(
        self, record: RoundRecord, ratios: dict[int, float], counts: dict, seen: dict, server_round: int
    ) -> None:
        """Add one round's record and noise ratios to the run's counts and direction scores."""
        bad = self.attacker + 1
        clean = {c["node"] for c in record.get("too-clean", [])}
        sites = {int(n): m for n, m in record.get("sites", {}).items()}
        counts["dropped"] += bad in record["dropped"]
        counts["too-clean"] += bad in clean
        counts["honest-too-clean"] += len(clean - {bad})
        counts["honest-site-rounds"] += len(set(sites) - {bad})
        clipped = {c["node"] for c in record.get("clipped", [])}
        counts["clipped"] += bad in clipped
        counts["honest-clipped"] += len(clipped - {bad})
        counts["capped"] += bad in {c["node"] for c in record.get("capped", [])}
        counts["discounted"] += bad in record.get("discounted", [])
        counts["honest-discounted"] += len(set(record.get("discounted", [])) - {bad})
        counts["unchanged"] += "global-unchanged" in record
        for node, c in record.get("direction-score", {}).items():
            seen["attacker-score" if int(node) == bad else "honest-score"].append(c)
        if server_round == self.rounds:
            for node, e in record.get("direction-evidence", {}).items():
                seen["attacker-evidence" if int(node) == bad else "honest-evidence"].append(e)
        for node, ratio in ratios.items():
            seen["attacker-noise-ratio" if int(node) == bad else "honest-noise-ratio"].append(ratio)

    def run(self, attack: str, robust: RobustSettings) -> dict:
        """One federation: server test accuracy at the end and what the strategy did."""
        s = self.settings
        strategy = AdapterFedAvg(robust=robust, noise=self.noise)
        counted = [counted_plan(s, len(d), self.rounds) if s.private else (None, []) for d in self.data]
        plans, histories = [p for p, _ in counted], [list(h) for _, h in counted]
        g = {k: v.copy() for k, v in self.initial.items()}
        rng = np.random.default_rng(self.seed)
        counts = dict.fromkeys(COUNTS, 0)
        seen: dict[str, list[float]] = {
            f"{who}-{what}": []
            for who in ("attacker", "honest")
            for what in ("score", "evidence", "noise-ratio")
        }
        for server_round in range(1, self.rounds + 1):
            strategy.remember_global(ArrayRecord({k: Array(v) for k, v in g.items()}))
            replies = self._replies(attack, g, plans, histories, server_round, rng, robust)
            aggregate, _ = strategy.aggregate_train(server_round, replies)
            ratios = self._noise_ratios(g, replies, server_round)
            self._tally(strategy.round_summary(server_round), ratios, counts, seen, server_round)
            if aggregate is not None:
                g = dict(zip(aggregate.keys(), aggregate.to_numpy_ndarrays(), strict=True))
        set_adapter_arrays(self.model, g)
        scores = evaluate(self.model, self.test, self.labels, head_only=s.trainable == "head")
        spread = {
            key: [round(min(c), 2), round(float(np.mean(c)), 2), round(max(c), 2)]
            for key, c in seen.items()
            if c and not key.endswith("evidence")
        }
        spread |= {
            key: [round(e, 2) for e in sorted(c)] for key, c in seen.items() if c and key.endswith("evidence")
        }
        return {"accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"], **counts, **spread}

    def _noise_ratios(self, g: dict, replies: list[Message], server_round: int) -> dict[int, float]:
        """Each DP reply's update norm over the noise norm its declared plan adds (n̂ as declared)."""
        d = sum(v.size for v in g.values())
        ratios = {}
        for msg in replies:
            metrics = dict(msg.content["metrics"])
            arrays = {k: v.numpy() for k, v in msg.content["arrays"].items()}
            expected = expected_noise_norm(metrics, d, self.noise, server_round)
            if expected and math.isfinite(metrics.get("epsilon", math.inf)):
                ratios[msg.metadata.src_node_id] = update_norm(g, arrays) / expected
        return ratios


def _arguments() -> argparse.Namespace:
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
    parser.add_argument("--csv", default="", help="write one row per run (the table's source) here")
    args = parser.parse_args()
    args.attack_list = [a.strip() for a in args.attacks.split(",") if a.strip()]
    args.names = [n.strip() for n in args.settings.split(",") if n.strip()]
    unknown = sorted(set(args.attack_list) - set(ATTACKS)) + sorted(set(args.names) - set(SETTINGS))
    if unknown:
        parser.error(f"unknown attack or setting {unknown}: choose from {ATTACKS} and {tuple(SETTINGS)}")
    return args


def _write_csv(path: str, runs: list[dict]) -> None:
    """One row per run: seed, attack, setting, accuracy, macro-F1 and the counts."""
    columns = ["seed", "attack", "setting", "accuracy", "macro_f1", *COUNTS]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(runs)


def main() -> None:
    """Every (seed, attack, setting) federation; the mean accuracy table."""
    args = _arguments()
    seeds = [int(s) for s in args.seeds.split(",")]
    overrides = json.loads(args.robust)
    robust = {
        name: RobustSettings.from_run_config(
            SETTINGS[name] if name == "plain" else {**overrides, **SETTINGS[name]}
        )
        for name in args.names
    }
    config = {
        "dataset": args.dataset,
        "max-steps": 3,
        "target-epsilon": args.target_epsilon,
        **json.loads(args.set),
    }
    scheme = {"scheme": args.partitioning, "alpha": args.dirichlet_alpha, "column": args.partition_column}
    print(f"{args.dataset}: {args.sites} sites, {args.rounds} rounds, {config}; site {args.attacker} attacks")
    for name in args.names:
        print(f"  {name}: {robust[name].describe()}")
    runs = []
    start = time.perf_counter()
    for seed in seeds:
        fed = Federation(config, seed, args.sites, args.rounds, scheme, args.attacker, args.random_norm)
        for attack in args.attack_list:
            for name in args.names:
                result = fed.run(attack, robust[name])
                runs.append({"seed": seed, "attack": attack, "setting": name, **result})
                print(json.dumps(runs[-1]), flush=True)
    print(f"\nserver test accuracy, mean over seeds {seeds} ({time.perf_counter() - start:.0f} s)")
    print(f"{'attack':<18}" + "".join(f"{n:>14}" for n in args.names))
    for attack in args.attack_list:
        cells = []
        for name in args.names:
            acc = [r["accuracy"] for r in runs if r["attack"] == attack and r["setting"] == name]
            cells.append(f"{np.mean(acc):>14.3f}")
        print(f"{attack:<18}" + "".join(cells))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"config": {**vars(args), **config}, "runs": runs}, fh, indent=2)
    if args.csv:
        _write_csv(args.csv, runs)


if __name__ == "__main__":
    main()
