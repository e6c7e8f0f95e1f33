"""Generate a federation's credentials: a CA, the SuperLink's TLS certificate, site key pairs.

    python -m server.credentials --out certs --sites 3 [--host superlink --host my.server.org]

Writes ``ca.crt``/``ca.key`` (keep ``ca.key`` offline), ``server.pem``/``server.key`` (the
SuperLink's certificate for the given host names, plus localhost and 127.0.0.1) and, per site,
``site-N`` (EC P-384 private key, OpenSSH format: stays at the site) and ``site-N.pub`` (the
public key the operator registers with ``flwr supernode register``). Existing files are never
overwritten: every output is checked (plain distinct names, a writable folder, no file already
there) before the first is written, and a failure is one line that leaves nothing behind. A folder
it creates is 0700 and private keys are 0600, whatever the umask. In a real federation each
site runs ``--site-key-only`` itself and sends only its ``.pub`` file. Nothing here is
committed: generate credentials at deployment time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

VALID_DAYS = 365
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class CredentialsError(ValueError):
    """Credentials cannot be written; the message names the path and the fix."""


@dataclass(frozen=True)
class Output:
    """One file to write: its name in the output folder, its bytes, whether it is a secret."""

    name: str
    data: bytes
    private: bool = False


def _missing_folders(out: Path) -> list[Path]:
    """``out`` and its missing parents, outermost first; refuses a path through a file."""
    missing = []
    for folder in (out, *out.parents):
        if folder.is_dir():
            break
        if os.path.lexists(folder):
            raise CredentialsError(f"{folder} exists and is not a folder; choose another --out")
        missing.append(folder)
    else:
        folder = Path.cwd()
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CredentialsError(f"{folder}: not writable by this user; choose another --out")
    return missing[::-1]


def check_outputs(out: Path, outputs: list[Output]) -> list[Path]:
    """Every check before anything is written: plain, distinct names; ``out`` a writable folder
    (or creatable); none of the files there already. Returns the folders to create."""
    names = [o.name for o in outputs]
    bad = [n for n in names if not NAME.fullmatch(n)]
    if bad:
        raise CredentialsError(f"{bad[0]!r}: not a plain file name; use letters, digits, '.', '_', '-'")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise CredentialsError(f"{twice}: asked to write these twice; choose distinct site names")
    missing = _missing_folders(out)
    if not missing:
        exist = [n for n in names if os.path.lexists(out / n)]
        if exist:
            raise CredentialsError(
                f"{out}: {', '.join(exist)} exist; refusing to overwrite credentials - move them away "
                "or choose another --out (nothing was written)"
            )
    return missing


def write_outputs(out: Path, outputs: list[Output]) -> None:
    """Check everything (``check_outputs``), then write it all or nothing.

    Folders it creates get mode 0700 whatever the umask; private keys are created 0600 and
    other files 0644. If a write still fails (a full disk, a file appearing meanwhile), the
    files and folders this call made are removed again, so no key is left without its pair.
    """
    missing = check_outputs(out, outputs)
    made: list[Path] = []
    try:
        for folder in missing:
            folder.mkdir()
            made.append(folder)
            os.chmod(folder, 0o700)  # mkdir's mode is cut by the umask, never raised by it
        for output in outputs:
            path = out / output.name
            _write(path, output.data, output.private)
            made.append(path)
    except OSError as err:
        for path in reversed(made):  # files first, then the (now empty) folders made here
            if path.is_dir():
                path.rmdir()
            else:
                path.unlink()
        raise CredentialsError(f"{err.filename or out}: {err.strerror or err}; nothing was written") from err


def _write(path: Path, data: bytes, private: bool = False) -> None:
    # created with its final mode: a private key is never readable by others, even briefly
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        os.fchmod(fh.fileno(), 0o600 if private else 0o644)
        fh.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def _cert(
    subject: str, key, issuer_name, issuer_key, ca: bool, hosts: Sequence[str] = ()
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name or name)  # None: self-signed
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if hosts:
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA384())


def ca_and_server_outputs(hosts: list[str]) -> list[Output]:
    """CA key/cert and a SuperLink key/cert for ``hosts`` (+ localhost, 127.0.0.1)."""
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = _cert("fedllm demo CA", ca_key, None, ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP384R1())
    all_hosts = list(dict.fromkeys([*hosts, "localhost", "127.0.0.1"]))
    server_cert = _cert(all_hosts[0], server_key, ca_cert.subject, ca_key, ca=False, hosts=all_hosts)
    return [
        Output("ca.key", _pem_key(ca_key), private=True),
        Output("ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM)),
        Output("server.key", _pem_key(server_key), private=True),
        Output("server.pem", server_cert.public_bytes(serialization.Encoding.PEM)),
    ]


def site_key_outputs(name: str) -> list[Output]:
    """An EC P-384 key pair for one SuperNode: ``name`` (private, OpenSSH) and ``name.pub``."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return [Output(name, private, private=True), Output(f"{name}.pub", public + b"\n")]


def make_ca_and_server(out: Path, hosts: list[str]) -> None:
    """Write ``ca_and_server_outputs(hosts)`` to ``out`` (all or nothing)."""
    write_outputs(out, ca_and_server_outputs(hosts))


def make_site_key(out: Path, name: str) -> Path:
    """Write the key pair ``name``/``name.pub`` to ``out`` (both or neither); return the .pub path."""
    write_outputs(out, site_key_outputs(name))
    return out / f"{name}.pub"


def main(argv: list[str] | None = None) -> None:
    """Command-line entry."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("certs"))
    parser.add_argument("--sites", type=int, default=3, help="site key pairs to make (site-1 ...)")
    parser.add_argument("--host", action="append", default=[], help="SuperLink host name or IP (repeatable)")
    parser.add_argument("--site-key-only", metavar="NAME", help="only make one site key pair NAME")
    args = parser.parse_args(argv)
    if args.sites < 0:
        parser.error("--sites must be 0 or more")
    try:
        if args.site_key_only:
            write_outputs(args.out, site_key_outputs(args.site_key_only))
            print(
                f"site key: {args.out / args.site_key_only} (keep at the site), "
                f"{args.out / args.site_key_only}.pub (send)"
            )
            return
        outputs = ca_and_server_outputs(args.host or ["superlink"])
        for i in range(1, args.sites + 1):
            outputs += site_key_outputs(f"site-{i}")
        write_outputs(args.out, outputs)  # every file checked before the first is written
    except CredentialsError as err:
        parser.exit(2, f"server.credentials: {err}\n")
    print(f"credentials in {args.out}: ca.crt, server.pem/server.key, site-1..{args.sites} (+ .pub)")


if __name__ == "__main__":
    main()
