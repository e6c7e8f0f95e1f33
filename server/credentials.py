"""Generate a federation's credentials: a CA, the SuperLink's TLS certificate, site key pairs.

    python -m server.credentials --out certs --sites 3 [--host superlink --host my.server.org]

Writes ``ca.crt``/``ca.key`` (keep ``ca.key`` offline), ``server.pem``/``server.key`` (the
SuperLink's certificate for the given host names, plus localhost and 127.0.0.1) and, per site,
``site-N`` (EC P-384 private key, OpenSSH format: stays at the site) and ``site-N.pub`` (the
public key the operator registers with ``flwr supernode register``). Existing files are never
overwritten. In a real federation each site runs ``--site-key-only`` itself and sends only its
``.pub`` file. Nothing here is committed: generate credentials at deployment time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

VALID_DAYS = 365


def _write(path: Path, data: bytes, private: bool = False) -> None:
    try:  # created with its final mode: a private key is never readable by others, even briefly
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    except FileExistsError as err:
        raise FileExistsError(
            f"{path} exists; refusing to overwrite credentials (move it away first)"
        ) from err
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def _cert(subject: str, key, issuer_name, issuer_key, ca: bool, hosts: list[str] = ()) -> x509.Certificate:
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
        names = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA384())


def make_ca_and_server(out: Path, hosts: list[str]) -> None:
    """CA key/cert and a SuperLink key/cert for ``hosts`` (+ localhost, 127.0.0.1)."""
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = _cert("fedllm demo CA", ca_key, None, ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP384R1())
    all_hosts = list(dict.fromkeys([*hosts, "localhost", "127.0.0.1"]))
    server_cert = _cert(all_hosts[0], server_key, ca_cert.subject, ca_key, ca=False, hosts=all_hosts)
    _write(out / "ca.key", _pem_key(ca_key), private=True)
    _write(out / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM))
    _write(out / "server.key", _pem_key(server_key), private=True)
    _write(out / "server.pem", server_cert.public_bytes(serialization.Encoding.PEM))


def make_site_key(out: Path, name: str) -> Path:
    """An EC P-384 key pair for one SuperNode: ``name`` (private) and ``name.pub``."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(out / name, private, private=True)
    _write(out / f"{name}.pub", public + b"\n")
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
    args.out.mkdir(parents=True, exist_ok=True)
    if args.site_key_only:
        public = make_site_key(args.out, args.site_key_only)
        print(f"site key: {args.out / args.site_key_only} (keep at the site), {public} (send)")
        return
    make_ca_and_server(args.out, args.host or ["superlink"])
    for i in range(1, args.sites + 1):
        make_site_key(args.out, f"site-{i}")
    print(f"credentials in {args.out}: ca.crt, server.pem/server.key, site-1..{args.sites} (+ .pub)")


if __name__ == "__main__":
    main()
