"""System tools some tests run (nginx, docker-compose): skipped on a bare machine, required in CI.

A new user runs the README's test command on a machine with only Python and pip; a test that
needs a Debian package there skips with the line that installs it. CI (``CI=true``, as
``.ci/run`` runs) installs those packages, so there a missing tool fails the test instead of
silently skipping it.
"""

from __future__ import annotations

import os
import shutil

import pytest

SBIN = "/usr/sbin:/usr/local/sbin"


def in_ci() -> bool:
    """True when the suite runs in CI (``CI`` set to anything but empty, 0 or false)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_tool(name: str, package: str | None = None) -> str:
    """The path of the executable ``name``; skip the test without it, or fail it in CI."""
    exe = shutil.which(name) or shutil.which(name, path=SBIN)
    if exe is not None:
        return exe
    install = f"apt-get install {package or name}"
    if in_ci():
        pytest.fail(f"{name} not found: CI must install it ({install})")
    pytest.skip(f"{name} not installed here ({install} to run this test; CI runs it)")
