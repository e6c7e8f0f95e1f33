"""The site's own privacy policy: limits the server's run config can never widen.

A real site sets its policy in its node config (``python -m clients.site join`` flags); the keys,
their defaults and meanings are ``SitePolicy``'s declared fields (``fedllm.settings_reader``).

Under DP a reply carries only the adapter and ``DP_REPLY_KEYS``; the rest is a release outside
DP that the site must opt into. A virtual site of a simulation (``partition-id`` in its node
config, no ``data-file``) has no node config of its own: its policy is read from the run
config's ``sim-site-*`` keys (the researcher is both server and sites there).
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode

from fedllm import failure_codes as codes
from fedllm.accounting import BudgetExhaustedError, check_delta, epsilon_for, resolve_delta
from fedllm.config import Settings
from fedllm.contract import DP_REPLY_KEYS, RELEASED_TRAIN_KEYS  # the reply keys (fedllm/contract.py)
from fedllm.ledger import LedgerError
from fedllm.settings_reader import key, read
from fedllm.statement import DEFAULT_NOT_COVERED

DEFAULT_MAX_EPSILON = 8.0
DEFAULT_MAX_DELTA = 1e-5
SIM_PREFIX = "sim-site-"
# failure reasons the server may see: fixed codes (fedllm/failure_codes.py, which the server
# checks against); the full text stays in the site's log. Every failure that could depend on the
# data (reading it, training on it) is the one code DECLINED.
DECLINED = codes.DECLINED
FAILURE_CODES = (
    (LedgerError, codes.LEDGER_ERROR),
    (BudgetExhaustedError, codes.REFUSED_BUDGET),
)


class SitePolicyError(BudgetExhaustedError):
    """A run asks for more than this site's policy allows; nothing was trained or sent."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class SitePolicy:
    """A site's limits; ``from_context`` reads them from where the site (not the server) sets them."""

    max_epsilon: float = key(
        DEFAULT_MAX_EPSILON,
        "the cap on the site's lifetime epsilon, over every run in its ledger plus the asking run's plan",
        low=0,
        low_open=True,
        fix="use a lifetime budget > 0; fix the site's node config",
    )
    max_delta: float = key(
        DEFAULT_MAX_DELTA,
        "the largest delta a run may use; the lifetime epsilon is stated at it",
        low=0,
        low_open=True,
        high=1,
        high_open=True,
        fix="use a delta in (0, 1); fix the site's node config",
    )
    allow_no_dp: bool = key(False, "whether the site ever trains without DP")
    release_train_metrics: bool = key(False, "send the exact mean training loss and time")
    release_evaluation: bool = key(
        False, "score adapters on the site's local test split and send the exact scores"
    )
    accountant: str = key("prv", "the accountant that states the lifetime epsilon", read=False)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], prefix: str = "") -> SitePolicy:
        """The policy in ``config`` (keys ``<prefix>max-epsilon`` ...); missing keys keep the
        defaults; a bad value is one line naming the key and the fix (booleans strictly:
        ``"ture"`` is an error, never a silent false)."""
        return read(cls, config, "site policy", prefix=prefix)

    @classmethod
    def from_context(cls, context: Context) -> SitePolicy:
        """A real site's node config; a virtual site's ``sim-site-*`` run-config keys."""
        if is_virtual_site(context):
            return cls.from_config(dict(context.run_config), SIM_PREFIX)
        return cls.from_config(dict(context.node_config))

    def check_run(self, settings: Settings) -> None:
        """Refuse a run config this site's policy does not allow, before anything reads the data.

        Depends only on the run config and the policy: DP required unless ``allow-no-dp``; the
        run's δ (``resolve_delta``: never a function of n) at most ``max-delta``; no ghost
        clipping under DP (``fedllm.privacy.finite_examples_only``: only per-example modes can
        keep an example whose gradient overflows on the server's weights to that example).
        """
        if not settings.private:
            if not self.allow_no_dp:
                raise SitePolicyError(
                    codes.REQUIRES_DP,
                    "this site trains only with DP (allow-no-dp is off); the run asks for none",
                )
            return
        delta = resolve_delta(settings)
        if delta > self.max_delta * (1 + 1e-9):
            raise SitePolicyError(
                codes.REFUSED_DELTA,
                f"the run's delta={delta:g} is above this site's max-delta={self.max_delta:g}",
            )
        if settings.grad_sample_mode == "ghost":
            raise SitePolicyError(
                codes.REFUSED_SETTING,
                "grad-sample-mode = ghost under DP: an example whose gradient overflows on the "
                "server's weights would make the whole update NaN; this site trains with hooks "
                "or functorch, which count such an example as a zero gradient",
            )

    def check_lifetime(self, committed: list, what: str = "this run's plan") -> float:
        """Refuse when ``committed`` (spent, reserved and about to be booked, as accountant
        history) composes above ``max-epsilon`` at ``max-delta``; return that lifetime ε."""
        lifetime = epsilon_for(committed, self.max_delta, self.accountant)
        if lifetime > self.max_epsilon * (1 + 1e-6):
            raise SitePolicyError(
                codes.REFUSED_LIFETIME_BUDGET,
                f"{what} would bring the site's lifetime epsilon to {lifetime:.3f} > its max-epsilon "
                f"{self.max_epsilon:g} (delta {self.max_delta:g}); nothing was trained",
            )
        return lifetime

    @staticmethod
    def check_count(delta: float, public_n: int) -> None:
        """Refuse a δ that is not below 1/n̂ (post-processing of the booked DP count)."""
        try:
            check_delta(delta, public_n)
        except ValueError as err:
            raise SitePolicyError(codes.REFUSED_DELTA, str(err)) from err

    def check_evaluate(self, private: bool) -> None:
        """Exact scores on the local test split are a release: only if the site opted in."""
        if self.release_evaluation or (not private and self.allow_no_dp):
            return
        raise SitePolicyError(
            codes.REFUSED_EVALUATION,
            "this site does not release scores on its local data (release-evaluation is off)",
        )

    def reply_metrics(self, metrics: dict, private: bool) -> dict:
        """What leaves the site: under DP only the DP keys (plus train metrics if opted in)."""
        if not private:
            return dict(metrics)
        allowed = DP_REPLY_KEYS + (RELEASED_TRAIN_KEYS if self.release_train_metrics else ())
        return {k: v for k, v in metrics.items() if k in allowed}

    def not_covered(self) -> list[str]:
        """What this site releases outside its DP guarantee, in plain words."""
        items = list(DEFAULT_NOT_COVERED)
        if self.release_train_metrics:
            items.append("the exact mean training loss and training time of each round (opted in)")
        if self.release_evaluation:
            items.append("exact scores of the adapters the server sends on the local test split (opted in)")
        if self.allow_no_dp:
            items.append("everything about runs this site trained without DP (allow-no-dp is on)")
        return items


def is_virtual_site(context: Context) -> bool:
    """A simulation's virtual site: a partition of the run's data set, no data file of its own."""
    return "data-file" not in context.node_config and "partition-id" in context.node_config


def site_secret(state_dir: Path) -> bytes:
    """The site's secret key for its train/test split (created once, 0600, never sent)."""
    path = state_dir / "site-secret"
    if not path.exists():
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.touch(mode=0o600, exist_ok=False)
        path.write_bytes(os.urandom(32))
    secret = path.read_bytes()
    if len(secret) < 16:
        raise LedgerError(f"{path}: the site secret is shorter than 16 bytes; restore it from a backup")
    return secret


def failure_code(err: BaseException) -> str:
    """The fixed code the server sees for a failure (never the message: it may hold data)."""
    if isinstance(err, SitePolicyError):
        return err.code
    return next((code for kind, code in FAILURE_CODES if isinstance(err, kind)), DECLINED)


def failures_as_codes(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """ClientApp mod: a failure reaches the server as a fixed code; its text stays in the site's log."""
    try:
        return call_next(msg, context)
    except Exception as err:  # every failure: the text may name files, rows or label values
        code = failure_code(err)
        print(f"[site {context.node_id}] {code}: {err}\n{traceback.format_exc()}", flush=True)
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=code), reply_to=msg)
