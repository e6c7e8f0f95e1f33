"""The Fleet proxy's limits: the routes a SuperNode needs, bodies its messages need, rates.

``deploy/fleet-proxy.conf.template`` forwards only the Fleet routes an authenticated SuperNode
calls (never ``register-node`` / ``unregister-node``), refuses bodies above what Flower's
chunked messages need, and limits each client address's request rate and requests in flight
(issue 22, part 3). The route list and the body limit are checked against Flower 1.42's own
client and serialisation; the nginx test runs the template with no SuperLink behind it (what
nginx refuses never reaches one; what it forwards ends in 502).
"""

from __future__ import annotations

import inspect
import os
import re
import socket
import ssl
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.app.message.message import remove_content_from_message
from flwr.common.serde import message_to_proto
from flwr.proto.fleet_pb2 import PushMessagesRequest
from flwr.proto.message_pb2 import PushObjectRequest
from flwr.proto.node_pb2 import Node
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from flwr.superlink.routers.fleet.router import router as fleet_router
from flwr.supernode import fleet_http_client

from server.credentials import make_ca_and_server
from simulations.superlink import free_port, start_process, wait_for_port

from .processes import stop_all
from .proxy import TEMPLATE, nginx_config
from .proxy import nginx as find_nginx

MiB = 1024 * 1024
SELF_REGISTRATION = {"/v1/fleet/register-node", "/v1/fleet/unregister-node"}
UINT64_MAX = 2**64 - 1  # the widest ids, so the measured bodies are upper bounds


def forwarded_routes() -> set[str]:
    """The exact request URIs the template's map lets through."""
    return set(re.findall(r'^\s*"~\^(/v1/fleet/[a-z-]+)\$" 1;$', TEMPLATE.read_text(), re.MULTILINE))


def body_limit() -> int:
    """``client_max_body_size`` in bytes."""
    return int(re.search(r"client_max_body_size (\d+)m;", TEMPLATE.read_text()).group(1)) * MiB


def test_the_proxy_forwards_exactly_the_routes_an_authenticated_supernode_calls():
    called = set(re.findall(r'path="(/v1/fleet/[a-z-]+)"', inspect.getsource(fleet_http_client)))
    served = {route.path for route in fleet_router.routes}
    assert SELF_REGISTRATION <= called <= served  # Flower's client uses what its SuperLink serves
    assert forwarded_routes() == called - SELF_REGISTRATION


def _lora_adapter(extra_values: int = 0) -> ArrayRecord:
    """BERT-base's default adapter as shapes (LoRA r 8 on query/value of 12 layers, a 5-label
    head), plus optionally one array of ``extra_values`` float32 (a larger trainable part)."""
    rng = np.random.default_rng(0)
    shapes = {}
    for layer in range(12):
        for module in ("query", "value"):
            prefix = f"base_model.model.bert.encoder.layer.{layer}.attention.self.{module}"
            shapes[f"{prefix}.lora_A.weight"] = (8, 768)
            shapes[f"{prefix}.lora_B.weight"] = (768, 8)
    shapes["base_model.model.classifier.weight"] = (5, 768)
    shapes["base_model.model.classifier.bias"] = (5,)
    if extra_values:
        shapes["extra"] = (extra_values,)
    return ArrayRecord({k: Array(rng.random(s, dtype=np.float32)) for k, s in shapes.items()})


def _fleet_bodies(content: RecordDict) -> tuple[int, int]:
    """(largest push-object body, push-messages body) a SuperNode sends for this reply."""
    metadata = Metadata(
        run_id=UINT64_MAX,
        message_id="",
        src_node_id=UINT64_MAX,
        dst_node_id=1,
        reply_to_message_id="f" * 64,
        group_id="1000",
        created_at=time.time(),
        ttl=3600.0,
        message_type="train",
    )
    message = Message(content, metadata=metadata)
    node = Node(node_id=UINT64_MAX)
    pushes = [
        PushObjectRequest(
            node=node, run_id=UINT64_MAX, object_id=oid, object_content=obj.deflate(), session_id="f" * 64
        ).ByteSize()
        for oid, obj in get_all_nested_objects(message).items()
    ]
    push_messages = PushMessagesRequest(
        node=node,
        messages_list=[message_to_proto(remove_content_from_message(message))],
        message_object_trees=[get_object_tree(message)],
        clientapp_runtime_list=[1.0],
    ).ByteSize()
    return max(pushes), push_messages


def test_the_body_limit_fits_the_largest_fleet_body_with_a_margin():
    limit = body_limit()
    metrics = MetricRecord({"num-examples": 100})
    lora_object, lora_message = _fleet_bodies(RecordDict({"arrays": _lora_adapter(), "metrics": metrics}))
    assert lora_object < 32_000 and lora_message < 16_000, (lora_object, lora_message)
    # an 80 MB array travels in 5 MiB chunks: no body is larger than one chunk, whatever the model
    chunk, message = _fleet_bodies(RecordDict({"arrays": _lora_adapter(20_000_000), "metrics": metrics}))
    assert 5 * MiB < chunk < 5 * MiB + 1024 and message < 32_000, (chunk, message)
    assert limit - chunk >= 2 * MiB, "keep room for one record that is not an array (never chunked)"
    # secure aggregation's per-site keys and encrypted shares, for 1,000 sites, as one record
    keys = ConfigRecord({"public-keys": [bytes(100)] * 1000, "shares": [bytes(200)] * 1000})
    secagg, _ = _fleet_bodies(RecordDict({"secagg": keys}))
    assert secagg < limit - chunk, secagg


def _send(tls: ssl.SSLSocket, route: str, length: int, body: bytes = b"") -> None:
    tls.sendall(
        f"POST {route} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/protobuf\r\n"
        f"Content-Length: {length}\r\n\r\n".encode()
        + body
    )


def _statuses(tls: ssl.SSLSocket, count: int) -> list[int]:
    """The status codes of the next ``count`` responses on this connection."""
    data = b""
    while data.count(b"HTTP/1.1 ") < count:
        chunk = tls.recv(1 << 16)
        if not chunk:
            break
        data += chunk
    return [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", data)]


class Proxy:
    """TLS connections to the nginx under test."""

    def __init__(self, port: int, ca: Path):
        self.port = port
        self.context = ssl.create_default_context(cafile=str(ca))

    def connect(self) -> ssl.SSLSocket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=20)
        return self.context.wrap_socket(sock, server_hostname="localhost")

    def status(self, route: str, length: int = 0, body: bytes = b"") -> int:
        with self.connect() as tls:
            _send(tls, route, length, body)
            return _statuses(tls, 1)[0]


@pytest.fixture
def proxy(tmp_path):
    nginx = find_nginx()
    certs = tmp_path / "certs"
    certs.mkdir()
    make_ca_and_server(certs, ["localhost"])
    port = free_port()
    folder = tmp_path / "nginx"
    config = nginx_config(folder, port, certs, free_port())  # nothing listens behind it
    process = start_process(
        [nginx, "-p", str(folder), "-c", str(config), "-e", str(folder / "error.log")],
        folder / "nginx.out",
        dict(os.environ),
        tmp_path,
    )
    try:
        wait_for_port(port, process, "nginx")
        yield Proxy(port, certs / "ca.crt")
    finally:
        stop_all([process])


def test_nginx_forwards_only_supernode_routes_and_enforces_its_limits(proxy):
    for route in sorted(forwarded_routes()):
        assert proxy.status(route) == 502, route  # forwarded: nothing behind it answers
    for route in [*sorted(SELF_REGISTRATION), "/v1/fleet/GET-RUN", "/v1/fleet/get-run/"]:
        assert proxy.status(route) == 404, route

    limit = body_limit()
    assert proxy.status("/v1/fleet/push-object", limit + 1) == 413  # refused from its header
    chunk = bytes(5 * MiB + 256)  # one array chunk and its envelope
    assert proxy.status("/v1/fleet/push-object", len(chunk), chunk) == 502

    # requests in flight per address: 16 wait for their bodies, the 17th is refused
    waiting = [proxy.connect() for _ in range(16)]
    try:
        for tls in waiting:
            _send(tls, "/v1/fleet/pull-messages", 10)
        time.sleep(0.5)
        assert proxy.status("/v1/fleet/pull-messages") == 503
    finally:
        for tls in waiting:
            tls.close()

    # request rate per address: a burst of 500 passes at once, then 50 a second
    count, batch = 1000, 100  # nginx's keepalive_requests: one connection carries at most 1,000
    time.sleep(1.0)  # the requests above have drained from the bucket
    with proxy.connect() as tls:  # pipelined in batches; one thread (an SSL socket is not thread-safe)
        statuses: list[int] = []
        for _ in range(count // batch):
            for _ in range(batch):
                _send(tls, "/v1/fleet/pull-messages", 0)
            statuses += _statuses(tls, batch)
    assert len(statuses) == count
    # the first 400 are inside the burst whatever came before it; of the 500 past it, more than 100
    # are refused unless sending them took 8 s
    assert 503 not in statuses[:400] and statuses.count(503) > 100, statuses.count(503)
