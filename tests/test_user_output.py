"""What fedllm leaves in a user's output: no report of the expected new head, no global filters."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import warnings

import pytest
from safetensors.torch import load_file, save_file

from fedllm import known_warnings
from fedllm.model import build_base_model, build_model

from .conftest import DEVICE, LABELS

DROPPED = "encoder.layer.0.attention.self.query.weight"


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def transformers_log():
    """What transformers' loggers hand to their handlers (the user's terminal)."""
    handler = _Records()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)


def _without(checkpoint, key: str, folder):
    """A copy of ``checkpoint`` whose weights lack ``key``."""
    shutil.copy(checkpoint / "config.json", folder / "config.json")
    weights = load_file(str(checkpoint / "model.safetensors"))
    save_file(
        {k: v for k, v in weights.items() if k != key}, str(folder / "model.safetensors"), {"format": "pt"}
    )
    return folder


def test_the_new_head_is_not_reported_but_a_missing_weight_is(
    settings, tiny_checkpoint, tmp_path, transformers_log
):
    build_base_model(settings.replace(model=str(tiny_checkpoint)), LABELS)
    assert not [m for m in transformers_log if "LOAD REPORT" in m]
    broken = _without(tiny_checkpoint, DROPPED, tmp_path)
    build_base_model(settings.replace(model=str(broken)), LABELS)
    reports = [m for m in transformers_log if "LOAD REPORT" in m]
    assert len(reports) == 1 and DROPPED in reports[0] and "classifier.weight" in reports[0]


def test_importing_fedllm_leaves_the_warning_filters_alone():
    script = (
        "import warnings\n"
        "import flwr, opacus, peft, torch, transformers\n"
        "before = list(warnings.filters)\n"
        "import fedllm, fedllm.adapters, fedllm.model, fedllm.privacy, fedllm.train\n"
        "added = [f for f in warnings.filters if f not in before]\n"
        "assert not added, added\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)


def test_known_warnings_are_ignored_inside_fedllm_calls_only(settings, tiny_config):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_model(settings.resolved(), LABELS, DEVICE, tiny_config)  # peft reads a deprecated property
        with known_warnings():
            warnings.warn("Secure RNG turned off. (inside)", stacklevel=1)
        warnings.warn("Secure RNG turned off. (outside)", stacklevel=1)
    assert [str(w.message) for w in caught] == ["Secure RNG turned off. (outside)"]


def test_importing_fedllm_privacy_leaves_no_root_log_handler():
    """Opacus' ``logging.basicConfig`` printed every Flower log line twice in ``flwr run --stream``."""
    code = (
        "import logging, fedllm.privacy, flwr.common.logger\n"
        "from flwr.common import log\n"
        "assert not logging.getLogger().handlers, logging.getLogger().handlers\n"
        "log(logging.INFO, 'one line')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = (out.stdout + out.stderr).splitlines()
    assert sum("one line" in line for line in lines) == 1, lines
