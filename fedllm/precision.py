"""Numeric precision of the frozen encoder's matmuls: bf16 autocast where the hardware has it.

``precision = "auto"`` picks bfloat16 autocast on a CUDA GPU that supports it and on a CPU with
native bf16 instructions (AVX512-BF16 or AMX-BF16, read from ``/proc/cpuinfo``), float32
elsewhere; ``"bf16"`` forces autocast (emulated, slower, on a CPU without them), ``"fp32"`` turns
it off. Under autocast only the frozen modules compute in bf16: every module that owns a
trainable weight (LoRA B, the head, ...) runs in float32 on float32 inputs (``keep_trainable_fp32``),
so the master weights, the gradients Opacus keeps per example, their clipping and the noise are
all float32. What DP-SGD guarantees does not depend on the precision (each example's clipped
gradient has norm at most C whatever it was computed with); only the gradient's accuracy does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from torch import nn

PRECISIONS = ("auto", "fp32", "bf16")
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags() -> set[str]:
    """The CPU feature flags the kernel reports (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def bf16_native(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 matmuls natively (not emulated)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return any(flag in cpu_flags() for flag in BF16_CPU_FLAGS)
    return False


def resolve_precision(name: str, device: torch.device) -> str:
    """``fp32`` or ``bf16`` for ``name`` on ``device`` (``auto``: bf16 where it is native)."""
    if name not in PRECISIONS:
        raise ValueError(f"invalid setting precision={name!r}: use 'auto', 'fp32' or 'bf16'")
    if name == "auto":
        return "bf16" if bf16_native(device) else "fp32"
    return name


def autocast(precision: str, device: torch.device) -> AbstractContextManager:
    """bfloat16 autocast on ``device`` for ``precision = "bf16"``, a no-op context otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def _sdpa_fp32(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention computed in float32 whatever autocast says."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    with torch.autocast(query.device.type, enabled=False):
        return sdpa_attention_forward(
            module, query.float(), key.float(), value.float(), attention_mask, **kwargs
        )


FP32_ATTENTION = "sdpa_fp32"


def _register_fp32_attention() -> None:
    """Register ``FP32_ATTENTION`` with transformers (imported here: importing fedllm must not
    load the modules that add warning filters, tests/test_user_output.py)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(FP32_ATTENTION, _sdpa_fp32)
    AttentionMaskInterface.register(FP32_ATTENTION, sdpa_mask)


def attention_in_fp32(model: nn.Module) -> Callable[[], None]:
    """Run the encoder's attention in float32 (a CPU under bf16 autocast); returns the undo.

    On CPU the bf16 flash-attention backward is ~8x slower than float32's (torch.profiler on
    one DP step of MiniLM, bench/dp_overhead.py --profile), while the linear layers gain from
    bf16: only the projections stay in bf16. A model whose attention is not SDPA is left alone.
    """
    wrapped: Any = model
    base = wrapped.get_base_model() if hasattr(wrapped, "get_base_model") else wrapped
    config = getattr(base, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return lambda: None
    _register_fp32_attention()
    base.set_attn_implementation(FP32_ATTENTION)
    return lambda: base.set_attn_implementation("sdpa")


def _float_args(_module: nn.Module, args: tuple) -> tuple:
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def _fp32_forward(forward: Callable, device_type: str) -> Callable:
    @functools.wraps(forward)
    def run(*args, **kwargs):
        with torch.autocast(device_type, enabled=False):
            return forward(*args, **kwargs)

    return run


def keep_trainable_fp32(model: nn.Module) -> Callable[[], None]:
    """Run every module that owns a trainable parameter in float32, under any autocast.

    A forward pre-hook casts its floating inputs to float32 (so the activations Opacus captures
    are float32) and its forward runs with autocast off (so its output, and the gradient it
    receives, are float32). Returns the function that undoes both.
    """
    undo: list[Callable[[], None]] = []
    for module in model.modules():
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        device_type = next(module.parameters(recurse=False)).device.type
        handle = module.register_forward_pre_hook(_float_args)
        module.forward = _fp32_forward(module.forward, device_type)
        undo.append(functools.partial(_restore, module, handle))

    def restore() -> None:
        for step in undo:
            step()

    return restore


def _restore(module: nn.Module, handle) -> None:
    handle.remove()
    del module.forward  # the instance attribute: the class's forward again
