"""The fault and attack probes of issue 14, run against the code: one markdown table.

    python bench/faults.py [--out docs/reliability-faults.md]

No training, no servers: each probe calls the piece of fedllm that meets the fault in a real run.

- train replies: one site of five sends a malformed or hostile reply; the round goes through the
  server's own ``AdapterFedAvg.aggregate_train`` (default run config: ``cosine``,
  ``max-update-norm`` and ``max-site-weight`` auto), against the adapter of a tiny random BERT
  with the run's LoRA layout, and the aggregate is loaded into that model as the server's evaluation does;
- attacks: hostile but well-formed replies, the move of the global against the bounds;
- run names, data files, credentials: the probes that meet files (``bench/faults_files.py``):
  ``server.app.make_run_dir`` with a submitted ``run-name``, the site's own reading
  (``clients.site`` join's check, ``load_site_file``, ``tokenize``), ``server.credentials`` main.

Every cell is computed from what the code did (round record, exception text, files on disk).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported

import argparse
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from faults_files import credential_probes, data_probes, run_name_probes
from faults_table import Row, table
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from replies import train_reply
from transformers import BertConfig

from fedllm.adapters import AdapterMismatchError, adapter_to_record, set_adapter_arrays
from fedllm.config import Settings
from fedllm.contract import RoundRecord
from fedllm.model import build_model
from server.robust import RobustSettings, update_norm
from server.strategy import AdapterFedAvg

TINY = BertConfig(
    vocab_size=30522,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=512,
)
LABELS = ["0", "1", "2"]
HONEST = {1: 100, 2: 140, 3: 80, 4: 120}  # node -> num-examples
BAD = 5


# ---------------------------------------------------------------- train replies


def _metrics(num_examples: object = 110, **extra) -> dict:
    """What a DP site's train reply carries (clients/policy.py's reply keys)."""
    metrics = {"num-examples": num_examples, "steps": 3, "epsilon": 2.5, "delta": 1e-5}
    metrics.update({"noise-multiplier": 1.1, "sample-rate": 0.5, "update-bytes": 4096})
    return {**metrics, **extra}


def _content(arrays: dict, metrics: dict) -> RecordDict:
    record = ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})
    return RecordDict({"arrays": record, "metrics": MetricRecord(metrics)})


def _honest(g: dict, seed: int, scale: float = 0.01) -> dict:
    """A site's adapter: the global plus a small random update."""
    rng = np.random.default_rng(1000 + seed)
    return {k: (v + scale * rng.normal(size=v.shape)).astype(np.float32) for k, v in g.items()}


def _with(arrays: dict, index: int, value: Callable[[np.ndarray], object]) -> dict:
    """``arrays`` with its ``index``-th tensor replaced by ``value(tensor)``."""
    name = list(arrays)[index]
    return {**arrays, name: value(arrays[name])}


def _sign_flip(g: dict) -> dict:
    return {k: (v - 1e6 * (_honest(g, BAD)[k] - v)).astype(np.float32) for k, v in g.items()}


def _random_norm(g: dict, norm: float = 1e3) -> dict:
    rng = np.random.default_rng(7)
    step = {k: rng.normal(size=v.shape) for k, v in g.items()}
    scale = norm / math.sqrt(sum(float(np.sum(s**2)) for s in step.values()))
    return {k: (v + scale * step[k]).astype(np.float32) for k, v in g.items()}


def _garbage(g: dict) -> RecordDict:
    arrays = {k: Array(v) for k, v in _honest(g, BAD).items()}
    last = list(arrays)[-1]
    arrays[last] = Array(dtype="float32", shape=(3,), stype="numpy.ndarray", data=b"not an npy payload")
    return RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord(_metrics())})


BIAS = -1  # the classifier bias, the adapter's last tensor


def _array(change: Callable[[np.ndarray], object], index: int = BIAS) -> Callable[[dict], tuple]:
    """A probe: an honest reply with one tensor changed."""
    return lambda g: (_with(_honest(g, BAD), index, change), _metrics())


def _metric(num_examples: object = 110, **extra) -> Callable[[dict], tuple]:
    """A probe: an honest adapter with these metrics."""
    return lambda g: (_honest(g, BAD), _metrics(num_examples, **extra))


# probe -> (the bad site's adapter from the global, its metrics), or a whole RecordDict
REPLIES: dict[str, Callable[[dict], tuple[dict, dict] | RecordDict]] = {
    "missing key": lambda g: (dict(list(_honest(g, BAD).items())[:-1]), _metrics()),
    "extra key": lambda g: ({**_honest(g, BAD), "extra": np.zeros(2, np.float32)}, _metrics()),
    "wrong shape (4,) for (3,)": _array(lambda a: np.zeros(4, a.dtype)),
    "scalar array": _array(lambda a: np.float32(0.5)),
    "(1, N) array": _array(lambda a: a[None, :]),
    "int64 array": _array(lambda a: np.ones(a.shape, np.int64)),
    "bool array": _array(lambda a: np.ones(a.shape, bool)),
    "float16 array": _array(lambda a: a.astype(np.float16)),
    "float64 array": _array(lambda a: a.astype(np.float64)),
    "complex64 array": _array(lambda a: a.astype(np.complex64)),
    "NaN array": _array(lambda a: np.full_like(a, np.nan)),
    "Inf array": _array(lambda a: np.full_like(a, np.inf), index=1),
    "undecodable array payload": _garbage,
    "NaN metric (epsilon)": _metric(epsilon=math.nan),
    "Inf metric (steps)": _metric(steps=math.inf),
    "list-valued epsilon": _metric(epsilon=[1.0, 2.0]),
    "num-examples 0": _metric(0),
    "num-examples -5": _metric(-5),
    "num-examples 1e12": _metric(1e12),
    "num-examples missing": lambda g: (
        _honest(g, BAD),
        {k: v for k, v in _metrics().items() if k != "num-examples"},
    ),
    "num-examples 2.5": _metric(2.5),
    "num-examples NaN": _metric(math.nan),
    "num-examples 200000 with delta 1e-5": _metric(200_000),
}


class Round:
    """One round of the server's strategy: four honest sites and site ``BAD``."""

    def __init__(self, model, robust: RobustSettings | None = None):
        self.model = model
        sent = adapter_to_record(model)
        self.g = _as_dict(sent)
        self.strategy = AdapterFedAvg(robust=robust or RobustSettings())
        self.strategy.remember_global(sent)

    def run(self, bad: Message | None) -> tuple[dict | None, RoundRecord]:
        """Aggregate the round; (the new global or None, the round record)."""
        replies = [train_reply(n, _content(_honest(self.g, n), _metrics(size))) for n, size in HONEST.items()]
        arrays, _ = self.strategy.aggregate_train(1, [*replies, *([bad] if bad else [])])
        record = self.strategy.round_summary(1)
        return (None if arrays is None else _as_dict(arrays)), record

    def loads(self, aggregate: dict) -> str:
        """Whether the aggregate is finite and loads into the model (the server's evaluation)."""
        if not all(np.isfinite(v).all() for v in aggregate.values()):
            return "NOT finite"
        try:
            set_adapter_arrays(self.model, aggregate)
        except AdapterMismatchError as err:
            return f"does NOT load ({err})"
        finally:
            set_adapter_arrays(self.model, self.g)
        return "finite, loads into the model"


def _reason(record: RoundRecord, node: int) -> str:
    return next(f["reason"] for f in record["train-failures"] if f["node"] == node)


def reply_probes(model) -> list[Row]:
    """Each malformed reply from site 5, with four honest sites, under the default run config."""
    rows = []
    for name, make in REPLIES.items():
        game = Round(model)
        made = make(game.g)
        content = made if isinstance(made, RecordDict) else _content(*made)
        aggregate, record = game.run(train_reply(BAD, content))
        if BAD in record["dropped"]:
            happened = f"dropped: {_reason(record, BAD)}"
            lost = f"site {BAD}'s reply for the round; {record['train-replies']} others averaged"
        else:
            happened = f"NOT dropped (clipped {record['clipped']}, capped {record['capped']})"
            lost = "nothing: its reply was averaged"
        lost += f"; global {game.loads(aggregate) if aggregate else 'unchanged'}"
        rows.append(Row("train reply", name, happened, lost))
    game = Round(model)
    aggregate, record = game.run(train_reply(BAD, error="site-declined"))
    happened = f"train-failures: {_reason(record, BAD)} (a site's fixed failure code)"
    lost = f"site {BAD}'s reply; {record['train-replies']} others averaged; global {game.loads(aggregate)}"
    rows.append(Row("train reply", "error reply", happened, lost))
    game = Round(model)
    nan = {k: np.full_like(v, np.nan) for k, v in game.g.items()}
    arrays, _ = game.strategy.aggregate_train(
        1, [train_reply(n, _content(nan, _metrics())) for n in (*HONEST, BAD)]
    )
    record = game.strategy.round_summary(1)
    happened = f"{len(record['dropped'])} dropped; global-unchanged: {record['global-unchanged']}"
    kept = arrays is None and all(
        np.array_equal(v, game.g[k]) for k, v in _as_dict(game.strategy.global_arrays).items()
    )
    rows.append(
        Row("train reply", "all five replies NaN", happened, f"the round; global kept as sent: {kept}")
    )
    return rows


def _as_dict(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def _distance(a: dict, b: dict) -> float:
    return update_norm(b, a)


ATTACKS: dict[str, Callable[[dict], tuple[dict, object]]] = {
    "sign-flipped update x1e6": lambda g: (_sign_flip(g), 110),
    "random update of norm 1e3": lambda g: (_random_norm(g), 110),
    "finite values 3e38": lambda g: ({k: np.full_like(v, 3e38) for k, v in g.items()}, 110),
    "num-examples 90000 (< 1/delta, honest update)": lambda g: (_honest(g, BAD), 90_000),
}


def attack_probes(model) -> list[Row]:
    """Hostile but well-formed replies: the move of the global against the norm bound and cap."""
    rows = []
    honest_only, _ = Round(model).run(None)
    for name, make in ATTACKS.items():
        game = Round(model)
        arrays, n = make(game.g)
        aggregate, record = game.run(train_reply(BAD, _content(arrays, _metrics(n))))
        plain = Round(model, RobustSettings().without_bounds())
        unbounded, _ = plain.run(train_reply(BAD, _content(arrays, _metrics(n))))
        moved = _distance(aggregate, game.g)
        clipped = {c["node"]: c["norm"] for c in record["clipped"]}
        capped = {c["node"]: c["num-examples"] for c in record["capped"]}
        if BAD in clipped:
            auto = RobustSettings().max_update_norm.multiple
            happened = (
                f"clipped: update norm {clipped[BAD]:.3g} cut to norm-bound {record['norm-bound']:.3g} "
                f"({auto:g} x the round's median); other sites clipped: {sorted(set(clipped) - {BAD})}"
            )
        elif BAD in capped:
            weights = [*HONEST.values(), record["weight-cap"]]
            happened = (
                f"capped: weight {capped[BAD]:g} cut to weight-cap {record['weight-cap']:g}; "
                f"its share of the mean {record['weight-cap'] / sum(weights):.0%} "
                f"(uncapped {n / (n + sum(HONEST.values())):.1%})"
            )
        else:
            happened = "averaged as sent"
        if BAD in record.get("discounted", []):
            happened += "; discounted by cosine (weight 0)"
        plain_move = "not finite" if unbounded is None else f"{_distance(unbounded, game.g):.3g}"
        bound = record["norm-bound"]
        within = "≤" if moved <= bound + 1e-6 else "ABOVE"
        pull = _distance(aggregate, honest_only)
        lost = (
            f"its pull beyond the bounds: the global moved {moved:.3g} ({within} norm-bound {bound:.3g}), "
            f"{pull:.3g} from the 4 honest sites' aggregate; plain FedAvg (no bounds) moved it "
            f"{plain_move}; global {game.loads(aggregate)}"
        )
        rows.append(Row("attack", name, happened, lost))
    return rows


def main(argv: list[str] | None = None) -> None:
    """Run every probe and print (and with ``--out``, write) the table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    logging.getLogger("flwr").setLevel(logging.ERROR)  # each drop is in the table, not the log
    torch.manual_seed(0)
    settings = Settings(max_length=32, device="cpu", trainable="lora").resolved()
    model = build_model(settings, LABELS, torch.device("cpu"), TINY)
    rows = (
        reply_probes(model)
        + attack_probes(model)
        + run_name_probes()
        + data_probes(LABELS)
        + credential_probes()
    )
    text = table(rows)
    print(text)
    print(f"\n{len(rows)} probes in {time.perf_counter() - start:.1f} s")
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
