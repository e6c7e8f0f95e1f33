"""The runbook in docs/deployment.md, run as written: its command blocks, taken from the file.

Each block follows a ``<!-- runbook: NAME [flags] -->`` line. ``settings`` is the one block not
run: the test sets the same variables to its own folders and free ports. ``background`` blocks
are started and left running (``port=VAR``: wait until that port opens), ``each-site`` blocks run
once per site with ``i`` = 1, 2, 3, and ``expect-fail`` blocks must fail in one line. Everything
else must exit 0. The runbook's processes are real: the SuperLink, nginx (skipped on a machine
without it, where the sites then use the SuperLink's port; CI requires it) and three sites. The
run is the defaults' private run shortened by ``RUN_OPTIONS`` to a tiny checkpoint and 2 rounds.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from simulations.superlink import free_port, start_process, wait_for_port

from .processes import stop_all
from .system_tools import SBIN, in_ci

pytestmark = pytest.mark.slow

DOC = Path(__file__).resolve().parent.parent / "docs" / "deployment.md"
BLOCK = re.compile(r"<!-- runbook: ([\w-]+)([^>]*)-->\n```bash\n(.*?)```", re.S)
SITES = (1, 2, 3)


def runbook_blocks() -> list[tuple[str, set[str], str]]:
    """(name, flags, commands) of every runbook block, in the file's order."""
    return [(m[1], set(m[2].split()), m[3]) for m in BLOCK.finditer(DOC.read_text())]


def test_the_doc_has_the_runbook_steps():
    names = [name for name, _, _ in runbook_blocks()]
    assert names == [
        "settings", "credentials", "superlink", "nginx", "register", "site-init", "site-join",
        "submit", "watch", "spend", "resume",
    ]  # fmt: skip


def _settings(tmp_path: Path, tiny_checkpoint: Path) -> dict[str, str]:
    """What the runbook's settings block sets, to this test's folders and free ports."""
    names = [m for m in re.findall(r"^export (\w+)=", runbook_blocks()[0][2], re.M)]
    run_options = f'model="{tiny_checkpoint}" num-server-rounds=2 max-steps=2 max-length=32 batch-size=16'
    values = {
        "FED": str(tmp_path / "fed"),
        "PUBLIC_ADDRESS": "127.0.0.1",
        "FLEET_PORT": str(free_port()),
        "SUPERLINK_PORT": str(free_port()),
        "SITE_PORT_BASE": str(free_port() + 10),
        "FLWR_HOME": str(tmp_path / "fed" / "operator"),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "RUN_OPTIONS": run_options,
    }
    assert sorted(names) == sorted(values), names  # the doc's settings, one for one
    return values


def _run(name: str, commands: str, env: dict, log: Path, timeout: float = 900) -> tuple[int, str]:
    out = subprocess.run(
        ["bash", "-euc", commands], env=env, cwd=log.parent, capture_output=True, text=True, timeout=timeout
    )
    log.write_text(out.stdout + out.stderr)
    return out.returncode, out.stdout + out.stderr


def test_the_runbook_runs_as_written_to_a_finished_private_run(tiny_checkpoint, tmp_path):
    nginx = shutil.which("nginx") or shutil.which("nginx", path=SBIN)
    if nginx is None and in_ci():
        pytest.fail("nginx not found: CI must install it (apt-get install nginx)")
    settings = _settings(tmp_path, tiny_checkpoint)
    if nginx is None:  # sites then use the SuperLink's own port
        settings["FLEET_PORT"] = settings["SUPERLINK_PORT"]
    env = {**os.environ, **settings, "PATH": os.pathsep.join([os.environ["PATH"], SBIN])}
    logs = tmp_path / "logs"
    logs.mkdir()
    procs, outputs = [], {}
    try:
        for name, flags, commands in runbook_blocks()[1:]:
            if name == "nginx" and nginx is None:
                continue
            for i in SITES if "each-site" in flags else (None,):
                block_env = env if i is None else {**env, "i": str(i)}
                label = name if i is None else f"{name}-{i}"
                if "background" in flags:
                    procs.append(
                        start_process(["bash", "-euc", commands], logs / f"{label}.log", block_env, logs)
                    )
                    if port := next((f[5:] for f in flags if f.startswith("port=")), None):
                        wait_for_port(
                            int(settings[port]), procs[-1], f"{label} (log {logs / label}.log)", 120
                        )
                    continue
                code, out = _run(label, commands, block_env, logs / f"{label}.log")
                outputs[label] = out
                assert (code != 0) == ("expect-fail" in flags), f"{label}: exit {code}\n{out[-4000:]}"
        _a_spent_budget_refuses_in_one_line(env, logs)
    finally:
        stop_all(procs)
    _check(Path(settings["FED"]), outputs)


def _a_spent_budget_refuses_in_one_line(env: dict, logs: Path) -> None:
    """A second run at epsilon 8: every site's lifetime cap is spent, nothing is aggregated."""
    commands = next(c for n, _, c in runbook_blocks() if n == "submit").replace('\\"first\\"', '\\"second\\"')
    code, out = _run("second", commands, env, logs / "second.log")
    assert code == 1, out[-4000:]
    last = out.strip().splitlines()[-1]
    assert re.match(
        r"fedllm: run \d+ finished:failed: round 1 of 2: no site's update was aggregated", last
    ), out
    assert "every site refused or failed" in last and "Traceback" not in out, out[-4000:]


def _check(fed: Path, outputs: dict[str, str]) -> None:
    """The finished run, the refused resume, the sites' books."""
    assert re.search(r"fedllm: run \d+ finished:completed", outputs["submit"]), outputs["submit"][-3000:]
    assert outputs["submit"].count("[ROUND 1/2]") == 1  # each Flower line once
    assert "Traceback" not in outputs["resume"], outputs["resume"][-3000:]
    assert "holds result.json, the run finished" in outputs["resume"].strip().splitlines()[-1]
    run_dir = fed / "runs" / "first"
    assert (run_dir / "final-adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / "result.json").is_file() and (run_dir / "round-002").is_dir()
    assert "example-level differential privacy" in outputs["spend"], outputs["spend"]
