"""docs/results.md from the data files in docs/ and docs/results-manifest.toml.

``python -m simulations.results_doc`` rewrites docs/results.md; ``--check`` exits 1 when the file on
disk differs from what the CSVs and the manifest give (tests/test_results_doc.py runs the same
check). Each manifest ``[[table]]`` names one CSV, the command that made it, the commit it ran at,
how it was measured, and how to tabulate it:

- ``kind = "sweep"``: the sweep's own summary (``simulations.sweep.summary_table``: mean ± std over
  seeds per setting and ε), as ``summary.md`` shows it;
- ``kind = "mean"``: mean ± std of ``values`` over the rows that share the ``by`` columns; with
  ``pivot``, one column per value of that column (e.g. sites × ε);
- ``kind = "rows"``: the listed ``columns`` of every row, as written.

``[elsewhere]`` maps each CSV that another doc tabulates to that doc, so that every CSV in docs/
is accounted for (a new CSV that is in neither fails the check).
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import tomllib
from pathlib import Path

from fedllm.files import write_or_check
from simulations.sweep import summary_table

DOCS = Path(__file__).resolve().parent.parent / "docs"
MANIFEST = "results-manifest.toml"
OUTPUT = "results.md"
KINDS = ("sweep", "mean", "rows")


class ManifestError(ValueError):
    """A manifest entry that cannot be tabulated; the message names the entry and the key."""


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _cell(text: str) -> str:
    """A CSV value as a table cell: as written, but at most 3 decimals, and inf as ∞."""
    value = _number(text)
    if value is None:
        return text
    if not math.isfinite(value):
        return "∞" if value > 0 else text
    decimals = len(text.partition(".")[2]) if "e" not in text.lower() else 99
    if decimals <= 3:
        return text
    return f"{value:.3f}" if abs(value) >= 0.001 else f"{value:.3g}"


def _heading(text: str) -> str:
    """A pivot value in a column heading: 8.0 as 8, inf as ∞."""
    value = _number(text)
    if value is None:
        return text
    return "∞" if value == math.inf else f"{value:g}"


def mean_std(values: list[float]) -> str:
    """``mean ± std`` (sample std; 0 for one value); large values without decimals."""
    if not values:
        return "–"
    mean = statistics.mean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    if abs(mean) >= 1000:
        return f"{mean:,.0f} ± {std:,.0f}"
    return f"{mean:.3f} ± {std:.3f}"


def read_rows(path: Path) -> list[dict[str, str]]:
    """The CSV's rows as dicts of strings; a missing file names itself."""
    if not path.exists():
        raise ManifestError(f"{path.name}: no such data file in docs/ (fix the manifest's csv)")
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _label(entry: dict, column: str) -> str:
    return entry.get("labels", {}).get(column, column)


def _require(entry: dict, rows: list[dict[str, str]], columns: list[str]) -> None:
    have = set(rows[0]) if rows else set()
    missing = [c for c in columns if c not in have]
    if missing:
        raise ManifestError(f"{entry['csv']}: no column {', '.join(missing)} (fix the manifest's columns)")


def sweep_table(entry: dict, rows: list[dict[str, str]]) -> str:
    """The sweep's own summary table (mean ± std over seeds per setting, trainable and ε)."""
    numeric = []
    for row in rows:
        text_columns = ("point", "kind", "trainable")
        parsed: dict = {k: (v if k in text_columns else _number(v)) for k, v in row.items()}
        parsed["trainable"] = row.get("trainable") or entry.get("trainable", "")
        numeric.append(parsed)
    return summary_table(numeric)


def mean_table(entry: dict, rows: list[dict[str, str]]) -> str:
    """Mean ± std of each value over the rows sharing the ``by`` columns (pivoted if asked)."""
    by, values, pivot = list(entry["by"]), list(entry["values"]), str(entry.get("pivot", ""))
    _require(entry, rows, by + values + ([pivot] if pivot else []))
    keys = list(dict.fromkeys(tuple(r[c] for c in by) for r in rows))
    spread: list[str | None] = list(dict.fromkeys(r[pivot] for r in rows)) if pivot else [None]
    heads = [_label(entry, c) for c in by]
    for p in spread:
        prefix = f"{_label(entry, pivot)} {_heading(p)}" if p is not None else ""
        for v in values:
            name = _label(entry, v)
            heads.append(f"{prefix}: {name}" if prefix and len(values) > 1 else prefix or name)
    heads.append("runs per cell")
    lines = ["| " + " | ".join(heads) + " |", "|---" * len(heads) + "|"]
    for key in keys:
        mine = [r for r in rows if tuple(r[c] for c in by) == key]
        cells, counts = [_cell(k) for k in key], set()
        for p in spread:
            group = [r for r in mine if not pivot or r[pivot] == p]
            if group:
                counts.add(len(group))
            for v in values:
                cells.append(mean_std([x for r in group if (x := _number(r[v])) is not None]))
        cells.append("-".join(str(c) for c in sorted({min(counts), max(counts)})))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rows_table(entry: dict, rows: list[dict[str, str]]) -> str:
    """The listed columns of every row (those in ``exact`` as written, every digit)."""
    columns = list(entry["columns"])
    exact = set(entry.get("exact", []))
    _require(entry, rows, columns)
    lines = ["| " + " | ".join(_label(entry, c) for c in columns) + " |", "|---" * len(columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(row[c] if c in exact else _cell(row[c]) for c in columns) + " |")
    return "\n".join(lines)


def table(entry: dict, docs: Path) -> str:
    """One manifest entry's table, from its CSV."""
    kind = entry.get("kind")
    if kind not in KINDS:
        raise ManifestError(f"{entry.get('csv', '?')}: kind {kind!r} (use one of {', '.join(KINDS)})")
    rows = read_rows(docs / entry["csv"])
    if not rows:
        raise ManifestError(f"{entry['csv']}: no rows")
    return {"sweep": sweep_table, "mean": mean_table, "rows": rows_table}[kind](entry, rows)


def section(entry: dict, docs: Path) -> str:
    """One entry: title, command, where and when, the table, notes, plots, the data link."""
    for key in ("title", "csv", "command", "commit", "measured"):
        if not str(entry.get(key, "")).strip():
            name = entry.get("csv", entry.get("title", "?"))
            raise ManifestError(f"{name}: no {key!r} (every table needs one)")
    parts = [
        f"## {entry['title']}",
        f"```bash\n{entry['command'].strip()}\n```",
        f"Data: [{entry['csv']}]({entry['csv']}); commit {entry['commit']}; "
        f"measured {entry['measured'].strip()}",
        table(entry, docs),
    ]
    if entry.get("notes", "").strip():
        parts.append(entry["notes"].strip())
    parts.extend(f"![{Path(p).stem}]({p})" for p in entry.get("plots", []))
    return "\n\n".join(parts)


def unaccounted(manifest: dict, docs: Path) -> list[str]:
    """CSVs in docs/ that neither a table nor ``[elsewhere]`` names."""
    named = {t["csv"] for t in manifest.get("table", [])} | set(manifest.get("elsewhere", {}))
    return sorted(p.name for p in docs.glob("*.csv") if p.name not in named)


def render(docs: Path = DOCS) -> str:
    """The whole of results.md, from the manifest and the CSVs it names."""
    manifest = tomllib.loads((docs / MANIFEST).read_text())
    stray = unaccounted(manifest, docs)
    if stray:
        names = ", ".join(stray)
        raise ManifestError(f"{names}: in docs/ but not in {MANIFEST} (add a [[table]] or [elsewhere])")
    body = [manifest["intro"].strip()]
    body += [section(entry, docs) for entry in manifest.get("table", [])]
    elsewhere = "\n".join(f"- [{name}]({name}): {where}" for name, where in manifest["elsewhere"].items())
    body.append("## Data files tabulated in other docs\n\n" + elsewhere)
    return "\n\n".join(body) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write docs/results.md, or with ``--check`` exit 1 if it is stale."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/results.md is stale")
    parser.add_argument("--docs", type=Path, default=DOCS, help="the docs folder (default: the repo's)")
    args = parser.parse_args(argv)
    return write_or_check(
        args.docs / OUTPUT, render(args.docs), "python -m simulations.results_doc", args.check
    )


if __name__ == "__main__":
    raise SystemExit(main())
