"""Keys of ``transformers.TrainingArguments``-style trainers (SuperDuperDB's LLMTrainer and
others) that need more than a new name: ``use_lora``, ``bits``, ``evaluation_strategy``
(or ``eval_strategy``), ``overwrite_output_dir`` and ``num_gpus``. Read before the
dialect is recognised, so the rest of the file is read as what it is."""

from __future__ import annotations

from typing import Any

STRATEGY_KEYS = ("evaluation_strategy", "eval_strategy")


def translate_trainer_keys(
    data: dict[str, Any], notes: list[str], problems: list[str]
) -> dict[str, Any]:
    """``data`` with those keys replaced by tunelab's own (an explicit tunelab key wins)."""
    out = dict(data)
    if "use_lora" in out:
        use = out.pop("use_lora")
        if not isinstance(use, bool):
            problems.append(f"use_lora: expected true or false, got {use!r}")
        elif "adapter" not in out:
            out["adapter"] = "lora" if use else "full"
    if "bits" in out:
        bits = out.pop("bits")
        if bits == 4:  # a 4-bit base trains only adapters: QLoRA
            if out.get("adapter", "lora") in ("lora", "qlora"):
                out["adapter"] = "qlora"
            else:
                problems.append("bits: 4 trains an adapter on a 4-bit base (QLoRA); "
                                "set use_lora: true, or leave bits out")  # fmt: skip
        elif bits == 8:
            out.setdefault("load_in_8bit", True)
        elif bits not in (16, 32, None):
            problems.append(f"bits: {bits!r}: the base model loads in 4, 8, 16 or 32 bits")
    for key in [k for k in STRATEGY_KEYS if k in out]:
        strategy = out.pop(key)
        if strategy == "no":
            out.setdefault("evals_per_epoch", 0)
            out.pop("eval_steps", None)
        elif strategy == "epoch":
            out.setdefault("evals_per_epoch", 1)
            out.pop("eval_steps", None)
        elif strategy != "steps":
            problems.append(f"{key}: {strategy!r}: one of no, steps, epoch")
    if out.pop("overwrite_output_dir", None):
        notes.append("overwrite_output_dir is not used: a run is replaced only with tunelab "
                     "train --overwrite (and a job always trains a run of its own)")  # fmt: skip
    if "num_gpus" in out:
        gpus = out.pop("num_gpus")
        if gpus not in (None, 0, 1):
            notes.append(f"num_gpus {gpus}: multi-GPU training is not supported yet; the run "
                         "uses one device")  # fmt: skip
    return out
