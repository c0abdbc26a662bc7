"""Rough time and peak-memory figures from a model's size, for planning (not measurements)."""

from __future__ import annotations

import os
from typing import Any

from tunelab.train.preflight import Plan

# Sustained training arithmetic, in FLOP/s: a CPU core, and a current datacenter GPU at a
# modest utilisation. Calibrated on this project's CPU measurements (about 220 tokens/s
# for a 135M model with LoRA on 2 cores).
CPU_FLOPS_PER_CORE = 6e10
GPU_FLOPS = 3e14


def estimate(plan: Plan, config: Any, n_total: int, trainable: int, tokens: int, hidden: int,
             layers: int, longest: int) -> dict[str, float]:  # fmt: skip
    """Seconds and peak memory (GiB) for training ``tokens`` tokens, roughly; activations
    are sized for the longest sample."""
    flops_per_token = (6 if config.adapter == "full" else 4) * n_total
    rate = (
        GPU_FLOPS if plan.hardware.device == "cuda" else CPU_FLOPS_PER_CORE * (os.cpu_count() or 1)
    )
    weight_bytes = {"fp32": 4, "bf16": 2, "fp16": 2}[plan.precision]
    if config.adapter == "qlora":
        weight_bytes = 0.55
    elif config.adapter == "lora" and plan.precision == "fp32":
        weight_bytes = 4
    optimizer = trainable * (4 + 4 + 8)  # weights (fp32 master), gradients, Adam moments
    activations = plan.micro_batch_size * longest * hidden * layers * 34
    if plan.gradient_checkpointing:
        activations /= layers
    memory = n_total * weight_bytes + optimizer + activations
    seconds, gib = tokens * flops_per_token / rate, memory / 2**30
    return {"seconds": float(f"{seconds:.3g}"), "memory_gib": float(f"{gib:.3g}")}


def fitting_batch(memory_gib: float, peak_for: Any, start: int = 64, share: float = 0.8) -> int:
    """The largest power-of-two batch (from ``start`` down to 1) whose estimated peak
    memory ``peak_for(batch)`` stays within ``share`` of ``memory_gib``."""
    batch = start
    while batch > 1 and peak_for(batch) > share * memory_gib:
        batch //= 2
    return batch
