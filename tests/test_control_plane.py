"""A closed control plane: the world reaches the SuperLink's Fleet API through nginx, nothing else.

Flower 1.42 serves the Fleet API (sites), the Control API (``flwr run``, ``flwr supernode
register``) and the Runtime API (ServerApp) on one HTTPS port and authenticates no Control API
account outside its enterprise edition. The deployment therefore publishes only nginx with
``deploy/fleet-proxy.conf.template``; the SuperLink's port stays on the operator's host. The
end-to-end test runs that arrangement as local processes: an outsider holding ``ca.crt`` is
refused everything but the Fleet API (where its unregistered key is refused), while registered
sites train through the proxy.
"""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
from pathlib import Path

import pytest
import yaml

from fedllm.shards import write_shards
from fedllm.site_state import init_state
from server.credentials import make_ca_and_server, make_site_key
from simulations.superlink import FlowerCLI, free_port, start_process, start_superlink, wait_for_port

from .processes import join_args, join_sites, run_quick, stop_all
from .proxy import ROOT, TEMPLATE, nginx_config, render_template
from .proxy import nginx as find_nginx


def test_compose_publishes_only_the_fleet_proxy():
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    published = {name: svc.get("ports", []) for name, svc in services.items() if svc.get("ports")}
    assert set(published) == {"superlink", "fleet-proxy"}
    assert all(p.startswith("127.0.0.1:") for p in published["superlink"]), published["superlink"]
    assert published["fleet-proxy"] == ["8000:8000"]

    proxy = services["fleet-proxy"]
    env = proxy["environment"]
    render_template(env)  # every variable of the template has a value in the compose file
    assert f"./{TEMPLATE.relative_to(ROOT)}:/etc/nginx/templates/default.conf.template:ro" in proxy["volumes"]
    link_flags = " ".join(services["superlink"]["command"])
    assert env["SUPERLINK_ADDRESS"] == "superlink:" + re.search(r"--port=(\d+)", link_flags).group(1)

    link_networks = set(services["superlink"]["networks"])
    for name in ("site-1", "site-2", "site-3"):
        site = services[name]
        assert not link_networks & set(site["networks"]), f"{name} can reach the SuperLink's port"
        assert f"--superlink=fleet-proxy:{env['FLEET_PORT']}" in site["command"]


def _raw_request(port: int, ca: Path, method: str, target: str) -> tuple[int, bytes]:
    """Send ``METHOD target`` byte for byte (no client-side path cleaning); (status, body)."""
    context = ssl.create_default_context(cafile=str(ca))
    request = (
        f"{method} {target} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n"
        "Content-Type: application/protobuf\r\nConnection: close\r\n\r\n"
    )
    answer = b""
    with context.wrap_socket(
        socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="localhost"
    ) as tls:
        tls.sendall(request.encode())
        while chunk := tls.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def _outsider_is_refused(outsider: FlowerCLI, certs: Path, port: int, run_dir: Path, data: Path) -> None:
    """What an outsider holding only ``ca.crt`` tries at the public port, and how it is refused."""
    # its flwr CLI: each Control API call ends at nginx
    refused = {
        "register-node": outsider.call("supernode", "register", str(certs / "outsider.pub"), "public"),
        "list-nodes": outsider.call("supernode", "list", "public"),
        "start-run": outsider.call(
            "run", ".", "public", "--run-config", f'run-dir="{run_dir}" run-name="outsider"'
        ),
        "list-runs": outsider.call("ls", "public"),
    }
    for route, answer in refused.items():
        assert answer.get("success") is False and "404 Not Found" in answer["error-message"], answer
        assert f"/v1/control/{route}" in answer["error-message"], answer

    # raw requests: only POST /v1/fleet/<route> reaches the SuperLink, which then wants a
    # registered key; the Runtime API, health, docs and path tricks end at nginx
    ca = certs / "ca.crt"
    status, body = _raw_request(port, ca, "POST", "/v1/fleet/get-run")
    assert status == 401 and b"Invalid SuperNode authentication" in body, (status, body)
    for target in (
        "/v1/runtime/get-nodes",
        "/health",
        "/docs",
        "/openapi.json",
        "/v1/fleet/../control/list-nodes",
        "/v1/fleet/%2e%2e/control/list-nodes",
        "/v1/fleet//get-run",
        "/v1/fleet/get-run?x=1",
        "/v1/fleetx/get-run",
    ):
        status, body = _raw_request(port, ca, "POST", target)
        assert status == 404 and b"nginx" in body, (target, status, body)
    status, body = _raw_request(port, ca, "GET", "/v1/fleet/get-run")
    assert status == 403 and b"nginx" in body, (status, body)

    # its own SuperNode through the proxy: the Fleet API answers, and refuses its key
    probe = outsider.home.parent / "probe"
    init_state(probe / "state", new_site=True)  # join refuses an uninitialised state before the key
    code, out = run_quick(
        join_args(port, certs, "outsider", data, probe / "state", activation_retries=0),
        {**outsider.env, "FLWR_HOME": str(probe)},
        probe / "site.log",
    )
    assert code != 0 and "key is not registered" in out, out[-3000:]


@pytest.mark.slow
def test_outsider_with_ca_is_refused_while_sites_train_through_the_proxy(tiny_checkpoint, tmp_path):
    nginx = find_nginx()
    certs = tmp_path / "certs"
    certs.mkdir()
    make_ca_and_server(certs, ["localhost"])
    for name in ("site-1", "site-2", "outsider"):
        make_site_key(certs, name)
    shards = write_shards("drug-reviews", 2, "natural", "condition", 1.0, 42, tmp_path / "shards")

    link_port, public_port = free_port(), free_port()
    operator = FlowerCLI(tmp_path / "operator", "operator")  # on the SuperLink's host: its own port
    operator.write_connection(f"127.0.0.1:{link_port}", str(certs / "ca.crt"))
    outsider = FlowerCLI(tmp_path / "outsider", "public")  # only ca.crt and the public address
    outsider.write_connection(f"127.0.0.1:{public_port}", str(certs / "ca.crt"))
    procs = []
    try:
        link = start_superlink(
            tmp_path / "superlink", link_port, operator.env, tmp_path, certificates=certs, supernode_auth=True
        )
        procs.append(link)
        proxy_dir = tmp_path / "nginx"
        config = nginx_config(proxy_dir, public_port, certs, link_port)
        proxy = start_process(
            [nginx, "-p", str(proxy_dir), "-c", str(config), "-e", str(proxy_dir / "error.log")],
            proxy_dir / "nginx.out",
            dict(os.environ),
            tmp_path,
        )
        procs.append(proxy)
        wait_for_port(public_port, proxy, "nginx")

        for name in ("site-1", "site-2"):  # the operator registers the sites on its own port
            answer = operator.call("supernode", "register", str(certs / f"{name}.pub"), "operator")
            assert answer.get("success"), answer
        sites = [("site-1", shards[0]), ("site-2", shards[1])]  # they know only the public address
        procs += join_sites(public_port, certs, sites, tmp_path, operator.env)

        run_config = {
            "model": str(tiny_checkpoint),
            "num-server-rounds": 1,
            "min-train-nodes": 2,
            "min-available-nodes": 2,
            "max-steps": 2,
            "max-length": 32,
            "batch-size": 16,
            "run-dir": str(tmp_path / "runs"),
            "run-name": "through-proxy",
        }
        tried: list[bool] = []  # the outsider tries everything while the sites train

        def outsider_tries() -> None:
            if not tried:
                tried.append(True)
                _outsider_is_refused(outsider, certs, public_port, tmp_path / "runs", shards[0])

        outcome = operator.run(run_config, timeout=600, on_poll=outsider_tries)
        assert tried
        logs = "\n".join((tmp_path / n / "site.log").read_text()[-2000:] for n in ("site-1", "site-2"))
        assert outcome.ok, f"{outcome}\n{operator.log(outcome.run_id)[-3000:]}\n{logs}"

        # nothing the outsider sent left a trace: two registered nodes, one run
        nodes = operator.call("supernode", "list", "operator")["nodes"]
        assert len(nodes) == 2, nodes
        runs = operator.call("ls", "operator")["runs"]
        assert [str(r["run-id"]) for r in runs] == [outcome.run_id], runs
    finally:
        stop_all(procs)

    rows = [
        json.loads(x)
        for x in (tmp_path / "runs" / "through-proxy" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["round"] for r in rows] == [0, 1]
    assert rows[1]["train-replies"] == 2
    access = (proxy_dir / "access.log").read_text()
    assert re.search(r'"POST /v1/fleet/push-messages HTTP/1.1" 200 ', access), access[-3000:]
    assert not (tmp_path / "runs" / "outsider").exists()
