"""Secure aggregation (SecAgg+), the parts both sides share: settings, the vector, the mask PRG.

The server (server/secagg.py) and the sites (clients/secagg.py) meet through Flower messages only;
what they must agree on lives here: the run-config keys, the clipping range, how a site's update
Δ (its adapter minus the global one) and its summed metrics are packed into one uint32 vector,
how the server reads the sum back, and the pseudo-random generator that expands a mask seed.

The vector of one site: ``quantize(w·clip(Δ, ±c))`` (Flower's stochastic quantisation to
[0, Q], Q = 2²²) followed by ``METRIC_SLOTS``, each an integer in [0, Q]: the site's weight w·Q,
its DP count n̂ and the numbers a DP reply carries, in fixed point. Every slot of K ≤ 1023 sites
sums below 2³², so the masked sum never wraps; the server checks that it did not (``decode``).

The round's modulus is 2^b with b = ``modulus_bits(K)``, the fewest bits that hold K·Q (25 for
5 sites): masks, masked vectors and the sum live mod 2^b, and a masked vector travels packed at
b bits a coordinate (``pack``), not 32. Keys travel raw: a public key as its compressed point
(49 bytes), a private key (Shamir-shared) as its 48-byte scalar, a Fernet token as its bytes.

The mask PRG is SHAKE-256 over a domain tag and the *whole* seed (a 32-byte private seed, or an
ECDH-derived pairwise key): unlike Flower's ``pseudo_rand_gen``, which folds its seed to 32 bits
for MT19937, no seed collides with another of a different byte order, and none is guessable.
"""

from __future__ import annotations

import base64
import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.common.secure_aggregation.quantization import dequantize, quantize

from fedllm.config import ResolvedSettings, require_resolved
from fedllm.settings_reader import key, read

AGGREGATIONS = ("plain", "secagg+")
QUANT_RANGE = 2**22  # Q: a quantised coordinate is an integer in [0, Q]
MOD_RANGE = 2**32  # masks and sums live in uint32
MAX_SITES = (MOD_RANGE - 1) // QUANT_RANGE  # 1023: K·Q < 2³²
MIN_SITES = 3  # with 2, the sum and one's own update reveal the other's
MASK_DOMAIN = b"fedllm-secagg-mask-v1\x00"
# the summed metrics, in the vector's order, with their fixed-point scale
METRIC_SLOTS = (
    ("sites", 1),
    ("weight", 1),
    ("num-examples", 1),
    ("steps", 1),
    ("epsilon", 1000),
    ("no-dp", 1),
    ("noise-multiplier", 1000),
    ("sample-rate", 1_000_000),
)
AUTO_CLIP_STEPS = 4  # auto clipping range under DP: this many full clipped steps on one coordinate
AUTO_CLIP_NO_DP = 1.0  # auto clipping range without DP (no clip norm to derive it from)
CURVE = ec.SECP384R1()  # the curve of Flower's generate_key_pairs (checked by ``public_bytes``)
SCALAR_BYTES = (CURVE.key_size + 7) // 8  # 48: a private key as its raw scalar


class SecAggError(ValueError):
    """A secure-aggregation message or sum that breaks the protocol; the round cannot use it."""


T = TypeVar("T", int, bytes, str)


def get_one(record: Mapping[str, object], key: str, kind: type[T]) -> T:
    """``record[key]`` as ``kind`` (int, bytes or str); ``SecAggError`` when absent or another type."""
    value = record.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise SecAggError(f"secure-aggregation field {key!r}: expected {kind.__name__}")
    return value


def get_list(record: Mapping[str, object], key: str, kind: type[T]) -> list[T]:
    """``record[key]`` as a list of ``kind``; ``SecAggError`` when absent or of another type."""
    value = record.get(key)
    if not isinstance(value, list) or any(not isinstance(v, kind) or isinstance(v, bool) for v in value):
        raise SecAggError(f"secure-aggregation field {key!r}: expected a list of {kind.__name__}")
    return [v for v in value if isinstance(v, kind)]


def _aggregation(value: Any) -> str:
    """The aggregation mode as written, case and spaces ignored."""
    return str(value).strip().lower()


@dataclass(frozen=True)
class SecAggSettings:
    """The run-config keys of the aggregation mode (docs/secure-aggregation.md); pyproject.toml
    declares them and docs/configuration.md's table is generated from the help below."""

    aggregation: str = key(
        "plain",
        "'plain' = each site's update reaches the server (validated, robustly aggregated); "
        "'secagg+' = the server sees only the sum of the sites' updates (docs/secure-aggregation.md); "
        "refuses median, trimmed-mean, krum, bulyan and needs >= 3 sites a round",
        choices=AGGREGATIONS,
        parse=_aggregation,
    )
    secagg_clip: float = key(
        0.0,
        f"the range ±c each coordinate of an update is clipped to; 0 = {AUTO_CLIP_STEPS} × lr × "
        f"max-grad-norm under DP, {AUTO_CLIP_NO_DP:g} without",
        low=0,
        finite=True,
        fix="use a positive range (0 = auto)",
    )
    secagg_max_weight: float = key(
        10000.0,
        "a site weighs min(n̂, this) / this; 0 = every site weighs 1",
        low=0,
        high=QUANT_RANGE,
        fix=f"use 0..{QUANT_RANGE}",
    )
    secagg_num_shares: int = key(
        0,
        "neighbours of a site, itself included (odd; fewer than all = SecAgg+'s sparse graph); "
        "0 = all the round's sites",
        low=3,
        special=(0, 1),
        fix="use 0 (all sites) or at least 3",
    )
    secagg_threshold: float = key(
        0.5,
        "shares needed to rebuild a secret, as a fraction of secagg-num-shares; always more than half",
        low=0.5,
        high=1,
        fix="use a fraction in [0.5, 1]",
    )
    secagg_timeout: float = key(
        120.0,
        "seconds the server waits for each key stage (setup, share keys, unmask); the masked-vector "
        "stage, which trains, waits as long as a plain round",
        low=0,
        low_open=True,
        fix="use a positive number of seconds",
    )

    @classmethod
    def from_run_config(cls, rc: Mapping[str, Any]) -> SecAggSettings:
        """Read and check the keys above; a bad value raises one line naming the key and the fix."""
        return read(cls, rc, "run config")

    @property
    def enabled(self) -> bool:
        """Whether this run aggregates securely."""
        return self.aggregation == "secagg+"

    def clip(self, settings: ResolvedSettings) -> float:
        """The range ±c every coordinate of Δ is clipped to before quantisation (public), from the
        run's resolved settings."""
        resolved = require_resolved(settings, "SecAggSettings.clip")
        if self.secagg_clip > 0:
            return self.secagg_clip
        if not resolved.private:
            return AUTO_CLIP_NO_DP
        return AUTO_CLIP_STEPS * resolved.lr * resolved.max_grad_norm

    def shares_and_threshold(self, num_sites: int) -> tuple[int, int]:
        """(neighbours per site incl. itself, shares needed) for a round of ``num_sites`` sites."""
        if not MIN_SITES <= num_sites <= MAX_SITES:
            raise SecAggError(f"secure aggregation needs {MIN_SITES}..{MAX_SITES} sites, got {num_sites}")
        shares = self.secagg_num_shares if 0 < self.secagg_num_shares < num_sites else num_sites
        if shares < num_sites and shares % 2 == 0:
            shares += 1  # a ring of offsets -h..h
        return shares, max(shares // 2 + 1, math.ceil(self.secagg_threshold * shares))


def mask(seed: bytes, length: int) -> np.ndarray:
    """``length`` uniform uint32 words from SHAKE-256 over the domain tag and the whole seed."""
    if len(seed) < 16:
        raise SecAggError("a mask seed must hold at least 128 bits")
    stream = hashlib.shake_256(MASK_DOMAIN + seed).digest(4 * length)
    return np.frombuffer(stream, dtype="<u4").astype(np.uint32)


def modulus_bits(num_sites: int) -> int:
    """b of the round's modulus 2^b: the fewest bits holding K·Q, the largest honest sum of a slot
    (each of K sites' slots is ≤ Q), so the sum mod 2^b is the sum. Both sides derive it from the
    round's size K; ≤ 32 for K ≤ ``MAX_SITES``."""
    if not 1 <= num_sites <= MAX_SITES:
        raise SecAggError(f"secure aggregation needs 1..{MAX_SITES} sites, got {num_sites}")
    return (num_sites * QUANT_RANGE).bit_length()


def reduce(values: np.ndarray, bits: int) -> np.ndarray:
    """``values`` (uint32, so already mod 2³²) mod 2^bits: 2^bits divides 2³², so sums and
    uniform masks stay sums and uniform masks."""
    return (np.asarray(values, dtype=np.uint32) & np.uint32((1 << bits) - 1)).astype(np.uint32)


def packed_size(length: int, bits: int) -> int:
    """Bytes of ``length`` values packed at ``bits`` bits each."""
    return (length * bits + 7) // 8


def pack(values: np.ndarray, bits: int) -> np.ndarray:
    """``values`` (each < 2^bits) as one little-endian stream of ``bits`` bits a value (uint8)."""
    values = np.asarray(values, dtype=np.uint32)
    if values.size and int(values.max()) >> bits:
        raise SecAggError(f"a value does not fit in {bits} bits")
    planes = ((values[:, None] >> np.arange(bits, dtype=np.uint32)) & np.uint32(1)).astype(np.uint8)
    return np.packbits(planes.ravel(), bitorder="little")


def unpack(packed: np.ndarray, length: int, bits: int) -> np.ndarray:
    """The ``length`` uint32 values ``pack`` wrote; ``SecAggError`` for a stream of another size."""
    if packed.dtype != np.uint8 or packed.shape != (packed_size(length, bits),):
        raise SecAggError(f"a packed vector must be {packed_size(length, bits)} uint8 bytes")
    planes = np.unpackbits(packed, count=length * bits, bitorder="little").reshape(length, bits)
    return (planes.astype(np.uint32) << np.arange(bits, dtype=np.uint32)).sum(axis=1, dtype=np.uint32)


def public_bytes(key: ec.EllipticCurvePublicKey) -> bytes:
    """A public key of Flower's curve as its compressed point (X9.62; 49 bytes, not ~215 of PEM)."""
    if key.curve.name != CURVE.name:
        raise SecAggError(f"a key on {key.curve.name}, not {CURVE.name}")
    return key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)


def load_public(data: bytes) -> ec.EllipticCurvePublicKey:
    """The public key of a compressed point; ``SecAggError`` when it is not one on the curve."""
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(CURVE, bytes(data))
    except ValueError as err:
        raise SecAggError("not a public key on the round's curve") from err


def private_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    """A private key as its raw big-endian scalar (48 bytes, not ~306 of PEM PKCS8)."""
    return key.private_numbers().private_value.to_bytes(SCALAR_BYTES, "big")


def load_private(data: bytes) -> ec.EllipticCurvePrivateKey:
    """The private key of a raw scalar; ``SecAggError`` when it is not a valid one."""
    if len(data) != SCALAR_BYTES:
        raise SecAggError(f"a private key must be {SCALAR_BYTES} bytes")
    try:
        return ec.derive_private_key(int.from_bytes(data, "big"), CURVE)
    except ValueError as err:
        raise SecAggError("not a private key on the round's curve") from err


def raw_token(token: bytes) -> bytes:
    """A Fernet token (Flower's ``encrypt``) as its raw bytes: base64 costs a third more."""
    return base64.urlsafe_b64decode(token)


def fernet_token(raw: bytes) -> bytes:
    """The Fernet token (base64, what Flower's ``decrypt`` reads) of ``raw_token``'s bytes."""
    return base64.urlsafe_b64encode(bytes(raw))


def site_weight(num_examples: float, max_weight: float) -> int:
    """The weight slot w·Q of a site: w = min(n̂, W) / W, or 1 when W = 0 (uniform)."""
    if max_weight <= 0:
        return QUANT_RANGE
    share = min(max(float(num_examples), 1.0), max_weight) / max_weight
    return max(1, round(share * QUANT_RANGE))


def metric_slots(metrics: dict, weight: int) -> np.ndarray:
    """The summed metrics of one site as integers in [0, Q] (``METRIC_SLOTS``' order)."""
    epsilon = float(metrics.get("epsilon", math.inf))
    private = math.isfinite(epsilon)
    values = {
        "sites": 1,
        "weight": weight,
        "num-examples": metrics.get("num-examples", 0),
        "steps": metrics.get("steps", 0),
        "epsilon": epsilon if private else 0.0,
        "no-dp": 0 if private else 1,
        "noise-multiplier": metrics.get("noise-multiplier", 0.0),
        "sample-rate": metrics.get("sample-rate", 0.0),
    }
    slots = [min(max(round(float(values[k]) * scale), 0), QUANT_RANGE) for k, scale in METRIC_SLOTS]
    return np.asarray(slots, dtype=np.uint32)


def encode(delta: np.ndarray, metrics: dict, clip: float, max_weight: float) -> tuple[np.ndarray, float]:
    """One site's vector (uint32, before masks) and the fraction of Δ's coordinates clipped to ±c.

    The fraction depends on the data: it stays in the site's own log and is never sent.
    """
    weight = site_weight(metrics.get("num-examples", 1), max_weight)
    clipped = float(np.mean(np.abs(delta) > clip)) if delta.size else 0.0
    scaled = np.clip(delta.astype(np.float64), -clip, clip) * (weight / QUANT_RANGE)
    (quantised,) = quantize([scaled], clip, QUANT_RANGE)
    body = np.clip(quantised, 0, QUANT_RANGE).astype(np.uint32)
    return np.concatenate([body, metric_slots(metrics, weight)]), clipped


@dataclass(frozen=True)
class Aggregate:
    """What the server reads from the unmasked sum: the weighted mean Δ and the metric sums."""

    mean_delta: np.ndarray
    sums: dict[str, float]

    def train_metrics(self) -> dict[str, float]:
        """The round's train metrics: totals and means over the sites, nothing per site."""
        sites, no_dp = self.sums["sites"], self.sums["no-dp"]
        metrics = {"sites": sites, "num-examples": self.sums["num-examples"]}
        metrics["steps"] = self.sums["steps"] / sites
        if sites > no_dp:
            for key in ("epsilon", "noise-multiplier", "sample-rate"):
                metrics[f"{key}-mean" if key == "epsilon" else key] = self.sums[key] / (sites - no_dp)
        if no_dp:
            metrics["no-dp-sites"] = no_dp
        return metrics


def decode(total: np.ndarray, num_sites: int, clip: float) -> Aggregate:
    """The weighted mean Δ and the metric sums from the unmasked sum of ``num_sites`` vectors.

    Checks on the sum (all an honest federation meets): no slot above K·Q (nothing wrapped), the
    ``sites`` slot equal to K, a positive total weight. Raises ``SecAggError`` otherwise.
    """
    total = np.asarray(total, dtype=np.uint32)
    size = len(METRIC_SLOTS)
    if total.size <= size:
        raise SecAggError("the sum is shorter than its metric slots")
    if int(total.max()) > num_sites * QUANT_RANGE:
        raise SecAggError("the sum has a slot above K·Q: a vector was out of range or a mask stayed")
    slots = {key: int(v) / scale for (key, scale), v in zip(METRIC_SLOTS, total[-size:], strict=True)}
    if slots["sites"] != num_sites or slots["weight"] <= 0:
        raise SecAggError(f"the sum counts {slots['sites']:g} sites, {num_sites} sent vectors")
    (summed,) = dequantize([total[:-size].astype(np.int64)], clip, QUANT_RANGE)
    weighted = summed - (num_sites - 1) * clip  # dequantize removes one site's offset c
    return Aggregate(weighted / (slots["weight"] / QUANT_RANGE), slots)


def quantisation_bound(num_sites: int, clip: float, total_weight: float) -> float:
    """The largest per-coordinate error of the mean Δ from quantisation (each site < 1 step)."""
    return num_sites * (2 * clip / QUANT_RANGE) / total_weight


def flatten(arrays: dict[str, np.ndarray], names: list[str]) -> np.ndarray:
    """The arrays ``names`` (in that order) as one float64 vector."""
    return np.concatenate([np.asarray(arrays[n], dtype=np.float64).ravel() for n in names])


def unflatten(vector: np.ndarray, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """A vector back into float32 arrays of ``shapes`` (in its order)."""
    out, start = {}, 0
    for name, shape in shapes.items():
        size = math.prod(shape)
        out[name] = np.asarray(vector[start : start + size], dtype=np.float32).reshape(shape)
        start += size
    if start != vector.size:
        raise SecAggError(f"the vector holds {vector.size} values, the adapter {start}")
    return out
