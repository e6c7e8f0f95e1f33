"""End to end in Flower's deployment runtime: SuperLink + 3 SuperNodes as OS processes."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from fedllm.accounting import epsilon_for
from fedllm.config import Settings
from fedllm.data import load_splits, tokenize
from fedllm.ledger import PrivacyLedger, total_steps
from fedllm.shards import write_shards
from fedllm.site_state import open_state
from fedllm.train import evaluate

from .processes import deployment, supernode_logs

pytestmark = pytest.mark.slow


def test_superlink_three_supernodes_two_rounds(tiny_checkpoint, tmp_path):
    shards = write_shards("drug-reviews", 3, "natural", "condition", 1.0, 42, tmp_path / "shards")
    config = {
        "model": str(tiny_checkpoint),
        "pooling": "cls",  # stock BertForSequenceClassification: loadable with plain peft
        "num-server-rounds": 2,
        "min-train-nodes": 3,
        "min-available-nodes": 3,
        "max-steps": 2,
        "max-length": 32,
        "batch-size": 16,
        "run-dir": str(tmp_path / "runs"),
        "run-name": "deploy",
    }
    with deployment(tmp_path, shards) as cli:
        outcome = cli.run(config, timeout=900)
        assert outcome.ok, f"{outcome}\n{cli.log(outcome.run_id)[-3000:]}\n{supernode_logs(tmp_path, 2000)}"

    run_dir = tmp_path / "runs" / "deploy"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["train-replies"] == 3 for r in rows[1:])

    # the final adapter loads with plain transformers + peft and scores as in the run
    labels = json.loads((run_dir / "final-adapter" / "labels.json").read_text())["labels"]
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_checkpoint), num_labels=len(labels))
    model = PeftModel.from_pretrained(base, str(run_dir / "final-adapter"))
    splits = load_splits(Settings(dataset="drug-reviews"), labels)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_checkpoint))
    scores = evaluate(model, tokenize(splits.test, tokenizer, labels, 32), labels)
    assert scores["accuracy"] == pytest.approx(rows[-1]["server"]["accuracy"], abs=1e-9)
    assert scores["loss"] == pytest.approx(rows[-1]["server"]["loss"], rel=1e-5)

    # each site's privacy spend is on its own disk, and it is what the site reported
    for i in range(1, 4):
        ledger = PrivacyLedger(tmp_path / f"site-{i}" / "state" / "privacy_ledger.json")
        spent = ledger.runs[outcome.run_id]
        assert sum(h[2] for h in spent["history"]) == 1 + 4  # the run's DP count, 2 rounds x 2 steps
        # the high-water mark outside the state folder saw that spend (raised after each round)
        mark = json.loads(open_state(ledger.path.parent).mark.read_text())
        assert mark["runs"][outcome.run_id] == 1 + 4
        assert spent["epsilon"] in [s["epsilon"] for s in rows[2]["sites"].values()]


def test_two_runs_submitted_at_once_that_together_pass_the_cap_train_once_per_site(tiny_checkpoint, tmp_path):
    """Issue 23, 1, in the deployment runtime: two runs at ε 7 at once, sites capped at 8 (the
    default). Each site trains exactly one of them; the other is refused with its count booked."""
    shards = write_shards("drug-reviews", 3, "natural", "condition", 1.0, 42, tmp_path / "shards")
    config = {
        "model": str(tiny_checkpoint),
        "num-server-rounds": 1,
        "min-train-nodes": 3,
        "min-available-nodes": 3,
        "max-steps": 2,
        "max-length": 32,
        "batch-size": 16,
        "target-epsilon": 7.0,
        "run-dir": str(tmp_path / "runs"),
    }
    with deployment(tmp_path, shards) as cli, ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(lambda name: cli.run({**config, "run-name": name}, timeout=900), "ab"))
    assert all(o.status.startswith("finished") for o in outcomes), outcomes
    for i in range(1, 4):
        runs = PrivacyLedger(tmp_path / f"site-{i}" / "state" / "privacy_ledger.json").runs
        trained = [key for key, run in runs.items() if total_steps(run) > 1]  # more than the DP count
        assert len(trained) == 1, (i, runs)
        assert statement_epsilon(runs) <= 8.0 + 1e-6


def statement_epsilon(runs: dict) -> float:
    """The site's lifetime ε over every booked step (counts included), at δ 1e-5."""
    return epsilon_for([h for run in runs.values() for h in run["history"]], 1e-5)
