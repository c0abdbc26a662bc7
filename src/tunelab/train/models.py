"""Find, convert and load base models and tokenizers.

A ``.gguf`` file (the built-in model is one) is converted once into a plain
safetensors model directory in the cache and loaded from there afterwards: a model
loaded with ``gguf_file=`` cannot be saved, merged or exported.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import Any

from tunelab.config.locations import ModelRef
from tunelab.config.schema import BUILTIN_MODEL
from tunelab.errors import ModelError
from tunelab.files import staged_directory
from tunelab.network import HubUnavailable, hub_or_cache
from tunelab.train.builtin import builtin, gguf_path

_DONE_MARK = ".tunelab-complete"


def cache_root() -> Path:
    """Where converted models live: ``$TUNELAB_CACHE`` or ``~/.cache/tunelab``."""
    return Path(os.environ.get("TUNELAB_CACHE", Path.home() / ".cache" / "tunelab")).expanduser()


def builtin_gguf(name: str = BUILTIN_MODEL) -> Path:
    """The GGUF file of a built-in model (the default one unless named)."""
    return gguf_path(builtin(name), cache_root())


def _file_digest(path: Path) -> str:
    """The first 16 hex digits of the file's SHA-256 (computed once per file version)."""
    stat = path.stat()
    return _digest(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def converted_path(gguf: Path) -> Path:
    """Where the safetensors copy of ``gguf`` is (or will be) kept in the cache."""
    return cache_root() / "models" / f"{gguf.stem}-{_file_digest(gguf)}"


def is_converted(gguf: Path) -> bool:
    return (converted_path(gguf) / _DONE_MARK).is_file()


def convert_gguf(gguf: Path, log=print) -> Path:
    """A safetensors copy of a GGUF model in the cache, made once (atomically) and reused."""
    target = converted_path(gguf)
    if is_converted(gguf):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"Converting {gguf.name} to safetensors once (cached in {target}) ...")
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as exc:  # transformers raises many types for unreadable files
        raise ModelError(f"{gguf}: cannot read this GGUF file: {exc}") from None
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    with staged_directory(target) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / _DONE_MARK).write_text(str(gguf))
    return target


def hub_location(repo_id: str, log=print) -> str:
    """``repo_id`` when the Hub answers; its cached copy when it does not; else an error in
    seconds."""
    try:
        location, note = hub_or_cache(repo_id)
    except HubUnavailable as exc:
        raise ModelError(
            f"could not load '{repo_id}' from the Hugging Face Hub: {exc}",
            "connect to the network (HF_TOKEN for gated models), or give a local model "
            "directory or .gguf file",
        ) from None
    if note:
        log(f"note: {note}")
    return location


def model_location(ref: ModelRef, log=print) -> str:
    """A directory or hub id that ``from_pretrained`` can read."""
    if ref.kind == "builtin":
        return str(convert_gguf(builtin_gguf(ref.location), log))
    if ref.kind == "gguf":
        return str(convert_gguf(Path(ref.location), log))
    if ref.kind == "hub":
        return hub_location(ref.location, log)
    return ref.location


def _load_error(location: str, ref: ModelRef, exc: Exception) -> ModelError:
    if ref.kind == "hub":
        return ModelError(
            f"could not load '{location}' from the Hugging Face Hub: {type(exc).__name__}: {exc}",
            "check the id, your network and HF_TOKEN, or give a local model directory",
        )
    return ModelError(f"{location}: cannot load the model: {type(exc).__name__}: {exc}")


def load_tokenizer(location: str, ref: ModelRef) -> Any:
    """The model's tokenizer, with a pad token (its EOS) if it has none."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
    except Exception as exc:
        raise _load_error(location, ref, exc) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def read_model_config(location: str, ref: ModelRef) -> Any:
    """The model's config (architecture and sizes), without its weights."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(location)
    except Exception as exc:
        raise _load_error(location, ref, exc) from None


def is_multimodal(location: str, ref: ModelRef) -> bool:
    """Whether the model sees images (its config has a vision part)."""
    return getattr(read_model_config(location, ref), "vision_config", None) is not None


def load_processor(location: str, ref: ModelRef) -> Any:
    """A multimodal model's processor (tokenizer, image processor, chat template)."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(location)
    except Exception as exc:
        raise _load_error(location, ref, exc) from None
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    return processor


def load_tokenizer_and_processor(location: str, ref: ModelRef, multimodal: bool) -> tuple[Any, Any]:
    """(tokenizer, processor); the processor is None for a text-only model."""
    if multimodal:
        processor = load_processor(location, ref)
        return processor.tokenizer, processor
    return load_tokenizer(location, ref), None


def bnb_config(bits: int, compute_dtype: Any = None) -> Any:
    """bitsandbytes settings for a base loaded in 8 bits, or in 4 (NF4, double quantization,
    computing in ``compute_dtype``): what QLoRA trains on and inference loads with."""
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def load_model(
    location: str, ref: ModelRef, dtype: Any = None, quantization: Any = None,
    multimodal: bool = False,
) -> Any:  # fmt: skip
    """The language model (or image-text model), in ``dtype`` or quantized."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    kwargs: dict[str, Any] = {"dtype": dtype} if dtype is not None else {}
    if quantization is not None:
        kwargs.update(quantization_config=quantization, device_map={"": 0})
    loader = AutoModelForImageTextToText if multimodal else AutoModelForCausalLM
    try:
        return loader.from_pretrained(location, **kwargs)
    except Exception as exc:
        raise _load_error(location, ref, exc) from None
