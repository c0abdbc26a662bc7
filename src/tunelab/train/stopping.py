"""Rules that end a run early, each saying why, and the status line shown at evaluations.

- **nan**: a NaN or infinite loss or gradient norm ends the run as failed at once.
- **exploding**, **vanishing**, **frozen**, **diverged**: a run that diverged or died
  (below) ends as failed, like a NaN.
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
turns every rule off except **nan** and the four divergence rules: a dead run is a
failure however long it was asked to train (mode non-stop would otherwise run forever).

The divergence rules read the Trainer's logs (``loss`` is the mean over the logging
interval, ``grad_norm`` the norm before clipping at the interval's last step). Their
limits (:class:`Divergence`) are fixed and well away from what healthy runs show:

- **exploding**: the gradient norm more than 100x its running median (of the last 20
  healthy logs, after 3 logs) for 3 logs in a row. Healthy runs spike to a few hundred
  times now and then, for one log, and clipping handles that; a run whose gradient stays
  that far up has diverged.
- **vanishing**: the gradient norm exactly 0, or below 1/10,000 of its running median,
  for 3 logs in a row while the training loss is above the perfect threshold. A live
  model with loss left to lose always has a gradient (LoRA's B starts at zero, but its
  gradient does not); one that fell ten-thousandfold in one log has saturated.
- **frozen**: the training loss the same to 1e-6 (relative) for 8 logs in a row, above
  the perfect threshold, at a learning rate of at least 1/100 of its peak (so not in
  warm-up or at the end of the schedule): the weights no longer change the output.
  Different batches give different losses however small the learning rate, and even
  the same batch every step moves by more than that at any real learning rate.
- **diverged**: the training loss above 3x its starting level (the median of the first
  3 logs, counted as at least 1.0 so that a low start is not a hair trigger) for 3 logs
  in a row.

An evaluation-based stop (early stopping, overfitting, perplexity) is not "keeping the
best weights" when the model is dead: if the validation losses it compares are frozen, or
the latest log already shows vanishing gradients or a diverged loss, the run fails.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from transformers import TrainerCallback

TEXT_FORMATS = frozenset({"text", "raw", "completion", "chunked_text", "pretrain"})


@dataclass(frozen=True)
class Divergence:
    """Limits of the rules that fail a diverged or dead run (see the module docstring)."""

    explode: float = 100.0  # a gradient norm this many times its running median explodes
    vanish: float = 1e-4  # one below this share of it (or exactly 0) has vanished
    history: int = 20  # the running median is over this many of the latest healthy norms
    frozen: float = 1e-6  # losses within this share of each other have not changed
    frozen_logs: int = 8  # logs of unchanged loss that fail the run
    frozen_lr: float = 0.01  # ... counted only at a learning rate of this share of its peak
    loss_factor: float = 3.0  # a loss this many times the starting level has diverged
    loss_floor: float = 1.0  # the starting level counts as at least this
    first_logs: int = 3  # logs that set the starting level and the first running median
    patience: int = 3  # logs in a row that exploding, vanishing and diverged need


@dataclass(frozen=True)
class Thresholds:
    task: str
    patience: int
    overfitting: float
    perfect: float
    watchdog: float | None
    watchdog_patience: int
    enabled: bool  # False with force_epochs: only the NaN and divergence stops stay
    early: bool = True  # early stopping and overfitting (off in circular training)
    divergence: Divergence = Divergence()  # always on, like the NaN stop


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


def _frozen(values: list[float], share: float) -> bool:
    """Whether ``values`` are all the same, to ``share`` of their size."""
    return max(values) - min(values) <= share * max(abs(v) for v in values)


class DivergenceWatch:
    """Follows the training loss and gradient norm, log by log, for the signs of a run that
    diverged or died; :meth:`observe` returns the reason to fail once a sign has lasted."""

    def __init__(self, limits: Divergence, perfect: float) -> None:
        self.limits = limits
        self.perfect = perfect  # at or below it a model may rightly have nothing left to learn
        self.norms: deque[float] = deque(maxlen=limits.history)  # healthy norms only
        self.first_losses: list[float] = []
        self.losses: deque[tuple[int, float]] = deque(maxlen=limits.frozen_logs)
        self.peak_lr = 0.0
        self.moving = True  # whether the learning rate is high enough for the loss to move
        self.signs: dict[str, str] = {}  # sign -> what the latest log showed
        self.since: dict[str, int] = {}  # sign -> the step it was first seen, in this streak
        self.counts: dict[str, int] = {}  # sign -> logs in a row
        self.peak_norm: tuple[float, int] | None = None  # the largest gradient norm, its step

    def observe(
        self, step: int, loss: float, norm: float | None, lr: float | None = None,
        peak_lr: float = 0.0,
    ) -> str | None:  # fmt: skip
        """Take one training log; the reason to fail the run, or None. ``peak_lr`` is the
        schedule's peak (the configured rate), so that warm-up counts as a low rate."""
        self.peak_lr = max(self.peak_lr, peak_lr)
        self.signs = self._norm_signs(norm, loss) | self._loss_signs(step, loss, lr)
        for sign in ("exploding", "vanishing", "diverged"):
            if sign in self.signs:
                self.since.setdefault(sign, step)
                self.counts[sign] = self.counts.get(sign, 0) + 1
            else:
                self.since.pop(sign, None)
                self.counts.pop(sign, None)
        if norm is not None and (self.peak_norm is None or norm > self.peak_norm[0]):
            self.peak_norm = (norm, step)
        if "frozen" in self.signs:
            return self._reason("frozen", self.losses[0][0], step, len(self.losses))
        for sign, count in self.counts.items():
            if count >= self.limits.patience:
                return self._reason(sign, self.since[sign], step, count)
        return None

    def pending(self, step: int) -> str | None:
        """The reason to fail, if the latest log shows a dead model though not yet for long."""
        for sign in ("vanishing", "diverged"):
            if sign in self.counts:
                return self._reason(sign, self.since[sign], step, self.counts[sign])
        return None

    def _norm_signs(self, norm: float | None, loss: float) -> dict[str, str]:
        if norm is None:
            return {}
        limits = self.limits
        level = statistics.median(self.norms) if self.norms else None
        if loss > self.perfect and (norm == 0.0 or (level and norm < limits.vanish * level)):
            below = "0" if norm == 0.0 else f"below {limits.vanish:g} of its median {level:.3g}"
            return {"vanishing": f"the gradient norm was {below}, the loss still {loss:.4f}"}
        if level and len(self.norms) >= limits.first_logs and norm > limits.explode * level:
            return {
                "exploding": f"the gradient norm was over {limits.explode:g}x its median "
                f"{level:.3g} (now {norm:.3g})"
            }
        self.norms.append(norm)  # only healthy norms, so that a streak keeps its yardstick
        return {}

    def _loss_signs(self, step: int, loss: float, lr: float | None) -> dict[str, str]:
        limits, signs = self.limits, {}
        self.peak_lr = max(self.peak_lr, lr or 0.0)
        self.moving = lr is None or lr >= limits.frozen_lr * self.peak_lr
        if self.moving:
            self.losses.append((step, loss))
        else:
            self.losses.clear()  # in warm-up or at the end of the schedule a still loss is fine
        values = [value for _, value in self.losses]
        if loss > self.perfect and len(values) == limits.frozen_logs:
            if _frozen(values, limits.frozen):
                signs["frozen"] = f"the training loss stayed at {loss:.4f}"
        if len(self.first_losses) < limits.first_logs:
            self.first_losses.append(loss)
            return signs
        start = max(statistics.median(self.first_losses), limits.loss_floor)
        if loss > limits.loss_factor * start:
            signs["diverged"] = (
                f"the training loss was over {limits.loss_factor:g}x its starting level "
                f"{start:.4f} (now {loss:.4f})"
            )
        return signs

    def _reason(self, sign: str, since: int, step: int, count: int) -> str:
        logs = f"{count} log{'s' if count > 1 else ''}"
        where = f"at step {step}" if since == step else f"from step {since} to {step}"
        reason = f"{sign}: {self.signs[sign]}, {logs} in a row {where}"
        if sign != "exploding" and self.peak_norm is not None:
            norm, at = self.peak_norm
            reason += f" (the gradient norm peaked at {norm:.3g} at step {at})"
        return reason


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
        self.eval_losses: list[float] = []
        self.watch = DivergenceWatch(rules.divergence, rules.perfect)
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
        dead = self.watch.observe(
            state.global_step, loss, norm, logs.get("learning_rate"), args.learning_rate
        )
        if dead:
            self._stop(control, dead, True)
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
        self.eval_losses.append(loss)
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
        early = None  # the reason to stop early and keep the best weights
        if loss <= rules.perfect:
            self._stop(control, f"perfect: validation loss {loss:.4f} <= {rules.perfect}")
        elif rules.task == "text" and perplexity > 100 and self.was_sane_perplexity:
            early = f"perplexity: validation perplexity rose to {perplexity:.1f}"
        elif rules.early and left <= 0 and gap is not None and gap > rules.overfitting:
            early = (
                f"overfitting: validation loss {loss:.4f} is {gap:.0%} above training loss "
                f"(threshold {rules.overfitting:.0%}) and has not improved for "
                f"{self.bad_evals} evaluations"
            )
        elif rules.early and left <= 0:
            early = (
                f"early stopping: validation loss has not improved for {self.bad_evals} "
                f"evaluations (best {self.best:.4f})"
            )
        if early:  # the best weights of a dead model are no result: the run fails instead
            dead = self._dead_model(loss, state.global_step)
            self._stop(control, dead or early, failed=dead is not None)
        self.was_sane_perplexity = self.was_sane_perplexity or perplexity <= 100

    def _dead_model(self, loss: float, step: int) -> str | None:
        """Why a run about to stop early is dead instead: the validation losses it compares
        (the best and those since, at least 3) are frozen at a real learning rate, or the
        latest log shows a dead model."""
        compared = self.eval_losses[-max(self.bad_evals + 1, 3) :]
        frozen = len(compared) >= 3 and _frozen(compared, self.rules.divergence.frozen)
        if frozen and self.watch.moving:
            return (
                f"frozen: the validation loss stayed at {loss:.4f} for {len(compared)} "
                f"evaluations in a row, up to step {step}"
            )
        return self.watch.pending(step)

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
