"""server/credentials.py: it checks every output before writing any, writes all or nothing, 0700/0600.

Found on 266a74c (issue 14): ``server.credentials`` wrote keys before checking its other outputs
(an orphan ``ca.key``, a ``site-1`` key that no longer matched ``site-1.pub``) and made its folder
0777 under umask 000.
"""

from __future__ import annotations

import os
import stat

import pytest

from server.credentials import CredentialsError, Output, write_outputs
from server.credentials import main as credentials_main


def _one_line(err: BaseException | str) -> str:
    text = str(err)
    assert "\n" not in text.strip() and "Traceback" not in text
    return text


def test_credentials_check_every_output_before_writing_any(tmp_path, capsys):
    out = tmp_path / "certs"
    out.mkdir()
    (out / "site-1.pub").write_text("an old key the operator registered\n")
    with pytest.raises(SystemExit) as code:
        credentials_main(["--out", str(out), "--sites", "2"])
    assert code.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "site-1.pub exist" in err and "move them away" in err
    assert sorted(p.name for p in out.iterdir()) == ["site-1.pub"]  # no orphan ca.key, no site-1

    site = tmp_path / "site"
    site.mkdir()
    (site / "ward-7").write_text("someone else's key\n")
    with pytest.raises(SystemExit):
        credentials_main(["--out", str(site), "--site-key-only", "ward-7"])
    assert sorted(p.name for p in site.iterdir()) == ["ward-7"]  # no ward-7.pub that fits no key


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--site-key-only", "../escaped"], "not a plain file name"),
        (["--site-key-only", ".hidden"], "not a plain file name"),
    ],
)
def test_credentials_refuse_bad_names_in_one_line(tmp_path, capsys, argv, says):
    out = tmp_path / "certs"
    with pytest.raises(SystemExit):
        credentials_main(["--out", str(out), *argv])
    assert says in _one_line(capsys.readouterr().err)
    assert not out.exists() and sorted(tmp_path.iterdir()) == []


def test_credentials_out_must_be_a_folder(tmp_path, capsys):
    (tmp_path / "certs").write_text("not a folder")
    with pytest.raises(SystemExit):
        credentials_main(["--out", str(tmp_path / "certs" / "inner")])
    assert f"{tmp_path / 'certs'} exists and is not a folder" in _one_line(capsys.readouterr().err)


def test_credentials_write_all_or_nothing(tmp_path):
    out = tmp_path / "new" / "certs"
    with pytest.raises(CredentialsError, match="asked to write these twice"):
        write_outputs(out, [Output("a", b"1", private=True), Output("a", b"2")])
    # a write that fails half-way (a name the file system refuses) takes back what was written
    with pytest.raises(CredentialsError, match="nothing was written") as caught:
        write_outputs(out, [Output("key", b"secret", private=True), Output("n" * 300, b"public")])
    _one_line(caught.value)
    assert not (tmp_path / "new").exists()


def test_credentials_folder_0700_and_keys_0600_under_umask_000(tmp_path):
    out = tmp_path / "new" / "certs"
    previous = os.umask(0)
    try:
        credentials_main(["--out", str(out), "--sites", "1"])
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o700
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes == {
        "ca.key": 0o600,
        "server.key": 0o600,
        "site-1": 0o600,
        "ca.crt": 0o644,
        "server.pem": 0o644,
        "site-1.pub": 0o644,
    }
