"""Build the pieces transformers and peft train with: the adapter and the Trainer."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from tunelab.config.schema import TuneConfig
from tunelab.model.loading import bnb_config, quantization_settings
from tunelab.model.ssmax import wrapped_attention
from tunelab.rundir import RunLayout
from tunelab.train.preflight import Plan
from tunelab.train.trackers import trackers
from tunelab.train.unfrozen import train_only


def torch_dtype(plan: Plan, config: TuneConfig) -> Any:
    """Weights dtype to load the base in: half precision only under a frozen LoRA base."""
    import torch

    if config.adapter != "full" and plan.precision == "bf16":
        return torch.bfloat16
    return torch.float32


def quantization(config: TuneConfig, plan: Plan) -> Any:
    """4-bit NF4 settings for QLoRA, 8-bit for load_in_8bit, the model_quantization_config
    asked for, else None."""
    if config.model_quantization_config:
        return quantization_settings(
            config.model_quantization_config, config.model_quantization_config_kwargs
        )
    if config.load_in_8bit and config.adapter == "lora":
        return bnb_config(8)
    if config.adapter != "qlora":
        return None
    import torch

    return bnb_config(4, torch.bfloat16 if plan.precision == "bf16" else torch.float16)


# an image-text model's vision side: its vision tower and the projector (connector) into text
VISION_MODULES = (
    r".*(vision_tower|vision_model|visual|multi_modal_projector|mm_projector|connector).*"
)

# transformers 5 moved an image-text model's parts under ``model``: (name now, in transformers 4)
_RENAMED = (
    ("model.language_model.", "language_model.model."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("lm_head", "language_model.lm_head"),
)


def old_name(name: str) -> tuple[str, str, str] | None:
    """(the name module ``name`` had in transformers 4's image-text layout, the part of it
    that changed then, and now); None for a name that did not change."""
    for now, before in _RENAMED:
        if name == now or (now.endswith(".") and name.startswith(now)):
            return before + name[len(now) :], before, now
    return None


@dataclass(frozen=True)
class RenamedTargets:
    """The modules a lora_target_modules regex written for transformers 4's names matches
    under those names: their names now, and the parts of the names that changed."""

    names: list[str]
    before: list[str]  # e.g. ["language_model.model."]
    now: list[str]  # e.g. ["model.language_model."]

    def note(self) -> str:
        def layout(parts: list[str]) -> str:
            return ", ".join(f"{p}*" if p.endswith(".") else p for p in parts)

        return (
            f"lora_target_modules was written for transformers 4's layout "
            f"({layout(self.before)}); it matches {len(self.names)} layers under their names "
            f"now ({layout(self.now)})"
        )


def renamed_targets(model: Any, targets: list[str] | str) -> RenamedTargets | None:
    """For a regular expression (``targets``) that matches no module of ``model``, but
    matches some under their transformers 4 names: those modules (with the vision side of
    an image-text model left out, as LoRA leaves it); else None."""
    if not isinstance(targets, str) or targets == "all-linear":
        return None
    try:
        regex = re.compile(targets)
    except re.error:
        return None  # peft says what is wrong with it
    names = [name for name, _ in model.named_modules() if name]
    if any(regex.fullmatch(name) for name in names):
        return None
    vision = getattr(model.config, "vision_config", None) is not None
    matched: dict[str, tuple[str, str]] = {}
    for name in names:
        renamed = old_name(name)
        if renamed is None or not regex.fullmatch(renamed[0]):
            continue
        if not (vision and re.fullmatch(VISION_MODULES, name)):
            matched[name] = renamed[1:]
    if not matched:
        return None
    renames = [(now, before) for now, before in _RENAMED if (before, now) in matched.values()]
    return RenamedTargets(
        sorted(matched), [before for _, before in renames], [now for now, _ in renames]
    )


def lora_settings(model: Any, config: TuneConfig) -> Any:
    """peft's LoraConfig for ``model``: the config's settings, or those of the adapter
    being continued (``lora_model_dir``)."""
    from peft import LoraConfig

    if config.lora_model_dir:  # saved for inference: its weights are to train on now
        saved = LoraConfig.from_pretrained(config.lora_model_dir)
        saved.inference_mode = False
        return saved
    vision = getattr(model.config, "vision_config", None) is not None
    optional: dict[str, Any] = {}
    if config.lora_fan_in_fan_out is not None:
        optional["fan_in_fan_out"] = config.lora_fan_in_fan_out
    modules_to_save = list(config.lora_modules_to_save or []) or None
    targets = config.lora_targets
    renamed = renamed_targets(model, targets)
    if renamed:  # the modules it meant, by their full names now
        targets = renamed.names
    return LoraConfig(
        # on an image-text model only the language part is adapted
        exclude_modules=VISION_MODULES if vision else None,
        r=config.lora_r,
        lora_alpha=config.lora_alpha_value,
        lora_dropout=config.lora_dropout,
        target_modules=targets,  # a str is a regular expression over full names
        modules_to_save=modules_to_save,
        # a trained copy of tied embeddings stays tied to the output head, and back
        ensure_weight_tying=bool(modules_to_save) and ties_embeddings(model),
        use_rslora=config.peft_use_rslora,
        use_dora=config.peft_use_dora,
        task_type="CAUSAL_LM",
        **optional,
    )


def ties_embeddings(model: Any) -> bool:
    """Whether the output head shares its weights with the input embeddings."""
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight


def build_adapter(model: Any, config: TuneConfig, plan: Plan, weights: bool = True) -> Any:
    """Wrap ``model`` with a LoRA adapter (or leave it whole for full fine-tuning), then
    freeze what unfrozen_parameters leaves out.

    ``weights=False`` only shapes the adapter (for a model on the meta device): a continued
    adapter's weights are not read and nothing is prepared for quantized training.
    """
    if config.adapter != "full":
        model = _with_lora(model, config, plan, weights)
    if config.unfrozen_parameters:
        train_only(model, config.unfrozen_parameters, adapter=config.adapter != "full")
        if weights and config.adapter == "full" and plan.gradient_checkpointing:
            # frozen embeddings give reentrant checkpointing inputs without gradients
            model.enable_input_require_grads()
    return model


def _with_lora(model: Any, config: TuneConfig, plan: Plan, weights: bool) -> Any:
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


def schedule(config: TuneConfig) -> tuple[str, dict[str, Any] | None]:
    """transformers' scheduler type and its arguments: tunelab's defaults, under the user's
    ``lr_scheduler_kwargs``. ``cosine_min_lr_ratio`` makes cosine end at that share of the
    peak (transformers' cosine_with_min_lr)."""
    name = config.lr_scheduler
    kwargs: dict[str, Any] = {}
    if config.cosine_min_lr_ratio is not None and name in ("cosine", "cosine_with_min_lr"):
        name = "cosine_with_min_lr"
        kwargs["min_lr_rate"] = config.cosine_min_lr_ratio
    kwargs = {**SCHEDULER_KWARGS.get(name, {}), **kwargs, **(config.lr_scheduler_kwargs or {})}
    return name, kwargs or None


def checkpointing_kwargs(config: TuneConfig, plan: Plan) -> dict[str, Any] | None:
    """What activation checkpointing is enabled with: non-reentrant unless the user says,
    and with ``offload`` the saved activations kept in (pinned) CPU memory."""
    if not plan.gradient_checkpointing:
        return None
    kwargs = {"use_reentrant": False, **(config.gradient_checkpointing_kwargs or {})}
    if plan.offload_activations:
        kwargs["offload"] = True
    elif plan.hardware.device == "cpu":
        kwargs.pop("offload", None)  # pinned memory needs an accelerator; nothing to move here
    return kwargs


def _adam(config: TuneConfig) -> dict[str, float]:
    names = ("adam_beta1", "adam_beta2", "adam_epsilon")
    return {name: getattr(config, name) for name in names if getattr(config, name) is not None}


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
    if config.evals_per_epoch == 0 and not eval_steps:
        has_eval = False  # no evaluation during training (the run evaluates once at the end)
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
    scheduler, scheduler_kwargs = schedule(config)
    return TrainingArguments(
        output_dir=str(layout.checkpoints),
        per_device_train_batch_size=1 if config.circular else plan.micro_batch_size,
        per_device_eval_batch_size=config.eval_batch_size or plan.micro_batch_size,
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
        lr_scheduler_type=scheduler,
        lr_scheduler_kwargs=scheduler_kwargs,
        warmup_steps=warmup,
        optim=config.optimizer,
        **_adam(config),
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
        activation_checkpointing_kwargs=checkpointing_kwargs(config, plan),
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


class FlatRowsCollator:
    """A batch of token rows -> one row, the samples end to end (transformers'
    DataCollatorWithFlattening), with each sample's bounds for the attention and position
    ids that restart per sample; no padding."""

    def __init__(self) -> None:
        from transformers import DataCollatorWithFlattening

        self.flatten = DataCollatorWithFlattening(return_flash_attn_kwargs=True)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        return self.flatten([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows])


def _dataset(rows: Any) -> Any:
    """Prepared rows as the trainer's dataset: memory-mapped Arrow rows as they are."""
    from datasets import Dataset

    from tunelab.data.rows import Rows

    return rows.dataset if isinstance(rows, Rows) else Dataset.from_list(rows)


def _trainer_class(chunked_loss: bool) -> Any:
    """transformers' Trainer; with ``chunked_loss``, one whose causal LM loss is the chunked
    cross-entropy of :mod:`tunelab.train.loss` (the same loss, without the full logits)."""
    from transformers import Trainer

    if not chunked_loss:
        return Trainer

    from tunelab.train.loss import chunked_causal_lm_loss

    class ChunkedLossTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if "labels" not in inputs:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            count = num_items_in_batch if self.model_accepts_loss_kwargs else None
            head = self.accelerator.unwrap_model(model).get_output_embeddings()
            loss, outputs = chunked_causal_lm_loss(model, head, inputs, count)
            if self.args.average_tokens_across_devices and count is not None:
                # as Trainer.compute_loss: the loss is averaged over devices afterwards
                loss = loss * (
                    self.accelerator.num_processes // self.get_tp_size()
                    if self.args.n_gpu <= 1
                    else self.args.n_gpu
                )
            return (loss, outputs) if return_outputs else loss

    return ChunkedLossTrainer


def build_trainer(
    model: Any, tokenizer: Any, args: Any, train: list, evaluation: list, callbacks: list,
    processor: Any = None, cycles: list[list[int]] | None = None, pad_to: int | None = None,
    chunked_loss: bool = False, padding_free: bool = False,
) -> Any:  # fmt: skip
    """A transformers Trainer whose only console output is tunelab's own callbacks.
    ``pad_to``: pad every batch of token rows to this length (pad_to_sequence_len);
    ``chunked_loss``: the causal LM loss without the full logits (see train/loss.py);
    ``padding_free``: each batch's samples end to end in one row, with their bounds for the
    attention (see model/varlen.py)."""
    from transformers import DataCollatorForSeq2Seq, PrinterCallback, ProgressCallback

    from tunelab.data.packing import is_packed

    if len(train) and "images" in train[0]:
        from tunelab.data.vision import VisionCollator

        collator: Any = VisionCollator(processor)
    elif is_packed(train):
        # flash attention (a package or a Hub kernel) takes the samples' bounds directly
        attention = getattr(model.config, "_attn_implementation", None) or ""
        collator = PackedRowsCollator("flash" in wrapped_attention(attention) or padding_free)
    elif padding_free:
        collator = FlatRowsCollator()
    else:
        collator = DataCollatorForSeq2Seq(
            tokenizer, padding="max_length" if pad_to else True, max_length=pad_to,
            label_pad_token_id=-100,
        )  # fmt: skip
    train_rows = train
    if cycles is not None:
        from tunelab.train.circular import CycleCollator

        collator = CycleCollator(train, collator)
        train_rows = [{"members": batch} for batch in cycles]
    trainer = _trainer_class(chunked_loss)(
        model=model,
        args=args,
        train_dataset=_dataset(train_rows),
        eval_dataset=_dataset(evaluation) if len(evaluation) else None,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    for default in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(default)
    return trainer
