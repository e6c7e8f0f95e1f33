"""The federation and server keys of the run config, in one typed place.

``ServerSettings`` is the one source of these keys' defaults; pyproject.toml's
``[tool.flwr.app.config]`` declares them again (Flower refuses undeclared keys), and
tests/test_config.py checks that table against this class key by key. The fine-tune settings
are ``fedllm.config.Settings``, the robust aggregation keys ``server.robust.RobustSettings``.

- ``num-server-rounds`` (8): rounds to run (the DP recipe's 8 rounds x 3 local steps,
  ``max-steps``, docs/dp-recipe.md);
- ``fraction-train`` (1.0), ``fraction-evaluate`` (0.0), ``min-train-nodes`` (2),
  ``min-evaluate-nodes`` (2), ``min-available-nodes`` (2): Flower's FedAvg sampling;
  ``fraction-evaluate`` 0 = no site scores adapters (sites score only if they opt in);
- ``server-eval`` (true): score each round's global adapter on the server's test split;
- ``run-dir`` (``runs``), ``run-name`` (``""`` = the start time): where the run folder goes;
- ``resume`` (``""``): a run folder to continue after a server crash (server/resume.py);
- ``labels`` (``""``): comma-separated label names; ``""`` = from the training split.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, fields
from typing import Any

from fedllm.config import true_or_false

# a folder name is at most 255 bytes (NAME_MAX); make_run_dir may append "-run<run id>"
MAX_RUN_NAME_BYTES = 200


def run_name(raw: object) -> str:
    """``run-name`` as one folder name; raises one line naming the key and the fix otherwise."""
    name = str(raw).strip()
    if len(name.encode("utf-8", "surrogatepass")) > MAX_RUN_NAME_BYTES:
        raise ValueError(
            f"run config run-name={name[:40]!r}... is {len(name.encode('utf-8', 'surrogatepass'))} bytes "
            f"long; a run name is one folder name of at most {MAX_RUN_NAME_BYTES} bytes: use a shorter one"
        )
    bad = (
        not name
        or name in (".", "..")
        or any(sep in name for sep in ("/", "\\"))
        or any(unicodedata.category(c) == "Cc" for c in name)
    )
    if bad:
        raise ValueError(
            f"run config run-name={str(raw)!r}: a run name is one folder name inside run-dir "
            "(no '/', '\\', '.', '..', control characters, not blank); use e.g. run-name=\"bbc-robust\""
        )
    return name


def _read(key: str, kind: str, value: Any) -> Any:
    """``value`` as ``kind`` (the field's annotation); one line naming the key otherwise."""
    if kind == "str":
        return str(value)
    try:
        if kind == "bool":
            return true_or_false(value)
        if isinstance(value, bool):
            raise ValueError("a number, not true/false")
        number = float(value)
        if kind == "int":
            if not number.is_integer():
                raise ValueError("a whole number")
            return int(number)
        return number
    except ValueError:
        expected = {"bool": "true or false", "int": "a whole number", "float": "a number"}[kind]
        raise ValueError(f"run config {key}={value!r}: expected {expected}") from None


@dataclass(frozen=True)
class ServerSettings:
    """How many rounds, which sites, where the run is written (the keys above)."""

    num_server_rounds: int = 8
    fraction_train: float = 1.0
    fraction_evaluate: float = 0.0
    min_train_nodes: int = 2
    min_evaluate_nodes: int = 2
    min_available_nodes: int = 2
    server_eval: bool = True
    run_dir: str = "runs"
    run_name: str = ""
    resume: str = ""
    labels: str = ""

    @classmethod
    def from_run_config(cls, rc: dict) -> ServerSettings:
        """Read and check the keys above (missing ones keep the defaults); a bad value raises one
        line naming the key and the fix. ``run-name`` and ``resume`` come back stripped."""
        values = {
            f.name: _read(key, str(f.type), rc[key]) if key in rc else f.default
            for f in fields(cls)
            for key in [f.name.replace("_", "-")]
        }
        if values["run_name"]:
            values["run_name"] = run_name(values["run_name"])
        values["resume"] = values["resume"].strip()
        settings = cls(**values)
        checks = [
            (settings.num_server_rounds >= 1, "num-server-rounds", "run at least 1 round"),
            (0 < settings.fraction_train <= 1, "fraction-train", "use a fraction in (0, 1]"),
            (
                0 <= settings.fraction_evaluate <= 1,
                "fraction-evaluate",
                "use a fraction in [0, 1] (0 = no site scores adapters)",
            ),
            (settings.min_train_nodes >= 1, "min-train-nodes", "use at least 1"),
            (settings.min_evaluate_nodes >= 0, "min-evaluate-nodes", "use 0 or more"),
            (settings.min_available_nodes >= 1, "min-available-nodes", "use at least 1"),
        ]
        for ok, key, fix in checks:
            if not ok:
                value = getattr(settings, key.replace("-", "_"))
                raise ValueError(f"run config {key}={value!r}: {fix}")
        return settings

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
    """Client-level DP at the server (server/client_dp.py, docs/client-level-dp.md).

    - ``client-dp-epsilon`` (0 = off): the run's client-level ε budget (Flower's ``max_epsilon``);
    - ``client-dp-delta`` (1e-5): its δ;
    - ``client-dp-clip`` (1.0): the L2 bound on one site's update (its adapter minus the global);
    - ``client-dp-noise-multiplier`` (0 = calibrated): σ; 0 = the smallest σ for which
      ``num-server-rounds`` releases stay within ``client-dp-epsilon`` (by the run's accountant);
    - ``client-dp-sites`` (0 = ``min-train-nodes``): sites per round, the fixed denominator m;
    - ``client-dp-accountant`` (``pld``): ``pld`` = dp-accounting's PLD behind Flower's accountant
      protocol (server/client_accountant.py), ``rdp`` = Flower's ``RdpAccountant``.
    """

    client_dp_epsilon: float = 0.0
    client_dp_delta: float = 1e-5
    client_dp_clip: float = 1.0
    client_dp_noise_multiplier: float = 0.0
    client_dp_sites: int = 0
    client_dp_accountant: str = "pld"

    @classmethod
    def from_run_config(cls, rc: dict) -> ClientDPSettings:
        """Read and check the keys above; a bad value raises one line naming the key and the fix."""
        values = {
            f.name: _read(key, str(f.type), rc[key]) if key in rc else f.default
            for f in fields(cls)
            for key in [f.name.replace("_", "-")]
        }
        settings = cls(**values)
        finite = {
            k: abs(v) < float("inf") for k, v in values.items() if not isinstance(v, str)
        }  # ±inf, NaN: False
        checks = [
            (
                finite["client_dp_epsilon"] and settings.client_dp_epsilon >= 0,
                "client-dp-epsilon",
                "use a budget > 0 (0 = off)",
            ),
            (0 < settings.client_dp_delta < 1, "client-dp-delta", "use a δ in (0, 1), e.g. 1e-5"),
            (
                finite["client_dp_clip"] and settings.client_dp_clip > 0,
                "client-dp-clip",
                "use an L2 bound > 0",
            ),
            (
                finite["client_dp_noise_multiplier"] and settings.client_dp_noise_multiplier >= 0,
                "client-dp-noise-multiplier",
                "use σ > 0, or 0 to calibrate it from client-dp-epsilon",
            ),
            (settings.client_dp_sites >= 0, "client-dp-sites", "use a number of sites (0 = min-train-nodes)"),
            (settings.client_dp_accountant in ("pld", "rdp"), "client-dp-accountant", "use pld or rdp"),
        ]
        for ok, key, fix in checks:
            if not ok:
                raise ValueError(f"run config {key}={values[key.replace('-', '_')]!r}: {fix}")
        return settings

    @property
    def enabled(self) -> bool:
        """Whether the server adds client-level DP."""
        return self.client_dp_epsilon > 0
