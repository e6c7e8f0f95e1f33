"""Every release on the books, and a state folder that cannot be reset silently (real sites).

``book_releases`` is a ClientApp mod around every message a real site handles:

- before: the state folder must be initialised and absolute (``fedllm.site_state.open_state``),
  its ledger no older than its high-water mark (``raise_high_water``), and the site's policy is
  stored in its marker (``spend`` reads its ``max-delta`` from there);
- after a reply that leaves the site: a train reply without DP is booked as a ``no-dp`` release
  (ε = ∞), an evaluation answer as an ``evaluation`` release (``PrivacyLedger.record_release``),
  before the reply is returned: a release that cannot be booked is not sent;
- always (also after a failure): the high-water mark is raised to the ledger, so every ledger
  write of the round is under the mark.

A virtual site of a simulation has no state folder: the mod passes its messages through.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from clients.policy import SitePolicy, is_virtual_site
from clients.replay import run_key
from fedllm.config import settings_from
from fedllm.contract import SERVER_ROUND
from fedllm.site_state import SiteState, open_state, raise_high_water, remember_policy


def site_state_of(context: Context) -> SiteState:
    """A real site's initialised state (node config ``state-dir``, optional ``high-water-dir``)."""
    node = context.node_config
    state_dir, high_water = node.get("state-dir"), node.get("high-water-dir")
    return open_state(
        None if state_dir is None else str(state_dir), None if high_water is None else str(high_water)
    )


def site_state_dir(context: Context) -> Path:
    """The state folder of a real site, refused (``StateError``) unless initialised and absolute."""
    return site_state_of(context).folder


def release_kind(msg: Message, context: Context) -> str | None:
    """The release record a successful reply to ``msg`` needs: ``no-dp``, ``evaluation`` or None."""
    kind = msg.metadata.message_type
    if kind.startswith("evaluate"):
        return "evaluation"
    if kind.startswith("train") and not settings_from(context.run_config).private:
        return "no-dp"
    return None


def book_releases(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """ClientApp mod: check the state before, book the release after, raise the mark always."""
    if is_virtual_site(context):
        return call_next(msg, context)
    state = site_state_of(context)
    raise_high_water(state)  # a ledger older than the mark stops the site here
    remember_policy(state, dataclasses.asdict(SitePolicy.from_context(context)))
    try:
        reply = call_next(msg, context)
        kind = release_kind(msg, context)
        if kind is not None and not reply.has_error():
            config = msg.content.config_records.get("config")
            server_round = config.get(SERVER_ROUND, 0) if config is not None else 0
            state.ledger.record_release(run_key(msg, context), kind, round=int(str(server_round)))
        return reply
    finally:
        raise_high_water(state)
