"""One typed configuration for model, LoRA, data, privacy and training (``Settings``).

The same hyphenated keys everywhere: Flower's run config (``flwr run --run-config "lora-r=16"``),
TOML files and command-line flags (``--lora-r 16``). ``Settings`` is the one source of each
fine-tune key's default and meaning (its declared help, ``fedllm.settings_reader``);
pyproject.toml declares the keys again for Flower, checked against ``flower_defaults()``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Self

from fedllm.auto import auto_values
from fedllm.settings_reader import check, defaults, key, key_name, read

SITE_DEVICES = ("any", "cpu", "cuda")
# A federated run's defaults where they differ from one local fine-tune's (Settings.epochs whole
# epochs): 3 local steps per round, the DP recipe's 8 rounds x 3 steps (docs/dp-recipe.md)
FEDERATED_DEFAULTS: dict[str, Any] = {"epochs": 1, "max-steps": 3}


@dataclass
class Settings:
    """Everything one local fine-tune needs; defaults are the tuned, documented defaults.

    Each field is a declared key (``fedllm.settings_reader.key``): its default, its help (the one
    place its meaning is written) and what it accepts. ``resolved()`` makes every 'auto' concrete;
    the library takes only ``ResolvedSettings``.
    """

    # model
    model: str = key("", "HF BERT path or hub id; '' = embedded MiniLM")
    pooling: str = key("mean", "sentence pooling: 'mean' or 'cls'", choices=("mean", "cls"))
    normalize_features: bool = key(
        False, "unit-normalise the mean-pooled features before the head (pooling = mean)"
    )
    pool_layers: int = key(
        1,
        "mean-pool the outputs of the top k encoder layers and concatenate them (pooling = mean): "
        "the head reads k x hidden features",
        low=1,
        fix="use a count of layers >= 1",
    )
    center_features: str = key(
        "none",
        "subtract a fixed vector from the pooled features before the head (pooling = mean): "
        "'validation' = the mean of the server's validation split's features (the server's own "
        "data, sent with every round), 'none' = raw features",
        choices=("none", "validation"),
    )
    max_length: int = key(
        0,
        "tokens per text (truncated); 0 = auto: 512 for the head (its features are computed once), "
        "128 for an encoder trainable (each step pays for every token)",
        low=8,
        special=(0,),
        fix="use 0 (auto) or at least 8",
    )
    truncation: str = key(
        "right", "which end of a long text to cut: 'right' or 'left'", choices=("right", "left")
    )
    lora_r: int = key(8, "LoRA rank", low=1, fix="use a rank >= 1")
    lora_alpha: int = key(16, "LoRA alpha")
    lora_dropout: float = key(0.0, "LoRA dropout")
    lora_targets: str = key("query,value", "comma-separated module names to adapt")
    lora_layers: int = key(
        0,
        "adapt only the top k encoder layers (0 = every layer)",
        low=0,
        fix="use 0 (every layer) or a positive count",
    )
    trainable: str = key(
        "auto",
        "what trains and travels: 'lora', 'ffa-lora' (A frozen), 'bias', 'head'; "
        "'auto' = lora without DP; under DP ffa-lora where it wins and site-devices says its "
        "cost fits (cuda, eps >= 3), else head",
        choices=("auto", "lora", "ffa-lora", "bias", "head"),
    )
    head_init: str = key(
        "random",
        "the head's start: 'random', or 'label-names' (the zero-shot head: each label's "
        "name in head-init-template, embedded by the frozen encoder; random when names are "
        "uninformative, e.g. '0', '1')",
        choices=("random", "label-names"),
    )
    head_init_template: str = key(
        "{}", "text around a label name for head-init = label-names ('{}' = the name)"
    )
    head_init_scale: float = key(
        0.0,
        "norm of each class's row of the zero-shot head (its logit scale); 0 = auto: "
        "10/sqrt(target-epsilon) under DP (a stronger prior where the noise is larger), 1 without",
        low=0,
        fix="use 0 (auto) or a positive scale, e.g. 10",
    )
    site_devices: str = key(
        "any",
        "what every site computes on, as the run declares it: 'cpu', 'cuda' or 'any' "
        "(not declared); trainable = auto under DP trains the encoder (ffa-lora) on 'cuda' at eps >= 3",
        choices=SITE_DEVICES,
    )
    # data
    dataset: str = key("drug-reviews", "'bbc-news', 'drug-reviews', or a CSV/TSV/JSONL file / HF dataset dir")
    test_file: str = key("", "held-out file ('' = built-in split)")
    text_column: str = key("text", "column holding the text")
    label_column: str = key("label", "column holding the label")
    test_fraction: float = key(
        0.2, "held-out share when no test file", low=0, low_open=True, high=1, high_open=True
    )
    validation_fraction: float = key(
        0.5,
        "share of the server's held-out data kept for validation (choosing settings); "
        "the rest is the test split results are reported on; 0 = no validation split",
        low=0,
        high=1,
        high_open=True,
    )
    # training
    epochs: int = key(5, "local epochs")
    max_steps: int = key(0, "stop after this many steps (0 = off)")
    batch_size: int = key(32, "(expected) batch size", low=1, fix="use a batch size >= 1")
    sample_rate: float = key(
        -1.0,
        "Poisson sample rate q in (0, 1]; 0 = 1/ceil(n/batch-size); -1 = auto "
        "(1 under DP: full batches; from batch-size without)",
        low=0,
        high=1,
        special=(-1,),
        fix="use -1 (auto), 0 (from batch-size) or a rate in (0, 1]",
    )
    max_step_noise: float = key(
        -1.0,
        "under DP, fewer local steps when a step would be noisier than this: the noise "
        "on an averaged step (norm sigma*C*sqrt(d)/(q*n)) at most this many clipping norms C; "
        "-1 = auto (2.0 under DP), 0 = off",
        low=0,
        special=(-1,),
        fix="use -1, 0 or > 0",
    )
    physical_batch_size: int = key(
        32,
        "largest batch in memory at once (0 = no limit); a private full-batch step "
        "runs in chunks of this size (Opacus BatchMemoryManager)",
        low=0,
        fix="use 0 (no limit) or a positive size",
    )
    optimizer: str = key(
        "auto",
        "'adamw' or 'sgd'; 'auto' = sgd under DP, adamw without",
        choices=("auto", "adamw", "sgd"),
    )
    momentum: float = key(0.0, "SGD momentum", low=0, high=1, high_open=True)
    lr: float = key(
        0.0,
        "learning rate; 0 = auto (AdamW 5e-3; SGD 10 on the head, 5 on the encoder)",
        low=0,
        fix="use a positive learning rate (or 0 = auto)",
    )
    weight_decay: float = key(0.0, "AdamW weight decay")
    schedule: str = key("linear", "'linear' decay or 'constant'", choices=("linear", "constant"))
    class_weighting: bool = key(True, "non-private runs: weight the loss by inverse class frequency")
    class_weights: str = key("", "explicit, public per-class loss weights 'w1,w2,...' (label order); DP-safe")
    imbalance: str = key(
        "none",
        "skewed labels: 'logit-adjust' (Menon et al. 2021: logits + imbalance-tau * log prior "
        "in training) or 'balanced' (loss weights prior^-imbalance-tau), the prior from the "
        "site's label histogram (under DP a DP histogram replaces the DP count); 'none' = off",
        choices=("none", "logit-adjust", "balanced"),
    )
    imbalance_tau: float = key(
        1.0,
        "strength of 'imbalance': tau of the logit adjustment / weight power",
        low=0,
        fix="use a value >= 0, e.g. 1",
    )
    precision: str = key(
        "auto",
        "encoder matmuls: 'fp32', 'bf16' (autocast; trainable weights, per-example "
        "gradients and noise stay fp32) or 'auto' (bf16 where the CPU/GPU has it natively)",
        choices=("auto", "fp32", "bf16"),
    )
    prefix_cache: bool = key(
        True,
        "with lora-layers = k, compute the frozen bottom layers once per data set "
        "and train the top k on their cached output (same logits)",
    )
    seed: int = key(
        42,
        "seed for splits, initialization and non-private sampling (DP noise and sampling draw "
        "from OS entropy)",
    )
    device: str = key(
        "auto", "'auto' (the first CUDA GPU when there is one, else the CPU), 'cpu', 'cuda', 'cuda:1'"
    )
    # privacy
    target_epsilon: float = key(
        8.0,
        "epsilon for the whole planned training; inf = no DP",
        low=0,
        low_open=True,
        fix="use a positive epsilon or inf",
    )
    delta: float = key(
        0.0,
        "DP delta; 0 = 1e-5 (never a function of n)",
        low=0,
        high=1,
        high_open=True,
        fix="use 0 (auto) or a value in (0, 1)",
    )
    count_noise: float = key(
        20.0,
        "std (rows) of the DP count n̂ a private site sends instead of n, booked in its ledger "
        "(docs/privacy.md)",
        low=0,
        low_open=True,
        fix="use a positive standard deviation in rows, e.g. 20",
    )
    noise_multiplier: float = key(
        0.0,
        "fixed noise multiplier (> 0 overrides target-epsilon)",
        low=0,
        fix="use 0 (off) or a positive value",
    )
    max_grad_norm: float = key(
        1.0, "per-sample clipping norm", low=0, low_open=True, fix="use a positive clipping norm"
    )
    grad_sample_mode: str = key(
        "hooks",
        "Opacus mode: 'hooks', 'functorch' or 'ghost'",
        choices=("hooks", "functorch", "ghost"),
    )
    accountant: str = key("prv", "Opacus accountant: 'prv' or 'rdp'", choices=("prv", "rdp"))

    @property
    def private(self) -> bool:
        """True when DP-SGD is on (a finite epsilon target or a fixed noise multiplier)."""
        return self.noise_multiplier > 0 or math.isfinite(self.target_epsilon)

    @property
    def lora_target_list(self) -> list[str]:
        """``lora_targets`` as a list of module names."""
        return [t.strip() for t in self.lora_targets.split(",") if t.strip()]

    def cross_checks(self) -> list[tuple[bool, str, str]]:
        """Checks across keys, ``(ok, key, fix)``; ``settings_reader.check`` runs them."""
        return [
            (
                self.pooling == "mean" or not self.normalize_features,
                "normalize-features",
                "use it with pooling = mean (or set it to false)",
            ),
            (self.pooling == "mean" or self.pool_layers == 1, "pool-layers", "use it with pooling = mean"),
            (
                self.pooling == "mean" or self.center_features == "none",
                "center-features",
                "use it with pooling = mean (or set it to 'none')",
            ),
            (bool(self.lora_target_list), "lora-targets", "name at least one module"),
            ("{}" in self.head_init_template, "head-init-template", "put '{}' where the label name goes"),
            (self.epochs >= 1 or self.max_steps > 0, "epochs", "train >= 1 epoch or set max-steps"),
        ]

    def validate(self) -> Self:
        """Raise ``SettingsError`` (a ``ValueError``) naming the key and the fix for an
        impossible setting."""
        return check(self, "settings")

    def resolved(self) -> ResolvedSettings:
        """A copy with every 'auto' setting made concrete (``fedllm.auto.auto_values``: the DP
        recipe when private, ours without). Called once where a run starts (an app or a command
        line); the library takes the result. Idempotent."""
        return ResolvedSettings(**(dataclasses.asdict(self) | auto_values(self))).validate()

    def to_dict(self) -> dict[str, Any]:
        """Hyphenated keys, as written in run configs and on the command line."""
        return {key_name(f.name): getattr(self, f.name) for f in fields(self)}

    def replace(self, **changes: Any) -> Self:
        """A copy with some fields changed (underscored names), checked."""
        return dataclasses.replace(self, **changes).validate()


@dataclass
class ResolvedSettings(Settings):
    """Settings with every 'auto' made concrete (``Settings.resolved()``): what the library takes.

    A checked type: ``validate`` (run by ``replace`` too) refuses an 'auto' value again, so a
    function annotated with this type never meets one. The apps and command lines resolve once.
    """

    def cross_checks(self) -> list[tuple[bool, str, str]]:
        """``Settings.cross_checks`` and: no key left at 'auto'."""
        concrete = (
            "resolved settings hold no 'auto': set a concrete value or replace() the unresolved settings"
        )
        return super().cross_checks() + [
            (self.trainable != "auto", "trainable", concrete),
            (self.optimizer != "auto", "optimizer", concrete),
            (self.lr > 0, "lr", concrete),
            (self.sample_rate >= 0, "sample-rate", concrete),
            (self.max_step_noise >= 0, "max-step-noise", concrete),
            (self.head_init_scale > 0, "head-init-scale", concrete),
            (self.max_length > 0, "max-length", concrete),
        ]

    def validate(self) -> Self:
        """Checked as ``Settings`` plus no 'auto' left."""
        return check(self, "resolved settings")

    def resolved(self) -> ResolvedSettings:
        """Already resolved: itself."""
        return self


def require_resolved(settings: Settings, who: str) -> ResolvedSettings:
    """``settings`` if resolved; a ``TypeError`` naming ``who`` and the fix otherwise (a caller
    outside the type checker)."""
    if not isinstance(settings, ResolvedSettings):
        raise TypeError(
            f"{who} takes resolved settings: call Settings.resolved() once where the run starts "
            "(the app or the command line) and pass its result"
        )
    return settings


_TYPES = {"str": str, "int": int, "float": float, "bool": bool}
# each setting's hyphenated key and its type (str, int, float or bool), in declaration order
SETTING_TYPES: dict[str, type] = {key_name(f.name): _TYPES[str(f.type)] for f in fields(Settings)}


def flower_defaults() -> dict[str, Any]:
    """The fine-tune settings as pyproject.toml's ``[tool.flwr.app.config]`` must declare them:
    ``Settings``' defaults with ``FEDERATED_DEFAULTS`` over them, hyphenated keys."""
    return {**defaults(Settings), **FEDERATED_DEFAULTS}


def settings_from(
    mapping: Mapping[str, Any], base: Settings | None = None, source: str = "settings"
) -> Settings:
    """Build settings from a flat mapping (Flower run config, TOML table, parsed CLI).

    Keys that are not settings are ignored, so an app may keep its own keys (e.g.
    ``num-server-rounds``) in the same table. A bad value raises one line naming ``source``,
    the key and the fix (``fedllm.settings_reader``).
    """
    hyphenated = {key_name(str(k)): v for k, v in mapping.items()}  # argparse's dests: lora_r
    return read(Settings, hyphenated, source, base=base or Settings())


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one ``--flag`` per setting, defaulting to ``None`` (= keep the base value)."""
    group = parser.add_argument_group("fine-tune settings")
    for f in fields(Settings):
        flag = "--" + key_name(f.name)
        help_text = f"{f.metadata.get('help', '')} (default: {f.default!r})"
        group.add_argument(flag, default=None, help=help_text)
