"""One contender's training run, in a process of its own: ``python benchmarks/child.py NAME
SPEC``. The harness (run.py) starts it with ``$BENCH_T0`` and ``$BENCH_PROBE`` set; the
probe (probe.py) measures whichever trainer the contender builds.

- ``tunelab``: ``tunelab train CONFIG --output DIR`` (the same as ``python -m tunelab``).
- ``trl``: TRL's ``SFTTrainer`` as its quick start builds it, with a LoRA ``peft_config``.
- ``plain``: transformers' ``Trainer`` + peft, each batch padded to its longest sample.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import probe  # noqa: E402


def read_rows(path: str) -> list[dict[str, str]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def lora_config(spec: dict[str, Any]) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=spec["lora_r"], lora_alpha=spec["lora_alpha"], lora_dropout=spec["lora_dropout"],
        target_modules="all-linear", task_type="CAUSAL_LM",
    )  # fmt: skip


def run_tunelab(spec: dict[str, Any]) -> int:
    from tunelab.cli import main

    return main(["train", spec["config"], "--output", spec["run_dir"]])


def run_trl(spec: dict[str, Any]) -> int:
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    rows = read_rows(spec["data"])
    dataset = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": probe.user_text(r)}],
                "completion": [{"role": "assistant", "content": r["output"]}],
            }
            for r in rows
        ]
    )
    args = SFTConfig(
        **same_work(spec),
        max_length=spec["sequence_len"],
        # TRL's default bf16=True stops on a CPU with "You need to assign use_cpu if you want
        # to train the model on CPU": done as it says, which keeps TRL's bf16 default
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = SFTTrainer(
        model=spec["model"], args=args, train_dataset=dataset, peft_config=lora_config(spec)
    )
    trainer.train()
    return 0


def same_work(spec: dict[str, Any]) -> dict[str, Any]:
    """The training arguments every contender gets alike: batch, one epoch, learning rate,
    seed; a log line per step; no checkpoints, no reporting."""
    return {
        "output_dir": spec["run_dir"],
        "per_device_train_batch_size": spec["micro_batch_size"],
        "gradient_accumulation_steps": spec["gradient_accumulation_steps"],
        "num_train_epochs": 1,
        "learning_rate": spec["learning_rate"],
        "logging_steps": 1,
        "seed": spec["seed"],
        "save_strategy": "no",
        "report_to": "none",
    }


def run_plain(spec: dict[str, Any]) -> int:
    import torch
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    dataset = Dataset.from_list(read_rows(spec["data"])).map(
        lambda row: probe.encode(tokenizer, row, spec["sequence_len"]),
        remove_columns=["instruction", "input", "output"],
    )
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    model = get_peft_model(model, lora_config(spec))
    args = TrainingArguments(**same_work(spec))
    collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
    Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator).train()
    return 0


CONTENDERS = {"tunelab": run_tunelab, "trl": run_trl, "plain": run_plain}


def main(argv: list[str]) -> int:
    name, spec_path = argv
    spec = json.loads(Path(spec_path).read_text())
    probe.install()
    return CONTENDERS[name](spec)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
