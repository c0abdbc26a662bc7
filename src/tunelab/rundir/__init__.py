"""The run directory: the one record of a run that training writes and everything else
reads (the CLI, and later a job queue and a web page). It imports no torch.

::

    <output_dir>/
      config.yaml                 resolved config (loads again with `tunelab train`)
      status.json                 the state of the run: see tunelab.rundir.status
      train.log                   what the console showed, as text
      metrics.jsonl               one JSON object per logged step or evaluation
      adapter_config.json         the LoRA adapter (peft.PeftModel.from_pretrained)
      adapter_model.safetensors
      model.safetensors, config.json   instead of the adapter, after full fine-tuning
      tokenizer.json, tokenizer_config.json, chat_template.jinja
      adapter_info.json           base model (and what training really read), data files and
                                  hashes, steps, losses, versions
      README.md                   model card: the base by an id others can load, data, losses
      training_history.png        loss curves
      logs/                       TensorBoard event files
      checkpoints/checkpoint-N/   intermediate checkpoints (with save_steps)
      checkpoints/last/, best/    adapter copies of the latest and the best checkpoint
      evaluations.csv             perplexity results (tunelab eval perplexity)

Files that must never be half-written are written beside their place, synced, and
renamed into it. `tunelab push` uploads all but checkpoints/, logs/, status.json,
train.log and wandb/ (:func:`files_to_push`).
"""

from tunelab.rundir.checkpoints import (
    MARKER,
    CheckpointIndex,
    checkpoint_index,
    checkpoint_step,
    complete_checkpoints,
    incomplete_checkpoints,
)
from tunelab.rundir.layout import (
    NOT_PUSHED,
    TOKENIZER_FILES,
    RunDir,
    RunLayout,
    check_output_dir,
    files_to_push,
    move_into,
    read_json,
    recover_swap,
    write_json,
)
from tunelab.rundir.metrics import (
    METRIC_KEYS,
    append_metrics,
    follow_metrics,
    read_metrics,
    whole_lines,
)
from tunelab.rundir.runs import describe_run, list_runs
from tunelab.rundir.status import (
    STATUS_VERSION,
    RunStatus,
    StatusFile,
    read_status,
    write_status,
)

__all__ = [
    "MARKER", "METRIC_KEYS", "NOT_PUSHED", "STATUS_VERSION", "TOKENIZER_FILES",
    "CheckpointIndex", "RunDir", "RunLayout", "RunStatus", "StatusFile", "append_metrics",
    "check_output_dir", "checkpoint_index", "checkpoint_step", "complete_checkpoints",
    "describe_run", "files_to_push", "follow_metrics", "incomplete_checkpoints", "list_runs",
    "move_into", "read_json", "read_metrics", "read_status", "recover_swap", "write_json",
    "whole_lines", "write_status",
]  # fmt: skip
