"""Hardware checks at run start, and the settings chosen for the machine at hand.

The schema says what a config may contain; this says whether it can run here. Every
problem is reported at once, each with its way out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tunelab.config.schema import BNB_OPTIMIZERS, TORCHAO_OPTIMIZERS, TuneConfig
from tunelab.errors import ConfigError
from tunelab.model.hardware import Hardware, attention_problem, has_module
from tunelab.model.loading import quantization_settings
from tunelab.train.trackers import tracker_problems


@dataclass(frozen=True)
class Plan:
    """Settings that depend on the machine: where each came from is in ``reasons``."""

    hardware: Hardware
    precision: Literal["bf16", "fp16", "fp32"]
    micro_batch_size: int
    gradient_checkpointing: bool
    reasons: tuple[str, ...]
    offload_activations: bool = False  # checkpointed activations kept in CPU memory
    chunked_loss: bool = False  # the loss without the full logits (train/loss.py)
    fast_lora: bool = False  # LoRA layers' shorter forward (train/fastlora.py)
    padding_free: bool = False  # samples end to end in one row (model/varlen.py)

    @property
    def checkpointing(self) -> bool | str:
        """Gradient checkpointing as it runs: on, off or 'offload'."""
        return "offload" if self.offload_activations else self.gradient_checkpointing


def _hub_token() -> str | None:
    from huggingface_hub import get_token

    return get_token()


def quantization_problem(config: TuneConfig, hw: Hardware) -> str | None:
    """What keeps model_quantization_config from loading here (a GPU, a package), in
    transformers' own words; None when nothing does, or when the config itself is wrong
    (planning reports that)."""
    name = config.model_quantization_config
    if not name:
        return None
    from transformers.quantizers import AutoHfQuantizer

    try:
        settings = quantization_settings(name, config.model_quantization_config_kwargs)
        # a model's stored quantization is what these settings usually read (gpt-oss: mxfp4)
        quantizer = AutoHfQuantizer.from_config(settings, pre_quantized=True)
        quantizer.validate_environment(device_map={"": 0} if hw.device == "cuda" else None)
    except ConfigError:
        return None
    except (ImportError, RuntimeError, ValueError) as exc:
        return f"model_quantization_config: {name} cannot load on this machine: {exc}"
    return None


def hardware_problems(config: TuneConfig, hw: Hardware) -> list[str]:
    """What keeps ``config`` from running on ``hw`` (and in this environment), each with its
    way out; empty when nothing does."""
    problems: list[str] = []
    gpu = hw.device == "cuda"
    needs_bnb = (
        config.adapter == "qlora" or config.load_in_8bit or config.optimizer in BNB_OPTIMIZERS
    )
    what = f"optimizer: {config.optimizer}"
    if config.load_in_8bit:
        what = "load_in_8bit (--use-8bit)"
    if config.adapter == "qlora":
        what = "adapter: qlora"
    if needs_bnb and not gpu:
        problems.append(
            f"{what} needs a CUDA GPU with bitsandbytes; this machine has none "
            "(use adapter: lora and optimizer: adamw_torch here)"
        )
    elif needs_bnb and not has_module("bitsandbytes"):
        problems.append(f"{what} needs bitsandbytes: pip install 'tunelab[gpu]'")
    if config.optimizer in TORCHAO_OPTIMIZERS and not gpu:
        problems.append(
            f"optimizer: {config.optimizer} needs a CUDA GPU with torchao; this machine has none "
            "(use optimizer: adamw_torch here)"
        )
    elif config.optimizer in TORCHAO_OPTIMIZERS and not has_module("torchao"):
        problems.append(f"optimizer: {config.optimizer} needs torchao: pip install torchao")
    for problem in (attention_problem(config.attn_implementation, hw),
                    quantization_problem(config, hw)):  # fmt: skip
        if problem:
            problems.append(problem)
    if config.fp16 and not gpu:
        problems.append("fp16: float16 training needs a CUDA GPU; set fp16: false")
    if config.bf16 is True and not hw.bf16 and gpu:
        problems.append("bf16: this GPU has no bfloat16 support; use bf16: auto")
    elif config.bf16 is True and not hw.bf16:
        problems.append(
            "bf16: this CPU's bfloat16 matmuls are no faster than float32 ones (it has no AMX), "
            "so bf16 would only lose precision; use bf16: auto"
        )
    if config.tf32 and not gpu:
        problems.append("tf32: TF32 needs an NVIDIA GPU (Ampere or newer); set tf32: false")
    if config.hub_model_id and not _hub_token():
        problems.append(
            f"hub_model_id: pushing to {config.hub_model_id} needs a Hugging Face token; set "
            "HF_TOKEN (or run `hf auth login`), or remove hub_model_id"
        )
    return problems + tracker_problems(config)


def _precision_reason(hw: Hardware) -> str:
    if hw.device == "cuda":
        return f"{'' if hw.bf16 else 'no '}bfloat16 on {hw.name}"
    if hw.bf16_speedup is None:
        return "bfloat16 is no faster on this CPU"
    if hw.bf16:
        return f"bf16 matmuls {hw.bf16_speedup:g}x as fast as fp32 on this CPU, measured"
    return f"bf16 matmuls {hw.bf16_speedup:g}x the speed of fp32 on this CPU, measured: no gain"


def machine_plan(config: TuneConfig, hw: Hardware) -> Plan:
    """Precision, micro-batch size and gradient checkpointing for ``hw``, with the reasons."""
    gpu = hw.device == "cuda"
    reasons = []
    if config.fp16:
        precision = "fp16"
    elif config.bf16 is True or (config.bf16 == "auto" and hw.bf16):
        precision = "bf16"
    else:
        precision = "fp32"
    if config.bf16 == "auto" and not config.fp16:
        reasons.append(f"precision {precision} ({_precision_reason(hw)})")
    if config.sample_packing:  # each row is already filled up to sequence_len
        batch = config.micro_batch_size or 1
        reason = "one packed row per step"
    else:
        batch = config.micro_batch_size or (8 if gpu else 4)
        reason = f"default on {hw.device}"
    if config.micro_batch_size is None:
        reasons.append(f"micro_batch_size {batch} ({reason})")
    if config.gradient_checkpointing == "auto":
        # Activation memory only matters on an accelerator; on CPU recomputing costs a
        # third of the throughput for memory that is rarely short.
        checkpointing = gpu and (config.adapter == "qlora" or config.sequence_len * batch > 32768)
        where = "needed for memory" if checkpointing else "memory suffices"
        reasons.append(f"gradient_checkpointing {'on' if checkpointing else 'off'} ({where})")
    else:
        checkpointing = bool(config.gradient_checkpointing)  # True, False or "offload"
    offload = config.gradient_checkpointing == "offload"
    if offload and not gpu:  # and pinned memory needs an accelerator
        offload = False
        reasons.append("gradient_checkpointing on, not offloaded (on a CPU the activations are "
                       "in CPU memory already)")  # fmt: skip
    return Plan(hw, precision, batch, checkpointing, tuple(reasons), offload)
