"""Resuming a run: which checkpoint, and whether it still belongs to this run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunelab.config import TuneConfig
from tunelab.errors import RunDirError
from tunelab.rundir import (
    MARKER,
    RunLayout,
    checkpoint_step,
    complete_checkpoints,
    read_json,
    read_status,
)
from tunelab.rundir.checkpoints import COPY_RECORD, numbered_checkpoints
from tunelab.train.checkpoints import copy_adapter

FIX = "train into a new --output, or pass --overwrite to start again"
CHANGED = (
    "resume with the run's own settings (`tunelab train <run>/config.yaml --resume`), or "
    "start a new run: another --output, or --overwrite"
)

RUN_KEYS = (
    "seed", "val_set_size", "max_examples", "sequence_len", "chat_template", "train_on_inputs",
    "sample_packing", "excess_length_strategy", "dataset_exact_deduplication",
    "gradient_accumulation_steps", "circular", "max_circular_epochs", "group_by_length",
    "special_tokens", "tokens", "unfrozen_parameters", "reinit_weights",
    "resize_token_embeddings_to_32x", "overrides_of_model_config", "model_quantization_config",
    "model_quantization_config_kwargs", "scaling_softmax", "scaling_softmax_factor",
    "scaling_softmax_bias",
)  # fmt: skip
# The optimizer and the learning-rate schedule are restored from the checkpoint as they
# were, so a resumed run cannot take other values for these: they are refused, not ignored.
SCHEDULE_KEYS = (
    "lr_scheduler", "warmup_steps", "warmup_ratio", "optimizer", "weight_decay",
    "max_grad_norm", "max_steps", "num_epochs", "lr_scheduler_kwargs", "cosine_min_lr_ratio",
    "adam_beta1", "adam_beta2", "adam_epsilon",
)  # fmt: skip


def fingerprint(config: TuneConfig, sources: list[Any], batch: int) -> dict[str, Any]:
    """What a checkpoint depends on: base model, adapter shape, data and its order, and the
    training schedule."""
    shape = {} if config.adapter == "full" else {
        "lora_r": config.lora_r,
        "lora_alpha": config.lora_alpha_value,
        "lora_target_modules": config.lora_targets,
        "lora_modules_to_save": config.lora_modules_to_save,
        "peft_use_dora": config.peft_use_dora,
        "peft_use_rslora": config.peft_use_rslora,
    }  # fmt: skip
    return {
        "base_model": config.base_model,
        "adapter": config.adapter,
        **shape,
        **{key: getattr(config, key) for key in RUN_KEYS},
        "learning_rate": config.learning_rate_value,
        **{key: getattr(config, key) for key in SCHEDULE_KEYS},
        "micro_batch_size": batch,
        "data": {s.path: s.sha256 for s in sources},
    }


def _differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    out = []
    for key in sorted(set(stored) | set(current)):
        if key == "data" or key not in stored:  # runs from older versions record fewer keys
            continue
        if stored.get(key) != current.get(key):
            out.append(f"{key} was {stored.get(key)!r}, now {current.get(key)!r}")
    before, now = stored.get("data", {}), current.get("data", {})
    for path in sorted(set(before) | set(now)):
        if path not in now:
            out.append(f"data file {path} is no longer used")
        elif path not in before:
            out.append(f"data file {path} is new")
        elif before[path] != now[path]:
            out.append(f"data file {path} has changed")
    return out


def check_resumable(layout: RunLayout) -> None:
    """The run directory holds a run that can be continued."""
    if not layout.status.is_file():
        raise RunDirError(f"{layout.root}: no tunelab run to resume here", "train without --resume")
    status = read_status(layout.status)
    if status.state == "completed":
        raise RunDirError(f"{layout.root}: this run has finished; there is nothing to resume", FIX)


def resume_point(layout: RunLayout, current: dict[str, Any], resume_from: str | None) -> Path:
    """The checkpoint to continue from, after checking that data, model and rank are the same."""
    stored = read_status(layout.status).fingerprint
    changes = _differences(stored, current)
    if changes:
        raise RunDirError(f"cannot resume {layout.root}: " + "; ".join(changes), CHANGED)
    if resume_from:
        path = Path(resume_from).expanduser()
        if not (path / MARKER).is_file():
            raise RunDirError(
                f"{resume_from}: not a complete tunelab checkpoint (no {MARKER})",
                "give a checkpoints/checkpoint-N folder, or use --resume for the latest one",
            )
        return path
    found = complete_checkpoints(layout.checkpoints)
    if not found:
        raise RunDirError(
            f"{layout.root}: no complete checkpoint to resume from",
            "set save_steps or saves_per_epoch so that runs leave checkpoints",
        )
    return found[-1]


def truncate_metrics(layout: RunLayout, step: int) -> None:
    """Forget logged steps after ``step``: the resumed run logs them again."""
    from tunelab.files import write_atomic

    if not layout.metrics.exists():
        return
    kept = []
    for line in layout.metrics.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the last line of a killed run, half written
            continue
        if record["step"] <= step:
            kept.append(line)
    write_atomic(layout.metrics, "".join(line + "\n" for line in kept))


def resumed_tokens(point: Path | None) -> int:
    """Input tokens the run had seen when ``point`` was saved (0 for a new run)."""
    if point is None:
        return 0
    return read_json(point / "trainer_state.json").get("num_input_tokens_seen", 0)


def restore_finished(trainer: Any, point: Path) -> None:
    """Take the state and weights of a checkpoint saved after the last step (the run stopped
    while finishing): the best checkpoint's weights where the run keeps the best."""
    from transformers import TrainerState

    trainer.state = TrainerState.load_from_json(str(point / "trainer_state.json"))
    best = trainer.state.best_model_checkpoint
    use_best = trainer.args.load_best_model_at_end and best and (Path(best) / MARKER).is_file()
    # the Trainer's own loader: adapters, whole and sharded models, as `train` would load them
    trainer._load_from_checkpoint(str(best if use_best else point))


def forget_after(layout: RunLayout, step: int) -> list[str]:
    """Resuming from ``step`` discards what came after it: later checkpoints (which would
    otherwise keep their completeness marker while the resumed run rewrites them), and the
    ``last``/``best`` copies taken from them. Returns what was removed."""
    import shutil

    removed = []
    for number, path in numbered_checkpoints(layout.checkpoints):
        if number > step:
            shutil.rmtree(path)
            removed.append(path.name)
    for name in ("last", "best"):
        copy = layout.checkpoints / name
        if read_json(copy / COPY_RECORD).get("step", 0) > step:
            shutil.rmtree(copy)
            removed.append(name)
    if "best" in removed:  # the best of what is left is the best again
        marked = [(read_json(p / MARKER), p) for p in complete_checkpoints(layout.checkpoints)]
        scored = [(r["eval_loss"], r, p) for r, p in marked if r.get("eval_loss") is not None]
        if scored:
            _, record, path = min(scored, key=lambda item: item[0])
            copy_adapter(path, layout.checkpoints / "best", record)
    return removed


__all__ = [
    "check_resumable", "checkpoint_step", "fingerprint", "forget_after", "restore_finished",
    "resume_point", "resumed_tokens", "truncate_metrics",
]  # fmt: skip
