"""Configs written for axolotl and LLaMA-Factory mean what their authors meant."""

from __future__ import annotations

import json

import pytest
import yaml

from tunelab.config import load_config
from tunelab.errors import ConfigError

from .conftest import MEMORISE, cli, write_json


def _write(tmp_path, text: str, name: str = "config.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _problems(path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return caught.value.problems


def test_empty_value_is_the_default(tmp_path, alpaca_file):
    path = _write(
        tmp_path,
        f"datasets:\n  - path: {alpaca_file}\nfp16:\nlora_r:\nlora_dropout:\nadapter: lora\n",
    )
    config = load_config(path).config
    assert (config.fp16, config.lora_r, config.lora_dropout) == (False, 8, 0.05)


def test_no_adapter_is_lora_in_tunelab_and_full_in_axolotl(tmp_path, alpaca_file):
    ours = _write(tmp_path, f"datasets:\n  - path: {alpaca_file}\n", "ours.yaml")
    loaded = load_config(ours)
    assert loaded.dialect == "tunelab" and loaded.config.adapter == "lora"
    theirs = _write(
        tmp_path, f"datasets:\n  - path: {alpaca_file}\nstrict: false\nflash_attention:\n"
    )
    loaded = load_config(theirs)
    assert loaded.dialect == "axolotl" and loaded.config.adapter == "full"
    assert any("full fine-tuning" in n for n in loaded.notes)
    assert "read as an axolotl config (it sets flash_attention, strict)" in loaded.notes
    # a flag that chooses the adapter wins, and the note about the default goes
    flagged = load_config(theirs, {"adapter": "lora"})
    assert flagged.config.adapter == "lora"
    assert not any("full fine-tuning" in n for n in flagged.notes)


def test_axolotl_alpaca_is_the_alpaca_prompt_and_completion_is_chunked_text(tmp_path):
    data = write_json(tmp_path / "d.json", MEMORISE)
    text = tmp_path / "t.jsonl"
    text.write_text(json.dumps({"body": "some text"}) + "\n")
    path = _write(
        tmp_path,
        f"strict: false\nadapter: lora\ndatasets:\n  - path: {data}\n    type: alpaca\n"
        f"  - path: {text}\n    type: completion\n    field: body\n"
        f"  - path: {data}\n    type: alpaca:chat\n",
    )
    first, second, third = load_config(path).config.datasets
    assert first.type == "alpaca_prompt" and first.prompt_style == "instruct"
    assert (second.type, second.field) == ("chunked_text", "body")
    assert third.prompt_style == "chat"
    # tunelab's own alpaca rows still go through the model's chat template
    ours = load_config(overrides={"datasets": [{"path": str(data), "type": "alpaca"}]})
    assert ours.config.datasets[0].type == "alpaca"


def test_ignored_refused_and_misspelt_keys(tmp_path, alpaca_file):
    path = _write(
        tmp_path,
        f"datasets:\n  - path: {alpaca_file}\nadapter: lora\nwandb_watch: all\n"
        "deepspeed: zero3.json\nlocal_rank:\nneftune_noise_alpha: 5\nlora_alhpa: 16\n",
    )
    problems = _problems(path)
    assert any(p.startswith("neftune_noise_alpha: axolotl's") and "not supported yet" in p
               for p in problems)  # fmt: skip
    assert "lora_alhpa: unknown key; did you mean 'lora_alpha'?" in problems
    assert not any("wandb_watch" in p or "deepspeed" in p for p in problems)
    path.write_text(path.read_text().replace("neftune_noise_alpha: 5\nlora_alhpa: 16\n", ""))
    notes = "\n".join(load_config(path).notes)
    assert "not supported yet, ignored: deepspeed" in notes
    assert "wandb_watch" in notes
    assert "local_rank" not in notes  # left empty: asks for nothing


@pytest.mark.parametrize(
    "setting, line",
    [
        ("rl: dpo", "preference training (rl: dpo) is not supported yet"),
        ("reward_model: true", "reward-model training"),
        ("process_reward_model: true", "process-reward-model training"),
    ],
)
def test_preference_and_reward_configs_get_one_line(tmp_path, setting, line):
    path = _write(
        tmp_path,
        f"base_model: somewhere\n{setting}\ndpo_beta: 0.1\nrl_beta: 0.1\nchat_template: x\n"
        "datasets:\n  - path: nowhere\n    type: chatml.ultra\n    field_chosen: a\n",
    )
    problems = _problems(path)
    assert len(problems) == 1 and line in problems[0]


def test_axolotl_translations(tmp_path, alpaca_file):
    path = _write(
        tmp_path,
        f"datasets:\n  - path: {alpaca_file}\n    type: chat_template\n"
        "    message_field_role: from\n    message_field_content: value\n"
        "adapter: lora\nload_in_4bit: true\nsdp_attention: true\nbfloat16: true\n"
        "model_config:\n  output_router_logits: true\nactivation_offloading: true\n"
        "gradient_checkpointing: true\n",
    )
    loaded = load_config(path)
    config = loaded.config
    assert config.adapter == "qlora" and config.attn_implementation == "sdpa" and config.bf16
    assert config.overrides_of_model_config == {"output_router_logits": True}
    assert config.gradient_checkpointing == "offload"
    assert config.datasets[0].message_property_mappings == {"role": "from", "content": "value"}


def test_runpod_request_is_axolotl(tmp_path, alpaca_file):
    request = {"input": {"args": {"datasets": [{"path": str(alpaca_file), "type": "alpaca"}]}}}
    path = _write(tmp_path, json.dumps(request), "request.json")
    loaded = load_config(path)
    assert loaded.dialect == "axolotl" and loaded.config.adapter == "full"
    assert loaded.config.datasets[0].type == "alpaca_prompt"


def _registry(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    rows = [{"instruction": f"Count to {i}.", "input": "", "output": f"{i}"} for i in range(20)]
    write_json(folder / "mine.json", rows)
    write_json(folder / "dataset_info.json", {"mine": {"file_name": "mine.json"}})
    return folder


def test_llamafactory_yaml_is_mapped(tmp_path, tiny_model_dir, capsys):
    folder = _registry(tmp_path)
    path = _write(
        tmp_path,
        yaml.safe_dump(
            {
                "model_name_or_path": str(tiny_model_dir),
                "stage": "sft",
                "do_train": True,
                "finetuning_type": "lora",
                "lora_rank": 4,
                "lora_target": "q_proj,v_proj",
                "dataset": "mine",
                "dataset_dir": "data",  # relative to the config file's folder
                "template": "qwen",
                "cutoff_len": 128,
                "max_samples": 10,
                "val_size": 0.2,
                "overwrite_cache": True,
                "output_dir": str(tmp_path / "out"),
                "per_device_train_batch_size": 2,
                "gradient_accumulation_steps": 2,
                "learning_rate": 1.0e-4,
                "num_train_epochs": 2.0,
                "lr_scheduler_type": "cosine",
                "plot_loss": True,
                "report_to": "none",
            }
        ),
    )
    loaded = load_config(path)
    config = loaded.config
    assert loaded.dialect == "llamafactory"
    assert (config.adapter, config.lora_r, config.lora_target_modules) == (
        "lora", 4, ["q_proj", "v_proj"],
    )  # fmt: skip
    assert config.datasets[0].path == f"{folder / 'dataset_info.json'}:mine"
    assert config.datasets[0].max_examples == 10
    assert (config.sequence_len, config.val_set_size, config.micro_batch_size) == (128, 0.2, 2)
    assert config.chat_template == "tokenizer_default"
    notes = "\n".join(loaded.notes)
    assert "template 'qwen'" in notes and "overwrite_cache" in notes and "plot_loss" in notes
    code, err = cli(["validate", str(path)], capsys)
    assert code == 0, err
    assert "8 samples" in err  # 10 rows, 2 held out


def test_llamafactory_lora_target_all_is_every_linear_layer(tmp_path, tiny_model_dir):
    folder = _registry(tmp_path)
    path = _write(
        tmp_path,
        f"model_name_or_path: {tiny_model_dir}\ndataset: mine\ndataset_dir: {folder}\n"
        "lora_target: all\n",
    )
    config = load_config(path).config
    assert config.lora_target_linear and config.lora_targets == "all-linear"


def test_llamafactory_keys_without_meaning_are_named(tmp_path, tiny_model_dir):
    _registry(tmp_path)
    base = (
        f"model_name_or_path: {tiny_model_dir}\ndataset: mine\ndataset_dir: {tmp_path / 'data'}\n"
    )
    path = _write(tmp_path, base + "finetuning_type: freeze\nmask_history: true\n")
    problems = _problems(path)
    assert any(p.startswith("finetuning_type: 'freeze' is not supported yet") for p in problems)
    assert any(p.startswith("mask_history:") and "LLaMA-Factory" in p for p in problems)
    path.write_text(base + "stage: dpo\n")
    assert len(_problems(path)) == 1 and "stage: dpo" in _problems(path)[0]


def test_a_hub_configuration_name_on_local_data_is_noted(alpaca_file):
    from tunelab.data.prepare import load_examples

    loaded = load_config(overrides={"datasets": [{"path": str(alpaca_file), "name": "en"}]})
    notes = load_examples(loaded.config).notes
    assert any("name 'en'" in n and "not used for local data" in n for n in notes)


def test_an_axolotl_prompt_format_not_supported_is_said_once(tmp_path, alpaca_file):
    path = _write(tmp_path, f"strict: false\ndatasets:\n  - path: {alpaca_file}\n    type: oasst\n")
    problems = _problems(path)
    assert len(problems) == 1
    assert problems[0].startswith("datasets.0.type: axolotl's prompt format 'oasst' is not")


def test_absent_keys_take_the_dialects_defaults(tmp_path, alpaca_file, tiny_model_dir):
    """What a file leaves out means what its own tool does without it."""
    theirs = _write(tmp_path, f"strict: false\nadapter: lora\ndatasets:\n  - path: {alpaca_file}\n")
    loaded = load_config(theirs)
    config = loaded.config
    assert (config.val_set_size, config.num_epochs, config.micro_batch_size) == (0.0, 1.0, 1)
    assert (config.sequence_len, config.lora_dropout, config.optimizer) == (
        512, 0.0, "adamw_torch_fused",
    )  # fmt: skip
    assert config.excess_length_strategy == "drop" and not config.dataset_exact_deduplication
    assert loaded.origins["num_epochs"] == "axolotl's default"
    assert any(
        n.startswith("axolotl's defaults for what the file leaves out") for n in loaded.notes
    )
    # what the file gives, and flags, win
    given = load_config(theirs, {"num_epochs": 2}, ["sequence_len=256"]).config
    assert (given.num_epochs, given.sequence_len) == (2, 256)
    ours = load_config(overrides={"datasets": [{"path": str(alpaca_file)}]}).config
    assert (ours.val_set_size, ours.num_epochs) == (0.1, 3.0)  # tunelab's own

    folder = _registry(tmp_path)
    lf = _write(
        tmp_path,
        f"model_name_or_path: {tiny_model_dir}\ndataset: mine\ndataset_dir: {folder}\n",
        "lf.yaml",
    )
    loaded = load_config(lf)
    config = loaded.config
    assert (config.learning_rate, config.lr_scheduler, config.micro_batch_size) == (
        5e-5, "linear", 8,
    )  # fmt: skip
    assert config.lora_target_linear and config.val_set_size == 0.0 and config.warmup_steps == 0
    assert loaded.origins["learning_rate"] == "LLaMA-Factory's default"


def test_llamafactory_max_samples_is_per_dataset(tmp_path, tiny_model_dir):
    folder = _registry(tmp_path)
    write_json(
        folder / "other.json", [{"instruction": f"Say {i}.", "output": f"{i}!"} for i in range(20)]
    )
    info = json.loads((folder / "dataset_info.json").read_text())
    write_json(folder / "dataset_info.json", {**info, "other": {"file_name": "other.json"}})
    lf = _write(
        tmp_path,
        f"model_name_or_path: {tiny_model_dir}\ndataset: mine,other\ndataset_dir: {folder}\n"
        "max_samples: 5\n",
        "lf.yaml",
    )
    from tunelab.data.prepare import load_examples

    config = load_config(lf).config
    assert [d.max_examples for d in config.datasets] == [5, 5]
    assert len(load_examples(config).examples) == 10


@pytest.mark.parametrize(
    "text, problem",
    [
        ("flash_attention: 'yes'\n", "flash_attention: must be true or false"),
        ("attention: 5\n", "attention: must be a name"),
        ("datasets:\n  - path: x\n    type: {field_instruction: a}\n", "custom prompt formats"),
    ],
)
def test_axolotl_values_of_the_wrong_kind_are_named(tmp_path, alpaca_file, text, problem):
    body = text if "datasets" in text else f"datasets:\n  - path: {alpaca_file}\n" + text
    path = _write(tmp_path, "strict: false\n" + body)
    assert any(problem in p for p in _problems(path))


def test_data_files_are_for_hub_datasets(alpaca_file):
    from tunelab.data.prepare import load_examples
    from tunelab.errors import DataError

    loaded = load_config(
        overrides={"datasets": [{"path": str(alpaca_file), "data_files": ["a.jsonl"]}]}
    )
    with pytest.raises(DataError) as caught:
        load_examples(loaded.config)
    assert "data_files picks files from a hub dataset" in caught.value.message


def test_superduperdb_llmtrainer_keys_read_as_tunelab_s(tiny_model_dir, alpaca_file):
    """SuperDuperDB's LLMTrainer takes TrainingArguments' names plus use_lora, bits and
    num_gpus: QLoRA is use_lora with bits 4, evaluation_strategy picks when to evaluate."""
    from tunelab.config import load_config
    from tunelab.errors import ConfigError

    trainer = {
        "model_name_or_path": str(tiny_model_dir), "datasets": [{"path": str(alpaca_file)}],
        "output_dir": "output/finetune", "overwrite_output_dir": True, "num_train_epochs": 3,
        "save_total_limit": 3, "logging_steps": 10, "evaluation_strategy": "steps",
        "save_steps": 100, "eval_steps": 100, "per_device_train_batch_size": 1,
        "per_device_eval_batch_size": 1, "gradient_accumulation_steps": 2,
        "max_seq_length": 128, "use_lora": True, "bits": 4, "num_gpus": 2,
    }  # fmt: skip
    loaded = load_config(data=trainer)
    c = loaded.config
    assert (c.adapter, c.num_epochs, c.micro_batch_size, c.eval_steps, c.sequence_len) == (
        "qlora", 3, 1, 100, 128)  # fmt: skip
    assert loaded.dialect == "tunelab"
    assert any("num_gpus 2" in n for n in loaded.notes)
    assert any(n.startswith("overwrite_output_dir is not used") for n in loaded.notes)
    plain = load_config(data={**trainer, "bits": None, "evaluation_strategy": "epoch"}).config
    assert (plain.adapter, plain.eval_steps, plain.evals_per_epoch) == ("lora", None, 1)
    assert load_config(data={**trainer, "use_lora": False, "bits": None}).config.adapter == "full"
    with pytest.raises(ConfigError) as info:
        load_config(data={**trainer, "use_lora": False, "bits": 4, "evaluation_strategy": "x"})
    assert len(info.value.problems) == 2
    assert info.value.problems[0].startswith("bits: 4 trains an adapter")
