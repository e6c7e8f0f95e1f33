"""Resume a run that a server crash interrupted: ``resume=<run dir>`` in the run config.

The run dir's ``config.json`` holds the run key (``run-key``: the Flower run id of the run's
first start) that the ServerApp sends to the sites in every train and evaluate config; the sites
key their ledger entry and kept replies by it (clients/handlers.py, clients/replay.py), so a resumed
run continues the same ledger entry and a round a site already trained on the same global
adapter is answered from its kept reply, with no new ε.

A resume (``find``, then ``load_last_good``, then ``commit``), with the run folder locked
(server/runlock.py) before ``find``:

1. ``resume`` names a folder directly inside ``run-dir`` (a plain name, or a path to it) that
   holds a ``config.json`` and no ``result.json`` (a finished run is not resumed);
2. that ``config.json`` must match this submission: the run config (all keys but ``resume``),
   the resolved settings and the labels; otherwise one line names the differing keys;
3. the resume point is the last round k whose checkpoint folder ``round-k/`` is complete and
   whose ``metrics.jsonl`` row exists, with the rows of rounds 0..k all present;
4. when ``round-k/`` cannot be read after all (truncated: ``load_last_good``), round k−1 is the
   resume point, with one warning line;
5. rows after k, checkpoint folders after k, partial folders and ``final-adapter/`` are removed;
   the log keeps rows 0..k; the ServerApp loads ``round-k/`` as the global adapter and runs
   rounds k+1 .. ``num-server-rounds`` into the same folder (``server-round`` and
   ``num-rounds`` keep their real values, so the sites' privacy plans stay as calibrated).

Resuming is explicit, never automatic: Flower 1.42's SuperLink marks a run whose ServerApp died
``finished:failed`` and does not start it again after a restart, and a new submission that
silently continued an old folder could mix two experiments. ``config.json`` lists every resume
(``resumes``: run id, from round, time).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, replace
from logging import WARNING
from pathlib import Path

from flwr.app import ArrayRecord
from flwr.common import log
from peft import PeftModel
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file

from fedllm.adapters import adapter_to_record
from fedllm.contract import RUN_LOG
from fedllm.files import write_durably
from server.runlog import dumps, plain

CONFIG = "config.json"
CHECKPOINT_FILES = ("adapter_model.safetensors", "adapter_config.json", "labels.json")
IGNORED_KEYS = ("resume",)


class ResumeError(ValueError):
    """The run dir cannot be resumed; the one-line message says why and what to do."""


@dataclass
class ResumePoint:
    """Where a resumed run continues: its folder, run key, last complete round and kept rows."""

    run_dir: Path
    run_key: str
    last_round: int
    rows: list[dict]
    resumes: list[dict]

    @property
    def checkpoint(self) -> Path:
        """The adapter folder the resumed run starts from."""
        return self.run_dir / f"round-{self.last_round:03d}"


def run_record(run_config: dict, settings: dict, labels: list[str]) -> dict:
    """What ``config.json`` stores and a resume compares (as strict JSON reads it back: a
    non-finite value such as ``target-epsilon = inf`` is the string ``"inf"``)."""
    config = {k: v for k, v in run_config.items() if k not in IGNORED_KEYS}
    return json.loads(dumps({"run-config": config, "settings": settings, "labels": labels}))


def write_config(run_dir: Path, record: dict, run_key: str, resumes: list | None = None) -> None:
    """Write ``config.json`` atomically: the run record, its run key and the resumes so far."""
    doc = {"run-key": run_key, **record, "resumes": resumes or []}
    write_durably(run_dir / CONFIG, dumps(doc, indent=2).encode())


def resume_dir(raw: str, root: Path) -> Path:
    """The run dir ``resume`` names (a plain name inside ``root``, or a path directly inside it)."""
    given = Path(str(raw)).expanduser()
    path = (root / given if len(given.parts) == 1 and not given.is_absolute() else given).resolve()
    if path.parent != root:
        raise ResumeError(
            f"run config resume={raw!r} resolves to {path}, not a folder directly inside run-dir "
            f"{root}; give the run folder's name or its path"
        )
    try:
        found = (path / CONFIG).is_file()
    except OSError as err:  # e.g. a name longer than the file system allows (ENAMETOOLONG)
        raise ResumeError(
            f"run config resume={raw[:40]!r}...: {err.strerror or err}; give the run folder's name"
        ) from None
    if not found:
        raise ResumeError(f"run config resume={raw!r}: {path / CONFIG} does not exist; nothing to resume")
    if (path / "result.json").exists():
        raise ResumeError(
            f"run config resume={raw!r}: {path} holds result.json, the run finished; start a new run"
        )
    return path


def _differences(stored: dict, current: dict) -> list[str]:
    """Dotted names of the keys whose values differ (or exist on one side only)."""
    keys = []
    for section in ("run-config", "settings"):
        old, new = stored.get(section, {}), current[section]
        keys += [f"{section}.{k}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if stored.get("labels") != current["labels"]:
        keys.append("labels")
    return keys


def _rows(path: Path) -> dict[int, dict]:
    """The complete rows of ``metrics.jsonl`` by round (a line cut by the crash is ignored)."""
    rows: dict[int, dict] = {}
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # the last line, cut by the crash
        if isinstance(row, dict) and isinstance(row.get("round"), int):
            rows.setdefault(row["round"], row)
    return rows


def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() and (folder / name).stat().st_size > 0 for name in CHECKPOINT_FILES)


def find(raw: str, root: Path, record: dict, num_rounds: int) -> ResumePoint:
    """Check ``resume=raw`` against this submission (``record``: its ``run_record``); the resume point.

    Changes nothing; raises ``ResumeError`` (one line) when the folder cannot be resumed.
    """
    run_dir = resume_dir(raw, root)
    try:
        stored = plain(json.loads((run_dir / CONFIG).read_text()))  # an older file may hold Infinity
    except (OSError, json.JSONDecodeError) as err:
        raise ResumeError(f"{run_dir / CONFIG}: not readable JSON ({err}); cannot resume") from err
    if not isinstance(stored, dict) or not isinstance(stored.get("run-key"), str):
        raise ResumeError(
            f"{run_dir / CONFIG} has no run-key (written before runs could resume): the sites cannot "
            "continue its ledger entries; start a new run"
        )
    if differ := _differences(stored, record):
        raise ResumeError(
            f"run config resume={raw!r}: this submission differs from {run_dir / CONFIG} in "
            f"{', '.join(differ[:8])}{' ...' if len(differ) > 8 else ''}; resubmit with the run's "
            "original settings"
        )
    rows = _rows(run_dir / RUN_LOG)
    last = -1
    while last + 1 in rows and _complete(run_dir / f"round-{last + 1:03d}"):
        last += 1
    if last < 0:
        raise ResumeError(f"{run_dir}: no complete round-000 checkpoint and log row; start a new run")
    if last > num_rounds:
        raise ResumeError(f"{run_dir}: round {last} is past num-server-rounds={num_rounds}; cannot resume")
    resumes = stored.get("resumes", [])
    return ResumePoint(run_dir, stored["run-key"], last, [rows[r] for r in range(last + 1)], resumes)


def commit(point: ResumePoint, record: dict, run_id: int) -> None:
    """Remove what lies after the resume point (later checkpoints, partial folders, the final
    adapter) and add this resume to ``config.json``; the log's rows are rewritten by ``RunLog``."""
    for path in point.run_dir.iterdir():
        name = path.name
        later = name.startswith("round-") and name[6:].isdigit() and int(name[6:]) > point.last_round
        if later or name == "final-adapter" or name.endswith(".partial"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    entry = {"run-id": run_id, "from-round": point.last_round, "time": round(time.time(), 3)}
    write_config(point.run_dir, record, point.run_key, [*point.resumes, entry])


def load_last_good(model: PeftModel, point: ResumePoint) -> tuple[ResumePoint, ArrayRecord]:
    """Load the resume point's checkpoint, or the last earlier one that loads; its point and arrays.

    A checkpoint that passes ``find``'s check (its files exist and are not empty) but cannot be
    read (truncated, corrupt) is skipped with one warning line, and the round before it becomes
    the resume point (its rows are kept; ``commit`` then removes the unreadable folder). Raises
    ``ResumeError`` (one line) when not even round 0 loads.
    """
    while True:
        try:
            return point, load_checkpoint(model, point.checkpoint)
        except (SafetensorError, OSError) as err:
            why = str(err).splitlines()[0] if str(err) else type(err).__name__
            if point.last_round == 0:
                raise ResumeError(
                    f"{point.checkpoint}: cannot be read ({why}) and there is no earlier round; "
                    "start a new run"
                ) from None
            log(
                WARNING,
                "fedllm: %s cannot be read (%s); resuming after round %d instead",
                point.checkpoint,
                why,
                point.last_round - 1,
            )
            point = replace(point, last_round=point.last_round - 1, rows=point.rows[:-1])


def load_checkpoint(model: PeftModel, folder: Path) -> ArrayRecord:
    """Load a checkpoint folder into ``model`` (peft's state dict, names checked); its adapter arrays.

    The arrays are bit for bit those that were sent and saved, in wire order, so the sites see
    the same global adapter (the same digest) as before the crash.
    """
    saved = load_file(str(folder / "adapter_model.safetensors"))
    expected = get_peft_model_state_dict(model)
    if set(saved) != set(expected):
        raise ResumeError(
            f"{folder}: its adapter names differ from this run's model (missing "
            f"{sorted(set(expected) - set(saved))[:3]}, unexpected {sorted(set(saved) - set(expected))[:3]})"
        )
    bad = [k for k in saved if saved[k].shape != expected[k].shape]
    if bad:
        raise ResumeError(f"{folder}: adapter array {bad[0]!r} has another shape than this run's model")
    set_peft_model_state_dict(model, saved)
    return adapter_to_record(model)
