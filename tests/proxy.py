"""The fleet proxy's template and a local nginx config, shared by test_control_plane and
test_fleet_proxy."""

from __future__ import annotations

from pathlib import Path

from server.proxy import render
from server.proxy import write as write_proxy

from .system_tools import require_tool

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "deploy" / "fleet-proxy.conf.template"


def render_template(values: dict[str, str]) -> str:
    """The proxy template with its ``${NAME}`` variables filled in, as the nginx image does."""
    return render(values, TEMPLATE)


def nginx() -> str:
    """The nginx binary (the test is skipped where it is not installed, as ``require_tool`` says)."""
    return require_tool("nginx")


def nginx_config(folder: Path, port: int, certs: Path, superlink_port: int) -> Path:
    """``python -m server.proxy``'s nginx.conf in ``folder`` (pid, logs, temp files there)."""
    return write_proxy(folder, f"127.0.0.1:{port}", f"127.0.0.1:{superlink_port}", certs)
