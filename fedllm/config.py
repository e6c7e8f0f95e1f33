"""One typed configuration for model, LoRA, data, privacy and training.

The same keys are used everywhere: Flower's run config (``[tool.flwr.app.config]`` in
``pyproject.toml``, ``flwr run --run-config "lora-r=16"``), TOML files and command-line flags
(``--lora-r 16``). Keys are written with hyphens on the outside and map to the underscored
field names below.

``Settings`` is the one source of every fine-tune default. Flower refuses run config keys an app
does not declare, so pyproject.toml declares them again: ``flower_defaults()`` is what that table
must hold (tests/test_config.py checks it key by key).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

DP_HEAD_LR = 10.0  # SGD on the head over the frozen encoder's pooled features, under DP
DP_ENCODER_LR = 5.0  # SGD on lora / ffa-lora / bias under DP (docs/dp-recipe.md: 0.5 lost 12-25 points)
DP_SAMPLE_RATE = 1.0  # Poisson q of the DP recipe: full-batch steps, the least noise per signal
DP_MAX_STEP_NOISE = 2.0  # noise norm of one averaged DP step, in clipping norms: see plan_privacy
# the zero-shot head's row norm at epsilon = 1; auto scales it by 1/sqrt(epsilon) (docs/dp-recipe.md)
HEAD_INIT_SCALE_AT_EPSILON_1 = 10.0
# trainable = auto under DP (``auto_trainable``): ffa-lora where it beats the head (ε >= 3) and
# its cost fits the sites' declared devices (cuda), the head otherwise
AUTO_ENCODER_MIN_EPSILON = 3.0
SITE_DEVICES = ("any", "cpu", "cuda")
# A federated run's defaults where they differ from one local fine-tune's: a site takes 3 local
# steps per round (``max-steps`` replaces epochs), the DP recipe's 8 rounds x 3 steps (docs/dp-recipe.md);
# python -m fedllm.centralized trains Settings.epochs whole epochs in one go.
FEDERATED_DEFAULTS: dict[str, Any] = {"epochs": 1, "max-steps": 3}


@dataclass
class Settings:
    """Everything one local fine-tune needs; defaults are the tuned, documented defaults."""

    # model
    model: str = field(default="", metadata={"help": "HF BERT path or hub id; '' = embedded MiniLM"})
    pooling: str = field(default="mean", metadata={"help": "sentence pooling: 'mean' or 'cls'"})
    normalize_features: bool = field(
        default=False,
        metadata={"help": "unit-normalise the mean-pooled features before the head (pooling = mean)"},
    )
    max_length: int = field(default=128, metadata={"help": "tokens per text (truncated)"})
    truncation: str = field(
        default="right", metadata={"help": "which end of a long text to cut: 'right' or 'left'"}
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    lora_targets: str = field(
        default="query,value", metadata={"help": "comma-separated module names to adapt"}
    )
    lora_layers: int = field(
        default=0, metadata={"help": "adapt only the top k encoder layers (0 = every layer)"}
    )
    trainable: str = field(
        default="auto",
        metadata={
            "help": "what trains and travels: 'lora', 'ffa-lora' (A frozen), 'bias', 'head'; "
            "'auto' = lora without DP; under DP ffa-lora where it wins and site-devices says its "
            "cost fits (cuda, eps >= 3), else head"
        },
    )
    head_init: str = field(
        default="random",
        metadata={
            "help": "the head's start: 'random', or 'label-names' (the zero-shot head: each label's "
            "name in head-init-template, embedded by the frozen encoder; random when names are "
            "uninformative, e.g. '0', '1')"
        },
    )
    head_init_template: str = field(
        default="{}",
        metadata={"help": "text around a label name for head-init = label-names ('{}' = the name)"},
    )
    head_init_scale: float = field(
        default=0.0,
        metadata={
            "help": "norm of each class's row of the zero-shot head (its logit scale); 0 = auto: "
            "10/sqrt(target-epsilon) under DP (a stronger prior where the noise is larger), 1 without"
        },
    )
    site_devices: str = field(
        default="any",
        metadata={
            "help": "what every site computes on, as the run declares it: 'cpu', 'cuda' or 'any' "
            "(not declared); trainable = auto under DP trains the encoder (ffa-lora) on 'cuda' at eps >= 3"
        },
    )
    # data
    dataset: str = field(
        default="drug-reviews",
        metadata={"help": "'bbc-news', 'drug-reviews', or a CSV/TSV/JSONL file / HF dataset dir"},
    )
    test_file: str = field(default="", metadata={"help": "held-out file ('' = built-in split)"})
    text_column: str = field(default="text", metadata={"help": "column holding the text"})
    label_column: str = field(default="label", metadata={"help": "column holding the label"})
    test_fraction: float = field(default=0.2, metadata={"help": "held-out share when no test file"})
    validation_fraction: float = field(
        default=0.5,
        metadata={
            "help": "share of the server's held-out data kept for validation (choosing settings); "
            "the rest is the test split results are reported on; 0 = no validation split"
        },
    )
    # training
    epochs: int = field(default=5, metadata={"help": "local epochs"})
    max_steps: int = field(default=0, metadata={"help": "stop after this many steps (0 = off)"})
    batch_size: int = field(default=32, metadata={"help": "(expected) batch size"})
    sample_rate: float = field(
        default=-1.0,
        metadata={
            "help": "Poisson sample rate q in (0, 1]; 0 = 1/ceil(n/batch-size); -1 = auto "
            "(1 under DP: full batches; from batch-size without)"
        },
    )
    max_step_noise: float = field(
        default=-1.0,
        metadata={
            "help": "under DP, fewer local steps when a step would be noisier than this: the noise "
            "on an averaged step (norm sigma*C*sqrt(d)/(q*n)) at most this many clipping norms C; "
            "-1 = auto (2.0 under DP), 0 = off"
        },
    )
    physical_batch_size: int = field(
        default=32,
        metadata={
            "help": "largest batch in memory at once (0 = no limit); a private full-batch step "
            "runs in chunks of this size (Opacus BatchMemoryManager)"
        },
    )
    optimizer: str = field(
        default="auto", metadata={"help": "'adamw' or 'sgd'; 'auto' = sgd under DP, adamw without"}
    )
    momentum: float = field(default=0.0, metadata={"help": "SGD momentum"})
    lr: float = field(
        default=0.0,
        metadata={"help": "learning rate; 0 = auto (AdamW 5e-3; SGD 10 on the head, 5 on the encoder)"},
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    schedule: str = field(default="linear", metadata={"help": "'linear' decay or 'constant'"})
    class_weighting: bool = field(
        default=True,
        metadata={"help": "non-private runs: weight the loss by inverse class frequency"},
    )
    class_weights: str = field(
        default="",
        metadata={"help": "explicit, public per-class loss weights 'w1,w2,...' (label order); DP-safe"},
    )
    imbalance: str = field(
        default="none",
        metadata={
            "help": "skewed labels: 'logit-adjust' (Menon et al. 2021: logits + imbalance-tau * log prior "
            "in training) or 'balanced' (loss weights prior^-imbalance-tau), the prior from the "
            "site's label histogram (under DP a DP histogram replaces the DP count); 'none' = off"
        },
    )
    imbalance_tau: float = field(
        default=1.0, metadata={"help": "strength of 'imbalance': tau of the logit adjustment / weight power"}
    )
    precision: str = field(
        default="auto",
        metadata={
            "help": "encoder matmuls: 'fp32', 'bf16' (autocast; trainable weights, per-example "
            "gradients and noise stay fp32) or 'auto' (bf16 where the CPU/GPU has it natively)"
        },
    )
    prefix_cache: bool = field(
        default=True,
        metadata={
            "help": "with lora-layers = k, compute the frozen bottom layers once per data set "
            "and train the top k on their cached output (same logits)"
        },
    )
    seed: int = field(default=42, metadata={"help": "seed for splits, init and sampling"})
    device: str = field(default="auto", metadata={"help": "'auto', 'cpu', 'cuda', 'cuda:1'"})
    # privacy
    target_epsilon: float = field(
        default=8.0, metadata={"help": "epsilon for the whole planned training; inf = no DP"}
    )
    delta: float = field(default=0.0, metadata={"help": "DP delta; 0 = 1e-5 (never a function of n)"})
    count_noise: float = field(
        default=20.0,
        metadata={"help": "std (rows) of the DP count n̂ a private site sends instead of n"},
    )
    noise_multiplier: float = field(
        default=0.0, metadata={"help": "fixed noise multiplier (> 0 overrides target-epsilon)"}
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "per-sample clipping norm"})
    grad_sample_mode: str = field(
        default="hooks", metadata={"help": "Opacus mode: 'hooks', 'functorch' or 'ghost'"}
    )
    accountant: str = field(default="prv", metadata={"help": "Opacus accountant: 'prv' or 'rdp'"})

    @property
    def private(self) -> bool:
        """True when DP-SGD is on (a finite epsilon target or a fixed noise multiplier)."""
        return self.noise_multiplier > 0 or math.isfinite(self.target_epsilon)

    @property
    def lora_target_list(self) -> list[str]:
        """``lora_targets`` as a list of module names."""
        return [t.strip() for t in self.lora_targets.split(",") if t.strip()]

    def validate(self) -> Settings:
        """Raise ``ValueError`` naming the key and the fix for an impossible setting."""
        checks = [
            (self.pooling in ("mean", "cls"), "pooling", "use 'mean' or 'cls'"),
            (
                self.pooling == "mean" or not self.normalize_features,
                "normalize-features",
                "use it with pooling = mean (or set it to false)",
            ),
            (self.max_length >= 8, "max-length", "use at least 8"),
            (self.truncation in ("right", "left"), "truncation", "use 'right' or 'left'"),
            (self.lora_r >= 1, "lora-r", "use a rank >= 1"),
            (self.lora_layers >= 0, "lora-layers", "use 0 (every layer) or a positive count"),
            (
                self.trainable in ("auto", "lora", "ffa-lora", "bias", "head"),
                "trainable",
                "use 'auto', 'lora', 'ffa-lora', 'bias' or 'head'",
            ),
            (bool(self.lora_target_list), "lora-targets", "name at least one module"),
            (self.head_init in ("random", "label-names"), "head-init", "use 'random' or 'label-names'"),
            ("{}" in self.head_init_template, "head-init-template", "put '{}' where the label name goes"),
            (self.head_init_scale >= 0, "head-init-scale", "use 0 (auto) or a positive scale, e.g. 10"),
            (self.epochs >= 1 or self.max_steps > 0, "epochs", "train >= 1 epoch or set max-steps"),
            (self.batch_size >= 1, "batch-size", "use a batch size >= 1"),
            (
                self.sample_rate == -1 or 0 <= self.sample_rate <= 1,
                "sample-rate",
                "use -1 (auto), 0 (from batch-size) or a rate in (0, 1]",
            ),
            (self.physical_batch_size >= 0, "physical-batch-size", "use 0 (no limit) or a positive size"),
            (self.optimizer in ("auto", "adamw", "sgd"), "optimizer", "use 'auto', 'adamw' or 'sgd'"),
            (0 <= self.momentum < 1, "momentum", "use a value in [0, 1)"),
            (self.lr >= 0, "lr", "use a positive learning rate (or 0 = auto)"),
            (self.max_step_noise >= 0 or self.max_step_noise == -1, "max-step-noise", "use -1, 0 or > 0"),
            (self.schedule in ("linear", "constant"), "schedule", "use 'linear' or 'constant'"),
            (0 < self.test_fraction < 1, "test-fraction", "use a value in (0, 1)"),
            (0 <= self.validation_fraction < 1, "validation-fraction", "use a value in [0, 1)"),
            (self.target_epsilon > 0, "target-epsilon", "use a positive epsilon or inf"),
            (0 <= self.delta < 1, "delta", "use 0 (auto) or a value in (0, 1)"),
            (self.count_noise > 0, "count-noise", "use a positive standard deviation in rows, e.g. 20"),
            (self.noise_multiplier >= 0, "noise-multiplier", "use 0 (off) or a positive value"),
            (self.max_grad_norm > 0, "max-grad-norm", "use a positive clipping norm"),
            (
                self.grad_sample_mode in ("hooks", "functorch", "ghost"),
                "grad-sample-mode",
                "use 'hooks', 'functorch' or 'ghost'",
            ),
            (self.accountant in ("prv", "rdp"), "accountant", "use 'prv' or 'rdp'"),
            (
                self.imbalance in ("none", "logit-adjust", "balanced"),
                "imbalance",
                "use 'none', 'logit-adjust' or 'balanced'",
            ),
            (self.imbalance_tau >= 0, "imbalance-tau", "use a value >= 0, e.g. 1"),
            (self.precision in ("auto", "fp32", "bf16"), "precision", "use 'auto', 'fp32' or 'bf16'"),
            (self.site_devices in SITE_DEVICES, "site-devices", "use 'any', 'cpu' or 'cuda'"),
        ]
        for ok, key, fix in checks:
            if not ok:
                raise ValueError(f"invalid setting {key}={getattr(self, _field(key))!r}: {fix}")
        return self

    def resolved(self) -> Settings:
        """A copy with every 'auto' setting made concrete: the DP recipe when private, else ours.

        Under DP the default is the DP linear probe, which won the recipe study (docs/dp-recipe.md):
        the head alone on the frozen encoder (cached features), SGD at lr 10 (5 when an encoder
        trainable is chosen), full-batch steps (Poisson q = 1), and no more local steps than keep
        each step's noise under ``max-step-noise`` = 2 clipping norms (``plan_privacy``). Without
        DP: LoRA, AdamW at 5e-3, batches of ``batch-size``, no step cap. Idempotent.
        """
        private = self.private
        trainable, lora_layers = (self.trainable, self.lora_layers)
        if trainable == "auto":
            trainable, lora_layers = auto_trainable(self)
        optimizer = self.optimizer if self.optimizer != "auto" else ("sgd" if private else "adamw")
        sgd_lr = DP_HEAD_LR if trainable == "head" else DP_ENCODER_LR
        lr = self.lr or (5e-3 if optimizer == "adamw" else sgd_lr)
        sample_rate = self.sample_rate if self.sample_rate >= 0 else (DP_SAMPLE_RATE if private else 0.0)
        step_noise = (
            self.max_step_noise if self.max_step_noise >= 0 else (DP_MAX_STEP_NOISE if private else 0.0)
        )
        return dataclasses.replace(
            self,
            head_init_scale=self.head_init_scale or self._auto_head_init_scale(),
            trainable=trainable,
            lora_layers=lora_layers,
            optimizer=optimizer,
            lr=lr,
            sample_rate=sample_rate,
            max_step_noise=step_noise,
        )

    def _auto_head_init_scale(self) -> float:
        """10/sqrt(epsilon) under a target epsilon (the zero-shot prior weighs more where the noise
        is larger: chosen on validation, docs/dp-recipe.md); 1 without DP or with a fixed noise."""
        if self.noise_multiplier > 0 or not math.isfinite(self.target_epsilon):
            return 1.0
        return HEAD_INIT_SCALE_AT_EPSILON_1 / math.sqrt(self.target_epsilon)

    def to_dict(self) -> dict[str, Any]:
        """Hyphenated keys, as written in run configs and on the command line."""
        return {_key(f.name): getattr(self, f.name) for f in fields(self)}

    def replace(self, **changes: Any) -> Settings:
        """A copy with some fields changed (underscored names)."""
        return dataclasses.replace(self, **changes).validate()


def auto_trainable(settings: Settings) -> tuple[str, int]:
    """``(trainable, lora_layers)`` for ``trainable = auto``, from public facts of the run config only.

    Without DP: ``lora``. Under DP, the encoder trainable where it wins and its cost fits, the
    head otherwise (docs/encoder-speed.md, "auto"): ``ffa-lora`` (``lora-layers`` as set, 0 =
    every layer) when ε ≥ ``AUTO_ENCODER_MIN_EPSILON`` (at ε = 1 the head's 1,925 noisy
    coordinates beat the encoder's 38,789) and the run declares ``site-devices = "cuda"``. On a
    CPU the encoder trainable whose cost fits (``ffa-lora`` on the top 2 layers, cached prefix,
    bf16: 5-7 minutes a federation) did not beat the head on validation at ε = 8 (0.954 against
    0.956, 3 seeds), and every layer costs 13-28 minutes: the head. ``any`` (nothing declared)
    and a fixed noise multiplier (ε unknown here): the head. Every input is in the run config,
    which the server and every site read alike, so every site trains the same parameters;
    nothing depends on a site's own hardware or data.
    """
    if not settings.private:
        return "lora", settings.lora_layers
    wins = settings.noise_multiplier == 0 and settings.target_epsilon >= AUTO_ENCODER_MIN_EPSILON
    if wins and settings.site_devices == "cuda":
        return "ffa-lora", settings.lora_layers
    return "head", settings.lora_layers


def _field(key: str) -> str:
    return key.replace("-", "_")


def _key(name: str) -> str:
    return name.replace("_", "-")


def true_or_false(value: Any) -> bool:
    """A bool from a bool or text (true/false, 1/0, yes/no, on/off); ``ValueError`` otherwise."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true/false, got {value!r}")


def _coerce(name: str, kind: type, value: Any) -> Any:
    if kind is bool:
        if not isinstance(value, str):
            return bool(value)
        try:
            return true_or_false(value)
        except ValueError as err:
            raise ValueError(f"setting {name}: {err}") from None
    try:
        return kind(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"setting {name}: expected {kind.__name__}, got {value!r}") from err


_TYPES = {"str": str, "int": int, "float": float, "bool": bool}
# each setting's hyphenated key and its type (str, int, float or bool), in declaration order
SETTING_TYPES: dict[str, type] = {_key(f.name): _TYPES[str(f.type)] for f in fields(Settings)}


def flower_defaults() -> dict[str, Any]:
    """The fine-tune settings as pyproject.toml's ``[tool.flwr.app.config]`` must declare them:
    ``Settings``' defaults with ``FEDERATED_DEFAULTS`` over them, hyphenated keys."""
    return {**Settings().to_dict(), **FEDERATED_DEFAULTS}


def settings_from(mapping: Mapping[str, Any], base: Settings | None = None) -> Settings:
    """Build settings from a flat mapping (Flower run config, TOML table, parsed CLI).

    Keys that are not settings are ignored, so an app may keep its own keys (e.g.
    ``num-server-rounds``) in the same table.
    """
    values = dataclasses.asdict(base or Settings())
    for key, value in mapping.items():
        kind = SETTING_TYPES.get(_key(str(key)))
        if kind is not None and value is not None:
            values[_field(str(key))] = _coerce(str(key), kind, value)
    return Settings(**values).validate()


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one ``--flag`` per setting, defaulting to ``None`` (= keep the base value)."""
    group = parser.add_argument_group("fine-tune settings")
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata.get('help', '')} (default: {f.default!r})"
        group.add_argument(flag, default=None, help=help_text)
