"""The fault and attack probes of issue 14, run against the code: one markdown table.

    python bench/faults.py [--out docs/reliability-faults.md]

No training, no servers: each probe calls the piece of fedllm that meets the fault in a real run.

- train replies: one site of five sends a malformed or hostile reply; the round goes through the
  server's own ``AdapterFedAvg.aggregate_train`` (default run config: ``cosine``,
  ``max-update-norm`` and ``max-site-weight`` auto), against the adapter of a tiny random BERT
  with the run's LoRA layout, and the aggregate is loaded into that model as the server's evaluation does;
- run names: ``server.app.make_run_dir`` with a submitted ``run-name``;
- data files: the site's own reading (``clients.site`` join's check, ``load_site_file``, ``tokenize``);
- credentials: ``server.credentials`` main.

Every cell is computed from what the code did (round record, exception text, files on disk).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported

import argparse
import contextlib
import io
import json
import logging
import math
import stat
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from replies import train_reply
from transformers import BertConfig

from clients.site import check_data
from clients.site import main as site_main
from fedllm.adapters import AdapterMismatchError, adapter_to_record, set_adapter_arrays
from fedllm.config import Settings
from fedllm.data import load_site_file, tokenize
from fedllm.model import build_model, load_tokenizer
from server.app import make_run_dir
from server.credentials import main as credentials_main
from server.robust import RobustSettings, update_norm
from server.strategy import AdapterFedAvg

TINY = BertConfig(
    vocab_size=30522,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=64,
)
LABELS = ["0", "1", "2"]
HONEST = {1: 100, 2: 140, 3: 80, 4: 120}  # node -> num-examples
BAD = 5
MAX_LENGTH = 128  # the run config's default max-length


@dataclass
class Row:
    """One probe's line of the table."""

    group: str
    probe: str
    happened: str
    lost: str


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

    def run(self, bad: Message | None) -> tuple[dict | None, dict]:
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


def _reason(record: dict, node: int) -> str:
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
    aggregate, record = game.run(train_reply(BAD, error="site-data-error"))
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


# ---------------------------------------------------------------- run names


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def run_name_probes() -> list[Row]:
    """A submitted ``run-name`` through ``make_run_dir``: refused, or a folder inside run-dir."""
    names = ["../escaped-by-outsider", "a/../../x", "/tmp/abs", "..", "sub/dir", "a\\b", "line\nbreak"]
    rows = []
    for name in [*names, "link-out (symlink in run-dir)", "bbc-robust"]:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            runs = root / "runs"
            runs.mkdir()
            submitted = name
            if name.startswith("link-out"):
                submitted = "link-out"
                (runs / "link-out").symlink_to(root / "outside")
            before = _files(root)
            context = Context(
                run_id=7,
                node_id=0,
                node_config={},
                state=RecordDict(),
                run_config={"run-dir": str(runs), "run-name": submitted},
            )
            try:
                path = make_run_dir(context)
                happened = f"run folder {path.relative_to(root.resolve())}"
            except ValueError as err:
                happened = f"refused: {str(err).replace(str(root.resolve()), '$TMP')}"
            written = sorted(_files(root) - before)
            outside = [w for w in written if not (root / w).resolve().is_relative_to(runs.resolve())]
            verdict = "WROTE OUTSIDE run-dir" if outside else "nothing"
            lost = f"{verdict}; files written: {written or 'none'}; outside run-dir: {outside or 'none'}"
            rows.append(Row("run-name", repr(name) if "\n" in name else name, happened, lost))
    return rows


# ---------------------------------------------------------------- data files


def _cli(main: Callable[[list[str]], None], argv: list[str]) -> tuple[int, str]:
    """A command-line entry point run in-process: (exit code, what it wrote to stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(argv)
            code = 0
        except SystemExit as exit_:
            code = int(exit_.code or 0)
    return code, err.getvalue().strip()


def _join(path: Path, tmp: Path) -> tuple[int, str]:
    """``python -m clients.site join`` with ``path`` as data-file: (exit code, stderr)."""
    argv = ["join", "--superlink", "127.0.0.1:9", "--insecure", "--data-file", str(path)]
    return _cli(site_main, [*argv, "--state-dir", str(tmp / "state")])


def _refused(group: str, probe: str, path: Path, tmp: Path) -> Row:
    code, err = _join(path, tmp)
    lines = err.strip().splitlines()
    happened = f"exit {code}, {len(lines)} line: {lines[-1].replace(str(tmp), '$TMP') if lines else ''}"
    state = "created" if (tmp / "state").exists() else "not created"
    return Row(group, probe, happened, f"the site does not join until the file is fixed; state dir {state}")


class _Recording:
    """The tokenizer, recording the length of every text it is asked to tokenize."""

    def __init__(self, inner) -> None:
        object.__setattr__(self, "inner", inner)
        object.__setattr__(self, "lengths", [])

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self.inner, name, value)

    def __call__(self, texts, **kwargs):
        self.lengths.extend(len(t) for t in texts)
        return self.inner(texts, **kwargs)


def data_probes() -> list[Row]:
    """Bad data files at the site's join check; labels and a 10 MB text through the site's reading."""
    rows = []
    key = b"a site's own secret split key"
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        (tmp / "folder").mkdir()
        (tmp / "folder" / "part-1.csv").write_text("text,label\nfine,0\n")
        rows.append(_refused("data-file", "a folder", tmp / "folder", tmp))
        os.mkfifo(tmp / "pipe.csv")
        rows.append(_refused("data-file", "a FIFO (would block a reader)", tmp / "pipe.csv", tmp))
        rows.append(_refused("data-file", "a missing file", tmp / "missing.csv", tmp))
        (tmp / "bad.jsonl").write_text('{"text": "a", "label": "0"}\n\n{"text": "b" "label": "1"}\n')
        rows.append(_refused("data-file", "JSONL with a bad line 3", tmp / "bad.jsonl", tmp))

        ints = tmp / "ints.csv"
        cells = [(f"review {i}: the drug worked as it said", str(i % 3)) for i in range(30)]
        cells[7] = ("review 7: no rating given", "")
        ints.write_text("text,label\n" + "".join(f"{t},{lab}\n" for t, lab in cells))
        site = load_site_file(ints, "text", "label", LABELS, Settings(test_fraction=0.2), key)
        labels = sorted(set(site.train["label"]) | set(site.test["label"]))
        report = check_data(ints, "text", "label").replace(str(tmp), "$TMP")
        rows.append(
            Row(
                "data-file",
                "integer labels 0/1/2, one blank cell (CSV)",
                f"read as labels {labels}, checked against the federation's {LABELS}: accepted",
                f"the blank row only: {report}",
            )
        )

        words = " ".join(f"side{i % 7} effect{i % 13} dose{i % 101}" for i in range(480_000))
        long = tmp / "long.csv"
        pd.DataFrame({"text": [words, *(f"short review {i}" for i in range(9))], "label": "0"}).to_csv(
            long, index=False
        )
        site = load_site_file(long, "text", "label", LABELS, Settings(test_fraction=0.2), key)
        frame = pd.concat([site.train, site.test], ignore_index=True)
        tokenizer = _Recording(load_tokenizer(""))
        start = time.perf_counter()
        ids = tokenize(frame, tokenizer, LABELS, MAX_LENGTH).tensors[0]
        seconds = time.perf_counter() - start
        row = int(frame["text"].str.len().idxmax())
        text = frame["text"][row]
        prefix = tokenizer.inner(
            [text[:200_000]], truncation=True, max_length=MAX_LENGTH, padding="max_length"
        )
        same = ids[row].tolist() == prefix["input_ids"][0]
        rows.append(
            Row(
                "data-file",
                f"a {len(text) / 1e6:.1f} MB text (max-length {MAX_LENGTH})",
                f"{max(tokenizer.lengths):,} characters passed to the tokenizer (of {len(text):,}); "
                f"tokenize() of {len(frame)} rows took {seconds:.2f} s",
                f"{'nothing' if same else 'TOKENS LOST'}: its ids equal those of its first 200,000 "
                f"characters: {same}",
            )
        )
    return rows


# ---------------------------------------------------------------- credentials


def credential_probes() -> list[Row]:
    """``server.credentials`` with an output already there, and under umask 000."""
    rows = []
    with tempfile.TemporaryDirectory() as name:
        out = Path(name) / "certs"
        out.mkdir()
        (out / "site-1.pub").write_text("an old key the operator registered\n")
        code, err = _cli(credentials_main, ["--out", str(out), "--sites", "2"])
        left = sorted(p.name for p in out.iterdir())
        rows.append(
            Row(
                "credentials",
                "--sites 2 where site-1.pub exists",
                f"exit {code}: {err.replace(name, '$TMP')}",
                f"{'nothing written' if left == ['site-1.pub'] else 'FILES WRITTEN'}; folder holds {left}",
            )
        )
        fresh = Path(name) / "new" / "certs"
        previous = os.umask(0)
        try:
            code, err = _cli(credentials_main, ["--out", str(fresh), "--sites", "1"])
        finally:
            os.umask(previous)
        modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in sorted(fresh.iterdir())}
        folders = [oct(stat.S_IMODE(p.stat().st_mode)) for p in (fresh.parent, fresh)]
        secret = [p for p in fresh.iterdir() if not p.name.endswith((".crt", ".pem", ".pub"))]
        private = folders == ["0o700", "0o700"] and all(
            stat.S_IMODE(p.stat().st_mode) == 0o600 for p in secret
        )
        rows.append(
            Row(
                "credentials",
                "umask 000, a new folder",
                f"exit {code}; folders new/, new/certs/ {' '.join(folders)}",
                f"{'nothing readable by others' if private else 'EXPOSED'}: files {json.dumps(modes)}",
            )
        )
    return rows


# ---------------------------------------------------------------- table


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def table(rows: list[Row]) -> str:
    """The rows as one markdown table."""
    lines = ["| # | group | probe | what happened | what was lost |", "|---|---|---|---|---|"]
    for i, row in enumerate(rows, start=1):
        cells = [_cell(c) for c in (row.group, f"`{row.probe}`", row.happened, row.lost)]
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
    settings = Settings(max_length=32, device="cpu", trainable="lora")
    model = build_model(settings, LABELS, torch.device("cpu"), TINY)
    rows = (
        reply_probes(model) + attack_probes(model) + run_name_probes() + data_probes() + credential_probes()
    )
    text = table(rows)
    print(text)
    print(f"\n{len(rows)} probes in {time.perf_counter() - start:.1f} s")
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
