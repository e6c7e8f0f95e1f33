"""The server's side of one secure-aggregation (SecAgg+) round, on the grid ``configure_train`` holds.

``SecAggRound`` runs the four stages of clients/secagg.py against the round's sampled sites:

1. ``setup`` (key-stage timeout): the round's size and threshold out, two public keys back;
   the sites that answer are S0;
2. ``share-keys`` (key-stage timeout): each site gets its neighbours' keys (its ring in S0: all
   of S0 unless ``secagg-num-shares`` is smaller) and returns encrypted share pairs, which the
   server can only forward; the sites that answer are S1;
3. ``collect`` (the round's train timeout): ``train_messages`` are the round's plain train
   messages plus the shares meant for each site; Flower's own loop sends them; ``collect`` sums
   the masked vectors of the sites that answer (S2), each packed at b bits a value, mod 2^b
   (b = ``fedllm.secagg.modulus_bits`` of the round's size: the fewest bits that hold K·Q);
4. ``unmask`` (key-stage timeout): each site of S2 is told which neighbours are active (S2) and
   which dropped after sharing (S1 − S2); from ≥ t b-shares of each active site the server
   rebuilds its private mask, from ≥ t key shares of each dropped site its pairwise masks with
   the active ones, and removes both. What is left is the sum of S2's vectors, nothing else.

Sites lost before stage 3 answers are simply not in S2 (their pairwise masks are removed);
sites lost after it are in the sum (their private masks are rebuilt from shares). Whenever fewer
than ``max(3, t)`` sites remain, or a site keeps fewer than t neighbours, ``SecAggError`` aborts
the round: the strategy then keeps the global adapter.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.app.typing import ConfigRecordValues
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.serverapp import Grid

from fedllm.contract import SecAggKey as K
from fedllm.secagg import (
    MIN_SITES,
    SecAggError,
    get_list,
    get_one,
    load_private,
    load_public,
    mask,
    modulus_bits,
    reduce,
    unpack,
)

RECORD = K.RECORD


def ring(nodes: list[int], shares: int) -> dict[int, list[int]]:
    """Each node's neighbours, itself included: offsets -h..h on a random ring (h = shares // 2)."""
    order = list(nodes)
    secrets.SystemRandom().shuffle(order)
    half = shares // 2
    k = len(order)
    return {nid: sorted({order[(i + o) % k] for o in range(-half, half + 1)}) for i, nid in enumerate(order)}


def content_bytes(content: RecordDict) -> int:
    """Bytes of a message's arrays and configs (what a site uploads)."""
    arrays = sum(r.count_bytes() for r in content.array_records.values())
    return arrays + sum(r.count_bytes() for r in content.config_records.values())


class SecAggRound:
    """One round's protocol state on the server; see the module docstring for the stages."""

    def __init__(self, grid: Grid, server_round: int, nodes: list[int], plan: tuple[int, int], **kw):
        self.grid, self.round = grid, server_round
        self.shares, self.threshold = plan
        self.timeout: float = kw.get("timeout", 120.0)
        self.length: int = kw["length"]  # the vector's length: adapter coordinates + metric slots
        self.bits = modulus_bits(len(nodes))  # sums live mod 2^bits; vectors travel packed at bits each
        self.neighbours = ring(nodes, self.shares)
        self.keys: dict[int, tuple[bytes, bytes]] = {}
        self.shared: set[int] = set()  # S1
        self.forward: dict[int, list[tuple[int, bytes]]] = {}
        self.masked: set[int] = set()  # S2
        self.total = np.zeros(self.length, dtype=np.uint32)
        self.failures: list[dict] = []
        self.uploaded = 0
        self.stage_bytes: dict[str, int] = {}  # uploaded per stage (setup, share-keys, collect, unmask)
        self.seconds: dict[str, float] = {}
        self._started = time.perf_counter()

    def _count(self, stage: str, nbytes: int) -> None:
        self.uploaded += nbytes
        self.stage_bytes[stage] = self.stage_bytes.get(stage, 0) + nbytes

    def _fail(self, node: int, stage: str, reason: str) -> None:
        self.failures.append({"node": node, "stage": stage, "reason": reason})

    def _check(self, alive: set[int], stage: str) -> None:
        """Abort unless ≥ max(3, t) sites are alive and each keeps ≥ t alive neighbours."""
        short = [n for n in alive if len(set(self.neighbours[n]) & alive) < self.threshold]
        if len(alive) < max(MIN_SITES, self.threshold) or short:
            raise SecAggError(
                f"secure aggregation aborted after {stage}: {len(alive)} sites left, "
                f"threshold {self.threshold}, at least {MIN_SITES} needed"
            )

    def _exchange(self, stage: str, payloads: dict[int, ConfigRecord]) -> dict[int, ConfigRecord]:
        """Send each site its stage record; the ``secagg`` records of the sites that answer (the
        bytes of every answer counted, whatever it holds)."""
        start = time.perf_counter()
        messages = [
            Message(RecordDict({RECORD: payload}), dst_node_id=nid, message_type=MessageType.TRAIN)
            for nid, payload in payloads.items()
        ]
        answers = {}
        for reply in self.grid.send_and_receive(messages, timeout=self.timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                self._fail(node, stage, str(reply.error.reason))
            elif node in payloads and RECORD in reply.content.config_records:
                answers[node] = reply.content.config_records[RECORD]
            else:
                self._fail(node, stage, "not a secure-aggregation answer")
            if not reply.has_error():
                self._count(stage, content_bytes(reply.content))
        self.seconds[stage] = round(time.perf_counter() - start, 3)
        return answers

    def setup(self) -> None:
        """Stage 1: the round's shape out, the public keys back (S0)."""
        base: dict[str, ConfigRecordValues] = {
            K.STAGE: "setup",
            K.ROUND: self.round,
            K.SITES: len(self.neighbours),
        }
        base |= {K.NUM_SHARES: self.shares, K.THRESHOLD: self.threshold}
        answers = self._exchange("setup", {n: ConfigRecord(dict(base)) for n in self.neighbours})
        for node, answer in answers.items():
            try:
                keys = (get_one(answer, K.PK1, bytes), get_one(answer, K.PK2, bytes))
                for key in keys:
                    load_public(key)  # a point on the curve, or the site is left out
            except SecAggError as err:
                self._fail(node, "setup", str(err))
                continue
            self.keys[node] = keys
        self._check(set(self.keys), "setup")

    def share_keys(self) -> None:
        """Stage 2: neighbours' keys out, encrypted share pairs back (S1), kept for forwarding."""
        alive = set(self.keys)
        payloads = {}
        for nid in alive:
            ring_alive = [n for n in self.neighbours[nid] if n in alive]
            payloads[nid] = ConfigRecord(
                {
                    K.STAGE: "share-keys",
                    K.ROUND: self.round,
                    K.NIDS: ring_alive,
                    K.PK1S: [self.keys[n][0] for n in ring_alive],
                    K.PK2S: [self.keys[n][1] for n in ring_alive],
                }
            )
        answers = self._exchange("share-keys", payloads)
        self.shared = set(answers)
        self.forward = {n: [] for n in self.shared}
        for src, answer in answers.items():
            try:
                pairs = list(
                    zip(get_list(answer, K.DSTS, int), get_list(answer, K.CTXTS, bytes), strict=True)
                )
            except (SecAggError, ValueError) as err:
                self._fail(src, "share-keys", str(err))
                continue
            for dst, ctxt in pairs:
                if dst in self.shared and dst in self.neighbours[src]:
                    self.forward[dst].append((src, ctxt))
        self._check(self.shared, "share-keys")

    def train_messages(self, content: RecordDict) -> list[Message]:
        """Stage 3's messages: the round's train content plus each site's forwarded shares."""
        messages = []
        for nid in sorted(self.shared):
            srcs = [s for s, _ in self.forward[nid]]
            record: dict[str, ConfigRecordValues] = {K.STAGE: "collect", K.ROUND: self.round, K.SRCS: srcs}
            record[K.CTXTS] = [c for _, c in self.forward[nid]]
            body = RecordDict({**content, RECORD: ConfigRecord(record)})
            messages.append(Message(body, dst_node_id=nid, message_type=MessageType.TRAIN))
        self._started = time.perf_counter()
        return messages

    def collect(self, replies: Iterable[Message]) -> None:
        """Stage 3's answers: the masked vectors of S2, summed mod 2³² (nothing else is read)."""
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                self._fail(node, "collect", str(reply.error.reason))
                continue
            vector = _vector(reply.content, self.length, self.bits)
            if node not in self.shared or node in self.masked or vector is None:
                self._fail(node, "collect", "not a masked vector of this round")
                continue
            self._count("collect", content_bytes(reply.content))
            self.total += vector  # uint32: wraps mod 2³² as the masks need
            self.masked.add(node)
        self.seconds["collect"] = round(time.perf_counter() - self._started, 3)
        self._check(self.masked, "collect")

    def unmask(self) -> np.ndarray:
        """Stage 4: rebuild the masks from shares and remove them; the sum of S2's vectors."""
        dropped = self.shared - self.masked
        payloads = {
            nid: ConfigRecord(
                {
                    K.STAGE: "unmask",
                    K.ROUND: self.round,
                    K.ACTIVE: [n for n in self.neighbours[nid] if n in self.masked],
                    K.DEAD: [n for n in self.neighbours[nid] if n in dropped],
                }
            )
            for nid in self.masked
        }
        collected: dict[int, list[bytes]] = {}
        for node, answer in self._exchange("unmask", payloads).items():
            try:
                pairs = list(
                    zip(get_list(answer, K.NIDS, int), get_list(answer, K.SHARES, bytes), strict=True)
                )
            except (SecAggError, ValueError) as err:
                self._fail(node, "unmask", str(err))
                continue
            for owner, share in pairs:
                collected.setdefault(owner, []).append(share)
        total = self.total.copy()
        for nid in self.masked:
            total -= mask(self._secret(collected, nid), self.length)
        for dead in dropped:
            live = [n for n in self.neighbours[dead] if n in self.masked]
            if live:
                sk = load_private(self._secret(collected, dead))
                for nid in live:
                    seed = generate_shared_key(sk, load_public(self.keys[nid][0]))
                    pairwise = mask(seed, self.length)
                    total = total - pairwise if nid > dead else total + pairwise
        return reduce(total, self.bits)

    def _secret(self, collected: dict[int, list[bytes]], owner: int) -> bytes:
        """A site's secret from its shares: at least t of them, or the round aborts."""
        shares = collected.get(owner, [])
        if len(shares) < self.threshold:
            raise SecAggError(
                f"secure aggregation aborted at unmask: {len(shares)} shares, {self.threshold} needed"
            )
        try:
            return combine_shares(shares)
        except ValueError as err:
            raise SecAggError("secure aggregation aborted at unmask: shares do not combine") from err

    def summary(self) -> dict:
        """What the round record keeps: who took part at each stage, failures, bytes, seconds."""
        return {
            "sampled": len(self.neighbours),
            "keys": len(self.keys),
            "shared": len(self.shared),
            "masked": sorted(self.masked),
            "recovered": sorted(self.shared - self.masked),
            "num-shares": self.shares,
            "threshold": self.threshold,
            "stage-seconds": dict(self.seconds),
            "stage-bytes": dict(self.stage_bytes),
            "failures": list(self.failures),
        }


def _vector(content: RecordDict, length: int, bits: int) -> np.ndarray | None:
    """The one masked vector of a stage-3 answer (packed at ``bits`` bits a value) as uint32, or
    None when it is anything else."""
    if list(content.array_records) != [K.MASKED] or content.metric_records or content.config_records:
        return None
    record: ArrayRecord = content.array_records[K.MASKED]
    if list(record) != [K.VECTOR]:
        return None
    try:
        return unpack(record[K.VECTOR].numpy(), length, bits)
    except (SecAggError, ValueError, TypeError):  # not a packed uint8 vector of the right size
        return None
