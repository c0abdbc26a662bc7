"""Rules that end a run early, each saying why, and the status line shown at evaluations.

- **nan**: a NaN or infinite loss or gradient norm ends the run as failed at once.
- **watchdog**: training loss above ``loss_watchdog_threshold`` for
  ``loss_watchdog_patience`` logs in a row ends the run as failed.
- **early stopping**: validation loss not improving for ``early_stopping_patience``
  evaluations in a row.
- **overfitting**: validation loss above training loss by more than
  ``overfitting_threshold`` (a share of the training loss) while it is not improving,
  for the same patience.
- **perfect**: validation loss (training loss without validation) at or below the
  task's perfect-loss threshold.
- **perplexity**: on text tasks, validation perplexity above 100 after having been
  below it.

Thresholds follow the task: instruction-style data (conversations, QA) expects low
losses; text-style data (text, raw, completion) tolerates higher ones. ``force_epochs``
turns every rule off except **nan**.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from transformers import TrainerCallback

TEXT_FORMATS = frozenset({"text", "raw", "completion"})


@dataclass(frozen=True)
class Thresholds:
    task: str
    patience: int
    overfitting: float
    perfect: float
    watchdog: float | None
    watchdog_patience: int
    enabled: bool  # False with force_epochs: only the NaN stop stays
    early: bool = True  # early stopping and overfitting (off in circular training)


def thresholds(config: Any, formats: list[str]) -> Thresholds:
    """The rules for a run: the config's values, else the task's defaults."""
    text = bool(formats) and all(f in TEXT_FORMATS for f in formats)
    return Thresholds(
        task="text" if text else "instruction",
        patience=config.early_stopping_patience or (5 if text else 3),
        overfitting=config.overfitting_threshold or (0.2 if text else 0.1),
        perfect=0.5 if text else 0.01,
        watchdog=config.loss_watchdog_threshold,
        watchdog_patience=config.loss_watchdog_patience,
        enabled=not config.force_epochs,
        early=not config.circular,
    )


def _bad(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


class StoppingRules(TrainerCallback):
    """Applies the rules; ``reason`` says which fired and ``failed`` whether it is an error."""

    def __init__(self, rules: Thresholds, say) -> None:
        self.rules = rules
        self.say = say
        self.reason: str | None = None
        self.failed = False
        self.train_loss: float | None = None
        self.best: float | None = None
        self.bad_evals = 0
        self.high_losses = 0
        self.evals = 0
        self.was_sane_perplexity = False
        self.started = time.perf_counter()

    def _stop(self, control, reason: str, failed: bool = False) -> None:
        if self.reason is None:
            self.reason, self.failed = reason, failed
        control.should_training_stop = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        loss, norm = logs["loss"], logs.get("grad_norm")
        if _bad(loss) or _bad(norm):
            what = "loss" if _bad(loss) else "gradient norm"
            value = loss if _bad(loss) else norm
            self._stop(control, f"nan: the {what} became {value} at step {state.global_step}", True)
            return
        self.train_loss = loss
        rules = self.rules
        if rules.enabled and rules.watchdog is not None:
            self.high_losses = self.high_losses + 1 if loss > rules.watchdog else 0
            if self.high_losses >= rules.watchdog_patience:
                self._stop(
                    control,
                    f"watchdog: training loss above {rules.watchdog} for "
                    f"{self.high_losses} logs in a row (now {loss:.4f})",
                    True,
                )
        if rules.enabled and args.eval_strategy == "no" and loss <= rules.perfect:
            self._stop(control, f"perfect: training loss {loss:.4f} <= {rules.perfect}")

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not metrics or "eval_loss" not in metrics:
            return
        self.evals += 1
        loss = metrics["eval_loss"]
        if _bad(loss):
            self._stop(control, f"nan: the validation loss became {loss}", True)
            return
        improved = self.best is None or loss < self.best
        self.best = loss if improved else self.best
        self.bad_evals = 0 if improved else self.bad_evals + 1
        rules = self.rules
        gap = None
        if self.train_loss:
            gap = (loss - self.train_loss) / self.train_loss
        self.say(self.status_line(loss, gap))
        if not rules.enabled:
            return
        left = rules.patience - self.bad_evals
        perplexity = math.exp(min(loss, 50))
        if loss <= rules.perfect:
            self._stop(control, f"perfect: validation loss {loss:.4f} <= {rules.perfect}")
        elif rules.task == "text" and perplexity > 100 and self.was_sane_perplexity:
            self._stop(control, f"perplexity: validation perplexity rose to {perplexity:.1f}")
        elif not rules.early:
            pass
        elif left <= 0 and gap is not None and gap > rules.overfitting:
            self._stop(
                control,
                f"overfitting: validation loss {loss:.4f} is {gap:.0%} above training loss "
                f"(threshold {rules.overfitting:.0%}) and has not improved for "
                f"{self.bad_evals} evaluations",
            )
        elif left <= 0:
            self._stop(
                control,
                f"early stopping: validation loss has not improved for {self.bad_evals} "
                f"evaluations (best {self.best:.4f})",
            )
        self.was_sane_perplexity = self.was_sane_perplexity or perplexity <= 100

    def status_line(self, loss: float, gap: float | None) -> str:
        elapsed = time.strftime("%H:%M:%S", time.gmtime(time.perf_counter() - self.started))
        parts = [f"eval #{self.evals}", f"time {elapsed}"]
        if self.train_loss is not None:
            parts.append(f"train loss {self.train_loss:.4f}")
        parts.append(f"val loss {loss:.4f}")
        if self.rules.task == "text":
            parts.append(f"perplexity {math.exp(min(loss, 50)):.1f}")
        parts.append(f"best val {self.best:.4f}")
        if self.rules.enabled:
            parts.append(f"patience {max(self.rules.patience - self.bad_evals, 0)} left")
        return " | ".join(parts)
