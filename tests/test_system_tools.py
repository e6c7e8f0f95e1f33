"""Tests that need a system tool skip on a bare machine with the install line, and fail in CI."""

from __future__ import annotations

import shutil

import pytest

from .system_tools import require_tool


@pytest.fixture
def no_tools(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name, path=None: None)


def test_missing_tool_skips_with_the_install_line_on_a_users_machine(no_tools, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install nginx"):
        require_tool("nginx")


@pytest.mark.parametrize("ci", ["true", "1"])
def test_missing_tool_fails_in_ci(no_tools, monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.fail.Exception, match="CI must install it .apt-get install docker-compose"):
        require_tool("docker-compose")


def test_ci_false_is_a_users_machine(no_tools, monkeypatch):
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception):
        require_tool("nginx")


def test_found_tool_is_returned(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name, path=None: f"/opt/bin/{name}")
    assert require_tool("nginx") == "/opt/bin/nginx"
