"""Container files: compose validates, each site sees only its own files, Dockerfiles lint clean.

No Docker engine runs here; the integration test (test_federation_tls.py) runs the very same
entry points as local processes.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .system_tools import require_tool

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILES = [ROOT / "clients" / "Dockerfile", ROOT / "server" / "Dockerfile"]


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_docker_compose_config_validates():
    exe = require_tool("docker-compose")
    result = subprocess.run(
        [exe, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_each_site_mounts_only_its_own_shard_and_key_read_only():
    services = _compose()["services"]
    sites = sorted(name for name in services if name.startswith("site-"))
    assert sites == ["site-1", "site-2", "site-3"]
    for name in sites:
        volumes = services[name]["volumes"]
        mounts = {v.split(":")[0]: v for v in volumes}
        assert f"./shards/{name}.csv" in mounts and mounts[f"./shards/{name}.csv"].endswith(":ro")
        assert f"./certs/{name}" in mounts and mounts[f"./certs/{name}"].endswith(":ro")
        others = [s for s in sites if s != name]
        assert not any(other in v for other in others for v in volumes), f"{name} sees another site"
        assert f"{name}-state:/state" in volumes  # privacy ledger survives restarts
        assert not any("server.key" in v or "ca.key" in v for v in volumes)
        flags = " ".join(services[name]["command"])
        assert "--max-epsilon=" in flags and "--max-delta=" in flags, f"{name} states no explicit caps"
        assert "--allow-no-dp" not in flags


def test_each_site_starts_only_after_init_on_its_own_state_and_high_water_volumes():
    services = _compose()["services"]
    for name in ("site-1", "site-2", "site-3"):
        init = services[f"init-{name}"]
        assert init["entrypoint"] == ["python", "-m", "clients.site", "init"]
        assert "--state-dir=/state" in init["command"]
        assert services[name]["depends_on"][f"init-{name}"] == {"condition": "service_completed_successfully"}
        assert "register" in services[name]["depends_on"]
        mounts = {f"{name}-state:/state", f"{name}-high-water:/high-water"}
        assert mounts <= set(init["volumes"]) and mounts <= set(services[name]["volumes"])
    assert {f"site-{i}-high-water" for i in (1, 2, 3)} <= set(_compose()["volumes"])


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_images_declare_no_anonymous_volume(dockerfile):
    # an anonymous VOLUME gives a new container a fresh, empty state: books reset without a word
    assert not re.search(r"^\s*VOLUME\b", dockerfile.read_text(), re.M | re.I)


def test_superlink_uses_tls_auth_and_named_volumes():
    config = _compose()
    link = config["services"]["superlink"]
    flags = " ".join(link["command"])
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth"):
        assert flag in flags
    assert "--insecure" not in flags
    assert {"superlink-db", "server-runs", "site-1-state"} <= set(config["volumes"])
    assert "server-runs:/runs" in link["volumes"] and "superlink-db:/db" in link["volumes"]


def test_dockerfiles_lint_clean():
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run(
        [str(hadolint), *map(str, DOCKERFILES)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_dockerfile_entry_points_exist(dockerfile):
    entry = re.search(r"^ENTRYPOINT \[(.*)\]", dockerfile.read_text(), re.M).group(1)
    argv = [part.strip().strip('"') for part in entry.split(",")]
    if argv[0] == "python":
        argv[0] = sys.executable
    else:
        argv[0] = str(Path(sys.executable).parent / argv[0])
    result = subprocess.run([*argv, "--help"], capture_output=True, text=True, check=False, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "usage" in (result.stdout + result.stderr).lower()
