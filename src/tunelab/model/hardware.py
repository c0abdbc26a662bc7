"""The machine at hand: its accelerator, and whether an attention kernel can run on it."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Hardware:
    device: Literal["cuda", "cpu"]
    bf16: bool  # bfloat16 trains well here: a GPU that has it, a CPU whose bf16 matmuls are fast
    name: str
    memory_gb: float | None  # accelerator memory
    bf16_speedup: float | None = None  # on a CPU: bf16 matmul speed over fp32's, measured


# On a CPU, bf16 pays when its matmuls run at least this much faster than fp32's (with AMX
# they run 5-7x faster; without, bf16 is converted in software and slower than fp32).
CPU_BF16_SPEEDUP = 1.5


def matmul_speedup(size: int = 768, tries: int = 3) -> float:
    """How much faster a bf16 matmul runs than a float32 one on this CPU (best of ``tries``
    each; a few tens of milliseconds)."""
    import time

    import torch

    best = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.ones(size, size, dtype=dtype)
        a @ a  # the first call sets up the kernel
        times = []
        for _ in range(tries):
            start = time.perf_counter()
            a @ a
            times.append(time.perf_counter() - start)
        best[dtype] = min(times)
    return best[torch.float32] / max(best[torch.bfloat16], 1e-9)


_DETECTED: list[Hardware] = []


def detect_hardware() -> Hardware:
    """The machine's accelerator, or its CPU with whether bf16 pays there (measured once
    per process)."""
    if _DETECTED:
        return _DETECTED[0]
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        found = Hardware(
            "cuda", torch.cuda.is_bf16_supported(), props.name, props.total_memory / 2**30
        )
    else:
        speedup = matmul_speedup()
        found = Hardware("cpu", speedup >= CPU_BF16_SPEEDUP, "CPU", None, round(speedup, 1))
    _DETECTED.append(found)
    return found


def has_module(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# Flash attention: transformers uses the package when it is installed, else fetches the same
# kernel from the Hub with the `kernels` package.
FLASH_PACKAGES = {
    "flash_attention_2": ("flash_attn", "flash-attn"),
    "flash_attention_3": ("flash_attn_interface", "flash-attn-3"),
    "flash_attention_4": ("flash_attn", "flash-attn-4"),
}
ATTENTION_NAMES = ("eager", "sdpa", "flex_attention", *FLASH_PACKAGES)
_HUB_KERNEL = re.compile(r"[^/:@]+/[^/:@]+(@[^/:@]+)?(:[^/:@]+)?")


def is_hub_kernel(name: str) -> bool:
    """Whether ``name`` is an attention kernel on the Hub, like 'kernels-community/flash-attn2'."""
    return _HUB_KERNEL.fullmatch(name) is not None


def attention_problem(name: str | None, hw: Hardware) -> str | None:
    """What keeps attention ``name`` from running on ``hw``, with its way out; else None."""
    if name in FLASH_PACKAGES:
        module, package = FLASH_PACKAGES[name]
        if hw.device != "cuda":
            return (
                f"attn_implementation: {name} needs a CUDA GPU (and {package} or the kernels "
                "package); this machine has none (use sdpa here)"
            )
        if not (has_module(module) or has_module("kernels")):
            return (
                f"attn_implementation: {name} needs {package}: pip install {package} (or pip "
                "install kernels, to fetch it from the Hugging Face Hub)"
            )
    elif name is not None and is_hub_kernel(name):
        if hw.device != "cuda":
            return (
                f"attn_implementation: {name} is a Hub kernel and needs a CUDA GPU (and the "
                "kernels package); this machine has none (use sdpa here)"
            )
        if not has_module("kernels"):
            return f"attn_implementation: {name} needs the kernels package: pip install kernels"
    return None
