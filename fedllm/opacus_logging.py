"""Undo the root-logger handler that importing Opacus installs.

``opacus.utils.module_utils`` calls ``logging.basicConfig`` when it is imported. With that handler
on the root logger every record of a logger that propagates, Flower's included, is printed twice:
once in its own format, once as ``12/05/2026 01:33:57:INFO:...``; ``flwr run --stream`` showed
every line twice. A library should not configure the root logger, so fedllm removes exactly that
handler when it imports Opacus (``fedllm.privacy``); handlers the application set are left alone.
"""

from __future__ import annotations

import logging

import opacus.utils.module_utils  # noqa: F401  (installs the handler removed below)

OPACUS_ROOT_FORMAT = "%(asctime)s:%(levelname)s:%(message)s"


def drop_opacus_root_handler() -> None:
    """Remove the root logger's stream handlers that carry Opacus' ``basicConfig`` format."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        formatter = handler.formatter
        if isinstance(handler, logging.StreamHandler) and formatter and formatter._fmt == OPACUS_ROOT_FORMAT:
            root.removeHandler(handler)


drop_opacus_root_handler()
