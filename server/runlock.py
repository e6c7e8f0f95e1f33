"""One ServerApp per run folder: an exclusive lock held for the ServerApp's whole lifetime.

Two ServerApps writing one run folder (two resumes of it, or a resume of a run that is still
going) delete each other's checkpoints and make every site train, and spend, twice per round.
So the ServerApp takes ``<run dir>/server.lock`` (``flock``, exclusive, non-blocking) before it
changes anything there: a fresh run right after creating its folder, a resume before it reads
or prunes the folder; it holds it until ``main`` returns. A second ServerApp on the same folder
stops with one line naming the folder, the holder and the fix.

The lock belongs to the open file, not to the file's existence: the kernel drops it when the
process dies, so a crashed server never leaves a stale lock that blocks its resume. The file
stays (it names its last holder); it is never deleted, because deleting a lock file another
process has open would let two processes hold "the" lock. ``flock`` holds between processes on
one host (and on NFS v4); a run folder shared between hosts over other file systems is not
protected.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK = "server.lock"


class RunDirInUse(RuntimeError):
    """Another ServerApp holds the run folder; the one-line message names it and the fix."""


def _holder(fd: int) -> str:
    """Who holds the lock, as its holder wrote it (pid, host, run id), in a few words."""
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"run {info['run-id']}, pid {info['pid']} on {info['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


class RunLock:
    """The held lock on one run folder; ``release`` (or the process's end) lets it go."""

    def __init__(self, run_dir: Path, fd: int):
        self.run_dir = run_dir
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, run_dir: Path, run_id: int) -> RunLock:
        """Lock ``run_dir`` for this ServerApp; raises ``RunDirInUse`` if another one holds it."""
        fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise RunDirInUse(
                f"run folder {run_dir} is in use by another ServerApp ({holder}); wait for that run to "
                f"end or stop it (flwr stop <its run id>), then submit again with resume={run_dir.name}"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        info = {"run-id": run_id, "pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        return cls(run_dir, fd)

    @property
    def held(self) -> bool:
        """Whether this object still holds the lock."""
        return self._fd is not None

    def release(self) -> None:
        """Let the lock go (closing the file drops it); a second call does nothing."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
