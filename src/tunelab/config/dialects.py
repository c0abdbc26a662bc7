"""Configs written for axolotl and LLaMA-Factory, read as their authors meant them.

A config is one of three dialects, told apart by its keys (see :func:`recognise`):

* **tunelab**'s own: no ``adapter`` means LoRA, ``type: alpaca`` rows go through the
  model's chat template.
* **axolotl**'s (and RunPod requests, which take axolotl's schema): no ``adapter`` means
  full fine-tuning, ``type: alpaca`` is the Alpaca prompt (``### Instruction:``),
  ``type: completion`` is text cut into ``sequence_len`` chunks.
* **LLaMA-Factory**'s training YAML (``stage``, ``finetuning_type``, ``dataset`` ...),
  mapped onto tunelab's keys.

Each translation says what it did in a note when the meaning is not obvious.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

from tunelab.config.keys import ALIASES, PREFERENCE_KEYS, axolotl_top_keys, is_empty
from tunelab.config.schema import DatasetType, TuneConfig
from tunelab.errors import ConfigError

# axolotl's attention switches -> transformers' attn_implementation
_ATTENTION_FLAGS = {
    "flash_attention": "flash_attention_2",
    "sdp_attention": "sdpa",
    "eager_attention": "eager",
    "flex_attention": "flex_attention",
}
_ATTENTION_NAMES = {
    "flash": "flash_attention_2",
    "fa2": "flash_attention_2",
    "flash_attention_2": "flash_attention_2",
    "fa3": "flash_attention_3",
    "flash_attention_3": "flash_attention_3",
    "sdpa": "sdpa",
    "sdp": "sdpa",
    "eager": "eager",
    "flex": "flex_attention",
    "flex_attention": "flex_attention",
}
# axolotl dataset types -> tunelab's (type, extra dataset keys)
_AXOLOTL_TYPES: dict[str, tuple[str, dict[str, Any]]] = {
    "alpaca": ("alpaca_prompt", {}),
    "jeopardy": ("jeopardy", {}),
    "completion": ("chunked_text", {}),
    "pretrain": ("pretrain", {}),
    "chat_template": ("chat_template", {}),
    "sharegpt": ("sharegpt", {}),
}
# What axolotl 0.19.0 does for a key a config leaves out, where tunelab's default differs
# (its schema, axolotl/utils/schemas/: micro_batch_size 1, sequence_len 512, ...; an absent
# excess_length_strategy drops long samples, an absent dataset_exact_deduplication keeps
# duplicates).
AXOLOTL_DEFAULTS: dict[str, Any] = {
    "val_set_size": 0.0,
    "num_epochs": 1.0,
    "sequence_len": 512,
    "micro_batch_size": 1,
    "lora_dropout": 0.0,
    "dataset_exact_deduplication": False,
    "excess_length_strategy": "drop",
    "group_by_length": False,
    "gradient_checkpointing": False,
    "optimizer": "adamw_torch_fused",
}
# What LLaMA-Factory (on transformers' TrainingArguments) does for a key a config leaves out,
# where tunelab's default differs. lora_target's default, all linear layers, is set apart.
LLAMAFACTORY_DEFAULTS: dict[str, Any] = {
    "val_set_size": 0.0,
    "num_epochs": 3.0,
    "learning_rate": 5e-5,
    "lr_scheduler": "linear",
    "lora_dropout": 0.0,
    "micro_batch_size": 8,
    "dataset_exact_deduplication": False,
    "group_by_length": False,
    "gradient_checkpointing": True,
    "bf16": False,
}
# The key under which a translated config carries {key: origin} for the defaults it filled
# in; load_config takes it out before validating.
FILLED = "__filled__"
_PREFERENCE_TYPES = ("dpo", "ipo", "orpo", "kto", "simpo", "grpo", "gdpo", "ebft", "cpo")


def _tunelab_keys() -> set[str]:
    return set(TuneConfig.model_fields) | set(ALIASES)


# LLaMA-Factory's own keys (its model, data and fine-tuning arguments) that mark its files.
_LLAMAFACTORY_MARKS = frozenset(
    """stage finetuning_type lora_rank lora_target dataset_dir cutoff_len max_samples
    val_size template do_train quantization_bit train_on_prompt overwrite_output_dir
    plot_loss additional_target new_special_tokens flash_attn""".split()
)


def recognise(data: dict[str, Any], request: bool = False) -> str:
    """'axolotl', 'llamafactory' or 'tunelab': whose config ``data`` is.

    A RunPod request (``{"input": {"args": ...}}``) is axolotl's. A file with a key only
    LLaMA-Factory uses (``stage``, ``finetuning_type``, ``cutoff_len``, ... or ``dataset``
    as a name) is LLaMA-Factory's; one with a key of axolotl's schema that tunelab does not
    have (``flash_attention``, ``strict``, ``load_in_4bit``, ``wandb_watch``, ...) is
    axolotl's. Anything else is tunelab's own.
    """
    if request:
        return "axolotl"
    keys = set(data)
    if keys & _LLAMAFACTORY_MARKS or isinstance(data.get("dataset"), str):
        return "llamafactory"
    if keys & (axolotl_top_keys() - _tunelab_keys()):
        return "axolotl"
    return "tunelab"


def dialect_note(data: dict[str, Any], dialect: str, request: bool = False) -> str | None:
    """The note that says whose config a file was read as, and why."""
    if dialect == "tunelab":
        return None
    if request:
        return "read as an axolotl config: a RunPod request takes axolotl's schema"
    if dialect == "llamafactory":
        marks = sorted(set(data) & _LLAMAFACTORY_MARKS) or ["dataset"]
        return f"read as a LLaMA-Factory training config (it sets {', '.join(marks[:4])})"
    theirs = axolotl_top_keys() - _tunelab_keys()
    marks = sorted(k for k in data if k in theirs and not is_empty(data[k]))
    marks = marks or sorted(set(data) & theirs)  # only empty ones: still axolotl's keys
    return f"read as an axolotl config (it sets {', '.join(marks[:4])})"


def drop_empty(data: dict[str, Any]) -> dict[str, Any]:
    """A key left empty (``fp16:``) means its default: leave it out, also inside datasets."""
    out = {k: v for k, v in data.items() if v is not None}
    for key in ("datasets", "pretraining_dataset", "test_datasets"):
        if isinstance(out.get(key), list):
            out[key] = [
                {k: v for k, v in e.items() if v is not None} if isinstance(e, dict) else e
                for e in out[key]
            ]
    return out


def preference_problem(data: dict[str, Any]) -> str | None:
    """The one line for preference and reward configs, which tunelab does not train yet."""
    rl = data.get("rl")
    if not is_empty(rl):
        what = f"preference training (rl: {rl})"
    elif not is_empty(data.get("reward_model")):
        what = "reward-model training (reward_model: true)"
    elif not is_empty(data.get("process_reward_model")):
        what = "process-reward-model training (process_reward_model: true)"
    elif data.get("stage") in ("rm", "ppo", "dpo", "kto"):
        what = f"LLaMA-Factory's stage: {data['stage']}"
    else:
        return None
    return (
        f"{what} is not supported yet: tunelab trains supervised fine-tuning only "
        f"(LoRA, QLoRA or full); remove {'/'.join(PREFERENCE_KEYS)} to train the chosen "
        "responses as plain supervised data"
    )


def _fill_defaults(
    data: dict[str, Any], defaults: dict[str, Any], who: str, notes: list[str]
) -> dict[str, Any]:
    """The keys ``data`` leaves out, set to ``who``'s defaults (named in one note, and in
    :data:`FILLED` of the result, for where each setting came from)."""
    given = {ALIASES.get(k, k) for k in data}
    filled = {k: v for k, v in defaults.items() if k not in given}
    if "warmup_steps" in filled and "warmup_ratio" in data:
        filled.pop("warmup_steps")
    if filled:
        notes.append(
            f"{who}'s defaults for what the file leaves out: "
            + ", ".join(f"{k} {v}" for k, v in filled.items())
        )
    return {**data, **filled, FILLED: {k: f"{who}'s default" for k in filled}}


def _attention(data: dict[str, Any], problems: list[str]) -> None:
    chosen: dict[str, str] = {}
    for flag, name in _ATTENTION_FLAGS.items():
        value = data.pop(flag, None)
        if value is True:
            chosen[flag] = name
        elif value not in (None, False):
            problems.append(f"{flag}: must be true or false (got {value!r})")
    word = data.pop("attention", None)
    if word is not None and not isinstance(word, str):
        problems.append(f"attention: must be a name such as flash or sdpa (got {word!r})")
    if isinstance(word, str):
        if word not in _ATTENTION_NAMES:
            problems.append(f"attention: unknown choice '{word}'; use one of "
                            f"{', '.join(sorted(_ATTENTION_NAMES))}")  # fmt: skip
        else:
            chosen["attention"] = _ATTENTION_NAMES[word]
    if "attn_implementation" in data:  # the explicit choice wins over the switches
        return
    if len(set(chosen.values())) > 1:
        problems.append(
            "attn_implementation: "
            + ", ".join(f"{k} asks for {v}" for k, v in chosen.items())
            + "; keep one of them"
        )
    elif chosen:
        data["attn_implementation"] = next(iter(chosen.values()))


def _axolotl_dataset(entry: dict[str, Any], where: str, problems: list[str]) -> dict[str, Any]:
    entry = dict(entry)
    kind = entry.get("type")
    if isinstance(kind, dict):
        entry.pop("type")  # said here, once
        problems.append(
            f"{where}.type: axolotl's custom prompt formats (a type given as a mapping) are "
            "not supported yet; write the layout as a data_template instead (see Data)"
        )
    if isinstance(kind, str):
        base, _, style = kind.partition(":")
        if base in _AXOLOTL_TYPES:
            name, extra = _AXOLOTL_TYPES[base]
            entry["type"] = name
            for key, value in extra.items():
                entry.setdefault(key, value)
            if style:
                entry["prompt_style"] = style
        elif base.split(".")[0] in _PREFERENCE_TYPES or "." in base:
            entry.pop("type")  # said here, once
            problems.append(
                f"{where}.type: '{kind}' is one of axolotl's preference-data formats; "
                "tunelab trains supervised fine-tuning only (not supported yet)"
            )
        else:
            own = ", ".join(t for t in get_args(DatasetType) if t not in _AXOLOTL_TYPES)
            entry.pop("type")  # said here, once
            problems.append(
                f"{where}.type: axolotl's prompt format '{kind}' is not supported yet; "
                f"use one of axolotl's {', '.join(_AXOLOTL_TYPES)} or tunelab's {own}"
            )
    for old, new in (("message_field_role", "role"), ("message_field_content", "content")):
        if old in entry:
            mapping = dict(entry.get("message_property_mappings") or {})
            mapping.setdefault(new, entry.pop(old))
            entry["message_property_mappings"] = mapping
    if "text_column" in entry:
        entry.setdefault("field", entry.pop("text_column"))
    if entry.get("type") in ("chunked_text", "pretrain"):
        entry.setdefault("field", "text")
    return entry


def from_axolotl(data: dict[str, Any], notes: list[str], problems: list[str]) -> dict[str, Any]:
    """axolotl's keys and values in tunelab's terms."""
    data = dict(data)
    if "adapter" not in data:
        data["adapter"] = "full"
        notes.append(
            "axolotl config without an adapter: full fine-tuning of every weight, as in "
            "axolotl (add adapter: lora for LoRA)"
        )
    if data.pop("load_in_4bit", None) is True and data.get("adapter") != "qlora":
        if data.get("adapter") == "lora":
            data["adapter"] = "qlora"
            notes.append("load_in_4bit with adapter: lora is QLoRA (adapter: qlora)")
        else:
            problems.append("load_in_4bit: a 4-bit base trains only with adapter: qlora")
    _attention(data, problems)
    if "model_config" in data:  # axolotl's other name for it
        data.setdefault("overrides_of_model_config", data.pop("model_config"))
    for key in ("base_model_config", "tokenizer_config"):  # the model's own: nothing to do
        if key in data and data[key] == data.get("base_model"):
            data.pop(key)
    offload = data.pop("activation_offloading", None)
    if offload not in (None, False):
        if data.get("gradient_checkpointing") is False:
            problems.append("activation_offloading: needs gradient_checkpointing; turn it on")
        else:
            data["gradient_checkpointing"] = "offload"
    if data.get("chat_template") == "jinja":
        data.pop("chat_template")
        if "chat_template_jinja" not in data:
            problems.append("chat_template: 'jinja' needs chat_template_jinja (the template)")
    for key in ("datasets", "pretraining_dataset"):
        entries = data.get(key)
        if isinstance(entries, list):
            data[key] = [
                _axolotl_dataset(e, f"{key}.{i}", problems) if isinstance(e, dict) else e
                for i, e in enumerate(entries)
            ]
    if data.get("pretraining_dataset") and "datasets" not in data:
        data["datasets"] = []
    test = data.pop("test_datasets", None)
    if test:
        problems.append(
            "test_datasets: a separate validation set is not supported yet; "
            "use val_set_size to hold out part of datasets"
        )
    return _fill_defaults(data, AXOLOTL_DEFAULTS, "axolotl", notes)


# LLaMA-Factory template names that are tunelab's own
_LF_TEMPLATES = {
    "llama3": "llama3",
    "chatml": "chatml",
    "gemma": "gemma",
    "gemma3": "gemma",
    "alpaca": "alpaca",
    "vicuna": "vicuna",
}
_LF_FINETUNING = {"lora": "lora", "full": "full"}
# LLaMA-Factory keys that change nothing tunelab trains
_LF_IGNORED = frozenset(
    """do_train do_eval do_predict overwrite_cache preprocessing_num_workers
    dataloader_num_workers plot_loss overwrite_output_dir report_to ddp_timeout deepspeed
    save_only_model logging_dir run_name tokenized_path streaming buffer_size
    resume_from_checkpoint save_strategy eval_strategy include_num_input_tokens_seen
    disable_gradient_checkpointing""".split()
)
# LLaMA-Factory key -> tunelab key, where only the name differs
_LF_RENAMES = {
    "lora_rank": "lora_r",
    "cutoff_len": "sequence_len",
    "val_size": "val_set_size",
    "train_on_prompt": "train_on_inputs",
    "packing": "sample_packing",
    "use_dora": "peft_use_dora",
    "use_rslora": "peft_use_rslora",
    "additional_target": "lora_modules_to_save",
    "new_special_tokens": "tokens",
    "default_system": "default_system_message",
}


def _names(value: Any) -> list[str]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v) for v in value] if isinstance(value, list) else []


def from_llamafactory(
    data: dict[str, Any], notes: list[str], problems: list[str], source_dir: Path | None
) -> dict[str, Any]:
    """LLaMA-Factory's training YAML in tunelab's terms; keys with no meaning here named."""
    data = dict(data)
    out: dict[str, Any] = {}
    ignored: list[str] = []
    stage = data.pop("stage", "sft")
    if stage not in ("sft", "pt"):
        problems.append(f"stage: '{stage}' is not supported yet; tunelab trains stage sft or pt")
    finetuning = data.pop("finetuning_type", "lora")
    if finetuning in _LF_FINETUNING:
        out["adapter"] = _LF_FINETUNING[finetuning]
    else:
        problems.append(f"finetuning_type: '{finetuning}' is not supported yet; use lora or full")
    bits = data.pop("quantization_bit", None)
    if isinstance(bits, str) and bits.strip().isdigit():
        bits = int(bits)
    if bits not in (None, 4, 8):
        problems.append(f"quantization_bit: use 4 or 8 (got {bits!r})")
    elif bits == 4 and out.get("adapter") == "lora":
        out["adapter"] = "qlora"
    elif bits == 8 and out.get("adapter") == "lora":
        out["load_in_8bit"] = True
    elif bits is not None:
        problems.append(f"quantization_bit: {bits} works only with finetuning_type: lora (4 or 8)")
    target = data.pop("lora_target", "all")  # LLaMA-Factory's default: every linear layer
    if not _names(target):
        problems.append(
            f"lora_target: give 'all' or layer names like q_proj,v_proj (got {target!r})"
        )
    elif _names(target) == ["all"]:
        out["lora_target_linear"] = True  # every linear layer, as in LLaMA-Factory
    elif target is not None:
        out["lora_target_modules"] = _names(target)
    names = _names(data.pop("dataset", None))
    folder = Path(str(data.pop("dataset_dir", "data")))
    if not folder.is_absolute() and source_dir is not None and not folder.exists():
        if (source_dir / folder).exists():
            folder = source_dir / folder
    max_samples = data.pop("max_samples", None)
    entries = []
    for name in names:  # one entry each: max_samples applies to each dataset
        entry: dict[str, Any] = {"path": f"{folder / 'dataset_info.json'}:{name}"}
        if stage == "pt":
            entry["type"] = "text"
        if max_samples:
            entry["max_examples"] = max_samples
        entries.append(entry)
    if entries:
        out["datasets"] = entries
    template = data.pop("template", None)
    if isinstance(template, str) and template:
        if template in _LF_TEMPLATES:
            out["chat_template"] = _LF_TEMPLATES[template]
        else:
            out["chat_template"] = "tokenizer_default"
            notes.append(
                f"template '{template}' is LLaMA-Factory's name for a model family's own chat "
                "template: the model's own template is used"
            )
    attention = data.pop("flash_attn", None)
    if attention in ("fa2", "sdpa", "eager"):
        out["attn_implementation"] = {"fa2": "flash_attention_2"}.get(attention, attention)
    elif attention not in (None, "auto", "disabled"):
        problems.append(f"flash_attn: unknown choice '{attention}' (fa2, sdpa, eager or auto)")
    if "eval_steps" in data and data.get("eval_strategy") == "no":
        data.pop("eval_steps")
    for key, value in data.items():
        if key in _LF_IGNORED:
            ignored.append(key)
        else:
            out[_LF_RENAMES.get(key, key)] = value
    if ignored:
        notes.append(
            "LLaMA-Factory keys with no effect here, ignored: " + ", ".join(sorted(ignored))
        )
    defaults = dict(LLAMAFACTORY_DEFAULTS)
    if not {"warmup_ratio", "warmup_steps"} & set(out):
        defaults["warmup_steps"] = 0
    if out.get("adapter") == "full":  # no LoRA settings to fill in
        defaults.pop("lora_dropout")
    return _fill_defaults(out, defaults, "LLaMA-Factory", notes)


def translate(
    data: dict[str, Any],
    dialect: str,
    notes: list[str],
    problems: list[str],
    source_dir: Path | None = None,
) -> dict[str, Any]:
    """``data`` in tunelab's terms, what it could not translate added to ``problems``.
    Preference and reward configs get one clear line and nothing else."""
    preference = preference_problem(data)
    if preference:
        raise ConfigError([preference])
    if dialect == "axolotl":
        return from_axolotl(data, notes, problems)
    if dialect == "llamafactory":
        return from_llamafactory(data, notes, problems, source_dir)
    return data
