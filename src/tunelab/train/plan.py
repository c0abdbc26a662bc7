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
from tunelab.data.prepare import load_examples, prepare_data
from tunelab.data.records import PreparedData
from tunelab.errors import ConfigError, ModelError, RunDirError
from tunelab.model.hardware import ATTENTION_NAMES, detect_hardware, is_hub_kernel
from tunelab.model.loading import (
    add_tokens,
    embedding_modules,
    fit_vocabulary,
    load_tokenizer_and_processor,
    model_location,
    quantization_settings,
    read_model_config,
)
from tunelab.model.ssmax import ssmax_settings, use_ssmax
from tunelab.rundir import read_json
from tunelab.train.auto import choose, family_of
from tunelab.train.estimate import estimate, fitting_batch
from tunelab.train.preflight import Plan, hardware_problems, machine_plan
from tunelab.train.trainer import (
    build_adapter,
    count_parameters,
    renamed_targets,
    steps_per_epoch,
    total_steps,
)
from tunelab.train.unfrozen import (
    example_name,
    parameter_names,
    pattern_problems,
    unmatched_patterns,
)

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


def meta_model(model_config: Any, multimodal: bool, trust_remote_code: bool = False) -> Any:
    """The model with shapes but no weights (PyTorch's meta device): built in a moment."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    loader = AutoModelForImageTextToText if multimodal else AutoModelForCausalLM
    with torch.device("meta"):
        return loader.from_config(model_config, trust_remote_code=trust_remote_code)


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


def linear_layers(model: Any) -> list[str]:
    """The full names of the model's linear layers (what LoRA can adapt)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    return [
        name for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, Conv1D)) and name
    ]  # fmt: skip


def linear_layer_names(model: Any) -> list[str]:
    """The names LoRA can target: the last part of every linear layer's name."""
    return sorted({name.rsplit(".", 1)[-1] for name in linear_layers(model)})


def _adapter_counts(model: Any, config: TuneConfig, plan: Plan) -> tuple[int, int]:
    """(trainable, total) parameters with the adapter on the meta model; a target that names
    no layer of this model is a config problem, reported with the names it has."""
    meta_plan = dataclasses.replace(plan, gradient_checkpointing=False)
    if config.adapter == "full":
        return count_parameters(build_adapter(model, config, meta_plan, weights=False))
    try:
        return count_parameters(build_adapter(model, config, meta_plan, weights=False))
    except ValueError as exc:
        from peft.utils.error import NoMatchingPeftModuleError

        known = ("not found in the base model", "Target module")
        if not isinstance(exc, NoMatchingPeftModuleError) and not any(k in str(exc) for k in known):
            raise
        layers = ", ".join(linear_layer_names(model))
        if isinstance(config.lora_targets, str):  # a regular expression over full names
            example = next(iter(linear_layers(model)), "")
            raise ConfigError(
                [f"lora_target_modules: the regular expression '{config.lora_targets}' matches "
                 f"no linear layer of '{config.base_model}' (it must match a whole module name, "
                 f"like '{example}'); its linear layers are: {layers}"]
            ) from None  # fmt: skip
        raise ConfigError(
            [f"lora_target_modules: {config.lora_targets} match no layer of "
             f"'{config.base_model}'; its linear layers are: {layers}"]
        ) from None  # fmt: skip


def _fix_streamed_batch(config: TuneConfig, plan: Plan) -> tuple[TuneConfig, Plan, str] | None:
    """With pretraining_dataset and no micro_batch_size given: the config with the machine
    plan's micro_batch_size fixed (the text streamed is as much as that batch takes, so it
    may not change once the data is read), the plan without that choice among its reasons,
    and the setting's origin; else None."""
    if not config.pretraining_dataset or config.micro_batch_size:
        return None
    chosen = next(r for r in plan.reasons if r.startswith("micro_batch_size"))
    why = chosen.partition("(")[2].rstrip(")")
    reasons = tuple(r for r in plan.reasons if r != chosen)
    fixed = config.model_copy(update={"micro_batch_size": plan.micro_batch_size})
    origin = f"chosen for this machine: {why}; fixed before pretraining_dataset is streamed"
    return fixed, dataclasses.replace(plan, reasons=reasons), origin


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


def _covers(modules_to_save: list[str], name: str) -> bool:
    return any(name == m or name.endswith("." + m) for m in modules_to_save)


def _train_new_tokens(
    config: TuneConfig, model: Any, new_tokens: list[str], origins: dict[str, str], log
) -> TuneConfig:
    """With LoRA, new vocabulary entries mean nothing unless their embeddings (and output
    head rows) are trained: those two modules are trained in full and saved with the
    adapter. A continued adapter keeps its shape, so it must already train them. A new pad
    token alone needs none of this: padding is never attended to nor trained."""
    special = dict(config.special_tokens or {})
    pad = special.pop("pad_token", None)
    used = set(special.values()) | set(config.tokens or [])
    new_tokens = [t for t in new_tokens if t != pad or t in used]
    if not new_tokens or config.adapter == "full":
        return config
    names = embedding_modules(model)
    if config.lora_model_dir:
        saved = read_json(Path(config.lora_model_dir).expanduser() / "adapter_config.json")
        missing = [n for n in names if not _covers(saved.get("modules_to_save") or [], n)]
        if missing:
            raise ConfigError(
                [f"tokens: the adapter in lora_model_dir does not train {', '.join(missing)}, "
                 "which new tokens need; train a new adapter (leave out lora_model_dir)"]
            )  # fmt: skip
        return config
    given = list(config.lora_modules_to_save or [])
    missing = [n for n in names if not _covers(given, n)]
    if not missing:
        return config
    log(
        f"note: {len(new_tokens)} new tokens ({', '.join(new_tokens[:5])}"
        f"{', ...' if len(new_tokens) > 5 else ''}): {', '.join(missing)} trained in full and "
        "saved with the adapter (lora_modules_to_save), so that they learn what they mean"
    )
    origins["lora_modules_to_save"] = "new tokens need trained embeddings"
    return config.model_copy(update={"lora_modules_to_save": given + missing})


def _model_changes(
    config: TuneConfig, model: Any, tokenizer: Any, multimodal: bool, log
) -> TuneConfig:
    """What the config changes about the model, done to the meta model as training will do
    it to the real one: a vocabulary padded to 32 rows, SSMax attention; and the names
    unfrozen_parameters gives checked against its parameters (returns the config without
    them where they are ignored)."""
    fit_vocabulary(model, tokenizer, mean_resizing=False,
                   multiple=32 if config.resize_token_embeddings_to_32x else None)  # fmt: skip
    ssmax = ssmax_settings(config)
    if ssmax:
        if multimodal:
            raise ConfigError(["scaling_softmax: not supported yet for image-text models"])
        use_ssmax(model, *ssmax)
    if config.unfrozen_parameters:
        return _check_unfrozen(config, parameter_names(model), log)
    return config


def _check_unfrozen(config: TuneConfig, names: list[str], log) -> TuneConfig:
    """unfrozen_parameters against the model's parameter ``names``: a pattern that matches
    none is said; when none matches, an adapter trains as it would without them, and full
    fine-tuning is refused (it would train every weight)."""
    patterns = config.unfrozen_parameters or []
    problems = pattern_problems(patterns)
    if problems:
        raise ConfigError(problems)
    unmatched = unmatched_patterns(patterns, names)
    if len(unmatched) < len(patterns):
        for line in unmatched:
            log(f"note: {line}; it unfreezes nothing")
        return config
    like = example_name(names)
    if config.adapter == "full":
        raise ConfigError(
            [*unmatched,
             f"unfrozen_parameters: none matches a parameter of '{config.base_model}' (its "
             f"parameters are named like {like}); ignoring them would train every weight, so "
             "give patterns for the parameters to train"]
        )  # fmt: skip
    for line in unmatched:
        log(f"note: {line}")
    log(
        f"note: unfrozen_parameters match no parameter of '{config.base_model}' (its "
        f"parameters are named like {like}); ignored: the adapter trains as it would "
        "without them"
    )
    return config.model_copy(update={"unfrozen_parameters": None})


def _nothing_trained(config: TuneConfig, trainable: int) -> None:
    """Full fine-tuning of the parameters unfrozen_parameters match: there must be some (with
    an adapter, matches without adapter weights are ignored instead)."""
    if not trainable and config.unfrozen_parameters and config.adapter == "full":
        raise ConfigError(["unfrozen_parameters: no parameter is left to train"])


def _quantization_problems(config: TuneConfig, model_config: Any) -> list[str]:
    """model_quantization_config: it loads the model on its own, and into weights that can
    be trained with this adapter."""
    name = config.model_quantization_config
    if not name:
        return []
    problems = []
    if config.adapter == "qlora" or config.load_in_8bit:
        what = "adapter: qlora" if config.adapter == "qlora" else "load_in_8bit"
        problems.append(
            f"model_quantization_config: {what} loads the model with its own quantization "
            "(bitsandbytes); give one of them"
        )
    if config.reinit_weights:
        problems.append(
            "model_quantization_config: reinit_weights starts from new weights; there is "
            "nothing to load quantized"
        )
    try:
        settings = quantization_settings(name, config.model_quantization_config_kwargs)
    except ConfigError as exc:
        return problems + exc.problems
    except ImportError:  # a package the method needs: the machine's checks say which
        return problems
    pre_quantized = getattr(model_config, "quantization_config", None) is not None
    if pre_quantized and getattr(settings, "dequantize", False):
        return problems  # the stored quantized weights load as ordinary ones
    from transformers.quantizers import AutoHfQuantizer

    quantizer = AutoHfQuantizer.from_config(settings, pre_quantized=pre_quantized)
    way_out = "; or load a quantized model with dequantize: true"
    if not hasattr(settings, "dequantize"):
        way_out = ""
    if config.adapter == "full" and not getattr(quantizer, "is_qat_trainable", False):
        problems.append(
            f"model_quantization_config: {name} keeps the weights quantized, and quantized "
            f"weights cannot be fully fine-tuned; use adapter: lora{way_out}"
        )
    elif config.adapter != "full" and not quantizer.is_trainable:
        problems.append(
            f"model_quantization_config: transformers cannot train adapters on weights "
            f"quantized with {name}{way_out}"
        )
    return problems


def _notes(config: TuneConfig, plan: Plan, data: PreparedData, log) -> None:
    """Settings that have no effect in this run, said rather than silently ignored."""
    if config.reinit_weights:
        log("note: reinit_weights: the model starts from freshly initialised weights (from "
            "its config); the pre-trained weights are not loaded")  # fmt: skip
    ssmax_numbers = (config.scaling_softmax_factor, config.scaling_softmax_bias)
    if not config.scaling_softmax and any(n is not None for n in ssmax_numbers):
        log("note: scaling_softmax_factor and scaling_softmax_bias are not used without "
            "scaling_softmax: true")  # fmt: skip
    if config.model_quantization_config_kwargs and not config.model_quantization_config:
        log("note: model_quantization_config_kwargs is not used without "
            "model_quantization_config")  # fmt: skip
    if config.gradient_checkpointing_kwargs and not plan.gradient_checkpointing:
        log("note: gradient_checkpointing_kwargs unused: gradient checkpointing is off")
    images = bool(data.train) and "images" in data.train[0]
    if config.pad_to_sequence_len and (config.sample_packing or images):
        what = "packed rows" if config.sample_packing else "image-text batches"
        log(f"note: pad_to_sequence_len does not apply to {what}")


def _refusals(config: TuneConfig, plan: Plan, model_config: Any, data: PreparedData) -> None:
    """Combinations that cannot train, known only once the model and data are known."""
    model_type = getattr(model_config, "model_type", None)
    problems = _quantization_problems(config, model_config)
    if config.reinit_weights and config.adapter != "full":
        problems.append(
            f"reinit_weights: an adapter on freshly initialised weights learns nothing useful; "
            f"use adapter: full (not {config.adapter}) to train from scratch"
        )
    attention = config.attn_implementation
    if attention and attention not in ATTENTION_NAMES and not is_hub_kernel(attention):
        problems.append(
            f"attn_implementation: '{attention}' is not an attention implementation; use "
            f"{', '.join(ATTENTION_NAMES)} or a Hub kernel like kernels-community/flash-attn2"
        )
    if config.cosine_min_lr_ratio is not None and config.lr_scheduler not in (
        "cosine", "cosine_with_min_lr"
    ):  # fmt: skip
        problems.append(
            f"cosine_min_lr_ratio: applies to the cosine schedule, not to lr_scheduler "
            f"{config.lr_scheduler}; set lr_scheduler: cosine or leave it out"
        )
    if family_of(model_type).name == "gemma" and plan.precision == "fp16":
        problems.append("fp16: gemma models overflow in float16; use bf16 (or fp32)")
    if config.lr_scheduler == "reduce_lr_on_plateau" and not data.eval:
        problems.append(
            "lr_scheduler: reduce_lr_on_plateau (mode adaptive) needs a validation set; "
            "set val_set_size above 0 or choose another mode"
        )
    if problems:
        raise ConfigError(problems)


def _speed_setting(value: Any, key: str, problem: str | None, on: str) -> tuple[bool, str | None]:
    """(whether speed setting ``key`` is used, the reason to print when it was left at auto);
    ``problem``: what keeps it from this run, which makes asking for it an error."""
    if value is True and problem:
        raise ConfigError([f"{key}: {problem}; leave it at auto"])
    if value != "auto":
        return bool(value) and not problem, None
    return not problem, f"{key} {'off' if problem else 'on'} ({problem or on})"


def _speed_plan(config: TuneConfig, plan: Plan, model_config: Any) -> Plan:
    """The plan with each speed setting on or off, and why (chunked_cross_entropy, fast_lora,
    padding_free); none changes what is learned."""
    from tunelab.train.loss import model_problem

    lora = config.adapter in ("lora", "qlora")
    chunked, *why = _speed_setting(
        config.chunked_cross_entropy, "chunked_cross_entropy", model_problem(model_config),
        "logits only where a token is trained, a chunk at a time: the same loss, without the "
        "full logits",
    )  # fmt: skip
    fast, reason = _speed_setting(
        config.fast_lora, "fast_lora", None if lora else "no LoRA adapter",
        "LoRA layers in fewer passes: the same function",
    )  # fmt: skip
    why.append(reason)
    flat, reason = _speed_setting(
        config.padding_free, "padding_free", _padding_free(config, model_config),
        "samples end to end, each attending to itself: no padding",
    )  # fmt: skip
    why.append(reason)
    reasons = (*plan.reasons, *(r for r in why if r))
    return dataclasses.replace(
        plan, chunked_loss=chunked, fast_lora=fast, padding_free=flat, reasons=reasons
    )


def _padding_free(config: TuneConfig, model_config: Any) -> str | None:
    """Why a batch's samples cannot go end to end in one row; None when they can."""
    from tunelab.model.varlen import model_problem

    attention = config.attn_implementation or "sdpa"
    if config.pad_to_sequence_len:
        return "pad_to_sequence_len pads every batch"
    if config.scaling_softmax:
        return "scaling_softmax wraps the attention"
    if config.circular:
        return "circular training batches its own way"
    if attention != "sdpa" and "flash" not in attention:
        return f"attn_implementation {attention} needs padded batches"
    return model_problem(model_config)


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
    streamed = _fix_streamed_batch(config, plan)
    if streamed:  # read as much streamed text as the batch the machine plan chose takes
        config, plan, _ = streamed
    loaded_data = load_examples(config)

    ref = resolve_model(config.base_model)
    log(f"model: {ref.describe()}")
    location = model_location(ref, log)
    trust = config.trust_remote_code
    model_config = read_model_config(location, ref, trust, config.overrides_of_model_config)
    context = fit_context(loaded, config, model_config)
    if context:
        config = config.model_copy(update={"sequence_len": context})
    if config.lora_model_dir:
        check_adapter_base(Path(config.lora_model_dir).expanduser(), location, ref.location)
    multimodal = getattr(model_config, "vision_config", None) is not None
    tokenizer, processor = load_tokenizer_and_processor(location, ref, multimodal, trust)
    new_tokens = add_tokens(tokenizer, config.special_tokens, config.tokens)
    data = prepare_data(config, tokenizer, loaded_data, processor)
    _describe_data(log, data)

    try:
        model = meta_model(model_config, multimodal, trust)
    except Exception as exc:  # an architecture this transformers cannot build
        raise ModelError(
            f"{location}: cannot build this model: {type(exc).__name__}: {exc}",
            "check that its config.json is a transformers model this version supports",
        ) from None
    config = _model_changes(config, model, tokenizer, multimodal, log)
    n_params = sum(p.numel() for p in model.parameters())
    model_type = getattr(model_config, "model_type", None)
    config, origins = choose(loaded, config, model_type, n_params)
    if context:
        origins["sequence_len"] = f"the model's context, {context}"
    if streamed:
        origins["micro_batch_size"] = streamed[2]
    config = _train_new_tokens(config, model, new_tokens, origins, log)
    _notes(config, plan, data, log)
    if config.adapter != "full" and not config.lora_model_dir:
        renamed = renamed_targets(model, config.lora_targets)  # LoRA adapts them by name
        if renamed:
            log(f"note: {renamed.note()}")
    trainable, total = _adapter_counts(model, config, plan)
    if not trainable and config.unfrozen_parameters and config.adapter != "full":
        log(
            "note: unfrozen_parameters hold no weight of the adapter (they match "
            "parameters LoRA does not adapt); ignored: the adapter trains as it would "
            "without them"
        )
        config = config.model_copy(update={"unfrozen_parameters": None})
        model = meta_model(model_config, multimodal, trust)  # the adapter again, unfrozen
        _model_changes(config, model, tokenizer, multimodal, lambda line: None)
        trainable, total = _adapter_counts(model, config, plan)
    _nothing_trained(config, trainable)
    plan = _fit_batch(plan, config, model_config, (n_params, trainable), data.stats["max_length"],
                      origins)  # fmt: skip
    _refusals(config, plan, model_config, data)
    plan = _speed_plan(config, plan, model_config)
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
