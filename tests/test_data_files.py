"""fedllm/data.py and fedllm/readers.py on bad data files: each ends in one line naming the file and the fix.

Found on 266a74c (issue 14): a folder as data-file gave a 20-line traceback; integer labels with
one blank cell became '0.0', '1.0', '2.0' (the site was refused every round); a 10 MB text was
tokenized whole before truncation (18.5 s, +1.3 GB); JSONL errors gave a character offset, not a line.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from clients.site import main as site_main
from fedllm.config import Settings
from fedllm.data import CHARS_PER_TOKEN, DataError, clean, load_site_file, read_table, tokenize

NOBODY = 65534
KEY = b"a site's own secret split key"


def _one_line(err: BaseException | str) -> str:
    text = str(err)
    assert "\n" not in text.strip() and "Traceback" not in text
    return text


# ---------------------------------------------------------------- unusable data files


def _folder(tmp_path: Path) -> Path:
    (tmp_path / "reviews").mkdir()
    (tmp_path / "reviews" / "part-1.csv").write_text("text,label\nfine,positive\n")
    return tmp_path / "reviews"


def _folder_named_csv(tmp_path: Path) -> Path:
    (tmp_path / "reviews.csv").mkdir()
    return tmp_path / "reviews.csv"


def _socket(tmp_path: Path) -> Path:
    path = tmp_path / "reviews.csv"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))  # the socket file stays after close; opening it fails for root too
    return path


def _fifo(tmp_path: Path) -> Path:
    path = tmp_path / "reviews.csv"
    os.mkfifo(path)  # without the check, reading it would block for ever (no writer)
    return path


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda tmp: tmp / "missing.csv", "file not found"),
        (_folder, "a folder, not a data file"),
        (_folder_named_csv, "a folder, not a data file"),
        (_socket, "not a regular file"),
        (_fifo, "not a regular file"),
    ],
    ids=["missing", "folder", "folder-named-csv", "socket", "fifo"],
)
def test_unusable_data_file_is_one_line_naming_it(tmp_path, make, says):
    path = make(tmp_path)
    with pytest.raises(DataError) as caught:
        read_table(path, "text", "label")
    message = _one_line(caught.value)
    assert message.startswith(f"{path}: {says}")
    assert ".csv, .tsv" in message or "data-file" in message  # the fix


def test_site_join_reports_a_folder_as_data_file_in_one_line(tmp_path, capsys):
    folder = _folder(tmp_path)
    argv = ["join", "--superlink", "127.0.0.1:9", "--insecure", "--data-file", str(folder)]
    argv += ["--state-dir", str(tmp_path / "state")]
    with pytest.raises(SystemExit) as code:
        site_main(argv)
    assert code.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"site cannot join: {folder}: a folder")
    assert not (tmp_path / "state").exists()  # nothing else happened


def test_unreadable_data_file_is_one_line_naming_it():
    """chmod 000: read by an unprivileged user (root reads through modes, so as root the read
    runs with the effective uid of ``nobody``, which chmod 000 does stop)."""
    with tempfile.TemporaryDirectory() as folder:
        os.chmod(folder, 0o711)  # others may reach the file, not list the folder
        path = Path(folder) / "reviews.csv"
        path.write_text("text,label\ngreat,positive\n")
        os.chmod(path, 0)
        as_root = os.geteuid() == 0
        if as_root:
            os.seteuid(NOBODY)
        try:
            assert path.stat().st_mode & 0o777 == 0  # reachable, but not readable by this user
            with pytest.raises(DataError) as caught:
                read_table(path, "text", "label")
        finally:
            if as_root:
                os.seteuid(0)
            os.chmod(path, 0o600)
    message = _one_line(caught.value)
    assert message.startswith(f"{path}: cannot be read (Permission denied)") and "read access" in message


# ---------------------------------------------------------------- labels as written


def _write_int_labels(path: Path) -> None:
    rows = [(f"review {i}: the drug worked as it said", str(i % 3)) for i in range(30)]
    rows[7] = ("review 7: no rating given", "")  # one blank label cell
    rows[8] = ("review 8: rated NA by the clinic", "NA")  # a value, not a gap
    if path.suffix == ".jsonl":
        typed = [(t, int(lab) if lab.isdigit() else (lab or None)) for t, lab in rows]  # 1, null, "NA"
        path.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in typed))
    else:
        sep = "\t" if path.suffix == ".tsv" else ","
        path.write_text("text" + sep + "label\n" + "".join(f"{t}{sep}{lab}\n" for t, lab in rows))


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_integer_labels_with_a_blank_cell_stay_integers(tmp_path, suffix):
    path = tmp_path / f"site{suffix}"
    _write_int_labels(path)
    frame = read_table(path, "text", "label")
    cleaned, report = clean(frame, str(path))
    assert set(cleaned["label"]) == {"0", "1", "2", "NA"}
    assert report.empty_dropped == 1 and "1 without text or label" in str(report)
    # the federation's label map is '0', '1', '2' (+ 'NA' here): the site is no longer refused
    site = load_site_file(path, "text", "label", ["0", "1", "2", "NA"], Settings(test_fraction=0.2), KEY)
    assert len(site.train) + len(site.test) == 29


def test_float_labels_as_written_stay_as_written(tmp_path):
    path = tmp_path / "site.csv"
    path.write_text("text,label\na,1.0\nb,2.5\nc,\n")
    assert read_table(path, "text", "label")["label"].tolist()[:2] == ["1.0", "2.5"]


# ---------------------------------------------------------------- JSONL errors name the line


@pytest.mark.parametrize(
    ("line", "says"),
    [
        (b'{"text": "b" "label": "x"}', "not valid JSON"),
        (b'["b", "x"]', "a JSON list, not an object"),
        (b'{"text": "b", "label": ["x"]}', "label 'label' is a JSON list"),
        (b'{"text": "caf\xe9", "label": "x"}', "not UTF-8"),
    ],
    ids=["syntax", "not-object", "list-label", "encoding"],
)
def test_jsonl_error_names_the_line(tmp_path, line, says):
    path = tmp_path / "site.jsonl"
    path.write_bytes(b'{"text": "a", "label": "x"}\n\n' + line + b'\n{"text": "c", "label": "y"}\n')
    with pytest.raises(DataError) as caught:
        read_table(path, "text", "label")
    assert _one_line(caught.value).startswith(f"{path}: line 3: {says}")


def test_site_join_reports_a_deeply_nested_jsonl_line_in_one_line(tmp_path, capsys):
    data = tmp_path / "site.jsonl"
    data.write_bytes(b'{"text": "a", "label": "x"}\n' + b"[" * 200_000 + b"\n")  # RecursionError in json
    argv = ["join", "--superlink", "127.0.0.1:9", "--insecure", "--data-file", str(data)]
    argv += ["--state-dir", str(tmp_path / "state")]
    with pytest.raises(SystemExit) as code:
        site_main(argv)
    err = capsys.readouterr().err
    assert code.value.code == 2 and err.count("\n") == 1, err[-2000:]
    assert err.startswith(f"site cannot join: {data}: line 2: JSON nested too deeply")
    assert not (tmp_path / "state").exists()


# ---------------------------------------------------------------- long texts


class _Recording:
    """The tokenizer, recording every text it is asked to tokenize."""

    def __init__(self, inner) -> None:
        object.__setattr__(self, "inner", inner)
        object.__setattr__(self, "texts", [])

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self.inner, name, value)

    def __call__(self, texts, **kwargs):
        self.texts.extend(texts)
        return self.inner(texts, **kwargs)


@pytest.mark.parametrize("truncation", ["right", "left"])
def test_a_10mb_text_is_cut_before_tokenizing_and_gives_the_same_ids(tokenizer, truncation):
    words = [f"side{i % 7} effect{i % 13} dose{i % 101}" for i in range(480_000)]
    long = " ".join(words)
    assert len(long) > 10_000_000
    frame = pd.DataFrame({"text": [long, "short and fine"], "label": ["a", "b"]})
    recording = _Recording(tokenizer)
    ids = tokenize(frame, recording, ["a", "b"], 32, truncation).tensors[0]
    assert max(len(t) for t in recording.texts) <= 32 * CHARS_PER_TOKEN  # not 10 MB
    assert recording.texts[1] == "short and fine"
    part = long[:5000] if truncation == "right" else long[-5000:]  # holds far more than 32 tokens
    tokenizer.truncation_side = truncation
    expected = tokenizer([part, "short and fine"], truncation=True, max_length=32, padding="max_length")
    assert ids.tolist() == expected["input_ids"]
