"""What to load for inference, and loading it.

A *target* is what a user points at: a run directory, one of its checkpoints
(``best``, ``last``, ``checkpoint-N``), a bare LoRA adapter directory, or nothing (the
base model). :func:`resolve_target` turns a path into a :class:`Target` without loading
weights; :func:`load` loads one base model, applies every adapter target to it (peft
keeps them side by side, so a comparison loads the base once) and loads fully
fine-tuned targets as models of their own.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.config import BUILTIN_MODEL
from tunelab.config.locations import model_problem, resolve_model, same_model
from tunelab.errors import ModelError, PreflightError, TunelabError
from tunelab.model.hardware import attention_problem, detect_hardware
from tunelab.model.loading import (
    bnb_config,
    fit_vocabulary,
    is_multimodal,
    load_model,
    load_tokenizer,
    model_location,
    quantization_settings,
    read_model_config,
    use_special_tokens,
)
from tunelab.model.ssmax import DEFAULT_BIAS, DEFAULT_FACTOR, use_ssmax
from tunelab.rundir import RunLayout, complete_checkpoints, list_runs, read_json

BASE = "base"
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


@dataclass(frozen=True)
class Target:
    """Trained weights: a LoRA adapter (on ``base``) or a whole fine-tuned model."""

    path: Path
    label: str  # how output and tables name it, e.g. "outputs/demo" or "outputs/demo@best"
    base: str  # the base model's name as training was given it
    base_location: str | None  # the directory the adapter was trained on, if it still exists
    full: bool  # whole weights rather than an adapter
    run: Path | None  # the run directory it belongs to
    qlora: bool = False  # trained on a 4-bit base
    trust_remote_code: bool = False  # the base ran its own Python code in training
    attn_implementation: str | None = None  # the attention it trained with
    new_tokens: bool = False  # it trained with tokens or special tokens of its own
    ssmax: tuple[float, float] | None = None  # scaling_softmax's (s, b), when it trained so
    embeddings_32x: bool = False  # resize_token_embeddings_to_32x
    # overrides_of_model_config, and (model_quantization_config, its kwargs): how the base
    # was loaded
    config_overrides: dict[str, Any] | None = field(default=None, compare=False)
    quantization: tuple[str, dict[str, Any] | None] | None = field(default=None, compare=False)


def _run_settings(run: Path | None) -> dict[str, Any]:
    """The settings a run trained with (its resolved config), as far as it recorded them."""
    import yaml

    if run is None:
        return {}
    layout = RunLayout(run)
    settings = read_json(layout.info).get("config") if layout.info.is_file() else None
    if not settings and layout.config.is_file():
        settings = yaml.safe_load(layout.config.read_text(encoding="utf-8"))
    return settings if isinstance(settings, dict) else {}


def _loading(run: Path | None) -> dict[str, Any]:
    """The Target fields that say how to load what ``run`` trained."""
    settings = _run_settings(run)
    factor, bias = settings.get("scaling_softmax_factor"), settings.get("scaling_softmax_bias")
    quantization = settings.get("model_quantization_config")
    return {
        "trust_remote_code": settings.get("trust_remote_code") is True,
        "attn_implementation": settings.get("attn_implementation"),
        "new_tokens": bool(settings.get("special_tokens") or settings.get("tokens")),
        "ssmax": (
            (DEFAULT_FACTOR if factor is None else factor, DEFAULT_BIAS if bias is None else bias)
            if settings.get("scaling_softmax") is True
            else None
        ),
        "embeddings_32x": settings.get("resize_token_embeddings_to_32x") is True,
        "config_overrides": settings.get("overrides_of_model_config") or None,
        "quantization": (
            (quantization, settings.get("model_quantization_config_kwargs"))
            if quantization
            else None
        ),
    }


def _checkpoint_names(run: Path) -> list[str]:
    folder = RunLayout(run).checkpoints
    named = [n for n in ("best", "last") if (folder / n).is_dir()]
    return named + [p.name for p in complete_checkpoints(folder)]


def _checkpoint(run: Path, name: str) -> Path:
    if not RunLayout(run).is_run():
        raise TunelabError(
            f"{run}: not a tunelab run directory, so it has no checkpoints",
            "give the output_dir of a `tunelab train` run, or the checkpoint's own path",
        )
    name = f"checkpoint-{name}" if re.fullmatch(r"\d+", name) else name
    path = RunLayout(run).checkpoints / name
    complete = name in ("best", "last") or path in complete_checkpoints(path.parent)
    if path.is_dir() and not complete:
        raise TunelabError(
            f"{path}: this checkpoint was cut short (it has no completeness marker)",
            f"choose a complete one: {', '.join(_checkpoint_names(run)) or 'none'}",
        )
    if not path.is_dir():
        available = ", ".join(_checkpoint_names(run)) or "none (train with save_steps)"
        raise TunelabError(
            f"{run}: no checkpoint '{name}'", f"choose one of the run's checkpoints: {available}"
        )
    return path


def _owning_run(path: Path) -> Path | None:
    if RunLayout(path).is_run():
        return path
    if path.parent.name == "checkpoints" and RunLayout(path.parent.parent).is_run():
        return path.parent.parent
    return None


def _weight_files(folder: Path, full: bool) -> list[Path]:
    """The safetensors files ``folder``'s model or adapter is stored in."""
    if not full:
        return [folder / "adapter_model.safetensors"]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set((read_json(index).get("weight_map") or {}).values()))
        return [folder / name for name in shards]
    return [folder / "model.safetensors"]


def check_weights(folder: Path, full: bool) -> None:
    """Every weight file of ``folder`` is there and reads as safetensors (header and length);
    otherwise say which file, and what is wrong with it."""
    from safetensors import SafetensorError, safe_open

    if not full and (folder / "adapter_model.bin").is_file():
        return  # peft's older format; loading it says what is wrong, if anything is
    hint = (
        "the run was probably stopped while saving: resume it (`tunelab train ... --resume`) "
        "or use one of its checkpoints (--checkpoint last)"
    )
    what = "model" if full else "adapter"
    for path in _weight_files(folder, full):
        if not path.is_file():
            raise ModelError(f"{path}: the {what}'s weights are missing", hint)
        try:
            with safe_open(str(path), "pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise ModelError(
                f"{path}: the {what}'s weights cannot be read ({exc}); the file is truncated or "
                "damaged",
                hint,
            ) from None


def resolve_target(path: str | Path, checkpoint: str | None = None) -> Target:
    """The trained weights at ``path`` (a run, a checkpoint or an adapter directory).

    ``checkpoint`` (``best``, ``last``, ``checkpoint-N`` or ``N``) picks one of a run's
    checkpoints; ``RUN@CHECKPOINT`` in ``path`` says the same.
    """
    given = Path(path).expanduser()
    if not given.is_dir() and "@" in str(path) and not checkpoint:
        head, _, checkpoint = str(path).rpartition("@")
        given = Path(head).expanduser()
    if not given.is_dir():
        raise TunelabError(f"{path}: no such directory", "give a run directory or an adapter")
    where = _checkpoint(given, checkpoint) if checkpoint else given
    run = _owning_run(where)
    info = read_json(RunLayout(run).info) if run else {}
    label = str(given) + (f"@{checkpoint}" if checkpoint else "")
    if (where / "adapter_config.json").is_file():
        recorded = read_json(where / "adapter_config.json").get("base_model_name_or_path") or ""
        base = info.get("base_model") or recorded
        if not base:
            raise TunelabError(
                f"{where}: the adapter does not say which base model it belongs to",
                "give the base model with --model",
            )
        location = recorded if recorded and Path(recorded).is_dir() else None
        qlora = info.get("adapter") == "qlora"
        check_weights(where, full=False)
        return Target(where, label, base, location, False, run, qlora, **_loading(run))
    if (where / "config.json").is_file() and any((where / w).is_file() for w in _WEIGHTS):
        check_weights(where, full=True)
        name = info.get("base_model") or str(where)
        return Target(where, label, name, None, True, run, **_loading(run))
    hint = "give the output_dir of a finished `tunelab train` run"
    names = _checkpoint_names(run) if run else []
    if names:
        hint = f"it has checkpoints: pass --checkpoint with one of {', '.join(names)}"
    raise TunelabError(f"{where}: no adapter here (adapter_config.json is missing)", hint)


def latest_run(folder: Path = Path("outputs")) -> Path | None:
    """The most recently finished run under ``folder`` (what `tunelab chat` picks by itself)."""
    done = [r for r in list_runs(folder) if r["state"] == "completed"] if folder.is_dir() else []
    return Path(max(done, key=lambda r: r["date"])["run"]) if done else None


def quantization_for(bits: int | None) -> Any:
    """bitsandbytes settings to load a base model in 4 or 8 bits (CUDA only), or None."""
    if not bits:
        return None
    import importlib.util

    import torch

    flag = f"--load-in-{bits}bit"
    hardware = detect_hardware()
    if hardware.device != "cuda":
        raise PreflightError(
            f"{flag} needs a CUDA GPU with bitsandbytes; this machine has none",
            "leave it out: without a GPU the model loads in full precision",
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise PreflightError(f"{flag} needs bitsandbytes", "pip install 'tunelab[gpu]'")
    return bnb_config(bits, torch.bfloat16 if hardware.bf16 else torch.float16)


def _placement() -> tuple[Any, str]:
    """(dtype, device) for inference: half precision on a GPU, float32 on a CPU."""
    import torch

    hardware = detect_hardware()
    if hardware.device == "cuda":
        return (torch.bfloat16 if hardware.bf16 else torch.float16), "cuda"
    return torch.float32, "cpu"


@dataclass
class Loaded:
    """A tokenizer and the models to answer with, each reachable by its label."""

    tokenizer: Any
    base_name: str
    labels: list[str]
    base: Any = None  # the base model, or the PeftModel holding every adapter
    adapters: dict[str, str] = field(default_factory=dict)  # label -> peft adapter name
    whole: dict[str, Any] = field(default_factory=dict)  # label -> fully fine-tuned model

    @contextmanager
    def use(self, label: str) -> Iterator[Any]:
        """The model for ``label`` (``BASE`` or a target's label), ready to run."""
        if label in self.whole:
            yield self.whole[label]
        elif label in self.adapters:
            self.base.set_adapter(self.adapters[label])
            yield self.base
        else:
            off = self.base.disable_adapter() if self.adapters else nullcontext()
            with off:
                yield self.base

    @property
    def model(self) -> Any:
        """The model a single-target session answers with (the target, else the base)."""
        label = self.labels[-1]
        if label in self.whole:
            return self.whole[label]
        if label in self.adapters:
            self.base.set_adapter(self.adapters[label])
        return self.base


def _attention(targets: list[Target], log) -> str | None:
    """The attention the targets trained with, where this machine can use it."""
    name = next((t.attn_implementation for t in targets if t.attn_implementation), None)
    problem = attention_problem(name, detect_hardware())
    if problem:
        log(f"note: loaded with the model's default attention: {problem}")
        return None
    return name


def _load_base(
    name: str, location: str | None, bits: int | None, log, for_merge: bool = False,
    trust_remote_code: bool = False, attention: str | None = None, like: Target | None = None,
) -> tuple[Any, str]:  # fmt: skip
    """(model, its directory or hub id). ``for_merge`` keeps the weights' stored dtype,
    on the CPU: merged weights should not lose precision to the GPU's bfloat16.
    ``trust_remote_code`` and ``attention`` are as the run trained with; so are the
    config overrides, quantization and SSMax of ``like`` (the run whose base this is)."""
    if location is None:
        problem = model_problem(name)
        if problem:
            raise ModelError(f"base model: {problem}")
        ref = resolve_model(name)
        location = model_location(ref, log)
    else:
        ref = resolve_model(location)
    quant = None if for_merge else quantization_for(bits)
    if quant is None and like is not None and like.quantization and not like.full:
        quant = quantization_settings(*like.quantization)  # e.g. Mxfp4Config(dequantize=True)
    dtype, device = ("auto", "cpu") if for_merge else _placement()
    multimodal = is_multimodal(location, ref, trust_remote_code)
    overrides = like.config_overrides if like is not None and not like.full else None
    config = read_model_config(location, ref, trust_remote_code, overrides) if overrides else None
    model = load_model(
        location, ref, dtype, quant, multimodal, trust_remote_code, attention, config=config
    )
    if getattr(model, "hf_device_map", None) is None:  # else placed as it was loaded
        model = model.to(device)
    if like is not None and like.ssmax:  # the attention is not part of the weights
        use_ssmax(model, *like.ssmax)
    return model.eval(), location


def _tokenizer(targets: list[Target], location: str) -> Any:
    """The tokenizer a run saved (with the chat template and tokens it trained with), else
    the base's."""
    trust = any(t.trust_remote_code for t in targets)
    for t in targets:
        for folder in (t.run, t.path):
            if folder and (folder / "tokenizer_config.json").is_file():
                return load_tokenizer(str(folder), resolve_model(str(folder)), trust)
    return load_tokenizer(location, resolve_model(location), trust)


def load(
    targets: list[Target], model: str | None = None, with_base: bool = False,
    bits: int | None = None, log=print, for_merge: bool = False,
) -> Loaded:  # fmt: skip
    """Load the base model once, every adapter in ``targets`` onto it, and whole models.

    ``model`` overrides the base model the targets name; an adapter trained on another
    base is refused. ``with_base`` adds the base model itself under the label ``BASE``.
    A target trained with QLoRA loads its base in 4 bits where a GPU allows, unless
    ``bits`` says otherwise. ``for_merge`` loads full precision on the CPU.
    """
    import torch

    adapters = [t for t in targets if not t.full]
    auto_4bit = any(t.qlora for t in adapters) and torch.cuda.is_available() and not for_merge
    if bits is None and auto_4bit:
        import importlib.util

        if importlib.util.find_spec("bitsandbytes"):
            bits = 4  # the base as the adapter was trained on it
        else:
            log("note: a QLoRA run, loaded in full precision (bitsandbytes is not installed)")
    base_name = model or next((t.base for t in adapters), None)
    if base_name is None and (with_base or not targets):  # the base alone, or whole models'
        base_name = targets[0].base if targets else BUILTIN_MODEL
    location = adapters[0].base_location if adapters and not model else None
    labels = ([BASE] if with_base or not targets else []) + [t.label for t in targets]
    loaded = Loaded(None, base_name or "", labels)
    trust = any(t.trust_remote_code for t in targets)
    attention = _attention(targets, log)
    if base_name is not None:
        loaded.base, location = _load_base(
            base_name, location, bits, log, for_merge, trust, attention,
            like=adapters[0] if adapters else None,
        )  # fmt: skip
        loaded.base_name = base_name
        loaded.tokenizer = _tokenizer(targets, location)
        multiple = 32 if any(t.embeddings_32x for t in adapters) else None
        if multiple or any(t.new_tokens for t in adapters):  # the base's shape as trained
            fit_vocabulary(loaded.base, loaded.tokenizer, mean_resizing=False, multiple=multiple)
        for i, t in enumerate(adapters):
            recorded = read_json(t.path / "adapter_config.json").get("base_model_name_or_path")
            if recorded and not (same_model(recorded, location) or same_model(t.base, base_name)):
                raise ModelError(
                    f"{t.label}: this adapter was trained on '{t.base}', not on '{base_name}'",
                    f"leave out --model, or give --model {t.base}",
                )
            loaded.base = _attach(loaded.base, t.path, f"a{i}", first=(i == 0))
            loaded.adapters[t.label] = f"a{i}"
    for t in targets:
        if t.full:
            loaded.whole[t.label], _ = _load_base(
                str(t.path), str(t.path), bits, log, for_merge, t.trust_remote_code, attention,
                like=t,
            )  # fmt: skip
    if loaded.tokenizer is None:
        loaded.tokenizer = _tokenizer(targets, location or str(targets[0].path))
    if any(t.new_tokens for t in targets):  # generation stops at the EOS it trained with
        for each in [loaded.base, *loaded.whole.values()]:
            if each is not None:
                use_special_tokens(each, loaded.tokenizer)
    return loaded


def _attach(model: Any, path: Path, name: str, first: bool) -> Any:
    from peft import PeftModel

    try:
        if first:
            return PeftModel.from_pretrained(model, str(path), adapter_name=name).eval()
        model.load_adapter(str(path), adapter_name=name)
        return model
    except Exception as exc:  # peft and safetensors raise many kinds for a bad adapter
        raise ModelError(
            f"{path}: this adapter does not fit the base model: {exc}",
            "load it on the model it was trained on",
        ) from None


def load_run(
    run_dir: str | Path, checkpoint: str | None = None, for_merge: bool = False
) -> tuple[Any, Any]:
    """(model, tokenizer) for a run: its base with the adapter, or its whole weights."""
    target = resolve_target(run_dir, checkpoint)
    loaded = load([target], log=lambda _: None, for_merge=for_merge)
    return loaded.model, loaded.tokenizer
