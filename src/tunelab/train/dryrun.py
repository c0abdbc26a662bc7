"""`tunelab train --dry-run`: the whole plan of a run, without loading weights or training.

The plan is the one training makes (see :mod:`tunelab.train.plan`); time and memory are
rough estimates from the parameter count: they say which order of magnitude to expect,
not a measurement.
"""

from __future__ import annotations

from typing import Any

from tunelab.config import LoadedConfig, resolved_dict
from tunelab.redact import redact_data
from tunelab.train.estimate import estimate
from tunelab.train.plan import plan_run, text_config


def _origin(key: str, origins: dict[str, str], reasons: tuple[str, ...]) -> str:
    """Where a planned setting came from: the config, or the plan's reason for it."""
    if key in origins:
        return origins[key]
    for reason in reasons:
        name, _, rest = reason.partition(" ")
        if name == key and "(" in rest:
            return "auto: " + rest[rest.index("(") + 1 : rest.rindex(")")]
    return "config" if key != "precision" else "bf16/fp16 in the config"


def dry_run(loaded: LoadedConfig, log) -> dict[str, Any]:
    """The plan as one JSON-ready object; what the run would say as it plans goes to ``log``."""
    rp = plan_run(loaded, log, strict=False)
    config, plan, data = rp.config, rp.plan, rp.data
    text = text_config(rp.model_config)
    guess = estimate(
        plan, config, rp.n_params, rp.trainable,
        int(data.stats["train_tokens"] * rp.steps / rp.per_epoch),
        getattr(text, "hidden_size", 1024), getattr(text, "num_hidden_layers", 24),
        data.stats["max_length"],
    )  # fmt: skip
    settings = {
        key: {"value": value, "from": rp.origins.get(key, "default")}
        for key, value in redact_data(resolved_dict(config)).items()
    }
    if config.adapter != "full" and config.lora_alpha is None:
        settings["lora_alpha"] = {"value": config.lora_alpha_value, "from": "2 x lora_r"}
    chosen = {  # the settings planned for this machine and model, each with its reason
        "precision": plan.precision,
        "micro_batch_size": plan.micro_batch_size,
        "gradient_checkpointing": plan.checkpointing,
        "chunked_cross_entropy": plan.chunked_loss,
        "padding_free": plan.padding_free,
        "fast_lora": plan.fast_lora,
    }
    for key, value in chosen.items():
        settings[key] = {"value": value, "from": _origin(key, rp.origins, plan.reasons)}
    return {
        "model": rp.ref.describe(),
        "device": plan.hardware.name,
        "settings": settings,
        "parameters": {"trainable": rp.trainable, "total": rp.total},
        "data": data.stats,
        "steps": rp.steps,
        "steps_per_epoch": rp.per_epoch,
        "tokens_per_epoch": data.stats["train_tokens"],
        "estimate": guess,
        "warnings": redact_data(rp.warnings),
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
    lines += [f"warning: cannot run on this machine: {w}" for w in report["warnings"]]
    return "\n".join(lines)
