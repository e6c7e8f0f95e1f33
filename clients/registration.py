"""Is this site's key registered at the SuperLink? Asked before the SuperNode starts.

Flower's SuperNode learns that its key is unknown only when the SuperLink refuses to activate it
(error 2004), which it also answers when the key is registered but its previous session is still
online (a SuperNode that crashed is held online for up to two missed 30 s heartbeats). ``join``
retried such refusals for ~2 minutes before explaining. This check tells the two apart in one
call: it asks the Fleet API to activate this key with a heartbeat interval outside Flower's
bounds. The SuperLink looks the key up first (unknown: 2004, "Failed to activate SuperNode") and
only then checks the interval (2003, "Invalid heartbeat interval"), so a registered key is
confirmed and nothing is activated. The request is signed with the site key exactly as the
SuperNode signs it, and goes through the Fleet proxy like every Fleet call.
"""

from __future__ import annotations

from pathlib import Path

import httpx
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.proto.fleet_pb2 import ActivateNodeRequest  # pylint: disable=E0611
from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor
from flwr.supercore.primitives.asymmetric import public_key_to_bytes
from flwr.supercore.protobuf.client import ProtobufClientInterceptor
from flwr.supernode.fleet_http_client import FleetHttpClient
from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

UNKNOWN_KEY = 2004  # FLEET_NODE_ACTIVATION_FAILED: checked before the interval
KNOWN_KEY = 2003  # FLEET_INVALID_HEARTBEAT_INTERVAL: the key was found, nothing was activated


def _code(err: httpx.HTTPStatusError) -> int | None:
    try:
        return int(err.response.json().get("code"))
    except (ValueError, TypeError, AttributeError):
        return None


def key_registered(
    address: str, root_certificates: Path | None, auth_key: Path, timeout: float = 10
) -> bool | None:
    """True if the SuperLink knows this site key, False if not, None if it did not say (an older
    SuperLink, a proxy in the way): then the SuperNode's own activation decides."""
    key = load_ssh_private_key(auth_key.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return None
    insecure = root_certificates is None
    interceptors: list[ProtobufClientInterceptor] = [
        RuntimeVersionHttpInterceptor(component_name="SuperNode"),
        NodeAuthHttpInterceptor(key, key.public_key()),
    ]
    certs = None if insecure else str(root_certificates)
    request = ActivateNodeRequest(public_key=public_key_to_bytes(key.public_key()), heartbeat_interval=0)
    try:
        with FleetHttpClient.from_server_address(address, insecure, certs, interceptors) as client:
            client.ActivateNode(request)
    except httpx.HTTPStatusError as err:
        code = _code(err)
        return None if code is None else {UNKNOWN_KEY: False, KNOWN_KEY: True}.get(code)
    except (httpx.HTTPError, ValueError):
        return None
    return None  # an interval of 0 was accepted: not the SuperLink this check knows
