"""Flower's processes for the end-to-end tests: sites that join a SuperLink, and waiting on them.

The SuperLink itself is started by ``simulations.superlink.start_superlink`` (one command line
for the harness and the tests); here are the sites: a plain insecure ``flower-supernode`` per
data shard, or ``python -m clients.site join`` (the site image's entry point) with TLS and a key.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from fedllm.site_state import init_state
from simulations.superlink import FlowerCLI, free_port, start_process, start_superlink, stop_process, venv_bin


def start_supernodes(port: int, shards: Iterable[Path], root: Path, env: dict) -> list[subprocess.Popen]:
    """One insecure SuperNode per shard joined to ``127.0.0.1:port``: site ``i`` lives in
    ``root/site-i`` (``FLWR_HOME``, ``supernode.log``, its privacy state in ``state/``, initialised
    as ``python -m clients.site init`` would)."""
    sites = []
    for i, shard in enumerate(shards, start=1):
        home = root / f"site-{i}"
        init_state(home / "state", new_site=True)
        args = [
            venv_bin("flower-supernode"),
            "--insecure",
            "--superlink",
            f"127.0.0.1:{port}",
            "--port",
            str(free_port()),
            "--node-config",
            f'data-file="{shard}" state-dir="{home / "state"}"',
        ]
        sites.append(start_process(args, home / "supernode.log", {**env, "FLWR_HOME": str(home)}, root))
    return sites


def join_args(
    port: int,
    certs: Path,
    key: str,
    data: Path,
    state: Path,
    ca_dir: Path | None = None,
    activation_retries: int = 6,
) -> list[str]:
    """``python -m clients.site join`` to ``127.0.0.1:port`` with TLS (``ca.crt`` of ``ca_dir``,
    else of ``certs``) and the site key ``certs/key``; a lifetime cap of ε 20 (two runs at 8)."""
    return [
        sys.executable,
        "-m",
        "clients.site",
        "join",
        "--superlink",
        f"127.0.0.1:{port}",
        "--root-certificates",
        str((ca_dir or certs) / "ca.crt"),
        "--auth-key",
        str(certs / key),
        "--data-file",
        str(data),
        "--state-dir",
        str(state),
        "--port",
        str(free_port()),
        "--max-retries",
        "0",
        "--activation-retries",
        str(activation_retries),
        "--max-epsilon",
        "20",
    ]


def join_sites(
    port: int, certs: Path, sites: Iterable[tuple[str, Path]], root: Path, env: dict
) -> list[subprocess.Popen]:
    """``join_args`` for each ``(key name, data file)``: site ``name`` lives in ``root/name``
    (``FLWR_HOME``, ``site.log``, its privacy state in ``state/``, initialised first)."""
    procs = []
    for name, data in sites:
        init_state(root / name / "state", new_site=True)
        args = join_args(port, certs, name, data, root / name / "state")
        procs.append(
            start_process(args, root / name / "site.log", {**env, "FLWR_HOME": str(root / name)}, root)
        )
    return procs


def run_quick(args: list[str], env: dict, log: Path, timeout: float = 120) -> tuple[int, str]:
    """Run a process that should fail fast; return (exit code, its output)."""
    proc = start_process(args, log, env, log.parent)
    try:
        code = proc.wait(timeout=timeout)
    finally:
        stop_process(proc, timeout=5)  # also ends children still retrying (SuperExec)
    return code, log.read_text()


def wait_until(
    what: str, ready: Callable[[], bool], procs: Iterable[subprocess.Popen] = (), timeout: float = 300
) -> None:
    """Poll ``ready`` until it holds; fail naming ``what`` on timeout or when one of ``procs`` exits."""
    procs = list(procs)
    deadline = time.monotonic() + timeout
    while not ready():
        dead = [p.args[0] for p in procs if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            raise AssertionError(f"waiting for {what}: " + (f"{dead} exited" if dead else "timed out"))
        time.sleep(0.2)


def stop_all(procs: Iterable[subprocess.Popen | None]) -> None:
    """End the processes in reverse order of starting (sites before their SuperLink)."""
    for proc in reversed(list(procs)):
        stop_process(proc)


@contextlib.contextmanager
def deployment(root: Path, shards: Iterable[Path]) -> Iterator[FlowerCLI]:
    """A SuperLink and one insecure SuperNode per shard under ``root`` (``start_supernodes``),
    stopped on exit; yields the operator's ``flwr`` CLI, connected to it."""
    cli = FlowerCLI(root / "cli", "deploy")
    port = free_port()
    cli.write_connection(f"127.0.0.1:{port}")
    procs = [start_superlink(root / "superlink", port, cli.env, root)]
    try:
        procs += start_supernodes(port, shards, root, cli.env)
        yield cli
    finally:
        stop_all(procs)


def supernode_logs(root: Path, tail: int = 0) -> str:
    """The sites' SuperNode logs under ``root`` (each cut to its last ``tail`` characters if > 0)."""
    return "\n".join(p.read_text()[-tail:] for p in sorted(root.glob("site-*/supernode.log")))
