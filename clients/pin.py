"""A site trains only for runs of the app it pinned, and only as the operator's run config says.

In Flower 1.42 a registered SuperNode can push a message with no ``reply_to`` and another node as
its destination; the SuperLink stores it as an instruction (``src_node_id`` is not checked against
the sender) and that node pulls it as if the ServerApp had sent it (docs/reliability.md, "Sites
addressing other sites"). What such a message cannot choose is the run it lands in: the run id
must name a run the operator submitted, and the site's SuperNode fetches that run's config and
Flower app bundle (FAB) from the SuperLink itself.

A real site that gives ``clients.site join --pin-app DIGEST`` (node config ``pin-app``) therefore
checks, before anything reads its data or books: that the app running is the one it pinned
(``app_digest`` over the files of the installed FAB), that the message's ``run-key`` is the run's
own id (or the run config names a ``resume``: the operator resumed a crashed run), and that a
train message's ``num-rounds`` is the run config's ``num-server-rounds``. A refusal reaches the
server as the public code ``site-refused-app`` or ``site-refused-run``.
"""

from __future__ import annotations

import hashlib
import re
import zipfile
from functools import lru_cache
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable

from clients.policy import SitePolicyError, is_virtual_site
from fedllm import failure_codes as codes
from fedllm.contract import NUM_ROUNDS, RUN_KEY

PIN_KEY = "pin-app"
DIGEST = re.compile(r"[0-9a-f]{64}")
APP_ROOT = Path(__file__).resolve().parent.parent  # the installed FAB's folder in deployment


def app_digest(files: dict[str, bytes]) -> str:
    """SHA-256 over the app's files: one ``path,sha256`` line per file, sorted by path."""
    lines = sorted(f"{path},{hashlib.sha256(data).hexdigest()}\n" for path, data in files.items())
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def folder_files(root: Path) -> dict[str, bytes]:
    """An installed app's files by relative path (Python's ``__pycache__`` left out)."""
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in root.rglob("*")
        if path.is_file() and not path.is_symlink() and "__pycache__" not in path.parts
    }


def fab_files(fab: Path) -> dict[str, bytes]:
    """A ``.fab`` file's app files (its ``.info/`` listing is removed when Flower installs it)."""
    with zipfile.ZipFile(fab) as archive:
        return {
            info.filename: archive.read(info)
            for info in archive.infolist()
            if not info.is_dir() and not info.filename.startswith(".info/")
        }


def digest_of(path: Path) -> str:
    """The app digest of a ``.fab`` file or of an installed app's folder."""
    return app_digest(fab_files(path) if path.is_file() else folder_files(path))


@lru_cache(maxsize=4)
def running_app_digest(root: Path = APP_ROOT) -> str:
    """The digest of the app this code was loaded from (computed once per process)."""
    return digest_of(root)


def check_pin(pin: str) -> str:
    """A pin as given: 64 lowercase hex characters (``clients.site app-digest`` prints one)."""
    value = str(pin).strip().lower()
    if not DIGEST.fullmatch(value):
        raise ValueError(f"pin-app {str(pin)[:80]!r}: expected the 64 hex characters `app-digest` prints")
    return value


def check_run(msg: Message, context: Context) -> None:
    """The message's run key and round count against the operator's run config."""
    config = msg.content.config_records.get("config", ConfigRecord())
    resumed = bool(str(context.run_config.get("resume", "")).strip())
    key = str(config.get(RUN_KEY, context.run_id))
    if key != str(context.run_id) and not resumed:
        raise SitePolicyError(
            codes.REFUSED_RUN,
            f"run-key {key[:40]!r} is not this run's id {context.run_id} and the run config resumes no run",
        )
    rounds, asked = context.run_config.get("num-server-rounds"), str(config.get(NUM_ROUNDS))
    if msg.metadata.message_type.startswith("train") and asked != str(rounds):
        raise SitePolicyError(
            codes.REFUSED_RUN,
            f"num-rounds {asked[:20]!r} is not the run config's num-server-rounds {rounds}",
        )


def pinned_app(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """ClientApp mod: a real site with ``pin-app`` refuses other apps and inconsistent runs."""
    if is_virtual_site(context) or PIN_KEY not in context.node_config:
        return call_next(msg, context)
    pin = check_pin(str(context.node_config[PIN_KEY]))
    running = running_app_digest()
    if running != pin:
        raise SitePolicyError(
            codes.REFUSED_APP,
            f"run {context.run_id} runs app {running[:16]}..., not the app this site pinned ({pin[:16]}...)",
        )
    check_run(msg, context)
    return call_next(msg, context)
