"""Planning a run: every check and choice made before the first training step, without weights.

`tunelab validate`, `tunelab train --dry-run` and `tunelab train` all plan a run here, so
a config that validates is one that starts training. The plan reads the data and every
row of it, the tokenizer and the model's config, builds the model on PyTorch's meta device
(shapes only) with its adapter, and makes the automatic choices (mode, model size and
family, the machine). Loading the weights is left to the run itself.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.config import LoadedConfig, TuneConfig
from tunelab.config.locations import ModelRef, resolve_model, same_model
from tunelab.data.prepare import PreparedData, load_examples, prepare_data
from tunelab.errors import ConfigError, ModelError, RunDirError
from tunelab.train.auto import choose, family_of
from tunelab.train.estimate import estimate, fitting_batch
from tunelab.train.models import (
    load_tokenizer_and_processor,
    model_location,
    read_model_config,
)
from tunelab.train.preflight import Plan, detect_hardware, hardware_problems, machine_plan
from tunelab.train.rundir import read_json
from tunelab.train.trainer import build_adapter, count_parameters, steps_per_epoch, total_steps

USER = ("file", "flag", "--set")


@dataclass
class RunPlan:
    """A run, checked and decided, before any weights are loaded."""

    config: TuneConfig  # with the automatic choices filled in
    origins: dict[str, str]  # setting -> where its value came from
    plan: Plan  # what depends on the machine
    data: PreparedData
    tokenizer: Any
    processor: Any  # an image-text model's processor, else None
    ref: ModelRef
    location: str  # a directory (or hub id) from_pretrained reads
    model_config: Any
    n_params: int
    trainable: int
    total: int
    steps: int
    per_epoch: int
    warnings: list[str] = field(default_factory=list)  # what keeps it from running here


def text_config(model_config: Any) -> Any:
    """The language part of a model's config (an image-text model nests it)."""
    return getattr(model_config, "text_config", None) or model_config


def meta_model(model_config: Any, multimodal: bool) -> Any:
    """The model with shapes but no weights (PyTorch's meta device): built in a moment."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    loader = AutoModelForImageTextToText if multimodal else AutoModelForCausalLM
    with torch.device("meta"):
        return loader.from_config(model_config)


def check_adapter_base(adapter_dir: Path, location: str, name: str) -> None:
    """An adapter continues only on the base model it was trained on (recorded by where it
    was read from, or, for a hub model read from its cached copy, by its id)."""
    recorded = read_json(adapter_dir / "adapter_config.json").get("base_model_name_or_path")
    if not (recorded and (same_model(recorded, location) or same_model(recorded, name))):
        raise RunDirError(
            f"{adapter_dir}: this adapter was trained on '{recorded}', not on '{location}'",
            "set base_model to the model the adapter was trained on",
        )


def fit_context(loaded: LoadedConfig, config: TuneConfig, model_config: Any) -> int | None:
    """The context ``sequence_len`` is capped to when the user left it at its default and the
    model reads fewer tokens; None when no cap is needed. A longer value the user asked for
    is refused: a model with learned positions fails on longer samples."""
    context = getattr(text_config(model_config), "max_position_embeddings", None)
    if not isinstance(context, int) or config.sequence_len <= context:
        return None
    if loaded.given("sequence_len"):
        raise ConfigError(
            [f"sequence_len: {config.sequence_len} is longer than the {context} tokens "
             f"'{config.base_model}' can read; use {context} or less"]
        )  # fmt: skip
    return context


def linear_layer_names(model: Any) -> list[str]:
    """The names LoRA can target: the last part of every linear layer's name."""
    import torch
    from transformers.pytorch_utils import Conv1D

    return sorted(
        {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
         if isinstance(module, (torch.nn.Linear, Conv1D)) and name}
    )  # fmt: skip


def _adapter_counts(model: Any, config: TuneConfig, plan: Plan) -> tuple[int, int]:
    """(trainable, total) parameters with the adapter on the meta model; a target that names
    no layer of this model is a config problem, reported with the names it has."""
    if config.adapter == "full":
        return count_parameters(model)
    meta_plan = dataclasses.replace(plan, gradient_checkpointing=False)
    try:
        return count_parameters(build_adapter(model, config, meta_plan, weights=False))
    except ValueError as exc:
        if "not found in the base model" not in str(exc) and "Target module" not in str(exc):
            raise
        raise ConfigError(
            [f"lora_target_modules: {config.lora_targets} match no layer of "
             f"'{config.base_model}'; its linear layers are: "
             f"{', '.join(linear_layer_names(model))}"]
        ) from None  # fmt: skip


def _fit_batch(plan: Plan, config: TuneConfig, model_config: Any, counts: tuple[int, int],
               longest: int, origins: dict[str, str]) -> Plan:  # fmt: skip
    """On a GPU, without a given micro_batch_size: the largest batch the memory estimate
    fits (``counts``: all parameters, and those trained)."""
    if plan.hardware.device != "cuda" or config.micro_batch_size or config.sample_packing:
        return plan
    text = text_config(model_config)
    n_params, trainable = counts

    def peak(batch: int) -> float:
        trial = dataclasses.replace(plan, micro_batch_size=batch)
        return estimate(
            trial, config, n_params, trainable, 0, getattr(text, "hidden_size", 1024),
            getattr(text, "num_hidden_layers", 24), longest,
        )["memory_gib"]  # fmt: skip

    batch = fitting_batch(plan.hardware.memory_gb or 0.0, peak)
    origins["micro_batch_size"] = f"fits {plan.hardware.memory_gb:.0f} GiB"
    return dataclasses.replace(plan, micro_batch_size=batch, reasons=tuple(
        r for r in plan.reasons if not r.startswith("micro_batch_size")
    ))  # fmt: skip


def _describe_data(log, data: PreparedData) -> None:
    for note in data.notes:
        log(f"note: {note}")
    for s in data.sources:
        log(f"data: {s.path} ({s.format}, {s.rows} rows)")
    st = data.stats
    extra = [
        f"{st[key]} {label}"
        for key, label in (
            ("duplicates", "duplicates removed"), ("truncated", "truncated"),
            ("dropped", "dropped (too long, or nothing left to train after the cut)"),
        )
        if st[key]
    ]  # fmt: skip
    if "packed_rows" in st:
        extra.append(
            f"packed into {st['packed_rows']} rows ({st['packing_efficiency']:.1%} filled)"
        )
    log(
        f"data: {st['train_samples']} training / {st['eval_samples']} validation samples, "
        f"{st['trained_tokens']} of {st['train_tokens']} tokens trained, longest {st['max_length']}"
        + "".join(f", {e}" for e in extra)
    )


def _refusals(config: TuneConfig, plan: Plan, model_type: str | None, data: PreparedData) -> None:
    """Combinations that cannot train, known only once the model and data are known."""
    problems = []
    if family_of(model_type).name == "gemma" and plan.precision == "fp16":
        problems.append("fp16: gemma models overflow in float16; use bf16 (or fp32)")
    if config.lr_scheduler == "reduce_lr_on_plateau" and not data.eval:
        problems.append(
            "lr_scheduler: reduce_lr_on_plateau (mode adaptive) needs a validation set; "
            "set val_set_size above 0 or choose another mode"
        )
    if problems:
        raise ConfigError(problems)


def plan_run(loaded: LoadedConfig, log=print, strict: bool = True, machine: bool = True) -> RunPlan:
    """Check and decide everything about a run short of loading its weights.

    With ``strict`` a machine that cannot run the config (no GPU for QLoRA, a tracker that
    cannot be reached, ...) is a :class:`~tunelab.errors.PreflightError`; otherwise those
    problems are returned in ``warnings`` and the plan is made for this machine anyway.
    ``machine=False`` leaves those checks out (for looking at the data alone).
    """
    from tunelab.errors import PreflightError

    config = loaded.config
    hardware = detect_hardware()
    problems = hardware_problems(config, hardware) if machine else []
    if problems and strict:
        raise PreflightError(
            "this configuration cannot run on this machine:\n  - " + "\n  - ".join(problems)
        )
    plan = machine_plan(config, hardware)
    loaded_data = load_examples(config)

    ref = resolve_model(config.base_model)
    log(f"model: {ref.describe()}")
    location = model_location(ref, log)
    model_config = read_model_config(location, ref)
    context = fit_context(loaded, config, model_config)
    if context:
        config = config.model_copy(update={"sequence_len": context})
    if config.lora_model_dir:
        check_adapter_base(Path(config.lora_model_dir).expanduser(), location, ref.location)
    multimodal = getattr(model_config, "vision_config", None) is not None
    tokenizer, processor = load_tokenizer_and_processor(location, ref, multimodal)
    data = prepare_data(config, tokenizer, loaded_data, processor)
    _describe_data(log, data)

    try:
        model = meta_model(model_config, multimodal)
    except Exception as exc:  # an architecture this transformers cannot build
        raise ModelError(
            f"{location}: cannot build this model: {type(exc).__name__}: {exc}",
            "check that its config.json is a transformers model this version supports",
        ) from None
    n_params = sum(p.numel() for p in model.parameters())
    model_type = getattr(model_config, "model_type", None)
    config, origins = choose(loaded, config, model_type, n_params)
    if context:
        origins["sequence_len"] = f"the model's context, {context}"
    trainable, total = _adapter_counts(model, config, plan)
    plan = _fit_batch(plan, config, model_config, (n_params, trainable), data.stats["max_length"],
                      origins)  # fmt: skip
    _refusals(config, plan, model_type, data)
    effective = {"micro_batch_size": plan.micro_batch_size}
    chosen = [
        f"{k} {effective.get(k, getattr(config, k))} ({why})"
        for k, why in origins.items()
        if why not in USER
    ]
    if chosen:
        log(f"chosen automatically: {'; '.join(chosen)}")
    if plan.reasons:
        log(f"chosen for this machine: {'; '.join(plan.reasons)}")
    return RunPlan(
        config, origins, plan, data, tokenizer, processor, ref, location, model_config,
        n_params, trainable, total, total_steps(config, plan, len(data.train)),
        steps_per_epoch(config, plan, len(data.train)), problems,
    )  # fmt: skip
