"""What a finished run leaves besides its weights: adapter_info.json and the loss plot."""

from __future__ import annotations

import io
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

LIBRARIES = ("tunelab", "torch", "transformers", "peft", "accelerate", "datasets", "safetensors")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def loss_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Final and best training and validation losses from the metrics records."""
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    summary: dict[str, Any] = {}
    if train:
        summary["final_loss"] = train[-1][1]
        summary["best_loss"] = min(loss for _, loss in train)
    if evals:
        summary["final_eval_loss"] = evals[-1][1]
        best = min(evals, key=lambda e: e[1])
        summary["best_eval_loss"], summary["best_eval_step"] = best[1], best[0]
    return summary


def plot_history(records: list[dict[str, Any]], path: Path) -> None:
    """Training and validation loss against step, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tunelab.files import write_atomic

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for key, label, style in (
        ("loss", "training loss", "-"),
        ("eval_loss", "validation loss", "o-"),
    ):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points, strict=True), style, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("tunelab training history")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(fig)
    write_atomic(path, buffer.getvalue())
