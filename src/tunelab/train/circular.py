"""Circular training: a small dataset is cycled many times with a growing batch size.

The whole schedule is laid out in advance as one pass over a list of batches (each a
list of sample indices) that the trainer reads in order: cycle ``c`` visits every
sample once, shuffled with ``seed + c``, in batches of ``base * 2 ** (c // 10)``
samples (the size doubles every 10 cycles, up to a quarter of the data and at most 64).
Validation runs at the end of every cycle, so the stopping rules (perfect loss above
all) can end it early; otherwise it ends when the cycles run out.
"""

from __future__ import annotations

import random
from typing import Any

DOUBLE_EVERY = 10
MAX_BATCH = 64


def batch_size(cycle: int, base: int, n: int) -> int:
    cap = max(base, min(MAX_BATCH, n // 4))
    return min(base * 2 ** (cycle // DOUBLE_EVERY), cap)


def schedule(n: int, base: int, cycles: int, seed: int) -> tuple[list[list[int]], list[int]]:
    """The batches of every cycle in order, and the step at which each cycle ends."""
    batches: list[list[int]] = []
    ends: list[int] = []
    for cycle in range(cycles):
        order = list(range(n))
        random.Random(seed + cycle).shuffle(order)
        size = batch_size(cycle, base, n)
        batches += [order[i : i + size] for i in range(0, n, size)]
        ends.append(len(batches))
    return batches, ends


class CycleCollator:
    """Turns one scheduled batch (sample indices) into a padded batch of those samples."""

    def __init__(self, samples: list[dict[str, Any]], pad: Any) -> None:
        self.samples, self.pad = samples, pad

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        if "members" not in items[0]:  # validation batches are ordinary samples
            return self.pad(items)
        return self.pad([self.samples[i] for item in items for i in item["members"]])


def cycle_end_callback(ends: list[int]):
    from transformers import TrainerCallback

    class EvaluateAtCycleEnds(TrainerCallback):
        """Validation (and the stopping rules) at the end of every cycle."""

        def __init__(self) -> None:
            self.ends = set(ends)

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in self.ends:
                control.should_evaluate = True

    return EvaluateAtCycleEnds()
