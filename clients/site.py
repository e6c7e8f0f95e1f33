"""A site joins a federation: check everything locally, then run Flower's SuperNode.

    python -m clients.site init --state-dir /state       # once: the site's state folder
    python -m clients.site join --superlink fed.example.org:8000 --root-certificates ca.crt \\
        --auth-key site-1 --data-file /data/reviews.csv --state-dir /state
    python -m clients.site spend --state-dir /state      # this site's lifetime privacy guarantee
    python -m clients.site app-digest fedllm.fab         # the digest `join --pin-app` takes

``join`` checks the data file (columns, rows), the CA certificate and the site key (an OpenSSH
private key no one but its owner may read), that the SuperLink answers and that its certificate
is signed by that CA, and only then starts ``flower-supernode`` with the same flags a site would
give it by hand. Failures are explained in one line each (wrong address, untrusted certificate,
a key others may read, unregistered key, bad data, a privacy ledger that fails validation, a state
folder that is not initialised, or older than its high-water mark). ``init``, ``rebase`` and
``spend`` are in ``clients.state_commands``.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from clients import state_commands
from clients.pin import PIN_KEY, check_pin, digest_of
from clients.policy import SitePolicy
from clients.registration import key_registered
from fedllm.data import DataError, clean, read_table
from fedllm.ledger import LedgerError
from fedllm.settings_reader import declared, key_name
from fedllm.site_state import StateError, open_state, raise_high_water, remember_policy

EXPLAIN = {
    "2004": "the SuperLink refused to activate this site: a SuperNode with this key is still online "
    "(another copy of this site running?), or its key is not registered (send the .pub file to the "
    "operator, who runs `flwr supernode register`)",
    "CERTIFICATE_VERIFY_FAILED": "the SuperLink's certificate is not signed by the CA given with "
    "--root-certificates: ask the operator for the federation's ca.crt",
    "UNAVAILABLE": "the SuperLink did not answer: check --superlink (host:port) and that it runs",
}


ACTIVATION_REFUSED = "[code: 2004]"
ACTIVATION_WAIT_S = 5  # a crashed session is held online <= 60 s: rejoin within 5 s of its end
NOT_REGISTERED = (
    "this site's key is not registered at the SuperLink: send {pub} to the operator, who runs "
    "`flwr supernode register {pub} <connection>`"
)


class SiteConfigError(RuntimeError):
    """Something at the site prevents joining; the message says what and how to fix it."""


def check_data(path: Path, text_column: str, label_column: str) -> str:
    """Read and clean the site's data file; return a one-line description."""
    _, report = clean(read_table(path, text_column, label_column), str(path))
    return str(report)


def check_key_permissions(auth_key: Path) -> None:
    """Refuse a site key that the file's group or anyone else may read (as OpenSSH refuses one):
    whoever reads it can sign in as this site and make it spend its privacy budget."""
    try:
        mode = stat.S_IMODE(auth_key.stat().st_mode)
    except OSError:
        return  # a missing or unreadable key is reported by the parse below
    if mode & 0o044:
        raise SiteConfigError(
            f"--auth-key {auth_key}: readable by its group or others (mode {mode:04o}); "
            f"make it private with `chmod 600 {auth_key}`"
        )


def check_credentials(root_certificates: Path | None, auth_key: Path | None) -> None:
    """The CA certificate parses as PEM and the site key as an OpenSSH private key."""
    if root_certificates is not None:
        try:
            x509.load_pem_x509_certificate(root_certificates.read_bytes())
        except (OSError, ValueError) as err:
            raise SiteConfigError(
                f"--root-certificates {root_certificates}: not a PEM CA certificate ({err})"
            ) from err
    if auth_key is not None:
        check_key_permissions(auth_key)
        try:
            load_ssh_private_key(auth_key.read_bytes(), password=None)
        except (OSError, ValueError) as err:
            raise SiteConfigError(
                f"--auth-key {auth_key}: not an OpenSSH private key ({err}); make one with "
                "`python -m server.credentials --site-key-only NAME`"
            ) from err


def check_superlink(address: str, root_certificates: Path | None, timeout: float = 5.0) -> None:
    """The SuperLink accepts a TCP connection and (with TLS) presents a certificate from our CA."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise SiteConfigError(f"--superlink {address!r}: expected HOST:PORT, e.g. fed.example.org:8000")
    try:
        sock = socket.create_connection((host, int(port)), timeout=timeout)
    except OSError as err:
        raise SiteConfigError(
            f"cannot reach the SuperLink at {address} ({err.strerror or err}): check the address, "
            "the port and that the server is up"
        ) from err
    with sock:
        if root_certificates is None:
            return
        context = ssl.create_default_context(cafile=str(root_certificates))
        context.set_alpn_protocols(["h2"])
        try:
            with context.wrap_socket(sock, server_hostname=host):
                pass
        except ssl.SSLCertVerificationError as err:
            raise SiteConfigError(
                f"the SuperLink at {address} presented a certificate that {root_certificates} does "
                f"not trust ({err.verify_message}): ask the operator for the federation's CA certificate"
            ) from err
        except ssl.SSLError as err:
            raise SiteConfigError(
                f"TLS with the SuperLink at {address} failed ({err}); is it serving TLS?"
            ) from err


def _node_value(value: object) -> str:
    """A node-config value as Flower parses it (TOML): bools and numbers bare, strings quoted."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else f'"{value}"'


def node_config_of(args: argparse.Namespace) -> dict[str, object]:
    """The SuperNode's node config for these join flags (absolute paths, the site's policy)."""
    node_config: dict[str, object] = {
        "data-file": str(Path(args.data_file).resolve()),
        "text-column": args.text_column,
        "label-column": args.label_column,
        "state-dir": str(Path(args.state_dir).resolve()),
    }
    # the site's own policy (clients/policy.py): nothing in a run config can widen it
    node_config["max-epsilon"] = float(args.max_epsilon)
    node_config["max-delta"] = float(args.max_delta)
    node_config["test-fraction"] = float(args.test_fraction)
    for flag in ("allow_no_dp", "release_train_metrics", "release_evaluation"):
        if getattr(args, flag):
            node_config[flag.replace("_", "-")] = True
    if args.high_water_dir:
        node_config["high-water-dir"] = str(Path(args.high_water_dir).resolve())
    if getattr(args, "pin_app", None):
        try:
            node_config[PIN_KEY] = check_pin(args.pin_app)
        except ValueError as err:
            raise SiteConfigError(f"--{err}") from err
    return node_config


def supernode_command(args: argparse.Namespace) -> list[str]:
    """The ``flower-supernode`` command line for these site settings."""
    node_config = node_config_of(args)
    cmd = [str(Path(sys.executable).parent / "flower-supernode"), "--superlink", args.superlink]
    cmd += ["--root-certificates", str(args.root_certificates)] if args.root_certificates else ["--insecure"]
    if args.auth_key:
        cmd += ["--auth-supernode-private-key", str(args.auth_key)]
    cmd += ["--port", str(args.port), "--max-retries", str(args.max_retries)]
    cmd += [
        "--node-config",
        " ".join(f"{k}={_node_value(v)}" for k, v in node_config.items()),
    ]
    return cmd


def join(args: argparse.Namespace) -> int:
    """Check, then run the SuperNode in the foreground; explain a failure in one line."""
    if not args.root_certificates and not args.insecure:
        raise SiteConfigError("give --root-certificates CA.crt (TLS) or, for local tests only, --insecure")
    print(f"site data: {check_data(Path(args.data_file), args.text_column, args.label_column)}")
    check_credentials(args.root_certificates, args.auth_key)
    check_superlink(args.superlink, args.root_certificates)
    if args.auth_key and key_registered(args.superlink, args.root_certificates, args.auth_key) is False:
        raise SiteConfigError(NOT_REGISTERED.format(pub=args.auth_key.with_name(args.auth_key.name + ".pub")))
    node_config = node_config_of(args)
    high_water = node_config.get("high-water-dir")  # init first:
    state = open_state(str(node_config["state-dir"]), None if high_water is None else str(high_water))
    runs = raise_high_water(state)  # a corrupt ledger, or one older than its mark, stops us here
    remember_policy(state, dataclasses.asdict(SitePolicy.from_config(node_config)))
    print(f"privacy ledger: {len(runs)} entr(y/ies) on record in {state.folder}")
    cmd = supernode_command(args)
    for attempt in range(args.activation_retries + 1):
        code, output = _run_supernode(cmd)
        if code == 0 or ACTIVATION_REFUSED not in output or attempt == args.activation_retries:
            break
        # after a crash the SuperLink keeps the old session online for up to 60 s (2 heartbeats)
        print(
            f"activation refused (this site's previous session is held online for up to 60 s after "
            f"a crash); retrying in {ACTIVATION_WAIT_S} s ({attempt + 1}/{args.activation_retries})",
            flush=True,
        )
        time.sleep(ACTIVATION_WAIT_S)
    if code != 0:
        reason = next((why for key, why in EXPLAIN.items() if key in output), "see the log above")
        print(f"site stopped (exit code {code}): {reason}", file=sys.stderr)
    return code


def _run_supernode(cmd: list[str]) -> tuple[int, str]:
    """Run the SuperNode, echoing its output; SIGTERM/SIGINT are passed on so it can sign off."""
    print("starting: " + shlex.join(cmd), flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: deque[str] = deque(maxlen=200)

    def echo() -> None:  # a thread: the SuperNode's children may hold the pipe after it exits
        for line in proc.stdout or ():
            sys.stdout.write(line)
            sys.stdout.flush()
            seen.append(line)

    def forward(signum, _frame) -> None:
        proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    reader = threading.Thread(target=echo, daemon=True)
    reader.start()
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    reader.join(timeout=2)
    return code, "".join(seen)


def _add_join_parser(sub: argparse._SubParsersAction) -> None:
    """The ``join`` subcommand and its flags."""
    j = sub.add_parser("join", help="check the site's setup, then run its SuperNode")
    j.add_argument("--superlink", required=True, help="HOST:PORT of the federation's SuperLink")
    j.add_argument("--root-certificates", type=Path, help="the federation's CA certificate (PEM)")
    j.add_argument("--insecure", action="store_true", help="no TLS (local tests only)")
    j.add_argument("--auth-key", type=Path, help="this site's private key (OpenSSH, EC P-384)")
    j.add_argument("--data-file", required=True, help="this site's data: CSV/TSV/JSONL/HF folder")
    j.add_argument("--text-column", default="text")
    j.add_argument("--label-column", default="label")
    j.add_argument(
        "--state-dir", required=True, help="the site's state folder, made by `init` (privacy ledger, secret)"
    )
    j.add_argument("--high-water-dir", help="folder of its high-water mark (default: the one init recorded)")
    policy = j.add_argument_group("this site's privacy policy (no run config can widen it)")
    _policy_flags(policy)
    policy.add_argument(
        "--test-fraction", type=float, default=0.2, help="share of rows kept for local testing (default 0.2)"
    )
    j.add_argument("--port", type=int, default=9094, help="local port of the SuperNode's own API")
    j.add_argument("--max-retries", type=int, default=10, help="reconnection attempts (0 = none)")
    j.add_argument(
        "--activation-retries",
        type=int,
        default=15,
        help=f"rejoin attempts, {ACTIVATION_WAIT_S} s apart, while the SuperLink still holds this "
        "site's previous session (up to 60 s after a crash)",
    )
    j.add_argument(
        "--pin-app",
        help="train only for runs of this app: the digest `app-digest` prints for the FAB you reviewed",
    )


def _policy_flags(group: argparse._ArgumentGroup) -> None:
    """One flag per declared key of ``SitePolicy``, its help taken from the field (said once)."""
    for f in declared(SitePolicy):
        name, text = key_name(f.name), f.metadata.get("help", "")
        if f.type == "bool":  # an opt-in: off unless the flag is given
            group.add_argument(f"--{name}", action="store_true", help=text)
        else:
            kind = state_commands.parse_delta if name == "max-delta" else float
            group.add_argument(
                f"--{name}", type=kind, default=f.default, help=f"{text} (default %(default)s)"
            )


def app_digest(args: argparse.Namespace) -> int:
    """Print the digest ``--pin-app`` takes, of a ``.fab`` file or an installed app's folder."""
    path = Path(args.path)
    if not path.exists():
        raise SiteConfigError(f"{path}: no such .fab file or app folder (make one with `flwr build`)")
    print(digest_of(path))
    return 0


def main(argv: list[str] | None = None) -> None:
    """Command-line entry."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_join_parser(sub)
    d = sub.add_parser("app-digest", help="print the digest of a .fab file (or app folder) for --pin-app")
    d.add_argument("path", help="the .fab file `flwr build` made, or an installed app's folder")
    state_commands.add_parsers(sub)
    args = parser.parse_args(argv)
    commands = {**state_commands.COMMANDS, "join": join, "app-digest": app_digest}
    try:
        code = commands[args.command](args)
    except (SiteConfigError, DataError) as err:
        print(f"site cannot join: {err}", file=sys.stderr)
        code = 2
    except StateError as err:  # one line naming the fix (init, restore, rebase)
        print(f"site state refused: {err}", file=sys.stderr)
        code = 2
    except LedgerError as err:  # one line, never a traceback: the message says what to restore
        print(f"privacy ledger refused: {err}", file=sys.stderr)
        code = 2
    raise SystemExit(code)


if __name__ == "__main__":
    main()
