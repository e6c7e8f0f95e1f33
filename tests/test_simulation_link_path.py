"""The harness works from an unactivated venv (``.venv/bin/python -m simulations.run``)."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

from simulations.superlink import SimulationLink

pytestmark = pytest.mark.slow  # a real SuperLink process


def test_simulation_superlink_starts_without_the_venv_on_path(tmp_path, monkeypatch):
    venv_bin = str(Path(sys.executable).parent)
    bare = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != venv_bin]
    monkeypatch.setenv("PATH", os.pathsep.join(bare))
    # the SuperLink spawns `flower-superexec` by name; it exits at start-up when that is not found
    with SimulationLink(tmp_path / "flwr") as link:
        assert link.proc is not None and link.proc.poll() is None
        with socket.create_connection(("127.0.0.1", link.port), timeout=5):
            pass
