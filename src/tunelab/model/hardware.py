"""The machine at hand: its accelerator, and whether an attention kernel can run on it."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Hardware:
    device: Literal["cuda", "cpu"]
    bf16: bool
    name: str
    memory_gb: float | None  # accelerator memory


def detect_hardware() -> Hardware:
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return Hardware(
            "cuda", torch.cuda.is_bf16_supported(), props.name, props.total_memory / 2**30
        )
    return Hardware("cpu", False, "CPU", None)


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
