"""`tunelab merge`: fold a run's LoRA adapter into its base model's weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunelab.errors import RunDirError, TunelabError
from tunelab.files import staged_directory
from tunelab.rundir import read_json


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


def write_merged(target: Any, folder: Path) -> Any:
    """Save the target's weights as one plain model (the adapter merged in, in the base's
    own precision, on the CPU; or the whole weights) with its tokenizer into ``folder``.
    Returns the tokenizer; the weights are not kept in memory."""
    from tunelab.infer.load import load

    loaded = load([target], log=lambda _: None, for_merge=True)
    model = loaded.whole[target.label] if target.full else loaded.base.merge_and_unload()
    model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return loaded.tokenizer


def merge(run_dir: str | Path, output: str | Path, checkpoint: str | None = None) -> Path:
    """Save base + adapter as one standard model directory at ``output``; returns it."""
    from tunelab.infer.load import resolve_target

    target, out = resolve_target(run_dir, checkpoint), Path(output)
    if target.full:
        raise TunelabError(
            f"{target.label} holds whole fine-tuned weights, not an adapter: nothing to merge",
            "load that directory as it is, with AutoModelForCausalLM.from_pretrained",
        )
    check_output(out)
    check_mergeable(target)
    with staged_directory(out.resolve()) as staging:
        write_merged(target, staging)
    return out
