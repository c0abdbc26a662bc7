"""The measuring probe every contender runs under, so all are timed and counted alike.

``install()`` wraps ``transformers.Trainer.train``: each trainer gets a callback that
records the wall-clock time of every optimizer step, the non-padding input tokens of every
micro-batch (the sum of ``attention_mask``; all ``input_ids`` where a batch has no mask),
the logged losses and the batch settings, and when training ends the loss of the trained
model on held-out examples (``$BENCH_HELDOUT``, tokenized alike for every contender), and
writes them as JSON to ``$BENCH_PROBE``. ``$BENCH_T0`` is the wall-clock time at which the
harness started the process, so the time to the first step counts imports, model loading
and data preparation.
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


def user_text(row: dict[str, str]) -> str:
    """The user turn, joined as tunelab's alpaca format joins it."""
    return "\n\n".join(p for p in (row["instruction"], row.get("input", "")) if p.strip())


def encode(tokenizer: Any, row: dict[str, str], sequence_len: int) -> dict[str, list[int]]:
    """An alpaca row as one user and one assistant turn in the chat template, the prompt
    masked out of the labels."""
    prompt = [{"role": "user", "content": user_text(row)}]
    whole = [*prompt, {"role": "assistant", "content": row["output"]}]
    head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    text = tokenizer.apply_chat_template(whole, tokenize=False)
    assert text.startswith(head)
    ids_head = tokenizer(head, add_special_tokens=False)["input_ids"]
    ids_tail = tokenizer(text[len(head) :], add_special_tokens=False)["input_ids"]
    ids = (ids_head + ids_tail)[:sequence_len]
    labels = ([-100] * len(ids_head) + ids_tail)[:sequence_len]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def heldout_loss(model: Any) -> float | None:
    """The mean per-example loss of ``model`` (as it is after training, in eval mode, no
    autocast) on the held-out rows of ``$BENCH_HELDOUT``; None without them."""
    path = os.environ.get("BENCH_HELDOUT")
    if not path:
        return None
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(os.environ["BENCH_MODEL"])
    length = int(os.environ["BENCH_SEQUENCE_LEN"])
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    losses = []
    with torch.no_grad():
        for row in rows:
            item = encode(tokenizer, row, length)
            ids = torch.tensor([item["input_ids"]], device=device)
            labels = torch.tensor([item["labels"]], device=device)
            losses.append(float(model(input_ids=ids, labels=labels).loss))
    model.train(was_training)
    return sum(losses) / len(losses)


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
                "heldout_loss": heldout_loss(model),
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
