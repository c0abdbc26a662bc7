"""`tunelab merge`: fold a run's LoRA adapter into its base model's weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunelab.errors import RunDirError, TunelabError
from tunelab.files import staged_directory
from tunelab.train.rundir import read_json


def check_output(target: Path) -> None:
    """An output directory must be new (or empty): nothing a user has is overwritten."""
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise RunDirError(f"{target} already exists and is not empty", "choose a new --output")


def check_mergeable(target: Any) -> None:
    """Refuse, before loading anything, an adapter whose base model is quantized."""
    config = Path(target.base_location or "") / "config.json"
    if not target.full and target.base_location and "quantization_config" in read_json(config):
        raise TunelabError(
            f"the adapter's base model {target.base_location} is quantized: merging into it "
            "would bake the quantization error into every weight",
            "merge into the full-precision version of the base model",
        )


def merged_model(loaded: Any, target: Any) -> Any:
    """The target's weights as one plain model: the adapter merged in, or whole weights."""
    if target.full:
        return loaded.whole[target.label]
    return loaded.base.merge_and_unload()


def merge(run_dir: str | Path, output: str | Path, checkpoint: str | None = None) -> Path:
    """Save base + adapter as one standard model directory at ``output``; returns it."""
    from tunelab.infer.load import load, resolve_target

    target, out = resolve_target(run_dir, checkpoint), Path(output)
    if target.full:
        raise TunelabError(
            f"{target.label} holds whole fine-tuned weights, not an adapter: nothing to merge",
            "load that directory as it is, with AutoModelForCausalLM.from_pretrained",
        )
    check_output(out)
    check_mergeable(target)
    loaded = load([target], log=lambda _: None, for_merge=True)
    model = merged_model(loaded, target)
    with staged_directory(out.resolve()) as staging:
        model.save_pretrained(staging)
        loaded.tokenizer.save_pretrained(staging)
    return out
