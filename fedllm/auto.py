"""How every 'auto' setting resolves: the DP recipe under DP, ours without (``auto_values``).

``Settings.resolved()`` (``fedllm.config``) calls ``auto_values`` once where a run starts. Every
rule reads public facts of the run config only (ε, the trainable, the declared site devices),
which the server and every site read alike: every site trains the same parameters on the same
features. The measurements behind each constant are in docs/dp-recipe.md and
docs/encoder-speed.md.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedllm.config import Settings

DP_HEAD_LR = 10.0  # SGD on the head over the frozen encoder's pooled features, under DP
DP_ENCODER_LR = 5.0  # SGD on lora / ffa-lora / bias under DP (docs/dp-recipe.md: 0.5 lost 12-25 points)
DP_SAMPLE_RATE = 1.0  # Poisson q of the DP recipe: full-batch steps, the least noise per signal
DP_MAX_STEP_NOISE = 2.0  # noise norm of one averaged DP step, in clipping norms: see plan_privacy
# the zero-shot head's row norm at epsilon = 1; auto scales it by 1/sqrt(epsilon) (docs/dp-recipe.md)
HEAD_INIT_SCALE_AT_EPSILON_1 = 10.0
AUTO_ENCODER_MIN_EPSILON = 3.0  # trainable = auto under DP: ffa-lora from here on cuda (auto_trainable)
# max-length = auto: the head reads BERT's 512 positions (its features are computed once; chosen
# on validation, docs/dp-recipe.md), an encoder trainable pays for each token at every step: 128
AUTO_MAX_LENGTH = {"head": 512, "encoder": 128}


def auto_values(settings: Settings) -> dict[str, Any]:
    """The concrete value of every key ``settings`` leaves at 'auto' (and of those it set: kept).

    Under DP the default is the DP linear probe, which won the recipe study (docs/dp-recipe.md):
    the head alone on the frozen encoder (cached features), SGD at lr 10 (5 when an encoder
    trainable is chosen), full-batch steps (Poisson q = 1), and no more local steps than keep
    each step's noise under ``max-step-noise`` = 2 clipping norms (``plan_privacy``). Without
    DP: LoRA, AdamW at 5e-3, batches of ``batch-size``, no step cap. ``max-length``: 512 tokens
    for the head, 128 for an encoder trainable (``AUTO_MAX_LENGTH``).
    """
    private, trainable, lora_layers = settings.private, settings.trainable, settings.lora_layers
    if trainable == "auto":
        trainable, lora_layers = auto_trainable(settings)
    optimizer = settings.optimizer if settings.optimizer != "auto" else ("sgd" if private else "adamw")
    sgd_lr = DP_HEAD_LR if trainable == "head" else DP_ENCODER_LR
    step_noise = settings.max_step_noise
    if step_noise < 0:
        step_noise = DP_MAX_STEP_NOISE if private else 0.0
    sample_rate = settings.sample_rate
    if sample_rate < 0:
        sample_rate = DP_SAMPLE_RATE if private else 0.0
    part = "head" if trainable == "head" else "encoder"
    return {
        "head_init_scale": settings.head_init_scale or auto_head_init_scale(settings),
        "max_length": settings.max_length or AUTO_MAX_LENGTH[part],
        "trainable": trainable,
        "lora_layers": lora_layers,
        "optimizer": optimizer,
        "lr": settings.lr or (5e-3 if optimizer == "adamw" else sgd_lr),
        "sample_rate": sample_rate,
        "max_step_noise": step_noise,
    }


def auto_head_init_scale(settings: Settings) -> float:
    """10/sqrt(epsilon) under a target epsilon (the zero-shot prior weighs more where the noise
    is larger: chosen on validation, docs/dp-recipe.md); 1 without DP or with a fixed noise."""
    if settings.noise_multiplier > 0 or not math.isfinite(settings.target_epsilon):
        return 1.0
    return HEAD_INIT_SCALE_AT_EPSILON_1 / math.sqrt(settings.target_epsilon)


def auto_trainable(settings: Settings) -> tuple[str, int]:
    """``(trainable, lora_layers)`` for ``trainable = auto``, from public facts of the run config only.

    Without DP: ``lora``. Under DP: ``ffa-lora`` (``lora-layers`` as set) when ε ≥
    ``AUTO_ENCODER_MIN_EPSILON`` and the run declares ``site-devices = "cuda"``; the head
    otherwise (docs/encoder-speed.md, "auto", gives the measurements). Every input is in the run
    config, which the server and every site read alike: every site trains the same parameters.
    """
    if not settings.private:
        return "lora", settings.lora_layers
    wins = settings.noise_multiplier == 0 and settings.target_epsilon >= AUTO_ENCODER_MIN_EPSILON
    if wins and settings.site_devices == "cuda":
        return "ffa-lora", settings.lora_layers
    return "head", settings.lora_layers
