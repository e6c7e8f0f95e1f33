"""fedllm: federated fine-tuning of BERT with LoRA adapters and differential privacy."""

import warnings

__version__ = "0.1.0"

# Known, understood warnings that would otherwise repeat every round at every site:
# - Opacus' secure RNG is off (documented in the README: turn on for a final production run);
# - Opacus' hooks on a model whose inputs need no grad (frozen embeddings, by design);
# - the RDP search reaching its largest order while calibrating small epsilons;
# - a transformers deprecation inside peft.
for _pattern in (
    "Secure RNG turned off",
    "Full backward hook is firing",
    "Optimal order is the largest alpha",
    ".*is_gradient_checkpointing.*",
):
    warnings.filterwarnings("ignore", message=_pattern)
