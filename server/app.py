"""fedllm ServerApp: FedAvg over the sites' LoRA adapters, with checkpoints and a run log.

Run directory (``run-dir``/``<run-name or start time>``, ``-run<id>`` appended if it exists):
``config.json`` (settings used, the run key, resumes), ``metrics.jsonl`` and ``metrics.csv`` (one
row per round), ``round-NNN/`` and ``final-adapter/`` (peft ``save_pretrained`` folders +
``labels.json``, each written to a ``.partial`` folder and renamed into place), ``result.json``.

``resume=<run dir>`` continues a run a server crash interrupted, from its last complete round, in
the same folder and under the same run key (server/resume.py).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedllm.adapters import adapter_from_record, adapter_to_record, full_model_nbytes, save_adapter
from fedllm.config import settings_from
from fedllm.data import load_splits, tokenize
from fedllm.model import build_model, load_tokenizer, pick_device
from fedllm.train import evaluate
from server.noise import NoiseModel
from server.resume import commit, find, load_checkpoint, resume_dir, run_record, write_config
from server.robust import RobustSettings
from server.runlog import RunLog
from server.settings import ServerSettings
from server.strategy import AdapterFedAvg

app = ServerApp()


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
    path = (root / name).resolve()
    if path.exists():
        path = (root / f"{name}-run{context.run_id}").resolve()
    if path.parent != root:
        raise ValueError(
            f"run config run-name={server.run_name!r} resolves to {path}, outside run-dir {root}; "
            "use a plain folder name"
        )
    path.mkdir(parents=True, exist_ok=False)
    return path


def _save(model, folder: Path, labels: list[str], extra: dict | None = None) -> None:
    """``save_adapter`` into ``.<name>.partial``, then a rename: a crash leaves no half folder."""
    partial = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    save_adapter(model, partial, labels, extra)
    if folder.exists():  # a resumed run trains this round again
        shutil.rmtree(folder)
    os.replace(partial, folder)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``num-server-rounds`` rounds over the adapters (server/robust.py's aggregator); log and checkpoint.

    Every train reply is validated and bounded before it is combined (server/strategy.py), so the
    arrays evaluated, checkpointed and sent each round are the previous global or a finite aggregate
    of the expected spec. With ``resume=<run dir>`` the rounds after that folder's last complete
    round are run (server/resume.py).
    """
    rc = context.run_config
    settings = settings_from(rc)
    robust = RobustSettings.from_run_config(rc)
    server = ServerSettings.from_run_config(rc)  # a bad key (run-name included) fails here
    num_rounds, resume, server_eval = server.num_server_rounds, server.resume, server.server_eval
    if resume:
        resume_dir(resume, _root(server))  # a bad resume fails before any data is loaded
    explicit = server.label_list
    splits = load_splits(settings, explicit or None) if (server_eval or not explicit) else None
    labels = explicit or splits.labels
    model = build_model(settings, labels, pick_device(settings.device))
    record = run_record(dict(rc), settings.to_dict(), labels)
    rows, first_round = None, 1
    if resume:
        point = find(resume, _root(server), record, num_rounds)
        initial = load_checkpoint(model, point.checkpoint)
        commit(point, record, context.run_id)
        run_dir, run_key, rows, first_round = point.run_dir, point.run_key, point.rows, point.last_round + 1
        print(
            f"fedllm: resuming {run_dir} after round {point.last_round} of {num_rounds} "
            f"(run key {run_key}; its checkpoint is the global adapter)"
        )
    else:
        run_dir, run_key = make_run_dir(context), str(context.run_id)  # the run key: this first run id
        write_config(run_dir, record, run_key)
        initial = adapter_to_record(model)
    full_bytes = full_model_nbytes(model)
    update_bytes = initial.count_bytes()
    print(
        f"fedllm: adapter update {update_bytes:,} B vs full model state dict {full_bytes:,} B "
        f"({full_bytes / update_bytes:.0f}x smaller); run dir {run_dir}"
    )
    print(f"fedllm: every train reply is validated; {robust.describe()}")
    test_ds = None
    if server_eval and splits is not None:
        test_ds = tokenize(
            splits.test,
            load_tokenizer(settings.model),
            labels,
            settings.max_length,
            settings.truncation,
        )
    head_only = settings.resolved().trainable == "head"  # the encoder never changes
    log = RunLog(run_dir, {"adapter-bytes": update_bytes, "full-model-bytes": full_bytes}, rows)

    def evaluate_and_checkpoint(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if resume and server_round < first_round:  # the checkpoint this run resumes from: logged
            return None
        adapter_from_record(model, arrays)
        scores = {}
        if test_ds is not None:
            result = evaluate(model, test_ds, labels, head_only=head_only)
            scores = {
                "loss": result["loss"],
                "accuracy": result["accuracy"],
                "macro-f1": result["macro_f1"],
            }
            print(
                f"fedllm: round {server_round} server test: accuracy {result['accuracy']:.4f} "
                f"macro-F1 {result['macro_f1']:.4f}"
            )
        _save(model, run_dir / f"round-{server_round:03d}", labels)
        log.round(server_round, strategy.round_summary(server_round), scores)
        return MetricRecord(scores) if scores else None

    noise = NoiseModel.of(settings, num_rounds)  # what the sites' DP noise must look like (noise check)
    strategy = AdapterFedAvg(robust=robust, noise=noise, **server.strategy_kwargs())
    if rows:
        strategy.restore(rows)  # the kept rounds' direction evidence (cosine) carries on
    strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=num_rounds,
        train_config=ConfigRecord(
            {"labels": json.dumps(labels), "num-rounds": num_rounds, "run-key": run_key}
        ),
        evaluate_config=ConfigRecord({"labels": json.dumps(labels), "run-key": run_key}),
        evaluate_fn=evaluate_and_checkpoint,
        first_round=first_round,
    )
    final = strategy.global_arrays
    final = initial if final is None else final  # the last accepted global (round 0's if none was)
    adapter_from_record(model, final)
    _save(model, run_dir / "final-adapter", labels, {"settings": settings.to_dict()})
    log.finish(run_dir / "final-adapter")
    print(f"fedllm: done; final adapter {run_dir / 'final-adapter'}; log {run_dir / 'metrics.jsonl'}")
