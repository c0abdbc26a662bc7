"""Settings chosen for the user where they gave none: by mode, model family and size.

Every choice records where it came from, so a run (and ``--dry-run``) can say why a
setting has the value it has. A key the user wrote is never changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tunelab.config import LoadedConfig, TuneConfig


@dataclass(frozen=True)
class Mode:
    lr_factor: float
    epochs: float
    evals_per_epoch: int
    automatic_stops: bool
    summary: str
    scheduler: str | None = None


MODES: dict[str, Mode] = {
    "slow": Mode(0.5, 5, 1, True, "half the learning rate, 5 epochs, 1 evaluation per epoch"),
    "medium": Mode(1.0, 3, 2, True, "the base learning rate, 3 epochs, 2 evaluations per epoch"),
    "fast": Mode(2.0, 1, 4, True, "twice the learning rate, 1 epoch, 4 evaluations per epoch"),
    "non-stop": Mode(
        0.3, 10_000, 1, False, "0.3x the learning rate, no epoch limit and no automatic "
        "stops: runs until stopped (Ctrl-C saves a checkpoint)"
    ),
    "circular": Mode(
        1.0, 1, 1, True, "the base learning rate, the data cycled up to max_circular_epochs "
        "times with a growing batch size, until the training loss is perfect",
    ),
    "adaptive": Mode(
        1.0, 5, 4, True, "the base learning rate, halved whenever validation loss stalls "
        "(reduce_lr_on_plateau), 5 epochs, 4 evaluations per epoch", "reduce_lr_on_plateau",
    ),
}  # fmt: skip


@dataclass(frozen=True)
class Family:
    """What tunelab knows about a model family."""

    name: str
    targets: tuple[str, ...] | None  # None: every linear layer
    note: str = ""


_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
FAMILIES: dict[str, Family] = {
    **{t: Family("llama", _ATTENTION) for t in ("llama", "mistral", "mixtral", "qwen2", "qwen3")},
    **{
        t: Family("gemma", _ATTENTION + _MLP, "trains in bf16 where the GPU has it, never fp16")
        for t in ("gemma", "gemma2", "gemma3", "gemma3_text")
    },
    **{t: Family("gpt2-style", ("c_attn", "c_proj")) for t in ("gpt2", "gpt_bigcode")},
    "phi": Family("phi", ("q_proj", "k_proj", "v_proj", "dense")),
    "phi3": Family("phi", ("qkv_proj", "o_proj")),
}
FALLBACK = Family("all-linear", None)

# (largest parameter count, LoRA rank)
RANKS = ((1e9, 8), (3e9, 16), (7e9, 32), (13e9, 64), (30e9, 128), (float("inf"), 256))


def family_of(model_type: str | None) -> Family:
    return FAMILIES.get(model_type or "", FALLBACK)


def rank_for(n_params: int) -> int:
    return next(rank for limit, rank in RANKS if n_params < limit)


def _size(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def _continued_adapter(loaded: LoadedConfig, config: TuneConfig) -> dict[str, Any]:
    """Rank, alpha and targets of the adapter being continued; the user may not change them."""
    import json
    from pathlib import Path

    from tunelab.errors import ConfigError

    saved = json.loads(
        (Path(config.lora_model_dir).expanduser() / "adapter_config.json").read_text()
    )
    targets = saved.get("target_modules")
    values = {
        "lora_r": saved.get("r"),
        "lora_alpha": saved.get("lora_alpha"),
        "lora_target_modules": sorted(targets) if isinstance(targets, list) else None,
    }
    changed = [
        f"{key}: the adapter has {values[key]}, the config asks for {getattr(config, key)}"
        for key in ("lora_r", "lora_alpha")
        if loaded.given(key) and getattr(config, key) != values[key]
    ]
    if changed:
        raise ConfigError([*changed, "lora_model_dir: an adapter keeps its shape; leave these out"])
    return {k: v for k, v in values.items() if v is not None}


def choose(
    loaded: LoadedConfig, config: TuneConfig, model_type: str | None, n_params: int
) -> tuple[TuneConfig, dict[str, str]]:
    """``config`` with the automatic settings filled in, and where each came from."""
    mode = MODES[config.mode]
    updates: dict[str, Any] = {}
    why: dict[str, str] = {}

    def put(key: str, value: Any, reason: str) -> None:
        if not loaded.given(key):
            updates[key], why[key] = value, reason

    base_lr = 2e-5 if config.adapter == "full" else 2e-4
    put("learning_rate", base_lr * mode.lr_factor, f"mode {config.mode}")
    if not loaded.given("max_steps"):
        put("num_epochs", mode.epochs, f"mode {config.mode}")
    if not loaded.given("eval_steps"):
        put("evals_per_epoch", mode.evals_per_epoch, f"mode {config.mode}")
    if not mode.automatic_stops:
        put("force_epochs", True, f"mode {config.mode}")
    if config.mode == "circular":
        put("circular", True, "mode circular")
    if mode.scheduler:
        put("lr_scheduler", mode.scheduler, f"mode {config.mode}")
    if config.lora_model_dir:
        updates.update(_continued_adapter(loaded, config))
        why.update({k: "lora_model_dir" for k in ("lora_r", "lora_alpha", "lora_target_modules")})
    elif config.adapter != "full":
        put("lora_r", rank_for(n_params), f"model size {_size(n_params)}")
        family = family_of(model_type)
        if family.targets and not loaded.given("lora_target_linear"):
            put("lora_target_modules", list(family.targets), f"{family.name} family handler")
    for key in loaded.origins:
        why[key] = loaded.origins[key]
    return config.model_copy(update=updates), why
