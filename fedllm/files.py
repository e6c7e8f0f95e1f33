"""General file helpers: durable writes and content fingerprints (no privacy logic)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import tempfile
from pathlib import Path


def fingerprint_file(path: str | Path) -> str:
    """``sha256:<hex>`` of a file's bytes, or of a folder's sorted relative paths and their bytes."""
    root = Path(path)
    digest = hashlib.sha256()
    files = {"": root}
    if root.is_dir():
        files = {p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_file()}
    for name, file in sorted(files.items()):
        if name:  # a folder: its layout counts too
            label = name.encode()
            digest.update(len(label).to_bytes(8, "big") + label + file.stat().st_size.to_bytes(8, "big"))
        with file.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def write_durably(target: Path, data: bytes) -> None:
    """Unique temp file in the same folder, flush + fsync, then an atomic rename over ``target``."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_or_check(target: Path, text: str, command: str, check: bool) -> int:
    """Write a generated file, or with ``check`` only compare: 1 and a line naming ``command``
    when ``target`` is stale, else 0 (the exit status of the docs generators)."""
    if check:
        if target.read_text() != text:
            print(f"{target} is stale: run {command}", file=sys.stderr)
            return 1
        return 0
    target.write_text(text)
    print(f"wrote {target}")
    return 0
