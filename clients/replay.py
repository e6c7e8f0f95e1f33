"""A site's last train reply per run, so a resumed run never makes it spend ε twice on a round.

When the server crashes after the sites trained round k+1 but before it checkpointed that round,
the resumed run (``resume=<run dir>``, server/resume.py) sends round k+1 again with the same
global adapter. A site that already trained that round on that global re-sends the reply it
kept instead of training: the same bytes it already released to this run, post-processing of
that release, so no new ε. Matching is exact: same run key (the server's ``run-key``), same
``server-round`` and the same SHA-256 of the global adapter received (``arrays_digest``). The
same round with a *different* global is trained again and spends ε (the site's budget checks may
refuse it: the honest outcome, since that is a new release).

A deployed site handles one message per run key at a time (``exclusive``: a lock file beside
the reply), so a dead run's last message and its resumed run's never train the same round twice.

One reply is kept per run key (the latest round trained): a deployed site in
``<state-dir>/replies/<sha256 of the run key>.npz`` (written through a temp file, fsync and an
atomic rename; ``np.load`` without pickle reads it back), a virtual site in ``context.state``
(which lives as long as the simulation: a resumed simulation's virtual sites start afresh).
Deleting ``replies/`` is always safe: a resume then costs ε again, nothing else.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord

from fedllm.contract import RUN_KEY as RUN_KEY_FIELD
from fedllm.files import write_durably
from fedllm.ledger import LedgerError

REPLIES_DIR = "replies"
STATE_ARRAYS, STATE_METRICS, STATE_META = "fedllm-kept-arrays", "fedllm-kept-metrics", "fedllm-kept-reply"
RUN_KEY = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def run_key(msg: Message, context: Context) -> str:
    """The run's ledger key: the server's ``run-key`` (stable across resumes), else Flower's run id.

    Raises ``LedgerError`` (one line) for a key that is not 1-128 characters of ``A-Za-z0-9._:-``.
    """
    config = msg.content.config_records.get("config", ConfigRecord())
    key = str(config[RUN_KEY_FIELD]) if RUN_KEY_FIELD in config else str(context.run_id)
    if not RUN_KEY.fullmatch(key):
        raise LedgerError(
            f"train config run-key={key[:40]!r}: not 1-128 characters of A-Za-z0-9._:-; "
            "the server must send the run key its run dir's config.json holds"
        )
    return key


def arrays_digest(arrays: ArrayRecord) -> str:
    """``sha256:<hex>`` over each array's name, dtype, shape and bytes, in the record's order."""
    digest = hashlib.sha256()
    for name, array in arrays.items():
        value = np.ascontiguousarray(array.numpy())
        head = json.dumps([name, value.dtype.str, list(value.shape)]).encode()
        digest.update(len(head).to_bytes(8, "big") + head + value.tobytes())
    return f"sha256:{digest.hexdigest()}"


@dataclass
class KeptReply:
    """A train reply as it was sent, with the round and the digest of the global it answered."""

    run_key: str
    server_round: int
    global_digest: str
    arrays: ArrayRecord
    metrics: dict

    def answers(self, key: str, server_round: int, global_digest: str) -> bool:
        """True when this reply was made for exactly this run key, round and global adapter."""
        return (self.run_key, self.server_round, self.global_digest) == (key, server_round, global_digest)


class ReplyStore:
    """Where a site keeps its last reply per run: a folder (deployed) or ``context.state`` (virtual)."""

    def __init__(self, context: Context, state_dir: Path | None):
        self.state = context.state
        self.folder = None if state_dir is None else state_dir / REPLIES_DIR

    def _file(self, key: str) -> Path:
        assert self.folder is not None  # a deployed site's store
        return self.folder / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.npz"

    @contextlib.contextmanager
    def exclusive(self, key: str) -> Iterator[None]:
        """Hold run ``key``'s lock (a deployed site's ``flock``; a virtual site needs none)."""
        if self.folder is None:
            yield
            return
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self._file(key).with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def keep(self, reply: KeptReply) -> None:
        """Store ``reply`` as this run key's last reply (replacing the previous round's)."""
        if self.folder is None:
            self.state[STATE_ARRAYS] = reply.arrays
            self.state[STATE_METRICS] = MetricRecord(reply.metrics)
            self.state[STATE_META] = ConfigRecord(
                {
                    "run-key": reply.run_key,
                    "server-round": reply.server_round,
                    "global-digest": reply.global_digest,
                }
            )
            return
        names = list(reply.arrays.keys())
        meta = {
            "run-key": reply.run_key,
            "server-round": reply.server_round,
            "global-digest": reply.global_digest,
            "names": names,
            "metrics": reply.metrics,
        }
        arrays = {f"a{i}": reply.arrays[name].numpy() for i, name in enumerate(names)}
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as bool
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_durably(self._file(reply.run_key), buffer.getvalue())

    def load(self, key: str) -> KeptReply | None:
        """This run key's last reply, or None (none kept; or unreadable, which is printed)."""
        if self.folder is None:
            if STATE_META not in self.state or self.state[STATE_META]["run-key"] != key:
                return None
            meta = self.state.config_records[STATE_META]
            return KeptReply(
                key,
                int(str(meta["server-round"])),
                str(meta["global-digest"]),
                self.state.array_records[STATE_ARRAYS],
                dict(self.state.metric_records[STATE_METRICS]),
            )
        path = self._file(key)
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(data["meta"].tobytes().decode())
                arrays = {name: Array(np.array(data[f"a{i}"])) for i, name in enumerate(meta["names"])}
            kept = KeptReply(
                str(meta["run-key"]),
                int(meta["server-round"]),
                str(meta["global-digest"]),
                ArrayRecord(arrays),
                dict(meta["metrics"]),
            )
        except (OSError, ValueError, KeyError, TypeError) as err:
            print(f"kept reply {path} is unreadable ({err}); this round is trained (and spends) again")
            return None
        return kept if kept.run_key == key else None
