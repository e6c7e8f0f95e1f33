"""The Fleet proxy's nginx configuration, from deploy/fleet-proxy.conf.template.

    python -m server.proxy --out DIR --listen HOST:PORT --superlink 127.0.0.1:9093 --certs CERTS

writes ``DIR/fleet.conf`` (the template filled in: nginx listens on HOST:PORT only, with the
federation's certificate, and forwards the Fleet API to the SuperLink) and ``DIR/nginx.conf``,
a complete configuration that runs nginx as the invoking user with everything (pid, logs,
temporary files) in DIR: ``nginx -p DIR -c nginx.conf``. On a server whose nginx runs as a
service, copy ``DIR/fleet.conf`` to ``/etc/nginx/conf.d/`` and ``nginx -s reload`` instead.
docker-compose.yml fills the same template through the nginx image.
"""

from __future__ import annotations

import argparse
import grp
import os
import pwd
import re
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parent.parent / "deploy" / "fleet-proxy.conf.template"
NAMES = ("FLEET_ADDRESS", "FLEET_PORT", "FLEET_CERTS", "SUPERLINK_ADDRESS", "SUPERLINK_TLS_NAME")


def render(values: dict[str, str], template: Path = TEMPLATE) -> str:
    """The template with its ``${NAME}`` variables filled in (nginx's own ``$variables`` stay)."""
    text = template.read_text()
    for name, value in values.items():
        text = text.replace("${" + name + "}", value)
    if left := re.findall(r"\$\{\w+\}", text):
        raise ValueError(f"{template}: no value for {sorted(set(left))}")
    return text


def standalone_config(folder: Path) -> str:
    """An nginx.conf that includes ``fleet.conf`` and keeps pid, logs and temp files in ``folder``."""
    user = ""
    if os.geteuid() == 0:  # as root nginx would hand requests to 'nobody', who may not read folder
        user = f"user {pwd.getpwuid(os.geteuid()).pw_name} {grp.getgrgid(os.getegid()).gr_name};"
    temp = " ".join(
        f"{kind}_temp_path {folder / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return (
        f"daemon off;\nworker_processes 1;\npid {folder / 'nginx.pid'};\n{user}\n"
        f"error_log {folder / 'error.log'} info;\nevents {{ worker_connections 64; }}\n"
        f"http {{\n  access_log {folder / 'access.log'};\n  {temp}\n  include fleet.conf;\n}}\n"
    )


def write(folder: Path, listen: str, superlink: str, certs: Path, tls_name: str = "localhost") -> Path:
    """Write ``fleet.conf`` and ``nginx.conf`` into ``folder``; the path of ``nginx.conf``."""
    address, _, port = listen.rpartition(":")
    if not address or not port.isdigit():
        raise ValueError(f"--listen {listen!r}: expected HOST:PORT, e.g. 203.0.113.7:8000")
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    values = {
        "FLEET_ADDRESS": address,
        "FLEET_PORT": port,
        "FLEET_CERTS": str(certs.resolve()),
        "SUPERLINK_ADDRESS": superlink,
        "SUPERLINK_TLS_NAME": tls_name,
    }
    (folder / "fleet.conf").write_text(render(values))
    (folder / "nginx.conf").write_text(standalone_config(folder))
    return folder / "nginx.conf"


def main(argv: list[str] | None = None) -> None:
    """Command-line entry."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for fleet.conf and nginx.conf")
    parser.add_argument("--listen", required=True, help="HOST:PORT the sites connect to (the public address)")
    parser.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink (never public)")
    parser.add_argument(
        "--certs", type=Path, required=True, help="folder with server.pem, server.key, ca.crt"
    )
    parser.add_argument("--tls-name", default="localhost", help="a name on the SuperLink's certificate")
    args = parser.parse_args(argv)
    try:
        config = write(args.out, args.listen, args.superlink, args.certs, args.tls_name)
    except ValueError as err:
        raise SystemExit(f"fedllm: {err}") from None
    print(f"wrote {config.parent / 'fleet.conf'} and {config}; run: nginx -p {config.parent} -c nginx.conf")


if __name__ == "__main__":
    main()
