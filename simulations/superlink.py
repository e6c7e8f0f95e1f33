"""A local Flower SuperLink and the ``flwr`` CLI against it: start, submit runs, wait, stop.

``SimulationLink`` is the harness's own simulation SuperLink (``flower-superlink --simulation``:
Flower's Simulation Engine then runs the virtual sites); the very same ServerApp/ClientApp
(``[tool.flwr.app.components]``) run there as in deployment. ``FlowerCLI`` talks to any SuperLink,
and the process helpers start, wait for and end Flower's processes and what they leave behind.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

PROJECT = Path(__file__).resolve().parent.parent


def venv_bin(name: str) -> str:
    """``name`` next to this interpreter (the venv's console scripts) if there, else ``name`` for ``PATH``."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def toml_value(value) -> str:
    """A Python value as a TOML literal for ``--run-config``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def run_config_arg(config: dict) -> str:
    """``{"lora-r": 8, "dataset": "x"}`` -> ``lora-r=8 dataset="x"``."""
    return " ".join(f"{key}={toml_value(value)}" for key, value in config.items())


def virtual_site_policy(epsilon: float, delta: float = 0.0, release_evaluation: bool = False) -> dict:
    """Run-config keys that set the simulated sites' own policy (``clients.policy``).

    Virtual sites have no node config of their own; the researcher states for them what a real
    site states in its node config: the lifetime cap (this run's budget), the δ cap, an explicit
    opt-out of DP for a non-private run, and whether local scores are released.
    """
    private = math.isfinite(epsilon)
    policy = {"sim-site-allow-no-dp": not private, "sim-site-release-evaluation": release_evaluation}
    if private:
        policy["sim-site-max-epsilon"] = float(epsilon)
    if delta > 0:
        policy["sim-site-max-delta"] = float(delta)
    return policy


@dataclass
class RunOutcome:
    """How one Flower run ended."""

    run_id: str
    status: str
    details: str
    seconds: float

    @property
    def ok(self) -> bool:
        """True when the run completed."""
        return self.status == "finished:completed"


class FlowerCLI:
    """The ``flwr`` CLI against one SuperLink connection, with its own ``FLWR_HOME``."""

    def __init__(self, home: str | Path, connection: str, app_dir: str | Path = PROJECT):
        self.home = Path(home).resolve()
        self.connection = connection
        self.app_dir = Path(app_dir).resolve()
        self.env = {
            **os.environ,
            "FLWR_HOME": str(self.home),
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "RAY_DEDUP_LOGS": "0",
            # the SuperLink starts `flower-superexec` by name: find it next to this interpreter
            # even when the venv is not activated (`.venv/bin/python -m simulations.run`)
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        }

    def write_connection(self, address: str, root_certificates: str | None = None) -> None:
        """Write ``FLWR_HOME/config.toml`` with this connection (insecure, or TLS with a CA)."""
        self.home.mkdir(parents=True, exist_ok=True)
        tls = (
            f'root-certificates = "{Path(root_certificates).resolve()}"'
            if root_certificates
            else "insecure = true"
        )
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{self.connection}"\n\n'
            f'[superlink.{self.connection}]\naddress = "{address}"\n{tls}\n'
        )

    def call(self, *args: str) -> dict:
        """Run ``flwr ARGS --format json`` and return the parsed answer."""
        out = subprocess.run(
            [venv_bin("flwr"), *args, "--format", "json"],
            cwd=self.app_dir,
            env=self.env,
            capture_output=True,
            text=True,
            check=False,
        )
        try:
            return json.loads(out.stdout)
        except json.JSONDecodeError as err:
            raise RuntimeError(f"flwr {' '.join(args)} failed: {out.stdout}\n{out.stderr}") from err

    def run(
        self,
        run_config: dict,
        federation_config: str | None = None,
        timeout: float = 3600,
        on_poll=None,
    ) -> RunOutcome:
        """Submit one run of the project's apps and block until it finishes (or times out)."""
        start = time.monotonic()
        extra = ["--federation-config", federation_config] if federation_config else []
        submitted = self.call("run", ".", self.connection, *extra, "--run-config", run_config_arg(run_config))
        if not submitted.get("success"):
            raise RuntimeError(f"flwr run refused the run: {submitted}")
        run_id = str(submitted["run-id"])
        status, details = "pending", ""
        while time.monotonic() - start < timeout:
            runs = self.call("ls", self.connection, "--run-id", run_id).get("runs", [])
            if runs:
                status, details = runs[0]["status"], runs[0].get("status-details", "")
                if status.startswith("finished"):
                    break
            if on_poll is not None:
                on_poll()
            time.sleep(2)
        else:
            self.call("stop", run_id, self.connection)
            status, details = "finished:stopped", f"timed out after {timeout:.0f} s"
        return RunOutcome(run_id, status, details, time.monotonic() - start)

    def log(self, run_id: str) -> str:
        """The run's log as the SuperLink keeps it."""
        out = subprocess.run(
            [venv_bin("flwr"), "log", run_id, self.connection, "--show"],
            cwd=self.app_dir,
            env=self.env,
            capture_output=True,
            text=True,
            check=False,
        )
        return out.stdout + out.stderr


def start_process(args: list[str], log_path: Path, env: dict, cwd: Path) -> subprocess.Popen:
    """Start a Flower process in its own process group, output to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        args,
        cwd=cwd,
        env=env,
        stdout=log_path.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop_process(proc: subprocess.Popen | None, timeout: float = 20) -> None:
    """End a process group started by ``start_process``: SIGTERM, then SIGKILL after ``timeout``.

    The group is ended even when its leader has exited, since Flower's SuperExec children
    may outlive it.
    """
    if proc is None:
        return
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):  # then SIGKILL below
            proc.wait(timeout=timeout)
    with contextlib.suppress(ProcessLookupError):  # the whole group may be gone already
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def processes_with_env(name: str, value: str) -> list[int]:
    """PIDs of the live processes whose environment has ``name=value`` (this one excepted)."""
    return [
        proc.pid
        for proc in psutil.process_iter(["environ"])  # None where not ours to read
        if (proc.info["environ"] or {}).get(name) == value and proc.pid != os.getpid()
    ]


def descendants(pids: set[int]) -> set[int]:
    """The live descendants of ``pids`` (children, their children, ...)."""
    found: set[int] = set()
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):  # exited meanwhile
            found.update(child.pid for child in psutil.Process(pid).children(recursive=True))
    return found - pids


def is_alive(pid: int) -> bool:
    """Whether ``pid`` runs (exists and is not a zombie)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def stop_processes_with_env(name: str, value: str, timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL, every process whose environment has ``name=value``, and their descendants.

    Descendants count even without the variable: Ray's raylet starts its DashboardAgent and
    RuntimeEnvAgent with an environment of their own, and they outlive a killed raylet. They are
    gathered before the first signal, while the raylet is still their parent.
    """
    targets: set[int] = set()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        targets |= set(processes_with_env(name, value))
        targets |= descendants(targets)
        targets.discard(os.getpid())
        for pid in filter(is_alive, targets):
            with contextlib.suppress(ProcessLookupError):  # exited since
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while any(is_alive(pid) for pid in targets) and time.monotonic() < deadline:
            time.sleep(0.5)


def wait_for_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 60) -> None:
    """Block until ``127.0.0.1:port`` accepts connections; fail early if ``proc`` died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"{what} did not open port {port} in {timeout:.0f} s")


def superlink_command(
    port: int,
    database: Path,
    certificates: Path | None = None,
    supernode_auth: bool = False,
    simulation: bool = False,
) -> list[str]:
    """The ``flower-superlink`` command line on ``127.0.0.1:port`` with its state in ``database``.

    Without ``certificates`` it serves plain HTTP (``--insecure``); with them, TLS from the
    ``ca.crt``, ``server.pem`` and ``server.key`` that ``python -m server.credentials`` writes
    there. ``supernode_auth`` admits only registered site keys; ``simulation`` runs the sites in
    Flower's Simulation Engine. ServerApps run in their own process (``--isolation subprocess``,
    Flower's default) and no app dependencies are installed at run time.
    """
    cmd = [venv_bin("flower-superlink")]
    if certificates is None:
        cmd.append("--insecure")
    else:
        cmd += ["--ssl-ca-certfile", str(certificates / "ca.crt")]
        cmd += ["--ssl-certfile", str(certificates / "server.pem")]
        cmd += ["--ssl-keyfile", str(certificates / "server.key")]
    if supernode_auth:
        cmd.append("--enable-supernode-auth")
    if simulation:
        cmd.append("--simulation")
    cmd += ["--isolation", "subprocess", "--host", "127.0.0.1", "--port", str(port)]
    return [*cmd, "--database", str(database), "--disable-runtime-dependency-installation"]


def start_superlink(
    home: Path, port: int, env: dict, cwd: Path | None = None, what: str = "SuperLink", **flags
) -> subprocess.Popen:
    """Start ``superlink_command(port, home / "state.db", **flags)`` with ``FLWR_HOME=home``, its
    output in ``home/superlink.log``, and wait until its port opens (the process is ended if not)."""
    log = home / "superlink.log"
    proc = start_process(
        superlink_command(port, home / "state.db", **flags), log, {**env, "FLWR_HOME": str(home)}, cwd or home
    )
    try:
        wait_for_port(port, proc, f"{what} (log: {log})")
    except BaseException:
        stop_process(proc)
        raise
    return proc


class SimulationLink(FlowerCLI):
    """A simulation SuperLink of our own (started, used, stopped), under ``home``, its processes
    (the ServerApp's, the virtual sites') with ``env`` added to this process's environment.

    Use as a context manager; ``simulate`` submits one run with N virtual sites and waits.
    """

    def __init__(self, home: str | Path, app_dir: str | Path = PROJECT, env: dict | None = None):
        super().__init__(home, "sim", app_dir)
        self.env.update(env or {})  # for the SuperLink and every process it starts
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> SimulationLink:
        self.write_connection(f"127.0.0.1:{self.port}")
        self.proc = start_superlink(
            self.home, self.port, self.env, simulation=True, what="simulation SuperLink"
        )
        return self

    def __exit__(self, *exc) -> None:
        stop_process(self.proc)
        # the simulation process and its Ray workers run in sessions of their own and would go on
        # training the interrupted run until their next call to the (gone) SuperLink
        stop_processes_with_env("FLWR_HOME", str(self.home))

    def simulate(
        self,
        run_config: dict,
        num_supernodes: int,
        cpus_per_site: int = 2,
        timeout: float = 3600,
        on_poll=None,
        gpus_per_site: float = 0.0,
    ) -> RunOutcome:
        """One run of the project's apps over ``num_supernodes`` virtual sites.

        Each virtual site's ClientApp gets ``cpus_per_site`` CPUs and ``gpus_per_site`` GPUs
        from Ray, which bounds how many train at once. With ``RAY_ADDRESS`` set in the
        environment, the Simulation Engine joins that (multi-machine) Ray cluster.
        """
        federation = (
            f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus_per_site} "
            f"client-resources-num-gpus={gpus_per_site}"
        )
        return self.run(run_config, federation, timeout, on_poll)
