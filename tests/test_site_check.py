"""A site checks the SuperLink before it joins: the address answers, and with the federation's CA.

``clients.site.check_superlink`` opens a TCP connection and a TLS handshake, nothing Flower-specific,
so a TLS endpoint on 127.0.0.1 presenting the SuperLink's certificate stands in for the SuperLink.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from clients.site import SiteConfigError, check_credentials, check_superlink
from clients.site import main as site_main
from server.credentials import make_ca_and_server, make_site_key
from simulations.superlink import free_port


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    """The federation's CA, the SuperLink's certificate (localhost, 127.0.0.1) and a site key."""
    folder = tmp_path_factory.mktemp("certs")
    make_ca_and_server(folder, ["localhost"])
    make_site_key(folder, "site-1")
    return folder


@contextlib.contextmanager
def superlink_tls(certs: Path) -> Iterator[int]:
    """A TLS endpoint on 127.0.0.1 with the SuperLink's certificate and key; yields its port."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs / "server.pem", certs / "server.key")
    context.set_alpn_protocols(["h2"])
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            # a client that does not trust the certificate hangs up in the middle of the handshake
            with conn, contextlib.suppress(OSError):
                context.wrap_socket(conn, server_side=True).close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        done.set()
        thread.join(timeout=5)
        server.close()


def _join(tmp_path: Path, frame, certs: Path, address: str, ca: Path, capsys) -> tuple[int, str]:
    """``python -m clients.site join`` in this process; (exit code, stderr)."""
    data = tmp_path / "site.csv"
    frame.to_csv(data, index=False)
    argv = [
        "join",
        "--superlink",
        address,
        "--root-certificates",
        str(ca),
        "--auth-key",
        str(certs / "site-1"),
    ]
    argv += ["--data-file", str(data), "--state-dir", str(tmp_path / "state")]
    with pytest.raises(SystemExit) as code:
        site_main(argv)
    return code.value.code, capsys.readouterr().err


def test_the_federations_ca_passes_and_another_ca_stops_the_join_in_one_line(tmp_path, frame, certs, capsys):
    other = tmp_path / "other-ca"
    other.mkdir()
    make_ca_and_server(other, ["localhost"])
    with superlink_tls(certs) as port:
        check_superlink(f"127.0.0.1:{port}", certs / "ca.crt")  # the federation's own CA: no error
        with pytest.raises(SiteConfigError, match="does not trust"):
            check_superlink(f"127.0.0.1:{port}", other / "ca.crt")
        code, err = _join(tmp_path, frame, certs, f"127.0.0.1:{port}", other / "ca.crt", capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert f"{other / 'ca.crt'} does not trust" in err and "ask the operator for the federation's CA" in err
    assert not (tmp_path / "state").exists(), "the site joined nothing and wrote nothing"


def test_an_address_where_nothing_listens_stops_the_join_in_one_line(tmp_path, frame, certs, capsys):
    address = f"127.0.0.1:{free_port()}"
    code, err = _join(tmp_path, frame, certs, address, certs / "ca.crt", capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert f"cannot reach the SuperLink at {address}" in err and "check the address" in err
    assert not (tmp_path / "state").exists()
    with pytest.raises(SiteConfigError, match="expected HOST:PORT"):
        check_superlink("fed.example.org", certs / "ca.crt")


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_a_site_key_others_may_read_is_refused_in_one_line(tmp_path, frame, certs, capsys, mode):
    key = tmp_path / "site-1"
    key.write_bytes((certs / "site-1").read_bytes())
    key.chmod(mode)
    code, err = _join(tmp_path, frame, tmp_path, f"127.0.0.1:{free_port()}", certs / "ca.crt", capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert f"--auth-key {key}: readable by its group or others" in err and f"chmod 600 {key}" in err
    assert not (tmp_path / "state").exists()
    key.chmod(0o600)
    check_credentials(certs / "ca.crt", key)  # the same key, private: accepted
