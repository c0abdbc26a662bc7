"""Build the pieces transformers and peft train with: the adapter and the Trainer."""

from __future__ import annotations

import math
from typing import Any

from tunelab.config.schema import TuneConfig
from tunelab.train.models import bnb_config
from tunelab.train.preflight import Plan
from tunelab.train.rundir import RunLayout
from tunelab.train.trackers import trackers


def torch_dtype(plan: Plan, config: TuneConfig) -> Any:
    """Weights dtype to load the base in: half precision only under a frozen LoRA base."""
    import torch

    if config.adapter != "full" and plan.precision == "bf16":
        return torch.bfloat16
    return torch.float32


def quantization(config: TuneConfig, plan: Plan) -> Any:
    """4-bit NF4 settings for QLoRA, 8-bit for load_in_8bit, else None."""
    if config.load_in_8bit and config.adapter == "lora":
        return bnb_config(8)
    if config.adapter != "qlora":
        return None
    import torch

    return bnb_config(4, torch.bfloat16 if plan.precision == "bf16" else torch.float16)


VISION_MODULES = r".*(vision_tower|vision_model|visual|multi_modal_projector|mm_projector).*"


def lora_settings(model: Any, config: TuneConfig) -> Any:
    """peft's LoraConfig for ``model``: the config's settings, or those of the adapter
    being continued (``lora_model_dir``)."""
    from peft import LoraConfig

    if config.lora_model_dir:  # saved for inference: its weights are to train on now
        saved = LoraConfig.from_pretrained(config.lora_model_dir)
        saved.inference_mode = False
        return saved
    vision = getattr(model.config, "vision_config", None) is not None
    return LoraConfig(
        # on an image-text model only the language part is adapted
        exclude_modules=VISION_MODULES if vision else None,
        r=config.lora_r,
        lora_alpha=config.lora_alpha_value,
        lora_dropout=config.lora_dropout,
        target_modules=config.lora_targets,
        task_type="CAUSAL_LM",
    )


def build_adapter(model: Any, config: TuneConfig, plan: Plan, weights: bool = True) -> Any:
    """Wrap ``model`` with a LoRA adapter (or leave it whole for full fine-tuning).

    ``weights=False`` only shapes the adapter (for a model on the meta device): a continued
    adapter's weights are not read and nothing is prepared for quantized training.
    """
    if config.adapter == "full":
        return model
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

    if weights and (config.adapter == "qlora" or config.load_in_8bit):
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=plan.gradient_checkpointing
        )
    if weights and config.lora_model_dir:  # continue a finished adapter, with a fresh optimizer
        return PeftModel.from_pretrained(model, config.lora_model_dir, is_trainable=True)
    return get_peft_model(model, lora_settings(model, config))


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def steps_per_epoch(config: TuneConfig, plan: Plan, n_train: int) -> int:
    batches = math.ceil(n_train / plan.micro_batch_size)
    return max(math.ceil(batches / config.gradient_accumulation_steps), 1)


def total_steps(config: TuneConfig, plan: Plan, n_train: int) -> int:
    """Optimizer updates the run will make (as the Trainer counts them)."""
    if config.circular:
        from tunelab.train.circular import batch_size

        cycles = range(config.max_circular_epochs)
        steps = sum(
            math.ceil(n_train / batch_size(c, plan.micro_batch_size, n_train)) for c in cycles
        )
        return min(steps, config.max_steps) if config.max_steps else steps
    if config.max_steps:
        return config.max_steps
    return math.ceil(config.num_epochs * steps_per_epoch(config, plan, n_train))


SCHEDULER_KWARGS = {
    "cosine_with_min_lr": {"min_lr_rate": 0.1},
    "reduce_lr_on_plateau": {"factor": 0.5, "patience": 1},
}


def training_arguments(
    config: TuneConfig, plan: Plan, layout: RunLayout, steps: int, per_epoch: int,
    has_eval: bool, images: bool = False,
) -> Any:  # fmt: skip
    from transformers import TrainingArguments

    # Defaults relative to the run's length use at most 3 epochs (or one, when shorter
    # than that), so that a non-stop run still logs, warms up and evaluates sensibly.
    epoch = min(per_epoch, steps)
    horizon = min(steps, 3 * per_epoch)
    if config.warmup_steps is not None:
        warmup: float = config.warmup_steps
    else:
        warmup = config.warmup_ratio if config.warmup_ratio is not None else int(0.03 * horizon)
    logging_steps = config.logging_steps or max(1, horizon // 50)
    eval_strategy, eval_steps = "no", config.eval_steps
    if has_eval and not eval_steps and config.evals_per_epoch:
        eval_steps = max(1, epoch // config.evals_per_epoch)
    if has_eval:
        eval_strategy = "steps" if eval_steps else "epoch"
    save_steps = config.save_steps
    if config.saves_per_epoch:
        save_steps = max(1, epoch // config.saves_per_epoch)
    # With validation and automatic stops, a checkpoint at every evaluation lets the run
    # end with the best weights, not the last ones.
    keep_best = has_eval and not config.force_epochs and save_steps is None
    save_strategy = "steps" if save_steps else "no"
    if keep_best:
        save_strategy, save_steps = eval_strategy, eval_steps
    if config.circular:  # one scheduled batch per step, read in order; see circular.py
        keep_best, eval_strategy, save_strategy = False, "no", "steps" if save_steps else "no"
    return TrainingArguments(
        output_dir=str(layout.checkpoints),
        per_device_train_batch_size=1 if config.circular else plan.micro_batch_size,
        per_device_eval_batch_size=plan.micro_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        train_sampling_strategy=(
            "sequential"
            if config.circular
            else "group_by_length"
            if config.group_by_length and not config.sample_packing
            else "random"
        ),
        num_train_epochs=config.num_epochs,
        max_steps=steps if config.circular else (config.max_steps or -1),
        learning_rate=config.learning_rate_value,
        lr_scheduler_type=config.lr_scheduler,
        lr_scheduler_kwargs=SCHEDULER_KWARGS.get(config.lr_scheduler),
        warmup_steps=warmup,
        optim=config.optimizer,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        eval_strategy=eval_strategy,
        eval_steps=eval_steps,
        save_strategy=save_strategy,
        save_steps=save_steps or 500,
        load_best_model_at_end=keep_best,
        save_total_limit=config.save_total_limit,
        metric_for_best_model="eval_loss" if has_eval else None,
        greater_is_better=False if has_eval else None,
        logging_steps=logging_steps,
        seed=config.seed,
        data_seed=config.seed,
        bf16=plan.precision == "bf16",
        fp16=plan.precision == "fp16",
        tf32=config.tf32 or None,
        activation_checkpointing=plan.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False}
        if plan.gradient_checkpointing
        else None,
        use_cpu=plan.hardware.device == "cpu",
        include_num_input_tokens_seen="all" if config.sample_packing else "non_padding",
        prediction_loss_only=True,
        logging_nan_inf_filter=False,  # a NaN is reported, never averaged away
        report_to=trackers(config) or "none",
        run_name=config.wandb_name,
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=not (images or config.circular),  # extra columns reach the collator
    )


class PackedRowsCollator:
    """Batches of packed rows -> one flat row (transformers' DataCollatorWithFlattening):
    position ids restart per sample, so attention and loss stay within each sample."""

    def __init__(self, flash_attention: bool = False) -> None:
        from transformers import DataCollatorWithFlattening

        self.flatten = DataCollatorWithFlattening(return_flash_attn_kwargs=flash_attention)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        samples = [
            {"input_ids": ids, "labels": labels}
            for row in rows
            for ids, labels in zip(row["input_ids"], row["labels"], strict=True)
        ]
        return self.flatten(samples)


def build_trainer(
    model: Any, tokenizer: Any, args: Any, train: list, evaluation: list, callbacks: list,
    processor: Any = None, cycles: list[list[int]] | None = None,
) -> Any:  # fmt: skip
    """A transformers Trainer whose only console output is tunelab's own callbacks."""
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, PrinterCallback, ProgressCallback, Trainer

    from tunelab.data.packing import is_packed

    if train and "images" in train[0]:
        from tunelab.data.vision import VisionCollator

        collator: Any = VisionCollator(processor)
    elif is_packed(train):
        flash = getattr(model.config, "_attn_implementation", "") == "flash_attention_2"
        collator = PackedRowsCollator(flash)
    else:
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    train_rows = train
    if cycles is not None:
        from tunelab.train.circular import CycleCollator

        collator = CycleCollator(train, collator)
        train_rows = [{"members": batch} for batch in cycles]
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(evaluation) if evaluation else None,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    for default in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(default)
    return trainer
