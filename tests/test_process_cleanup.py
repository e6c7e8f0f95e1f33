"""The harness ends what a run left behind: the processes that carry its FLWR_HOME, and their children."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid

from simulations.superlink import descendants, is_alive, processes_with_env, stop_processes_with_env

# a stand-in for Ray's raylet: it carries the marker and starts a child with an environment of its
# own (as the raylet starts ray::DashboardAgent and ray::RuntimeEnvAgent), then waits
PARENT = """
import os, subprocess, sys, time
env = {k: v for k, v in os.environ.items() if k != "FEDLLM_TEST_MARKER"}
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], env=env)
print(child.pid, flush=True)
time.sleep(600)
"""


def test_children_without_the_marker_are_ended_with_their_parent():
    marker = str(uuid.uuid4())
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT],
        env={**os.environ, "FEDLLM_TEST_MARKER": marker},
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        child = int(parent.stdout.readline())
        assert processes_with_env("FEDLLM_TEST_MARKER", marker) == [parent.pid]  # not the child
        assert descendants({parent.pid}) == {child}
        stop_processes_with_env("FEDLLM_TEST_MARKER", marker, timeout=10)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 5
        while is_alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not is_alive(child), "a child without the marker outlived its parent's cleanup"
    finally:  # on failure, end the stand-ins: the child shares the parent's process group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(parent.pid, signal.SIGKILL)
        parent.wait()
