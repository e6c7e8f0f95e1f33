"""The privacy statement at its edges (issue 23): every answer a site gives is a release.

Each test drives the real ClientApp (or the library piece the statement rests on) with the
server's choices an attacker would make: concurrent run keys, label lists, deltas, a crafted head.
"""

from __future__ import annotations

import json
import math
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import Array, ArrayRecord
from scipy.optimize import brentq
from scipy.stats import norm

import clients.app
import clients.handlers
import fedllm.site_round
from clients.policy import SitePolicy
from clients.site import main as site_main
from fedllm.accounting import PrivacyPlan, count_entry, epsilon_for, plan_privacy
from fedllm.adapters import adapter_to_record
from fedllm.config import Settings, settings_from
from fedllm.data import tokenize
from fedllm.ledger import PrivacyLedger, total_steps
from fedllm.model import build_model
from fedllm.train import train_local

from .conftest import LABELS, TINY
from .conftest import flower_context as _context
from .sites import COUNT_NOISE
from .sites import ask as _ask
from .sites import ledger_path as _ledger_path
from .sites import message as _message


def _ledger(site: dict) -> PrivacyLedger:
    return PrivacyLedger(_ledger_path(site))


# ------------------------------------------------------------------ 1: concurrent runs, one cap


def test_two_interleaved_runs_that_together_pass_the_cap_train_exactly_once(site, run_config, monkeypatch):
    """Run A pauses right after its lifetime check until run B has checked too (at most 3 s).

    Without one site-wide lock from check to booking both checks pass on the same empty books
    (lifetime 10.66 > 8 once both trained); with it, B checks after A booked and is refused.
    """
    checked = {name: threading.Event() for name in ("A", "B")}
    original = SitePolicy.check_lifetime

    def paused(self, committed, what="this run's plan"):
        result = original(self, committed, what)
        name = threading.current_thread().name[0]
        checked[name].set()
        if name == "A":
            checked["B"].wait(timeout=3)
        return result

    monkeypatch.setattr(SitePolicy, "check_lifetime", paused)

    def ask(run_id: int):
        threading.current_thread().name = "AB"[run_id - 1]
        if run_id == 2:
            checked["A"].wait(timeout=30)
        return _ask(site, run_config, run_id=run_id)

    with ThreadPoolExecutor(2) as pool:
        replies = list(pool.map(ask, (1, 2)))
    trained = [r for r in replies if not r.has_error()]
    refused = [r for r in replies if r.has_error()]
    assert len(trained) == 1 and len(refused) == 1
    assert refused[0].error.reason == "site-refused-lifetime-budget"
    assert _ledger(site).lifetime_epsilon(1e-5) <= 8.0 + 1e-6


def test_a_started_run_reserves_its_whole_plan(site, run_config):
    """A 3-round run at ε 6 books round 1 and reserves rounds 2 and 3 at its first round: a
    second run at ε 6 checked meanwhile composes with all three rounds, not with one."""
    six = {**run_config, "target-epsilon": 6.0}
    msg = _message(six)
    msg.content["config"]["num-rounds"] = 3
    assert not clients.app.app(msg, _context(site, six, run_id=1)).has_error()
    run = _ledger(site).runs["1"]
    assert total_steps(run) == 1 + 2 and total_steps({"history": run["reserved"]}) == 2 * 2
    late = _ask(site, six, run_id=2)
    assert late.has_error() and late.error.reason == "site-refused-lifetime-budget"
    # what run 1 has spent so far would have let the second run in
    alone = plan_privacy(settings_from(six).resolved(), run["public-n"], 1, count_noise=COUNT_NOISE)
    second = [count_entry(COUNT_NOISE), (alone.noise_multiplier, alone.sample_rate, alone.planned_steps)]
    assert epsilon_for([*run["history"], *second], 1e-5) < 8.0


# ------------------------------------------------------------------ 2 and 3: answers that were free queries


def test_a_row_whose_label_the_run_does_not_list_changes_no_answer(tmp_path, site, run_config, frame):
    """D and D + one row labelled 'delighted' (not among the run's labels) both train."""
    added = pd.concat([frame, pd.DataFrame([{"text": "so happy", "label": "delighted", "condition": "c9"}])])
    for table in (frame, added):
        table.to_csv(site["data-file"], index=False)
        reply = _ask({**site, "max-epsilon": 100.0}, run_config, run_id=len(table))
        assert not reply.has_error(), reply.error


def test_a_label_list_missing_a_class_of_the_site_is_trained_not_answered_with_an_error(site, run_config):
    only_two = LABELS[:2]
    msg = _message(run_config)
    msg.content["config"]["labels"] = json.dumps(only_two)
    msg.content["arrays"] = adapter_to_record(build_model(settings_from(run_config).resolved(), only_two))
    reply = clients.app.app(msg, _context(site, run_config))
    assert not reply.has_error(), reply.error


def test_delta_one_over_n_is_answered_alike_for_n_and_n_plus_one(tmp_path, site, run_config, frame):
    """The old binary search on n: δ = 1/k gave site-internal-error exactly when n ≥ k."""
    answers = set()
    for table in (frame, pd.concat([frame, frame.head(1).assign(text="one more row")])):
        table.to_csv(site["data-file"], index=False)
        reply = _ask(site, {**run_config, "delta": 1 / len(frame)})
        answers.add(reply.error.reason if reply.has_error() else "trained")
    assert answers == {"site-refused-delta"}
    assert not _ledger_path(site).exists()  # refused from the run config alone: nothing read or booked


def test_a_site_that_refuses_everything_never_reads_its_data(site, run_config):
    missing = {**site, "data-file": site["data-file"] + ".gone"}
    no_dp = _ask(missing, {**run_config, "target-epsilon": math.inf})
    assert no_dp.error.reason == "site-requires-dp"
    broke = _ask({**missing, "max-epsilon": 0.01}, run_config)  # not even the DP count fits
    assert broke.error.reason == "site-refused-lifetime-budget"


def test_a_head_that_no_noisy_step_can_move_is_trained_and_booked_not_answered_with_an_error(
    site, run_config
):
    """All head values 1e30: a float32 step cannot change them. A frozen-weights check after the
    noisy step answered that (site-internal-error, nothing booked): an unbooked query."""
    msg = _message(run_config)
    arrays = msg.content["arrays"]
    msg.content["arrays"] = ArrayRecord(
        {
            k: Array(np.full_like(v.numpy(), 1e30) if "classifier" in k else v.numpy())
            for k, v in arrays.items()
        }
    )
    reply = clients.app.app(msg, _context(site, run_config))
    assert not reply.has_error(), reply.error
    assert total_steps(_ledger(site).runs["1"]) == 1 + 2


def test_a_round_that_fails_after_booking_stays_booked(site, run_config, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("the noisy step ran into something")

    monkeypatch.setattr(fedllm.site_round, "train_local", broken)  # the one site round (clients.app calls it)
    reply = _ask(site, run_config)
    assert reply.has_error() and reply.error.reason == "site-declined"
    run = _ledger(site).runs["1"]
    assert total_steps(run) == 1 + 2 and run["epsilon"] > 0


# ------------------------------------------------------------------ 5: no secret randomness from the server


def _clipped_sum(private: bool, frame: pd.DataFrame, tokenizer) -> torch.Tensor:
    """Σ of the clipped per-example gradients of one DP step (σ = 0, q = 1, lr 1, divisor 100),
    with the global RNG seeded as the server's ``seed`` would seed it."""
    settings = Settings(
        max_length=32,
        trainable="lora",
        optimizer="sgd",
        lr=1.0,
        schedule="constant",
        max_steps=1,
        sample_rate=1.0,
        physical_batch_size=0,
        target_epsilon=8.0 if private else math.inf,
        device="cpu",
    )
    torch.manual_seed(0)
    model = build_model(settings.resolved(), LABELS, torch.device("cpu"), TINY)
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    plan = PrivacyPlan(0.0, 1.0, 1e-5, 1, math.inf, "rdp", 1, public_n=100)
    torch.manual_seed(1234)
    train_local(
        model,
        tokenize(frame, tokenizer, LABELS, 32),
        settings.replace(target_epsilon=8.0).resolved(),
        plan=plan,
    )
    after = [p.detach() for p in model.parameters() if p.requires_grad]
    return torch.cat([(b - a).flatten() for b, a in zip(before, after, strict=True)]) * 100


def test_one_added_row_moves_the_clipped_gradient_sum_by_at_most_c(tokenizer, frame):
    small = frame.head(24)
    added = pd.concat(
        [small, pd.DataFrame([{"text": "a much longer added review " * 5, "label": "negative"}])]
    )
    moved = (_clipped_sum(True, added, tokenizer) - _clipped_sum(True, small, tokenizer)).norm()
    assert float(moved) <= 1.0 + 1e-4  # C = 1
    # with the dropout the server's seed predicts, the same row moved the others' gradients too
    leaky = (_clipped_sum(False, added, tokenizer) - _clipped_sum(False, small, tokenizer)).norm()
    assert float(leaky) > 1.5


# ------------------------------------------------------------------ 6: the relation and the ε booked


def _gaussian_epsilon(mu: float, delta: float) -> float:
    """Exact ε of a μ-Gaussian mechanism at δ (Balle & Wang 2018): an independent computation."""

    def delta_at(eps: float) -> float:
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)

    return brentq(lambda eps: delta_at(eps) - delta, 0.0, 100.0)


def test_the_epsilon_booked_is_the_exact_one_of_the_count_and_the_steps_under_add_remove(site, run_config):
    """q = 1: the count (σ_n, sensitivity 1) and s steps (σ, sensitivity C) compose to one Gaussian
    of μ = sqrt(1/σ_n² + s/σ²). The PRV accountant is a little above the exact value (0.01-0.02)."""
    reply = _ask(site, {**run_config, "sample-rate": 1.0})
    run = _ledger(site).runs["1"]
    sigma, steps = run["plan"]["noise_multiplier"], total_steps(run) - 1
    exact = _gaussian_epsilon(math.sqrt(1 / COUNT_NOISE**2 + steps / sigma**2), 1e-5)
    booked = reply.content["metrics"]["epsilon"]
    assert booked == pytest.approx(run["epsilon"])
    assert exact <= booked <= exact + 0.05


def test_the_site_sends_its_dp_count_never_its_n(site, run_config, frame, monkeypatch):
    monkeypatch.setattr(random.SystemRandom, "gauss", lambda self, mu, sigma: 7.4)
    reply = _ask(site, run_config)
    run = _ledger(site).runs["1"]
    settings = Settings(model=run_config["model"])
    n = len(clients.handlers._site_data(_context(site, run_config), settings, LABELS).train)
    assert reply.content["metrics"]["num-examples"] == run["public-n"] == n + 7
    assert reply.content["metrics"]["delta"] == 1e-5  # a public constant, not 1/(10 n)
    assert run["history"][0] == count_entry(COUNT_NOISE)


def test_an_abandoned_runs_reservation_is_released_by_the_operator(site, run_config, capsys):
    six = {**run_config, "target-epsilon": 6.0}
    msg = _message(six)
    msg.content["config"]["num-rounds"] = 3
    assert not clients.app.app(msg, _context(site, six, run_id=1)).has_error()
    assert _ask(site, six, run_id=2).error.reason == "site-refused-lifetime-budget"
    # run 1 never comes back: the operator releases what it had reserved
    capsys.readouterr()
    for command in (["spend"], ["release", "--run", "1"]):
        with pytest.raises(SystemExit) as done:
            site_main([*command, "--state-dir", site["state-dir"]])
        assert done.value.code == 0
    out = capsys.readouterr().out
    assert "1: 4 planned steps not yet taken" in out and "released the reservation of 4 planned steps" in out
    run = _ledger(site).runs["1"]
    assert run["reserved"] == [] and total_steps(run) == 1 + 2  # what it spent stays booked
    assert not _ask(site, six, run_id=3).has_error()
