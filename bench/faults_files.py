"""The fault probes that meet files (issue 14), for ``bench/faults.py``'s table.

- run names: ``server.app.make_run_dir`` with a submitted ``run-name``;
- data files: the site's own reading (``clients.site`` join's check, ``load_site_file``, ``tokenize``);
- credentials: ``server.credentials`` main.

Each cell is computed from what the code did (exception text, exit code, files on disk).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
from faults_table import Row
from flwr.app import Context, RecordDict

from clients.site import check_data
from clients.site import main as site_main
from fedllm.config import Settings
from fedllm.data import load_site_file, tokenize
from fedllm.model import load_tokenizer
from server.app import make_run_dir
from server.credentials import main as credentials_main

MAX_LENGTH = 128  # an encoder trainable's auto max-length (the head's is 512)


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


def data_probes(labels: list[str]) -> list[Row]:
    """Bad data files at the site's join check; labels and a 10 MB text through the site's reading
    (``labels``: the federation's)."""
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
        site = load_site_file(ints, "text", "label", labels, Settings(test_fraction=0.2), key)
        labels = sorted(set(site.train["label"]) | set(site.test["label"]))
        report = check_data(ints, "text", "label").replace(str(tmp), "$TMP")
        rows.append(
            Row(
                "data-file",
                "integer labels 0/1/2, one blank cell (CSV)",
                f"read as labels {labels}, checked against the federation's {labels}: accepted",
                f"the blank row only: {report}",
            )
        )

        words = " ".join(f"side{i % 7} effect{i % 13} dose{i % 101}" for i in range(480_000))
        long = tmp / "long.csv"
        pd.DataFrame({"text": [words, *(f"short review {i}" for i in range(9))], "label": "0"}).to_csv(
            long, index=False
        )
        site = load_site_file(long, "text", "label", labels, Settings(test_fraction=0.2), key)
        frame = pd.concat([site.train, site.test], ignore_index=True)
        tokenizer = _Recording(load_tokenizer(""))
        start = time.perf_counter()
        ids = tokenize(frame, tokenizer, labels, MAX_LENGTH).tensors[0]
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
