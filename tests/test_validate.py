"""`validate` means `train` will start: every check training makes before its first step."""

import json
import shutil

import pytest

from tunelab.config import load_config
from tunelab.errors import ConfigError
from tunelab.train.run import train

from .conftest import cli, write_json


def validate(capsys, data, model, *more):
    return cli(["validate", "--data", str(data), "--base-model", str(model), *more], capsys)


def train_cli(capsys, data, model, out, *more):
    args = ["train", "--data", str(data), "--base-model", str(model), "--output", str(out)]
    return cli([*args, "--no-tensorboard", "--max-steps", "1", *more], capsys)


@pytest.fixture(scope="module")
def no_template_model(tiny_model_dir, tmp_path_factory):
    """The tiny model with its chat template taken away: a plain language model."""
    path = tmp_path_factory.mktemp("plain") / "model"
    shutil.copytree(tiny_model_dir, path)
    (path / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def gpt2_dir(tiny_model_dir, tmp_path_factory):
    """A 2-layer GPT-2-style model with learned positions for only 32 tokens."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("gpt2") / "model"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.save_pretrained(path)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=32, n_embd=32, n_layer=2, n_head=2,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(path)
    return path


@pytest.mark.parametrize("name", ["chatmll", "qwen-3", "jinja"])
def test_an_unknown_chat_template_fails_validate(name, tiny_model_dir, alpaca_file, tmp_path,
                                                 capsys):  # fmt: skip
    code, err = validate(capsys, alpaca_file, tiny_model_dir, "--chat-template", name)
    assert code == 2 and f"chat_template '{name}'" in err and "ok:" not in err
    code, err = train_cli(capsys, alpaca_file, tiny_model_dir, tmp_path / "o", "--chat-template",
                          name)  # fmt: skip
    assert code == 2 and f"chat_template '{name}'" in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", ["qwen3", "phi_3", "tokenizer_default"])
def test_a_model_family_template_name_uses_the_models_own(name, tiny_model_dir, alpaca_file,
                                                          capsys):  # fmt: skip
    code, err = validate(capsys, alpaca_file, tiny_model_dir, "--chat-template", name)
    assert code == 0 and "ok: the configuration is valid" in err


def test_conversations_on_a_model_without_a_chat_template(no_template_model, alpaca_file, capsys):
    code, err = validate(capsys, alpaca_file, no_template_model)
    assert code == 2 and "has no chat template" in err and "ok:" not in err
    code, err = validate(capsys, alpaca_file, no_template_model, "--chat-template", "chatml")
    assert code == 0 and "ok: the configuration is valid" in err
    # a model family's name means the model's own template, which this model does not have
    code, err = validate(capsys, alpaca_file, no_template_model, "--chat-template", "qwen_25")
    assert code == 2 and "chat_template 'qwen_25'" in err and "chat_template_jinja" in err


def test_nothing_left_to_train_fails_validate(tiny_model_dir, tmp_path, capsys):
    rows = [{"instruction": "word " * 60, "output": "yes"} for _ in range(4)]
    data = write_json(tmp_path / "long.json", rows)
    args = ["--sequence-len", "16", "--set", "excess_length_strategy=drop"]
    code, err = validate(capsys, data, tiny_model_dir, *args)
    assert code == 2 and "nothing left to train on" in err and "ok:" not in err


def test_lora_targets_that_match_no_layer(tiny_model_dir, alpaca_file, tmp_path, capsys):
    more = ["--set", "lora_target_modules=[nonexistent_proj]"]
    code, err = validate(capsys, alpaca_file, tiny_model_dir, *more)
    assert code == 2 and "lora_target_modules" in err and "nonexistent_proj" in err
    assert "q_proj" in err  # the names the model does have
    code, err = train_cli(capsys, alpaca_file, tiny_model_dir, tmp_path / "o", *more)
    assert code == 2 and "nonexistent_proj" in err and not (tmp_path / "o").exists()


def test_validate_says_what_training_would_do(tiny_model_dir, alpaca_file, capsys):
    code, err = validate(capsys, alpaca_file, tiny_model_dir, "--max-steps", "3")
    assert code == 0 and "training would start with 4 samples" in err and "3 steps" in err
    assert "chosen automatically:" in err and "lora_r 8 (model size" in err


def test_sequence_len_is_capped_at_the_models_context(gpt2_dir, tmp_path):
    text = tmp_path / "book.txt"
    text.write_text(" ".join(f"the tree of word {i}" for i in range(200)))
    settings = {"base_model": str(gpt2_dir), "datasets": [{"path": str(text), "type": "raw"}],
                "val_set_size": 0, "max_steps": 2, "output_dir": str(tmp_path / "run")}  # fmt: skip
    result = train(load_config(overrides=settings), quiet=True)
    info = json.loads((result.run_dir / "adapter_info.json").read_text())
    assert info["config"]["sequence_len"] == 32 and info["data"]["max_length"] <= 32
    assert info["origins"]["sequence_len"] == "the model's context, 32"
    asked = {**settings, "sequence_len": 64, "output_dir": str(tmp_path / "again")}
    with pytest.raises(ConfigError, match="sequence_len: 64 is longer than the 32 tokens"):
        train(load_config(overrides=asked), quiet=True)
    assert not (tmp_path / "again").exists()


def test_validate_dry_run_and_train_refuse_alike(tiny_model_dir, alpaca_file, tmp_path, capsys):
    """One planning function: a refusal the run makes, the dry run and validate make too."""
    refusal = "reduce_lr_on_plateau (mode adaptive) needs a validation set"
    more = ("--mode", "adaptive", "--set", "val_set_size=0")
    code, err = validate(capsys, alpaca_file, tiny_model_dir, *more)
    assert code == 2 and refusal in err
    code, err = train_cli(capsys, alpaca_file, tiny_model_dir, tmp_path / "dry", "--dry-run", *more)
    assert code == 2 and refusal in err
    code, err = train_cli(capsys, alpaca_file, tiny_model_dir, tmp_path / "run", *more)
    assert code == 2 and refusal in err and not (tmp_path / "run").exists()
