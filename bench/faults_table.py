"""The fault table's rows and their markdown (``bench/faults.py`` and ``bench/faults_files.py``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Row:
    """One probe's line of the table."""

    group: str
    probe: str
    happened: str
    lost: str


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def table(rows: list[Row]) -> str:
    """The rows as one markdown table."""
    lines = ["| # | group | probe | what happened | what was lost |", "|---|---|---|---|---|"]
    for i, row in enumerate(rows, start=1):
        cells = [_cell(c) for c in (row.group, f"`{row.probe}`", row.happened, row.lost)]
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
