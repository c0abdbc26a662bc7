"""Key names from other tools: the ones that mean ours, and the ones tunelab does not do yet."""

from __future__ import annotations

# transformers / TrainingArguments-style names for our keys.
ALIASES: dict[str, str] = {
    "num_train_epochs": "num_epochs",
    "per_device_train_batch_size": "micro_batch_size",
    "max_seq_length": "sequence_len",
    "max_length": "sequence_len",
    "lr_scheduler_type": "lr_scheduler",
    "optim": "optimizer",
    "model_name_or_path": "base_model",
}

# axolotl / RunPod keys that tunelab recognises but does not implement yet. They are
# reported by name when a config sets them, never silently dropped.
UNSUPPORTED: frozenset[str] = frozenset(
    """
    base_model_config revision_of_model tokenizer_config model_type tokenizer_type
    hub_strategy is_falcon_derived_model is_llama_derived_model
    is_qwen_derived_model is_mistral_derived_model overrides_of_model_config
    load_in_4bit gpu_memory_limit lora_on_cpu device_map max_memory
    eval_batch_size lr_quadratic_warmup save_strategy
    save_first_step push_dataset_to_hub
    dataset_processes dataset_keep_in_memory peft_layers_to_transform
    lora_modules_to_save lora_fan_in_fan_out
    lr_scheduler_kwargs cosine_min_lr_ratio cosine_constant_lr_ratio lr_div_factor
    optim_args optim_target_modules adam_beta1 adam_beta2 adam_epsilon flash_optimum
    xformers_attention flash_attention flash_attn_cross_entropy flash_attn_rms_norm
    flash_attn_fuse_qkv flash_attn_fuse_mlp sdp_attention s2_attention attn_implementation
    special_tokens tokens fsdp fsdp_config deepspeed ddp_timeout ddp_bucket_cap_mb
    ddp_broadcast_buffers wandb_watch wandb_log_model
    eval_sample_packing pad_to_sequence_len
    strict chat_template_jinja torch_compile
    resume_from_checkpoint auto_resume_from_checkpoints plugins liger_rope liger_rms_norm
    liger_glu_activation liger_layer_norm liger_fused_linear_cross_entropy
    """.split()
)

# Secrets never belong in a config (it is saved with every run): they come from the
# environment.
SECRETS: dict[str, str] = {
    "wandb_api_key": "WANDB_API_KEY",
    "hf_token": "HF_TOKEN",
    "hub_token": "HF_TOKEN",
    "mlflow_tracking_token": "MLFLOW_TRACKING_TOKEN",
}

# Keys of a ``datasets`` entry that tunelab does not read yet.
UNSUPPORTED_DATASET_KEYS: frozenset[str] = frozenset(
    """
    ds_type data_files train_on_split name field conversation roles shards chat_template
    roles_to_train train_on_eos
    """.split()
)

# Keys of a RunPod-style request's ``input`` object, around its ``args``.
ENVELOPE_KEYS: frozenset[str] = frozenset({"user_id", "model_id", "run_id", "credentials"})


def is_empty(value: object) -> bool:
    """A value that asks for nothing: null, false, an empty string or collection."""
    return value is None or value is False or value == "" or value == [] or value == {}
