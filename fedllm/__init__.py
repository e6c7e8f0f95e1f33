"""fedllm: federated fine-tuning of BERT with LoRA adapters and differential privacy."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

__version__ = "0.1.0"

# Known, understood warnings that would otherwise repeat every round at every site:
# - Opacus' secure RNG is off (README: what Opacus' secure_mode would and would not add);
# - Opacus' hooks on a model whose inputs need no grad (frozen embeddings, by design);
# - the RDP search reaching its largest order while calibrating small epsilons (also inside the
#   PRV accountant, which bounds its domain with RDP at a tiny delta): the bound is only looser;
# - the RDP search reaching its smallest order for sigma = 0 (a noise-free plan: epsilon = inf);
# - numpy's log(0) in Opacus' PRV accountant at q = 1 (full-batch DP-GD, the DP recipe's
#   default): it computes log(1 - q) = -inf, the right limit, and masks it out;
# - a transformers deprecation inside peft (``get_peft_model``, ``PeftModel.from_pretrained``).
KNOWN_WARNINGS = (
    "Secure RNG turned off",
    "Full backward hook is firing",
    "Optimal order is the largest alpha",
    "Optimal order is the smallest alpha",
    "divide by zero encountered in log",
    ".*is_gradient_checkpointing.*",
)


@contextmanager
def known_warnings() -> Iterator[None]:
    """Ignore ``KNOWN_WARNINGS`` inside the block only; the caller's warning filters are restored.

    Wrap fedllm's own calls that emit them (also usable as a decorator); importing fedllm
    changes no warning filter.
    """
    with warnings.catch_warnings():
        for pattern in KNOWN_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
        yield
