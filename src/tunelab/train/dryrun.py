"""`tunelab train --dry-run`: the whole plan of a run, without loading weights or training.

The model is built on PyTorch's meta device (shapes only), so even a large model is
planned in seconds. Time and memory are rough estimates from the parameter count:
they say which order of magnitude to expect, not a measurement.
"""

from __future__ import annotations

import os
from typing import Any

from tunelab.config import LoadedConfig, resolved_dict
from tunelab.config.locations import resolve_model
from tunelab.data.prepare import load_examples, prepare_data
from tunelab.train.auto import choose
from tunelab.train.models import load_tokenizer_and_processor, model_location
from tunelab.train.preflight import Plan, detect_hardware, preflight
from tunelab.train.trainer import build_adapter, count_parameters, steps_per_epoch, total_steps

# Sustained training arithmetic, in FLOP/s: a CPU core, and a current datacenter GPU at a
# modest utilisation. Calibrated on this project's CPU measurements (about 220 tokens/s
# for a 135M model with LoRA on 2 cores).
CPU_FLOPS_PER_CORE = 6e10
GPU_FLOPS = 3e14


def _meta_model(location: str, multimodal: bool) -> Any:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(location)
    loader = AutoModelForImageTextToText if multimodal else AutoModelForCausalLM
    with torch.device("meta"):
        return loader.from_config(config)


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


def dry_run(loaded: LoadedConfig) -> dict[str, Any]:
    """The plan as one JSON-ready object."""
    config = loaded.config
    plan = preflight(config, detect_hardware())
    ref = resolve_model(config.base_model)
    location = model_location(ref)
    tokenizer, processor = load_tokenizer_and_processor(location, ref)
    data = prepare_data(config, tokenizer, load_examples(config), processor)
    model = _meta_model(location, processor is not None)
    n_params = sum(p.numel() for p in model.parameters())
    config, origins = choose(loaded, config, getattr(model.config, "model_type", None), n_params)
    trainable, total = count_parameters(build_adapter(model, config, plan))
    steps = total_steps(config, plan, len(data.train))
    per_epoch = steps_per_epoch(config, plan, len(data.train))
    epochs = steps / per_epoch
    text = getattr(model.config, "text_config", model.config)
    guess = estimate(
        plan, config, n_params, trainable, int(data.stats["train_tokens"] * epochs),
        getattr(text, "hidden_size", 1024), getattr(text, "num_hidden_layers", 24),
        data.stats["max_length"],
    )  # fmt: skip
    settings = {
        key: {"value": value, "from": origins.get(key, "default")}
        for key, value in resolved_dict(config).items()
    }
    if config.adapter != "full" and config.lora_alpha is None:
        settings["lora_alpha"] = {"value": config.lora_alpha_value, "from": "2 x lora_r"}
    settings.update({
        "precision": {"value": plan.precision, "from": "hardware"},
        "micro_batch_size": {"value": plan.micro_batch_size,
                             "from": origins.get("micro_batch_size", "hardware")},
        "gradient_checkpointing": {"value": plan.gradient_checkpointing,
                                   "from": origins.get("gradient_checkpointing", "hardware")},
    })  # fmt: skip
    return {
        "model": ref.describe(),
        "device": plan.hardware.name,
        "settings": settings,
        "parameters": {"trainable": trainable, "total": total},
        "data": data.stats,
        "steps": steps,
        "steps_per_epoch": per_epoch,
        "tokens_per_epoch": data.stats["train_tokens"],
        "estimate": guess,
        "notes": loaded.notes + data.notes,
    }


def describe(report: dict[str, Any]) -> str:
    """The plan as text: every setting with where it came from, then the numbers."""
    width = max(len(k) for k in report["settings"])
    lines = [f"model: {report['model']} on {report['device']}", "", "settings (value, from):"]
    for key, item in report["settings"].items():
        lines.append(f"  {key:<{width}}  {item['value']!s:<30}  {item['from']}")
    p, e = report["parameters"], report["estimate"]
    lines += [
        "",
        f"parameters: {p['trainable']:,} trained of {p['total']:,}",
        f"steps: {report['steps']} ({report['steps_per_epoch']} per epoch), "
        f"{report['tokens_per_epoch']:,} tokens per epoch",
        f"estimate: about {e['seconds'] / 60:.1f} min, about {e['memory_gib']:.1f} GiB peak memory "
        "(rough, from the parameter count)",
    ]
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)
