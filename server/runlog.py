"""The run log: ``metrics.jsonl`` and ``metrics.csv`` (one row per round), ``result.json``.

A resumed run (server/resume.py) starts its log from the rows it keeps (``RunLog(..., rows=)``):
``metrics.jsonl`` is rewritten with exactly those rows (atomically) and ``metrics.csv`` from
them; ``wall-seconds`` continues from the last kept row (the downtime is not counted).

Every JSON file here is strict JSON (``dumps``): a non-finite number is written as the string
``"inf"``, ``"-inf"`` or ``"nan"``, never as a ``NaN`` / ``Infinity`` token.
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedllm.contract import RUN_LOG
from fedllm.files import write_durably


def plain(value: Any) -> Any:
    """Strict-JSON values: non-finite floats become the strings ``"inf"``, ``"-inf"``, ``"nan"``;
    numpy scalars become Python numbers; tuples become lists, keys strings.

    Strings, not null: ε = ∞ is a meaningful value (a reply without DP), and null would read as
    "missing"; a reader turns them back with ``float(value)`` (simulations/sweep.py does).
    """
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` of ``plain(value)``, refusing NaN/Infinity tokens: every JSON file of a run
    folder (``metrics.jsonl``, ``config.json``, ``result.json``) parses with a strict reader."""
    return json.dumps(plain(value), allow_nan=False, **kwargs)


def _flatten(row: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        elif not isinstance(value, list):
            flat[name] = value
    return flat


class RunLog:
    """Appends one row per round; rewrites the CSV with the union of columns each time."""

    def __init__(self, run_dir: Path, header: dict, rows: list[dict] | None = None):
        self.run_dir = run_dir
        self.header = header
        self.rows: list[dict] = [plain(r) for r in rows or []]
        done = float(self.rows[-1].get("wall-seconds", 0.0)) if self.rows else 0.0
        self.start = time.perf_counter() - done
        if rows is not None:  # a resumed log: exactly the kept rows, nothing after them
            text = "".join(dumps(r) + "\n" for r in self.rows)
            write_durably(self.run_dir / RUN_LOG, text.encode())
            self._write_csv()

    def _write_csv(self) -> None:
        flat = [_flatten(r) for r in self.rows]
        columns = list(dict.fromkeys(k for r in flat for k in r))
        with (self.run_dir / "metrics.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            writer.writerows(flat)

    def round(self, server_round: int, received: dict, server_scores: dict) -> None:
        """Record one round: what the strategy received and the server-side test scores."""
        row = {
            "round": server_round,
            "wall-seconds": round(time.perf_counter() - self.start, 3),
            **received,
            "server": server_scores,
        }
        row = plain(row)
        self.rows.append(row)
        with (self.run_dir / RUN_LOG).open("a") as fh:
            fh.write(dumps(row) + "\n")
        self._write_csv()

    def finish(self, final_adapter: Path, extra: dict | None = None) -> dict:
        """Write ``result.json``: the last round's numbers, sizes, where the adapter is, and ``extra``."""
        last = self.rows[-1] if self.rows else {}
        result = plain(
            {
                **self.header,
                "rounds": len(self.rows) - 1,
                "final": last,
                "final-adapter": str(final_adapter),
                "wall-seconds": round(time.perf_counter() - self.start, 3),
                **(extra or {}),
            }
        )
        (self.run_dir / "result.json").write_text(dumps(result, indent=2))
        return result
