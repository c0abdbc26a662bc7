"""Find, convert and load base models and tokenizers.

A ``.gguf`` file (the built-in model is one) is converted once into a plain
safetensors model directory in the cache and loaded from there afterwards: a model
loaded with ``gguf_file=`` cannot be saved, merged or exported.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import math
import os
from pathlib import Path
from typing import Any

from tunelab.config.locations import ModelRef
from tunelab.config.schema import BUILTIN_MODEL
from tunelab.errors import ConfigError, ModelError
from tunelab.files import staged_directory
from tunelab.model.builtin import builtin, gguf_path
from tunelab.network import HubUnavailable, hub_or_cache

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
    if "trust_remote_code" in str(exc):  # a tokenizer or processor that ships its own code
        return remote_code_error(location, "its tokenizer or processor")
    if ref.kind == "hub":
        return ModelError(
            f"could not load '{location}' from the Hugging Face Hub: {type(exc).__name__}: {exc}",
            "check the id, your network and HF_TOKEN, or give a local model directory",
        )
    return ModelError(f"{location}: cannot load the model: {type(exc).__name__}: {exc}")


def remote_code_error(location: str, where: str = "auto_map in config.json") -> ModelError:
    return ModelError(
        f"{location}: it runs its own Python code ({where}), and trust_remote_code is not set",
        "set trust_remote_code: true if you trust it",
    )


def needs_remote_code(config_dict: dict[str, Any]) -> bool:
    """Whether a model's config.json asks for the Python code it ships (``auto_map``) for an
    architecture this transformers does not know. A known architecture that still lists its
    own code (many do) loads with transformers' code, which runs nothing from the model."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return "auto_map" in config_dict and config_dict.get("model_type") not in CONFIG_MAPPING


def load_tokenizer(location: str, ref: ModelRef, trust_remote_code: bool = False) -> Any:
    """The model's tokenizer, with a pad token (its EOS) if it has none."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise _load_error(location, ref, exc) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def read_model_config(
    location: str, ref: ModelRef, trust_remote_code: bool = False,
    overrides: dict[str, Any] | None = None,
) -> Any:  # fmt: skip
    """The model's config (architecture and sizes), without its weights, with ``overrides``
    (overrides_of_model_config) set on it. A model that needs its own Python code is refused
    unless ``trust_remote_code`` (never a prompt)."""
    from transformers import AutoConfig, PretrainedConfig

    try:
        config_dict, _ = PretrainedConfig.get_config_dict(location)
    except Exception as exc:
        raise _load_error(location, ref, exc) from None
    if not trust_remote_code and needs_remote_code(config_dict):
        raise remote_code_error(location)
    try:
        config = AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise _load_error(location, ref, exc) from None
    problems = override_config(config, overrides or {})
    if problems:
        raise ConfigError(problems)
    return config


def override_config(
    config: Any, overrides: dict[str, Any], where: str = "overrides_of_model_config"
) -> list[str]:
    """Set ``overrides`` on a model's config (a dict for a nested config, like text_config,
    sets keys inside it); returns a problem for each key the config does not have."""
    import difflib

    from transformers import PretrainedConfig

    problems = []
    known = sorted(set(config.to_dict()) | set(getattr(config, "attribute_map", {})))
    for key, value in overrides.items():
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            problems.append(
                f"{where}.{key}: the {config.model_type} model's config has no such setting"
                + (f"; did you mean '{close[0]}'?" if close else "")
            )
        elif isinstance(value, dict) and isinstance(getattr(config, key), PretrainedConfig):
            problems += override_config(getattr(config, key), value, f"{where}.{key}")
        else:
            setattr(config, key, value)
    return problems


def is_multimodal(location: str, ref: ModelRef, trust_remote_code: bool = False) -> bool:
    """Whether the model sees images (its config has a vision part)."""
    config = read_model_config(location, ref, trust_remote_code)
    return getattr(config, "vision_config", None) is not None


def load_processor(location: str, ref: ModelRef, trust_remote_code: bool = False) -> Any:
    """A multimodal model's processor (tokenizer, image processor, chat template)."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(location, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise _load_error(location, ref, exc) from None
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    return processor


def load_tokenizer_and_processor(
    location: str, ref: ModelRef, multimodal: bool, trust_remote_code: bool = False
) -> tuple[Any, Any]:
    """(tokenizer, processor); the processor is None for a text-only model."""
    if multimodal:
        processor = load_processor(location, ref, trust_remote_code)
        return processor.tokenizer, processor
    return load_tokenizer(location, ref, trust_remote_code), None


SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token",
                  "mask_token")  # fmt: skip


def add_tokens(
    tokenizer: Any, special_tokens: dict[str, str] | None, tokens: list[str] | None
) -> list[str]:
    """Set the tokenizer's ``special_tokens`` (a token already in the vocabulary just becomes
    that special token) and add ``tokens`` to its vocabulary; returns the entries the
    vocabulary gained."""
    from tokenizers import AddedToken

    unknown = sorted(set(special_tokens or {}) - set(SPECIAL_TOKENS))
    if unknown:
        raise ConfigError(
            [f"special_tokens.{key}: not a special token; use {', '.join(SPECIAL_TOKENS)}"
             for key in unknown]
        )  # fmt: skip
    before = set(tokenizer.get_vocab())
    if special_tokens:
        tokenizer.add_special_tokens(dict(special_tokens))
    if tokens:  # matched in the raw text, as written
        tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in tokens])
    return sorted(set(tokenizer.get_vocab()) - before, key=tokenizer.convert_tokens_to_ids)


def fit_vocabulary(
    model: Any, tokenizer: Any, mean_resizing: bool = True, multiple: int | None = None
) -> bool:
    """Resize the model's embeddings (and output head) when the tokenizer outgrew them, or
    to the next ``multiple`` of rows at or above the tokenizer's size
    (resize_token_embeddings_to_32x); whether it did. New rows start at the mean of the
    others (``mean_resizing``)."""
    rows = model.get_input_embeddings().weight.shape[0]
    wanted = math.ceil(len(tokenizer) / multiple) * multiple if multiple else len(tokenizer)
    if wanted <= rows:
        return False
    model.resize_token_embeddings(
        len(tokenizer), pad_to_multiple_of=multiple, mean_resizing=mean_resizing
    )
    return True


def use_special_tokens(model: Any, tokenizer: Any) -> None:
    """Give the model's config and generation config the tokenizer's BOS, EOS and pad tokens
    (after special_tokens changed them): generation stops at the EOS token, and still at
    those it stopped at before."""
    config = model.config.get_text_config()
    generation = getattr(model, "generation_config", None)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        token = getattr(tokenizer, name)
        if token is None:
            continue
        for holder in (config, generation):
            current = getattr(holder, name, None) if holder is not None else None
            if name == "eos_token_id" and isinstance(current, list):
                setattr(holder, name, [token, *(t for t in current if t != token)])
            elif name == "eos_token_id" and holder is generation and current is not None:
                setattr(holder, name, list(dict.fromkeys([token, current])))
            elif holder is not None:
                setattr(holder, name, token)


def embedding_modules(model: Any) -> list[str]:
    """The full names of the input embeddings and the output head (what new tokens need
    trained)."""
    wanted = {id(m) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m}
    return [name for name, module in model.named_modules() if id(module) in wanted]


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


def quantization_classes() -> dict[str, type]:
    """transformers' quantization config classes by name (what model_quantization_config
    names)."""
    from transformers.utils import quantization_config as module

    return {
        name: cls for name, cls in vars(module).items()
        if name.endswith("Config") and inspect.isclass(cls)
        and issubclass(cls, module.QuantizationConfigMixin)
    }  # fmt: skip


def quantization_settings(name: str, kwargs: dict[str, Any] | None = None) -> Any:
    """The transformers quantization config ``name`` built with ``kwargs``
    (model_quantization_config and its _kwargs), e.g. Mxfp4Config(dequantize=True).
    An ImportError (a package the method needs) is left to the caller."""
    classes = quantization_classes()
    if name not in classes:
        raise ConfigError(
            [f"model_quantization_config: '{name}' is not a transformers quantization config; "
             f"use one of {', '.join(sorted(classes))}"]
        )  # fmt: skip
    # the classes take **kwargs and drop what they do not know: refuse it instead
    known = [
        n for n, p in inspect.signature(classes[name].__init__).parameters.items()
        if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]  # fmt: skip
    unknown = sorted(set(kwargs or {}) - set(known))
    if unknown:
        raise ConfigError(
            [f"model_quantization_config_kwargs.{key}: {name} has no such argument; it takes "
             f"{', '.join(known) or 'none'}" for key in unknown]
        )  # fmt: skip
    try:
        return classes[name](**(kwargs or {}))
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            [f"model_quantization_config_kwargs: {name} does not accept {kwargs or {}}: {exc}"]
        ) from None


def load_model(
    location: str, ref: ModelRef, dtype: Any = None, quantization: Any = None,
    multimodal: bool = False, trust_remote_code: bool = False,
    attn_implementation: str | None = None, config: Any = None, reinit: bool = False,
) -> Any:  # fmt: skip
    """The language model (or image-text model), in ``dtype`` or quantized, with the
    attention ``attn_implementation`` (default the model's own choice). ``config``: the
    model's config to use instead of its own (with overrides_of_model_config set);
    ``reinit``: weights freshly initialised from that config, none read (reinit_weights)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        if torch.cuda.is_available():  # a CPU-capable method (Mxfp4Config dequantize) stays here
            kwargs["device_map"] = {"": 0}
    loader = AutoModelForImageTextToText if multimodal else AutoModelForCausalLM
    if reinit:
        assert config is not None and quantization is None
        return loader.from_config(config, **kwargs)
    if config is not None:
        kwargs["config"] = config
    try:
        return loader.from_pretrained(location, **kwargs)
    except Exception as exc:
        raise _load_error(location, ref, exc) from None
