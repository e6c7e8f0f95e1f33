"""fedllm ServerApp: FedAvg over the sites' LoRA adapters, with checkpoints and a run log.

Run directory (``run-dir``/``<run-name or start time>``, ``-run<id>`` appended if it exists):
``config.json`` (settings used, the run key, resumes), ``metrics.jsonl`` and ``metrics.csv`` (one
row per round), ``round-NNN/`` and ``final-adapter/`` (peft ``save_pretrained`` folders +
``labels.json``, each written to a ``.partial`` folder and renamed into place), ``result.json``.

``resume=<run dir>`` continues a run a server crash interrupted, from its last complete round, in
the same folder and under the same run key (server/resume.py).
"""

from __future__ import annotations

import os
import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from peft import PeftModel

from fedllm.adapters import adapter_from_record, adapter_to_record, full_model_nbytes, save_adapter
from fedllm.config import ResolvedSettings, Settings, settings_from
from fedllm.contract import SCORE_KEYS, VALIDATION_PREFIX, evaluate_config, train_config
from fedllm.data import Splits, load_splits, tokenize
from fedllm.head_init import centre_on_validation
from fedllm.model import build_model, load_tokenizer, pick_device
from fedllm.secagg import SecAggSettings
from fedllm.train import evaluate
from server.client_dp import ClientDPFedAvg, describe
from server.noise import NoiseModel
from server.outcome import RunFailed, untrained_round
from server.resume import commit, find, load_last_good, resume_dir, run_record, write_config
from server.robust import RobustSettings
from server.runlock import RunLock
from server.runlog import RunLog
from server.secagg_fedavg import SecAggFedAvg
from server.settings import ClientDPSettings, ServerSettings
from server.strategy import AdapterFedAvg

app = ServerApp()
EVALUATE_NAMES = ("loss", "accuracy", "macro_f1")  # fedllm.train.evaluate's names of SCORE_KEYS


def _root(server: ServerSettings) -> Path:
    """``run-dir``, resolved."""
    return Path(server.run_dir).expanduser().resolve()


def make_run_dir(context: Context) -> Path:
    """``run-dir/run-name`` (default: the start time); never reuses an existing folder.

    The final path is resolved (symlinks followed) and must lie directly inside ``run-dir``.
    """
    server = ServerSettings.from_run_config(context.run_config)  # a bad run-name fails here
    root = _root(server)
    name = server.run_name or time.strftime("%Y%m%d-%H%M%S")
    for candidate in (name, f"{name}-run{context.run_id}"):
        path = (root / candidate).resolve()
        if path.parent != root:
            raise ValueError(
                f"run config run-name={server.run_name!r} resolves to {path}, outside run-dir {root}; "
                "use a plain folder name"
            )
        try:
            path.mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:  # taken (perhaps a moment ago, by another ServerApp): the next name
            continue
    raise ValueError(
        f"run folders {name!r} and {name}-run{context.run_id} both exist in {root}; use another run-name"
    )


def _save(model, folder: Path, labels: list[str], extra: dict | None = None) -> None:
    """``save_adapter`` into ``.<name>.partial``, then a rename: a crash leaves no half folder."""
    partial = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    save_adapter(model, partial, labels, extra)
    if folder.exists():  # a resumed run trains this round again
        shutil.rmtree(folder)
    os.replace(partial, folder)


def _server_eval_sets(settings: Settings, splits: Splits, labels: list[str]) -> dict:
    """The server's tokenized held-out parts, ``{"": test, "validation-": validation}`` (the key is
    the prefix of their scores; an empty validation part is left out)."""
    tokenizer = load_tokenizer(settings.model)
    parts = {"": splits.test, VALIDATION_PREFIX: splits.validation}
    return {
        prefix: tokenize(frame, tokenizer, labels, settings.max_length, settings.truncation)
        for prefix, frame in parts.items()
        if prefix == "" or len(frame)
    }


def server_scores(model: PeftModel, eval_sets: dict, labels: list[str], head_only: bool) -> dict[str, float]:
    """Loss, accuracy and macro-F1 on the test part (plain keys) and on the validation part
    (``validation-`` keys): settings are chosen on the latter, results reported on the former."""
    scores: dict[str, float] = {}
    for prefix, dataset in eval_sets.items():
        result = evaluate(model, dataset, labels, head_only=head_only)
        scores |= {f"{prefix}{k}": result[m] for k, m in zip(SCORE_KEYS, EVALUATE_NAMES, strict=True)}
    return scores


@dataclass
class OpenedRun:
    """The run folder this ServerApp writes (locked), its run key, kept rows and first round."""

    run_dir: Path
    run_key: str
    rows: list[dict] | None
    first_round: int
    initial: ArrayRecord


def lock_run_dir(run_dir: Path, run_id: int, stack: ExitStack) -> None:
    """Lock ``run_dir`` for this ServerApp until ``stack`` closes (server/runlock.py)."""
    stack.callback(RunLock.acquire(run_dir, run_id).release)


def open_run(context: Context, server: ServerSettings, record: dict, model, stack: ExitStack) -> OpenedRun:
    """A new run folder, locked until ``stack`` closes, or the resumed one (locked by the caller
    before anything in it was read): checked, pruned, its checkpoint loaded into ``model`` (an
    unreadable last one falls back to the round before it, with one warning line)."""
    if not server.resume:
        run_dir = make_run_dir(context)
        lock_run_dir(run_dir, context.run_id, stack)
        write_config(run_dir, record, str(context.run_id))  # the run key: this first run id
        return OpenedRun(run_dir, str(context.run_id), None, 1, adapter_to_record(model))
    num_rounds = server.num_server_rounds
    point, initial = load_last_good(model, find(server.resume, _root(server), record, num_rounds))
    commit(point, record, context.run_id)
    print(
        f"fedllm: resuming {point.run_dir} after round {point.last_round} of {num_rounds} "
        f"(run key {point.run_key}; its checkpoint is the global adapter)"
    )
    return OpenedRun(point.run_dir, point.run_key, point.rows, point.last_round + 1, initial)


def make_strategy(rc: dict, settings, server: ServerSettings, robust: RobustSettings):
    """The run's strategy: SecAgg+, client-level DP (Flower's wrapper) or validated robust FedAvg."""
    secagg = SecAggSettings.from_run_config(rc)
    client_dp = ClientDPSettings.from_run_config(rc)
    if secagg.enabled and client_dp.enabled:
        raise ValueError(
            'run config client-dp-epsilon with aggregation="secagg+": the two are not combined yet; '
            'set client-dp-epsilon=0 or aggregation="plain"'
        )
    if secagg.enabled:  # the server sees only the sum of the sites' updates (server/secagg_fedavg.py)
        print(
            "fedllm: secure aggregation (secagg+): the server sees only the sum; "
            f"clip ±{secagg.clip(settings):g}"
        )
        return SecAggFedAvg(secagg, settings, robust=robust, **server.strategy_kwargs())
    if client_dp.enabled:  # whole sites protected, Flower's wrapper and accountant (server/client_dp.py)
        strategy = ClientDPFedAvg(
            client_dp, server.num_server_rounds, robust.max_num_examples, **server.strategy_kwargs()
        )
        print(f"fedllm: every train reply is validated; {describe(strategy, server.num_server_rounds)}")
        return strategy
    print(f"fedllm: every train reply is validated; {robust.describe()}")
    noise = NoiseModel.of(settings, server.num_server_rounds)  # what the sites' DP noise must look like
    return AdapterFedAvg(robust=robust, noise=noise, **server.strategy_kwargs())


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``num-server-rounds`` rounds over the adapters (server/robust.py's aggregator); log and checkpoint.

    Every train reply is validated and bounded before it is combined (server/strategy.py), so the
    arrays evaluated, checkpointed and sent each round are the previous global or a finite aggregate
    of the expected spec. With ``resume=<run dir>`` the rounds after that folder's last complete
    round are run (server/resume.py). The run folder is locked for this ServerApp's lifetime
    (server/runlock.py): a second ServerApp on it stops with one line.
    """
    server = ServerSettings.from_run_config(context.run_config)  # a bad key (run-name included) fails here
    with ExitStack() as stack:
        if server.resume:  # a bad or busy resume fails before any data is loaded
            lock_run_dir(resume_dir(server.resume, _root(server)), context.run_id, stack)
        _run(grid, context, server, stack)


def _run(grid: Grid, context: Context, server: ServerSettings, stack: ExitStack) -> None:
    """``main``'s body: set up (data, model, run folder), the rounds, the final adapter."""
    rc = context.run_config
    configured = settings_from(rc, source="run config")
    settings = configured.resolved()  # 'auto' made concrete once, here: the library takes these
    robust = RobustSettings.from_run_config(rc)
    labels, splits = _labels(settings, server)
    model = build_model(settings, labels, pick_device(settings.device))
    center = _feature_center(settings, splits, labels, model)
    run = open_run(context, server, run_record(dict(rc), configured.to_dict(), labels), model, stack)
    log = _open_log(run, model)
    eval_sets = (
        _server_eval_sets(settings, splits, labels) if splits is not None and server.server_eval else None
    )
    head_only = settings.trainable == "head"  # the encoder never changes
    strategy = make_strategy(rc, settings, server, robust)
    end = RoundEnd(model, labels, run, log, strategy, server.num_server_rounds, eval_sets, head_only)
    if run.rows:
        strategy.restore(run.rows)  # the kept rounds' direction evidence (cosine) carries on
    strategy.start(
        grid=grid,
        initial_arrays=run.initial,
        num_rounds=server.num_server_rounds,
        train_config=train_config(labels, server.num_server_rounds, run.run_key, center),
        evaluate_config=evaluate_config(labels, run.run_key, center),
        evaluate_fn=end,
        first_round=run.first_round,
    )
    _finish(strategy, model, run, log, labels, configured)  # recorded as configured


def _labels(settings: Settings, server: ServerSettings) -> tuple[list[str], Splits | None]:
    """The run's labels (``labels`` in the run config, else the data set's) and the data set's
    splits where they are needed (server evaluation, or labels to read)."""
    explicit = server.label_list
    if not server.server_eval and explicit and settings.center_features == "none":
        return explicit, None
    splits = load_splits(settings, explicit or None)
    return explicit or splits.labels, splits


def _feature_center(
    settings: ResolvedSettings, splits: Splits | None, labels: list[str], model: PeftModel
) -> list[float] | None:
    """With ``center-features = "validation"``: the mean of the server's validation features, set
    as ``model``'s feature centre (the zero-shot head redone from it) and sent with every round."""
    if settings.center_features == "none" or splits is None:
        return None
    validation = tokenize(
        splits.validation, load_tokenizer(settings.model), labels, settings.max_length, settings.truncation
    )
    if (center := centre_on_validation(model, validation, settings, labels)) is None:
        return None
    print(f"fedllm: the head's input is centred on the mean features of {len(validation)} validation texts")
    return center.tolist()


def _open_log(run: OpenedRun, model: PeftModel) -> RunLog:
    """The run log (its header: the update's and the full model's sizes), after one line on them."""
    full_bytes, update_bytes = full_model_nbytes(model), run.initial.count_bytes()
    print(
        f"fedllm: adapter update {update_bytes:,} B vs full model state dict {full_bytes:,} B "
        f"({full_bytes / update_bytes:.0f}x smaller); run dir {run.run_dir}"
    )
    return RunLog(run.run_dir, {"adapter-bytes": update_bytes, "full-model-bytes": full_bytes}, run.rows)


@dataclass
class RoundEnd:
    """The strategy's ``evaluate_fn``: after each round, the server's scores, the checkpoint and
    the run-log row; a round that aggregated no update stops the run (server/outcome.py)."""

    model: PeftModel
    labels: list[str]
    run: OpenedRun
    log: RunLog
    strategy: Any  # make_strategy's: AdapterFedAvg, SecAggFedAvg or ClientDPFedAvg
    num_rounds: int
    eval_sets: dict | None
    head_only: bool

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Score, checkpoint and log round ``server_round``'s global adapter ``arrays``."""
        if self.run.rows is not None and server_round < self.run.first_round:  # resumed from it: logged
            return None
        record = self.strategy.round_summary(server_round)
        if why := untrained_round(server_round, self.num_rounds, record):
            self.log.round(server_round, record, {})  # its failures, no checkpoint
            raise RunFailed(why)  # server/outcome.py: one line, finished:failed, no final adapter
        adapter_from_record(self.model, arrays)
        scores: dict[str, float] = {}
        if self.eval_sets is not None:
            scores = server_scores(self.model, self.eval_sets, self.labels, self.head_only)
            print(
                f"fedllm: round {server_round} server test: accuracy {scores['accuracy']:.4f} "
                f"macro-F1 {scores['macro-f1']:.4f}"
                + (
                    f"; validation accuracy {scores[VALIDATION_PREFIX + 'accuracy']:.4f}"
                    if len(self.eval_sets) > 1
                    else ""
                )
            )
        _save(self.model, self.run.run_dir / f"round-{server_round:03d}", self.labels)
        self.log.round(server_round, record, scores)
        return MetricRecord(dict(scores)) if scores else None


def _finish(
    strategy: Any, model: PeftModel, run: OpenedRun, log: RunLog, labels: list[str], settings: Settings
) -> None:
    """The final adapter (the last accepted global, round 0's if none was) and ``result.json``."""
    final = strategy.global_arrays
    final = run.initial if final is None else final
    adapter_from_record(model, final)
    _save(model, run.run_dir / "final-adapter", labels, {"settings": settings.to_dict()})
    extra = {}
    if isinstance(strategy, ClientDPFedAvg):  # the run's client-level (ε, δ), and why it stopped early
        spent = strategy.spent()
        extra = {"client-dp": spent, "stopped": strategy.stopped}
        print(
            f"fedllm: client-level DP for the whole run: ε {spent['epsilon']:.4f} at δ {spent['delta']:g} "
            f"over {spent['releases']} releases"
            + (f"; stopped early: {strategy.stopped}" if strategy.stopped else "")
        )
    log.finish(run.run_dir / "final-adapter", extra)
    print(f"fedllm: done; final adapter {run.run_dir / 'final-adapter'}; log {run.run_dir / 'metrics.jsonl'}")
