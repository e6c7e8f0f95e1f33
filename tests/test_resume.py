"""Resume after a server crash: the run dir continues, the sites spend no ε twice.

Fast tests drive the pieces (server/resume.py's resume point, checkpoints loaded bit for bit,
the site's kept reply in clients/replay.py through the real ClientApp); the slow test kills a
real SuperLink (and its ServerApp) after round 1 of 3, restarts it and resumes the run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from clients.app import app
from clients.replay import KeptReply, ReplyStore, arrays_digest
from fedllm.accounting import count_entry, epsilon_for
from fedllm.adapters import adapter_state, adapter_to_record
from fedllm.config import settings_from
from fedllm.ledger import PrivacyLedger, run_epsilon, total_steps
from fedllm.model import build_model
from fedllm.shards import write_shards
from server.app import _save
from server.resume import ResumeError, commit, find, load_checkpoint, load_last_good, run_record, write_config
from server.runlog import RunLog
from server.strategy import AdapterFedAvg
from simulations.superlink import FlowerCLI, descendants, free_port, is_alive, run_config_arg, start_superlink

from .conftest import LABELS, init_site
from .processes import start_supernodes, stop_all, wait_until
from .replies import (  # noqa: F401
    ScriptedGrid,
    as_dict,
    delivered,
    dp_metrics,
    global_adapter,
    honest,
    reply,
    server_identity,
)


@pytest.fixture
def run_config(tiny_checkpoint):
    # count-noise 4: n̂ stays near this ~47-row site's n, so the head's step cap keeps 2 steps a round
    return {
        "model": str(tiny_checkpoint),
        "max-length": 32,
        "batch-size": 16,
        "max-steps": 2,
        "count-noise": 4.0,
    }


def _global(run_config: dict) -> ArrayRecord:
    model = build_model(settings_from(run_config).resolved(), LABELS, torch.device("cpu"))
    return adapter_to_record(model)


def _train(arrays: ArrayRecord, context: Context, server_round: int, run_key: str) -> Message:
    config = {"labels": json.dumps(LABELS), "num-rounds": 3, "server-round": server_round}
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({**config, "run-key": run_key})})
    return app(delivered(content, "train", context.run_id), context)


def test_a_round_asked_again_with_the_same_global_is_answered_from_the_kept_reply(
    tmp_path, frame, run_config, capsys
):
    data = tmp_path / "site.csv"
    frame.to_csv(data, index=False)
    site = {"data-file": str(data), "state-dir": init_site(tmp_path / "state")}
    ledger = PrivacyLedger(tmp_path / "state" / "privacy_ledger.json")
    arrays = _global(run_config)

    def context(run_id: int) -> Context:  # a fresh Flower run (and context.state) each time
        return Context(run_id=run_id, node_id=7, node_config=site, state=RecordDict(), run_config=run_config)

    first = _train(arrays, context(1), 1, "run-a")
    assert not first.has_error(), first.error
    assert set(ledger.runs) == {"run-a"}  # keyed by the server's run key, not Flower's run id
    before = ledger.path.read_bytes()

    # the resumed run (another Flower run id) asks round 1 again with the same global adapter
    again = _train(arrays, context(2), 1, "run-a")
    assert not again.has_error(), again.error
    assert ledger.path.read_bytes() == before, "a replayed round must record no spend"
    assert arrays_digest(again.content["arrays"]) == arrays_digest(first.content["arrays"])
    assert dict(again.content["metrics"]) == dict(first.content["metrics"])
    assert "kept reply is sent again (no step, no new epsilon)" in capsys.readouterr().out

    # the same round with another global is a new release: trained, and its steps are spent
    other = ArrayRecord({k: Array(v.numpy() + np.float32(0.01)) for k, v in arrays.items()})
    retrained = _train(other, context(3), 1, "run-a")
    assert not retrained.has_error(), retrained.error
    assert total_steps(ledger.runs["run-a"]) == 1 + 4  # the run's DP count, then two rounds' steps
    assert set(ledger.runs) == {"run-a"}


def test_two_messages_of_one_run_key_at_once_train_the_round_once(tmp_path, frame, run_config, capsys):
    # a dead run's last message, delivered after the SuperLink restarts, and the resumed run's
    data = tmp_path / "site.csv"
    frame.to_csv(data, index=False)
    site = {"data-file": str(data), "state-dir": init_site(tmp_path / "state")}
    arrays = _global(run_config)
    contexts = [
        Context(run_id=i, node_id=7, node_config=site, state=RecordDict(), run_config=run_config)
        for i in (1, 2)
    ]
    with ThreadPoolExecutor(2) as pool:
        replies = list(pool.map(lambda ctx: _train(arrays, ctx, 1, "run-a"), contexts))
    assert not any(r.has_error() for r in replies)
    assert arrays_digest(replies[0].content["arrays"]) == arrays_digest(replies[1].content["arrays"])
    assert total_steps(PrivacyLedger(tmp_path / "state" / "privacy_ledger.json").runs["run-a"]) == 1 + 2
    assert capsys.readouterr().out.count("kept reply is sent again") == 1


def test_a_bad_run_key_is_refused_before_any_step(tmp_path, frame, run_config):
    data = tmp_path / "site.csv"
    frame.to_csv(data, index=False)
    site = {"data-file": str(data), "state-dir": init_site(tmp_path / "state")}
    ctx = Context(run_id=1, node_id=7, node_config=site, state=RecordDict(), run_config=run_config)
    reply = _train(_global(run_config), ctx, 1, "../../etc/passwd")
    assert reply.has_error() and reply.error.reason == "site-ledger-error"
    assert not (tmp_path / "state" / "privacy_ledger.json").exists()


def test_kept_replies_round_trip_in_a_state_dir_and_in_context_state(tmp_path):
    arrays = ArrayRecord({"b": Array(np.arange(6, dtype=np.float32).reshape(2, 3)), "a": Array(np.ones(2))})
    kept = KeptReply("key-1", 2, arrays_digest(arrays), arrays, {"num-examples": 5, "epsilon": float("inf")})
    for state_dir in (tmp_path / "state", None):
        ctx = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
        store = ReplyStore(ctx, state_dir)
        assert store.load("key-1") is None
        store.keep(kept)
        loaded = store.load("key-1")
        assert loaded.answers("key-1", 2, kept.global_digest) and not loaded.answers(
            "key-1", 3, kept.global_digest
        )
        assert list(loaded.arrays.keys()) == ["b", "a"] and loaded.metrics == kept.metrics
        assert arrays_digest(loaded.arrays) == kept.global_digest
        assert store.load("key-2") is None
    file = next((tmp_path / "state" / "replies").glob("*.npz"))
    file.write_bytes(b"not an npz")  # an unreadable kept reply: the round is trained again
    assert ReplyStore(ctx, tmp_path / "state").load("key-1") is None


def test_a_checkpoint_loads_bit_for_bit_so_the_sites_see_the_same_global(tmp_path, run_config):
    settings = settings_from(run_config)
    trained = build_model(settings.resolved(), LABELS, torch.device("cpu"))
    with torch.no_grad():
        for param in adapter_state(trained).values():
            param.add_(torch.randn_like(param))
    sent = adapter_to_record(trained)
    _save(trained, tmp_path / "round-001", LABELS)
    assert not list(tmp_path.glob(".*partial"))
    fresh = build_model(settings.replace(seed=7).resolved(), LABELS, torch.device("cpu"))
    loaded = load_checkpoint(fresh, tmp_path / "round-001")
    assert list(loaded.keys()) == list(sent.keys())
    assert arrays_digest(loaded) == arrays_digest(sent)


def test_a_truncated_checkpoint_falls_back_to_the_round_before_it_with_one_warning(
    tmp_path, run_config, caplog
):
    settings = settings_from(run_config)
    run_dir = tmp_path / "runs" / "cut"
    run_dir.mkdir(parents=True)
    record = run_record(run_config, {}, LABELS)
    write_config(run_dir, record, "4242")
    log = RunLog(run_dir, {})
    sent = []
    for r in range(3):
        model = build_model(settings.replace(seed=r).resolved(), LABELS, torch.device("cpu"))
        _save(model, run_dir / f"round-{r:03d}", LABELS)
        sent.append(adapter_to_record(model))
        log.round(r, {}, {})
    cut = run_dir / "round-002" / "adapter_model.safetensors"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])  # non-empty: passes find's check
    point = find("cut", run_dir.parent.resolve(), record, num_rounds=3)
    assert point.last_round == 2
    model = build_model(settings.replace(seed=9).resolved(), LABELS, torch.device("cpu"))
    with caplog.at_level("WARNING"):
        point, loaded = load_last_good(model, point)
    assert point.last_round == 1 and [r["round"] for r in point.rows] == [0, 1]
    assert arrays_digest(loaded) == arrays_digest(sent[1])
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "round-002" in warning and "resuming after round 1" in warning and "\n" not in warning
    commit(point, record, run_id=8)
    assert not (run_dir / "round-002").exists() and (run_dir / "round-001").is_dir()
    for r in (0, 1):
        (run_dir / f"round-{r:03d}" / "adapter_model.safetensors").write_bytes(b"\x08\x00")
    with pytest.raises(ResumeError, match="no earlier round") as err:
        load_last_good(model, find("cut", run_dir.parent.resolve(), record, num_rounds=3))
    assert "\n" not in str(err.value)


def _fake_run(root: Path, rounds_logged: int, rounds_saved: int) -> tuple[Path, dict]:
    """A run dir as a crash leaves it: checkpoints, log rows and a line cut in half."""
    run_dir = root / "crashed"
    run_dir.mkdir(parents=True)
    record = run_record({"lr": 0.1, "resume": ""}, {"lr": 0.1}, LABELS)
    write_config(run_dir, record, "4242")
    for r in range(rounds_saved + 1):
        folder = run_dir / f"round-{r:03d}"
        folder.mkdir()
        for name in ("adapter_model.safetensors", "adapter_config.json", "labels.json"):
            (folder / name).write_text("x")
    log = RunLog(run_dir, {})
    for r in range(rounds_logged + 1):
        log.round(r, {"train-replies": 2}, {"accuracy": r / 10})
    with (run_dir / "metrics.jsonl").open("a") as fh:
        fh.write('{"round": 9, "cut')
    (run_dir / ".round-009.partial").mkdir()
    (run_dir / "final-adapter").mkdir()
    return run_dir, record


def test_the_resume_point_is_the_last_round_with_checkpoint_and_log_row(tmp_path):
    run_dir, record = _fake_run(tmp_path / "runs", rounds_logged=1, rounds_saved=2)
    root = (tmp_path / "runs").resolve()
    submitted = run_record({"lr": 0.1, "resume": str(run_dir)}, {"lr": 0.1}, LABELS)
    point = find("crashed", root, submitted, num_rounds=3)
    assert (point.last_round, point.run_key, [r["round"] for r in point.rows]) == (1, "4242", [0, 1])
    assert (run_dir / "round-002").exists(), "find changes nothing"
    commit(point, submitted, run_id=77)
    RunLog(run_dir, {}, point.rows)
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "config.json", "metrics.csv", "metrics.jsonl", "round-000", "round-001",
    ]  # fmt: skip
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == [0, 1]
    stored = json.loads((run_dir / "config.json").read_text())
    assert stored["run-key"] == "4242" and [r["from-round"] for r in stored["resumes"]] == [1]
    assert (run_dir / "metrics.csv").read_text().count("\n") == 3


def test_a_resume_that_does_not_fit_is_refused_in_one_line(tmp_path):
    run_dir, record = _fake_run(tmp_path / "runs", rounds_logged=1, rounds_saved=1)
    root = (tmp_path / "runs").resolve()
    changed = run_record({"lr": 0.5, "seed": 1}, {"lr": 0.5}, LABELS)
    with pytest.raises(ResumeError) as err:
        find(str(run_dir), root, changed, num_rounds=3)
    assert "run-config.lr, run-config.seed, settings.lr" in str(err.value) and "\n" not in str(err.value)
    for raw, words in [
        ("../elsewhere", "not a folder directly inside run-dir"),
        ("missing", "does not exist"),
    ]:
        with pytest.raises(ResumeError, match=words):
            find(raw, root, record, num_rounds=3)
    (run_dir / "result.json").write_text("{}")
    with pytest.raises(ResumeError, match="the run finished"):
        find("crashed", root, record, num_rounds=3)
    assert (run_dir / "final-adapter").exists(), "a refused resume changes nothing"


def _logged_rounds(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(x)["round"] for x in lines if x.endswith("}")]


def _steps(state: Path, key: str) -> int:
    path = state / "privacy_ledger.json"
    runs = PrivacyLedger(path).runs if path.exists() else {}
    return total_steps(runs[key]) - 1 if key in runs else 0  # DP-SGD steps: the run's DP count is 1


@pytest.mark.slow
def test_a_run_killed_after_round_1_resumes_with_no_epsilon_spent_twice(tiny_checkpoint, tmp_path):
    shards = write_shards("drug-reviews", 2, "natural", "condition", 1.0, 42, tmp_path / "shards")
    cli = FlowerCLI(tmp_path / "cli", "deploy")
    port = free_port()
    cli.write_connection(f"127.0.0.1:{port}")
    config = {
        "model": str(tiny_checkpoint),
        "num-server-rounds": 3,
        "max-steps": 2,
        "max-length": 32,
        "batch-size": 16,
        "run-dir": str(tmp_path / "runs"),
        "run-name": "crash",
    }
    run_dir = tmp_path / "runs" / "crash"
    home = tmp_path / "superlink"
    states = [tmp_path / f"site-{i}" / "state" for i in (1, 2)]  # start_supernodes' layout
    sites, link = [], None
    try:
        link = start_superlink(home, port, cli.env, tmp_path)
        sites = start_supernodes(port, shards, tmp_path, cli.env)
        submitted = cli.call("run", ".", cli.connection, "--run-config", run_config_arg(config))
        assert submitted.get("success"), submitted
        key = str(submitted["run-id"])
        wait_until(
            "round 1's checkpoint and log row", lambda: 1 in _logged_rounds(run_dir), procs=[link, *sites]
        )
        # site 2 answers no more: the server waits in round 2 while site 1 trains it and records it
        os.killpg(sites[1].pid, signal.SIGSTOP)
        wait_until("site 1 to train round 2", lambda: _steps(states[0], key) == 4, procs=[link, sites[0]])
        round_1 = (run_dir / "round-001" / "adapter_model.safetensors").read_bytes()
        rows_before = (run_dir / "metrics.jsonl").read_text().splitlines()
        assert _logged_rounds(run_dir) == [0, 1] and not (run_dir / "round-002").exists()

        doomed = {link.pid} | descendants({link.pid})  # the SuperLink, its SuperExec and ServerApp
        os.killpg(link.pid, signal.SIGKILL)
        for pid in filter(is_alive, doomed):
            os.kill(pid, signal.SIGKILL)
        link.wait()
        os.killpg(sites[1].pid, signal.SIGCONT)
        wait_until("the old ServerApp to be gone", lambda: not any(map(is_alive, doomed)), timeout=30)

        link = start_superlink(home, port, cli.env, tmp_path)  # the same database
        old = cli.call("ls", cli.connection, "--run-id", key).get("runs", [{}])[0]
        outcome = cli.run({**config, "resume": str(run_dir)}, timeout=600)
        logs = "\n".join(s.parent.joinpath("supernode.log").read_text()[-3000:] for s in states)
        assert outcome.ok, f"{outcome}\n{cli.log(outcome.run_id)[-4000:]}\n{logs}"
        # the SuperNodes outlived the SuperLink and reconnected by themselves
        assert all(site.poll() is None for site in sites)
    finally:
        for proc in sites:  # a stopped site would not hear SIGTERM
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGCONT)
        stop_all([link, *sites])

    print(f"the killed run {key} ended {old.get('status')!r}")
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert rows[:2] == rows_before  # rounds 0 and 1 kept as they were
    assert [json.loads(r)["round"] for r in rows] == [0, 1, 2, 3]
    assert all(json.loads(r)["train-replies"] == 2 for r in rows[1:])
    assert (run_dir / "round-001" / "adapter_model.safetensors").read_bytes() == round_1
    assert (run_dir / "final-adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((run_dir / "result.json").read_text())["rounds"] == 3
    stored = json.loads((run_dir / "config.json").read_text())
    assert stored["run-key"] == key and [r["from-round"] for r in stored["resumes"]] == [1]

    site_1_log = states[0].parent.joinpath("supernode.log").read_text()
    assert site_1_log.count("no step, no new epsilon") == 1  # round 2, kept from before the crash
    for state in states:  # one ledger entry per site: 3 rounds x 2 steps, each spent once
        runs = PrivacyLedger(state / "privacy_ledger.json").runs
        assert set(runs) == {key}
        entry = runs[key]
        assert total_steps(entry) == 1 + 6  # the DP count, then 3 rounds of 2 steps
        plan = entry["plan"]
        sigma, q = plan["noise_multiplier"], plan["sample_rate"]
        real = epsilon_for(
            [count_entry(plan["count_noise"]), (sigma, q, 6)], plan["delta"], plan["accountant"]
        )
        assert entry["epsilon"] == pytest.approx(real, rel=1e-6) == run_epsilon(entry)


def test_a_run_key_whose_plan_is_spent_adds_no_step_the_lifetime_check_did_not_count(
    tmp_path, frame, run_config
):
    # the server chooses the run key and the rounds: once a run key's history holds its plan's
    # steps, another round's steps are composed too, and refused above the site's cap
    data = tmp_path / "site.csv"
    frame.to_csv(data, index=False)
    site = {"data-file": str(data), "state-dir": init_site(tmp_path / "state"), "max-epsilon": 7.5}
    config = {**run_config, "target-epsilon": 7.0}
    ledger = PrivacyLedger(tmp_path / "state" / "privacy_ledger.json")

    def context() -> Context:
        return Context(run_id=1, node_id=7, node_config=site, state=RecordDict(), run_config=config)

    arrays = _global(run_config)
    for server_round in (1, 2, 3):  # the whole plan: 3 rounds of 2 steps
        assert not _train(arrays, context(), server_round, "run-a").has_error()
        arrays = ArrayRecord({k: Array(v.numpy() + np.float32(0.01)) for k, v in arrays.items()})
    spent = ledger.path.read_bytes()
    extra = _train(arrays, context(), 4, "run-a")
    assert extra.has_error() and extra.error.reason == "site-refused-lifetime-budget"
    assert ledger.path.read_bytes() == spent


@pytest.mark.usefixtures("server_identity")
def test_a_resumed_strategy_runs_the_remaining_rounds_under_their_real_numbers():
    seen, evaluated = [], []

    def answer(node: int, server_round: int, arrays: ArrayRecord) -> Message:
        seen.append(server_round)
        return reply(node, honest(as_dict(arrays), node + 10 * server_round), dp_metrics(100))

    strategy = AdapterFedAvg(min_available_nodes=2, min_train_nodes=2, fraction_evaluate=0.0)
    strategy.start(
        grid=ScriptedGrid([1, 2], answer),
        initial_arrays=ArrayRecord({k: Array(v) for k, v in global_adapter().items()}),
        num_rounds=3,
        evaluate_fn=lambda server_round, arrays: evaluated.append(server_round),
        first_round=2,  # round 1's checkpoint is the initial global
    )
    assert seen == [2, 2, 3, 3] and evaluated == [2, 3]  # the starting checkpoint is not redone
    assert sorted(strategy.rounds) == [2, 3] and strategy.round_offset == 0
    with pytest.raises(ValueError, match="first_round=5"):
        strategy.start(grid=ScriptedGrid([1, 2], answer), initial_arrays=None, num_rounds=3, first_round=5)
