"""Key names from other tools: the ones that mean ours, and the ones tunelab does not do.

Every key of axolotl's config schema is listed in ``axolotl_keys.txt`` (with the version it
was read from). A key there is either one of tunelab's own (same name, same meaning), one
that :mod:`tunelab.config.dialects` translates, one in :data:`IGNORED` (it does not change
what is trained; named in a note), or refused when set (ignoring it would train something
other than what its author meant).
"""

from __future__ import annotations

from functools import cache
from importlib import resources

# transformers / TrainingArguments-style names for our keys.
ALIASES: dict[str, str] = {
    "num_train_epochs": "num_epochs",
    "per_device_train_batch_size": "micro_batch_size",
    "per_device_eval_batch_size": "eval_batch_size",
    "max_seq_length": "sequence_len",
    "max_length": "sequence_len",
    "lr_scheduler_type": "lr_scheduler",
    "optim": "optimizer",
    "model_name_or_path": "base_model",
    "bfloat16": "bf16",
    "float16": "fp16",
    "dataset_num_proc": "dataset_processes",  # axolotl's newer name
}

_DISTRIBUTED = "multi-GPU training is not supported yet; the run uses one device"
_SPEED = "a speed or memory option of axolotl's own kernels; tunelab chooses its own"
_TOOLING = "axolotl's own tooling, logging or housekeeping; no effect on what is trained"
_LOADING = "how axolotl loads the model; tunelab picks the model class from its config.json"

# Keys whose value does not change what is trained. Set, they are named in one note.
IGNORED: dict[str, str] = {
    **dict.fromkeys(
        """deepspeed fsdp fsdp_config fsdp_version fsdp_final_state_dict_type ddp
        ddp_timeout ddp_bucket_cap_mb ddp_broadcast_buffers ddp_find_unused_parameters
        local_rank world_size device device_map max_memory gpu_memory_limit lora_on_cpu
        tensor_parallel_size context_parallel_size dp_shard_size dp_replicate_size
        sequence_parallel_degree heads_k_stride ring_attn_func use_ray ray_num_workers
        ray_run_name resources_per_worker accelerator_config qlora_sharded_model_loading
        deepcompile expert_parallel_size expert_parallel_backend""".split(),
        _DISTRIBUTED,
    ),
    **dict.fromkeys(
        """xformers_attention flash_attn_cross_entropy flash_attn_rms_norm
        flash_attn_fuse_mlp flash_attn_d512 flash_optimum s2_attention sage_attention
        sdpa_varlen fused_attn_kernel plugins liger_rope liger_rms_norm liger_glu_activation
        liger_layer_norm liger_fused_linear_cross_entropy liger_cross_entropy liger_swiglu
        liger_kernel_impl liger_rms_norm_gated liger_use_token_scaling cut_cross_entropy
        use_kernels use_scattermoe use_sonicmoe lora_mlp_kernel lora_qkv_kernel lora_o_kernel
        lora_embedding_kernel chunked_cross_entropy_num_chunks
        tiled_mlp tiled_mlp_num_shards tiled_mlp_use_original_mlp torch_compile
        torch_compile_backend torch_compile_mode torch_compile_options
        experimental_skip_move_to_device low_cpu_mem_usage sample_packing_bin_size
        sample_packing_group_size sample_packing_eff_est sample_packing_mp_start_method
        sample_packing_sequentially multipack_real_batches batch_flattening
        pretrain_multipack_attn pretrain_multipack_buffer_size streaming_multipack_buffer_size
        eval_sample_packing dataloader_num_workers dataloader_pin_memory
        dataloader_prefetch_factor dataloader_drop_last gc_steps gc_collect_steps
        torch_empty_cache_steps embeddings_skip_upcast peft_autocast_adapter_dtype
        activation_offloading layer_offloading ple_cpu_offload selective_checkpointing
        dynamic_checkpoint experts_implementation moe_bnb_fast moe_grouped_backend
        expert_backend""".split(),
        _SPEED,
    ),
    **dict.fromkeys(
        """strict debug eval_table_size eval_table_max_new_tokens eval_max_new_tokens
        do_causal_lm_eval eval_causal_lm_metrics do_bench_eval bench_dataset bench_split
        wandb_watch wandb_log_model hf_mlflow_log_artifacts use_wandb use_mlflow
        use_tensorboard include_tokens_per_second include_tkps profiler_steps
        profiler_steps_start remove_unused_columns skip_prepare_dataset
        dataset_keep_in_memory push_dataset_to_hub num_dataset_shards_to_save
        is_preprocess preprocess_iterable axolotl_config_path save_safetensors save_only_model
        save_first_step save_strategy hub_strategy hub_revision tokenizer_save_jinja_files
        gradio_title gradio_share gradio_server_name gradio_server_port gradio_max_new_tokens
        gradio_temperature generate_samples num_generation_samples generation_max_new_tokens
        generation_temperature generation_top_k generation_top_p generation_do_sample
        generation_prompt_ratio use_otel_metrics otel_metrics_host otel_metrics_port
        use_comet comet_api_key comet_workspace comet_project_name comet_experiment_key
        comet_mode comet_online comet_experiment_config use_trackio trackio_project_name
        trackio_run_name trackio_space_id mlflow_run_name auto_resume_from_checkpoints
        merge_lora merge_method total_num_tokens total_supervised_tokens torchdistx_path
        tokenizer_use_fast tokenizer_use_mistral_common""".split(),
        _TOOLING,
    ),
    **dict.fromkeys(
        """model_type tokenizer_type processor_type type_of_model is_falcon_derived_model
        is_llama_derived_model is_qwen_derived_model is_mistral_derived_model""".split(),
        _LOADING,
    ),
}

# The way out for refused keys that have one in tunelab.
REFUSED_HINTS: dict[str, str] = {
    "resume_from_checkpoint": "to continue a run, use `tunelab train CONFIG --resume`",
    "trainer_cls": "tunelab trains with its own trainer; a custom trainer class cannot be used",
}

# Preference and reward training: one clear answer, never a list of unknown keys.
PREFERENCE_KEYS = ("rl", "reward_model", "process_reward_model")

# Secrets never belong in a config (it is saved with every run): they come from the
# environment.
SECRETS: dict[str, str] = {
    "wandb_api_key": "WANDB_API_KEY",
    "hf_token": "HF_TOKEN",
    "hub_token": "HF_TOKEN",
    "mlflow_tracking_token": "MLFLOW_TRACKING_TOKEN",
    "comet_api_key": "COMET_API_KEY",
    "swanlab_api_key": "SWANLAB_API_KEY",
}

# Keys of a ``datasets`` entry that change nothing tunelab reads.
IGNORED_DATASET_KEYS: dict[str, str] = {
    **dict.fromkeys(["ds_type", "shards", "shards_idx", "preprocess_shards"], _TOOLING),
    "trust_remote_code": "hub datasets are read as data, never as code",
}

# Keys of a RunPod-style request's ``input`` object, around its ``args``.
ENVELOPE_KEYS: frozenset[str] = frozenset({"user_id", "model_id", "run_id", "credentials"})


@cache
def axolotl_keys() -> dict[str, frozenset[str]]:
    """Sections of ``axolotl_keys.txt``: 'config', 'plugin', 'dataset' and 'other' key names."""
    sections: dict[str, set[str]] = {}
    current = None
    text = resources.files("tunelab.config").joinpath("axolotl_keys.txt").read_text("utf-8")
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), set())
        elif current is not None:
            current.add(line)
    return {name: frozenset(keys) for name, keys in sections.items()}


def axolotl_top_keys() -> frozenset[str]:
    keys = axolotl_keys()
    return keys["config"] | keys["plugin"] | keys["other"]


def is_empty(value: object) -> bool:
    """A value that asks for nothing: null, false, an empty string or collection."""
    return value is None or value is False or value == "" or value == [] or value == {}
