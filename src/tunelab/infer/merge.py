"""`tunelab merge`: fold a run's LoRA adapter into its base model's weights."""

from __future__ import annotations

from pathlib import Path

from tunelab.errors import RunDirError, TunelabError
from tunelab.files import staged_directory
from tunelab.train.rundir import RunLayout, read_json


def merge(run_dir: str | Path, output: str | Path) -> Path:
    """Save base + adapter as one standard model directory at ``output``; returns it."""
    layout, target = RunLayout(Path(run_dir)), Path(output)
    if not layout.adapter_config.exists():
        raise TunelabError(
            f"{run_dir}: no adapter to merge (adapter_config.json is missing)",
            "give the output_dir of a finished LoRA run",
        )
    if target.exists() and any(target.iterdir()):
        raise RunDirError(f"{target} already exists and is not empty", "choose a new --output")
    base = read_json(layout.adapter_config).get("base_model_name_or_path", "")
    if base and "quantization_config" in read_json(Path(base) / "config.json"):
        raise TunelabError(
            f"the adapter's base model {base} is quantized: merging into it would bake the "
            "quantization error into every weight",
            "merge into the full-precision version of the base model",
        )
    from tunelab.infer.generate import load_run

    model, tokenizer = load_run(layout.root)
    merged = model.merge_and_unload()
    with staged_directory(target.resolve()) as staging:
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return target
