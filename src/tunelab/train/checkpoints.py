"""Checkpoints that survive a crash, and the bookkeeping that makes them resumable.

The trainer writes ``checkpoints/checkpoint-N`` (weights, optimizer, scheduler, RNG and
data position). Once it has finished, :class:`CheckpointCallback` writes a completeness
marker into it, and refreshes ``checkpoints/last`` and (when the latest validation loss
is the best so far) ``checkpoints/best``: adapter-only copies that load like a run.
Resuming only ever considers checkpoints with the marker, so one cut short by a crash
is ignored and the previous one is used.
"""

from __future__ import annotations

import io
import json
import shutil
import signal
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from tunelab.files import staged_directory, write_atomic
from tunelab.rundir.checkpoints import COPY_RECORD, MARKER

ADAPTER_FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "model.safetensors",
    "config.json",
)


class CheckpointCallback(TrainerCallback):
    """Marks finished checkpoints and keeps ``last`` and ``best`` up to date."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.last_eval: tuple[int, float] | None = None  # (step, loss) of the latest evaluation
        previous = folder / "best" / COPY_RECORD  # a resumed run keeps its best
        self.best_eval = (
            json.loads(previous.read_text())["eval_loss"] if previous.exists() else None
        )

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics and "eval_loss" in metrics:
            self.last_eval = (state.global_step, metrics["eval_loss"])

    def on_save(self, args, state, control, **kwargs):
        path = self.folder / f"checkpoint-{state.global_step}"
        if not path.is_dir():
            return
        # only an evaluation of these very weights says how good they are
        evaluated = self.last_eval is not None and self.last_eval[0] == state.global_step
        current = self.last_eval[1] if evaluated else None
        record = {"step": state.global_step, "epoch": state.epoch, "eval_loss": current}
        write_atomic(path / MARKER, json.dumps(record))
        copy_adapter(path, self.folder / "last", record)
        if current is not None and (self.best_eval is None or current < self.best_eval):
            self.best_eval = current
            copy_adapter(path, self.folder / "best", record)


def copy_adapter(source: Path, target: Path, record: dict[str, Any]) -> None:
    with staged_directory(target) as staging:
        for name in ADAPTER_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, staging / name)
        (staging / COPY_RECORD).write_text(json.dumps(record), encoding="utf-8")


class StopOnSignal(TrainerCallback):
    """SIGINT or SIGTERM: save a checkpoint at the end of the current step and stop."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.step: int | None = None  # the last step finished, once training began
        self._previous: dict[int, Any] = {}

    @property
    def reason(self) -> str | None:
        """Why the run stopped, for its status: ``signal SIGTERM``; None without a signal."""
        if self.received is None:
            return None
        try:
            return f"signal {signal.Signals(self.received).name}"
        except ValueError:
            return f"signal {self.received}"

    def _handle(self, signum, frame) -> None:
        if self.received is not None:  # a second signal: stop now
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            raise KeyboardInterrupt
        self.received = signum

    def on_train_begin(self, args, state, control, **kwargs):
        self.step = state.global_step
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def on_step_end(self, args, state, control, **kwargs):
        self.step = state.global_step
        if self.received is not None:
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class EpochSeedCallback(TrainerCallback):
    """Seeds the global RNG at each epoch start from (seed, epoch).

    transformers' length-grouped sampler draws its order from the global RNG when the
    epoch starts; seeding it there makes that order the same in a resumed run, so a
    resumed run sees exactly the batches an uninterrupted one would.
    """

    def on_epoch_begin(self, args, state, control, **kwargs):
        import torch

        torch.manual_seed(args.seed + int(state.epoch or 0))

    def on_save(self, args, state, control, **kwargs):
        """A checkpoint at the end of an epoch: a run resumed from it starts the next epoch
        with the RNG state the checkpoint holds (transformers loads it after the epoch
        began), so that state must be the one this epoch's seed gives, not the state the
        last step left behind. Runs before the checkpoint is marked complete."""
        import torch

        epoch = state.epoch or 0.0
        rng_file = Path(args.output_dir) / f"checkpoint-{state.global_step}" / "rng_state.pth"
        if epoch != int(epoch) or not rng_file.is_file():
            return
        saved = torch.load(rng_file, weights_only=False)
        kept = torch.random.get_rng_state()
        kept_cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        torch.manual_seed(args.seed + int(epoch))
        saved["cpu"] = torch.random.get_rng_state()
        if "cuda" in saved and kept_cuda is not None:
            all_devices = isinstance(saved["cuda"], (list, tuple))
            saved["cuda"] = (
                torch.cuda.get_rng_state_all() if all_devices else (torch.cuda.get_rng_state())
            )
        torch.random.set_rng_state(kept)
        if kept_cuda is not None:
            torch.cuda.set_rng_state_all(kept_cuda)
        buffer = io.BytesIO()
        torch.save(saved, buffer)
        write_atomic(rng_file, buffer.getvalue())
