"""The measuring probe every contender runs under, so all are timed and counted alike.

``install()`` wraps ``transformers.Trainer.train``: each trainer gets a callback that
records the wall-clock time of every optimizer step, the non-padding input tokens of every
micro-batch (the sum of ``attention_mask``; all ``input_ids`` where a batch has no mask),
the logged losses and the batch settings, and writes them as JSON to ``$BENCH_PROBE`` when
training ends. ``$BENCH_T0`` is the wall-clock time at which the harness started the
process, so the time to the first step counts imports, model loading and data preparation.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import time
from typing import Any


def _tokens(inputs: Any) -> int:
    mask = inputs.get("attention_mask") if hasattr(inputs, "get") else None
    if mask is not None and getattr(mask, "dim", lambda: 0)() == 2:
        return int(mask.sum())
    ids = inputs["input_ids"]
    return int(ids.numel())


def install() -> None:
    from transformers import Trainer, TrainerCallback

    t0 = float(os.environ.get("BENCH_T0") or time.time())
    out = os.environ["BENCH_PROBE"]

    class Probe(TrainerCallback):
        def __init__(self) -> None:
            self.tokens = 0
            self.steps: list[tuple[float, int]] = []  # (seconds since t0, tokens so far)
            self.losses: list[float] = []
            self.train_begin: float | None = None
            self.trainer: Any = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.train_begin = time.time() - t0

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append((time.time() - t0, self.tokens))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and "train_loss" not in logs:
                self.losses.append(float(logs["loss"]))

        def on_train_end(self, args, state, control, model=None, **kwargs):
            params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            record = {
                "train_begin_s": self.train_begin,
                "train_end_s": time.time() - t0,
                "steps": self.steps,
                "tokens": self.tokens,
                "losses": self.losses,
                "micro_batch_size": args.per_device_train_batch_size,
                "gradient_accumulation_steps": args.gradient_accumulation_steps,
                "learning_rate": args.learning_rate,
                "gradient_checkpointing": bool(args.gradient_checkpointing),
                "bf16": bool(args.bf16),
                "base_parameters": params,
                "trainable_parameters": trainable,
                "peak_rss_self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
            with open(out, "w") as f:
                json.dump(record, f)

    original = Trainer.train

    @functools.wraps(original)
    def train(self, *args, **kwargs):
        probe = Probe()
        self.add_callback(probe)
        step = self.training_step

        def training_step(model, inputs, *more, **named):
            probe.tokens += _tokens(inputs)
            return step(model, inputs, *more, **named)

        self.training_step = training_step
        return original(self, *args, **kwargs)

    Trainer.train = train
