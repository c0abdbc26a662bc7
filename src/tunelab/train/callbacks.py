"""Trainer callbacks: throughput, the metrics file and status, the console progress bar.

They are passed to the trainer in this order, so that the throughput figure added to
each log reaches TensorBoard, the metrics file and the console alike.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm
from transformers import TrainerCallback

from tunelab.rundir import METRIC_KEYS, StatusFile, append_metrics


class ThroughputCallback(TrainerCallback):
    """Adds ``tokens_per_second`` (non-padding input tokens) to every training log."""

    def __init__(self) -> None:
        self._last: tuple[float, int] | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = (time.perf_counter(), state.num_input_tokens_seen)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or self._last is None:
            return
        now, seen = time.perf_counter(), state.num_input_tokens_seen
        then, before = self._last
        if now > then:
            logs["tokens_per_second"] = round((seen - before) / (now - then), 1)
        self._last = (now, seen)


class MetricsFileCallback(TrainerCallback):
    """Appends one JSON object per logged step or evaluation to ``metrics.jsonl``, and
    keeps the step, epoch and latest loss in ``status.json`` current.

    Progress in the status is for watchers: a write of it that fails (a full disk, a
    permission changed) is said once through ``warn`` (the run's log) and training goes on.
    """

    def __init__(
        self, path: Path, status: StatusFile | None = None,
        warn: Callable[[str], None] = lambda line: None,
    ) -> None:  # fmt: skip
        self.path = path
        self.status = status
        self.warn = warn
        self.warned = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or not ("loss" in logs or "eval_loss" in logs):
            return
        epoch = round(state.epoch or 0.0, 4)
        record = {"step": state.global_step, "epoch": epoch}
        record.update({k: logs[k] for k in METRIC_KEYS if k in logs})
        append_metrics(self.path, record)
        if self.status is not None:
            loss = logs.get("loss", self.status.current.last_loss)
            try:
                self.status.update(step=state.global_step, epoch=epoch, last_loss=loss)
            except Exception as exc:  # noqa: BLE001 - never stop training for it
                if not self.warned:
                    self.warned = True
                    self.warn(
                        f"warning: could not write the progress to {self.status.path} "
                        f"({type(exc).__name__}: {exc}); training goes on"
                    )


def _fmt(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4f}" if abs(value) >= 1e-3 else f"{value:.2e}"


class ConsoleProgressCallback(TrainerCallback):
    """A progress bar with step/total, ETA, loss, learning rate and tokens per second.

    On a terminal the bar redraws in place; otherwise (logs, CI) each log is one line.
    ``echo`` receives every line for the run's log file.
    """

    def __init__(self, echo: Callable[[str], None], quiet: bool = False, stream=None) -> None:
        self.echo = echo
        self.stream = stream or sys.stderr
        self.bar: tqdm | None = None
        self.quiet = quiet
        self.interactive = self.stream.isatty() and not quiet

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = (time.perf_counter(), state.global_step)
        self.bar = tqdm(
            total=state.max_steps,
            initial=state.global_step,
            desc="training",
            unit="step",
            file=self.stream,
            disable=not self.interactive,
            dynamic_ncols=True,
        )

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or self.bar is None:
            return
        if "loss" in logs:
            parts = {"loss": _fmt(logs["loss"]), "lr": _fmt(logs.get("learning_rate", 0.0))}
            if "tokens_per_second" in logs:
                parts["tok/s"] = f"{logs['tokens_per_second']:.0f}"
            self.bar.set_postfix(parts, refresh=True)
            line = self._line(state, parts)
        else:
            return  # evaluations are reported by the stopping rules' status line
        if not self.interactive and not self.quiet:
            print(line, file=self.stream, flush=True)
        self.echo(line)

    def say(self, line: str) -> None:
        """Print a line above the bar (or as a line of its own) and keep it for the log."""
        if self.bar is not None and self.interactive:
            self.bar.write(line, file=self.stream)
        elif not self.quiet:
            print(line, file=self.stream, flush=True)
        self.echo(line)

    def _line(self, state, parts: dict[str, str]) -> str:
        started, first_step = self._start
        done = max(state.global_step - first_step, 1)
        left = (state.max_steps - state.global_step) * (time.perf_counter() - started) / done
        eta = time.strftime("%H:%M:%S", time.gmtime(left))
        fields = " ".join(f"{k} {v}" for k, v in parts.items())
        return f"step {state.global_step}/{state.max_steps} {fields} eta {eta}"

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()


class PlotCallback(TrainerCallback):
    """Redraws training_history.png after every evaluation."""

    def __init__(self, metrics: Path, plot: Path) -> None:
        self.metrics, self.plot = metrics, plot

    def on_evaluate(self, args, state, control, **kwargs):
        from tunelab.rundir import read_metrics
        from tunelab.train.artifacts import plot_history

        plot_history(read_metrics(self.metrics), self.plot)
