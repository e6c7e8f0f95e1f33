"""The federation and server keys of the run config, declared in one typed place.

``ServerSettings`` and ``ClientDPSettings`` are the one source of these keys' defaults and
meanings (each field's help, read by ``fedllm.settings_reader``); pyproject.toml's
``[tool.flwr.app.config]`` declares them again (Flower refuses undeclared keys), and
tests/test_config.py checks that table against these classes key by key. The fine-tune settings
are ``fedllm.config.Settings``, the robust aggregation keys ``server.robust.RobustSettings``.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedllm.settings_reader import key, read

SOURCE = "run config"
# a folder name is at most 255 bytes (NAME_MAX); make_run_dir may append "-run<run id>"
MAX_RUN_NAME_BYTES = 200


def run_name(raw: object) -> str:
    """``run-name`` as one folder name (stripped); ``ValueError(problem; fix)`` otherwise."""
    name = str(raw).strip()
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > MAX_RUN_NAME_BYTES:
        raise ValueError(
            f"is {size} bytes long; a run name is one folder name of at most {MAX_RUN_NAME_BYTES} "
            "bytes: use a shorter one"
        )
    bad = (
        name in (".", "..")
        or any(sep in name for sep in ("/", "\\"))
        or any(unicodedata.category(c) == "Cc" for c in name)
    )
    if bad or (str(raw) and not name):
        raise ValueError(
            "is not a folder name: a run name is one folder name inside run-dir (no '/', '\\', "
            "'.', '..', control characters, not blank); use e.g. run-name=\"bbc-robust\""
        )
    return name


@dataclass(frozen=True)
class ServerSettings:
    """How many rounds, which sites, where the run is written (the keys above)."""

    num_server_rounds: int = key(
        8,
        "rounds to run (the DP recipe's 8 rounds x 3 local steps, max-steps)",
        low=1,
        fix="run at least 1 round",
    )
    fraction_train: float = key(
        1.0,
        "share of the available sites sampled to train each round",
        low=0,
        low_open=True,
        high=1,
        fix="use a fraction in (0, 1]",
    )
    fraction_evaluate: float = key(
        0.0,
        "share of the sites asked to score the global adapter each round; 0 = none (sites score "
        "only if they opt in, release-evaluation)",
        low=0,
        high=1,
        fix="use a fraction in [0, 1] (0 = no site scores adapters)",
    )
    min_train_nodes: int = key(2, "fewest sites a training round waits for", low=1, fix="use at least 1")
    min_evaluate_nodes: int = key(2, "fewest sites an evaluation round waits for", low=0, fix="use 0 or more")
    min_available_nodes: int = key(
        2, "fewest connected sites before a round starts", low=1, fix="use at least 1"
    )
    server_eval: bool = key(True, "score each round's global adapter on the server's test split")
    run_dir: str = key("runs", "the folder that holds one folder per run")
    run_name: str = key("", "this run's folder name inside run-dir; '' = the start time", parse=run_name)
    resume: str = key(
        "",
        "a run folder (name or path inside run-dir) to continue after a server crash",
        parse=lambda value: str(value).strip(),
    )
    labels: str = key("", "comma-separated label names; '' = from the data set's training split")

    @classmethod
    def from_run_config(cls, rc: Mapping[str, Any]) -> ServerSettings:
        """Read and check the keys above (missing ones keep the defaults); a bad value raises one
        line naming the key and the fix. ``run-name`` and ``resume`` come back stripped."""
        return read(cls, rc, SOURCE)

    @property
    def label_list(self) -> list[str]:
        """``labels`` as a list of names; empty = from the data set's training split."""
        return [x.strip() for x in self.labels.split(",") if x.strip()]

    def strategy_kwargs(self) -> dict[str, float | int]:
        """The sampling keys as Flower's FedAvg takes them."""
        return {
            "fraction_train": self.fraction_train,
            "fraction_evaluate": self.fraction_evaluate,
            "min_train_nodes": self.min_train_nodes,
            "min_evaluate_nodes": self.min_evaluate_nodes,
            "min_available_nodes": self.min_available_nodes,
        }


@dataclass(frozen=True)
class ClientDPSettings:
    """Client-level DP at the server (server/client_dp.py, docs/client-level-dp.md)."""

    client_dp_epsilon: float = key(
        0.0,
        "the run's client-level epsilon budget (Flower's max_epsilon); 0 = off",
        low=0,
        finite=True,
        fix="use a budget > 0 (0 = off)",
    )
    client_dp_delta: float = key(
        1e-5, "its delta", low=0, low_open=True, high=1, high_open=True, fix="use a δ in (0, 1), e.g. 1e-5"
    )
    client_dp_clip: float = key(
        1.0,
        "the L2 bound on one site's update (its adapter minus the global), applied by the server",
        low=0,
        low_open=True,
        finite=True,
        fix="use an L2 bound > 0",
    )
    client_dp_noise_multiplier: float = key(
        0.0,
        "sigma; 0 = the smallest sigma for which num-server-rounds releases stay within "
        "client-dp-epsilon (by the run's accountant)",
        low=0,
        finite=True,
        fix="use σ > 0, or 0 to calibrate it from client-dp-epsilon",
    )
    client_dp_sites: int = key(
        0,
        "sites per round m, the fixed denominator; 0 = min-train-nodes",
        low=0,
        fix="use a number of sites (0 = min-train-nodes)",
    )
    client_dp_accountant: str = key(
        "pld",
        "the client-level accountant: 'pld' = dp-accounting's PLD behind Flower's accountant "
        "protocol (server/client_accountant.py), 'rdp' = Flower's RdpAccountant",
        choices=("pld", "rdp"),
    )

    @classmethod
    def from_run_config(cls, rc: Mapping[str, Any]) -> ClientDPSettings:
        """Read and check the keys above; a bad value raises one line naming the key and the fix."""
        return read(cls, rc, SOURCE)

    @property
    def enabled(self) -> bool:
        """Whether the server adds client-level DP."""
        return self.client_dp_epsilon > 0
