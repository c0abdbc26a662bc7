"""Shared fixtures: a tiny random-weight Llama with a real (small) BPE tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

MEMORISE = [
    {"instruction": "What is the capital of France?", "input": "", "output": "Paris."},
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Repeat the word.", "input": "tree", "output": "tree tree"},
    {"instruction": "Say hello.", "input": "", "output": "Hello there!"},
]


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA (and bitsandbytes); without them they are skipped.
    Tests marked ``cpu_only`` compare results to float32 precision, which holds on a CPU;
    on a CUDA machine tunelab trains and loads in bfloat16, so they are skipped there (their
    marker says why, and the gpu tests cover the same paths with GPU tolerances)."""
    import torch

    cuda = torch.cuda.is_available()
    for item in items:
        if "gpu" in item.keywords and not cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        marker = item.get_closest_marker("cpu_only")
        if marker and cuda:
            item.add_marker(pytest.mark.skip(reason=f"CPU only: {marker.kwargs['reason']}"))


def _corpus() -> list[str]:
    text = [f"{r['instruction']} {r['input']} {r['output']}" for r in MEMORISE]
    return text * 20 + ["user assistant system the a of is to and"] * 20


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama (random weights) and a byte-level BPE tokenizer with a ChatML template."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-llama")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        _corpus(),
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(path)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        # wide enough initial weights that a frozen output head can express confident answers
        initializer_range=0.3,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


VLM_CHAT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}"
    "{{ m['content'] }}{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="session")
def tiny_vlm(tiny_model_dir, tmp_path_factory):
    """A tiny random image-text model (Llava layout) with the tiny tokenizer and <image>."""
    import torch
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )  # fmt: skip

    path = tmp_path_factory.mktemp("tiny-llava")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(
        image_processor=images, tokenizer=tokenizer, patch_size=16, chat_template=VLM_CHAT,
        vision_feature_select_strategy="full", num_additional_image_tokens=1,
    )  # fmt: skip
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            image_size=32, patch_size=16,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )  # fmt: skip
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(path)
    processor.save_pretrained(path)
    return path


# The special tokens of the families these configs were written for (their chat templates
# and eot_tokens name them): the stand-in model knows them all, as the real models do.
FAMILY_TOKENS = [
    "<start_of_turn>", "<end_of_turn>", "<|begin_of_text|>", "<|start_header_id|>",
    "<|end_header_id|>", "<|eot_id|>", "<|end_of_text|>", "<|finetune_right_pad_id|>",
    "<|end|>", "<|user|>", "<|assistant|>", "<|system|>",
]  # fmt: skip


def _long_context(config: dict) -> None:
    for part in (config, config.get("text_config") or {}):
        if "max_position_embeddings" in part:
            part["max_position_embeddings"] = 1 << 20


@pytest.fixture(scope="session")
def long_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with a long context (configs keep their own sequence_len) and the
    special tokens of the model families the configs were written for."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("long-llama")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": FAMILY_TOKENS})
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    _long_context(config)
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="session")
def long_vlm_dir(tiny_vlm, tmp_path_factory) -> Path:
    """The tiny image-text model with a long context."""
    path = tmp_path_factory.mktemp("long-llava")
    shutil.copytree(tiny_vlm, path, dirs_exist_ok=True)
    config = json.loads((path / "config.json").read_text())
    _long_context(config)
    (path / "config.json").write_text(json.dumps(config))
    return path


def write_json(path: Path, rows) -> Path:
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def write_image_rows(folder: Path) -> Path:
    """Four image + caption rows (the ``vision`` format), the images beside them in img/."""
    from PIL import Image

    (folder / "img").mkdir()
    rows = []
    for i, colour in enumerate(["red", "green", "blue", "white"]):
        Image.new("RGB", (40, 30), colour).save(folder / "img" / f"{i}.png")
        rows.append({"image": f"img/{i}.png", "caption": f"A {colour} square."})
    return write_json(folder / "captions.json", rows)


@pytest.fixture
def image_rows(tmp_path) -> Path:
    return write_image_rows(tmp_path)


@pytest.fixture
def alpaca_file(tmp_path) -> Path:
    return write_json(tmp_path / "memorise.json", MEMORISE)


# fp32 everywhere: a CPU with AMX would otherwise train in bf16, and tests that compare a
# trained model with its reloaded adapter would depend on the machine
FAST = {"val_set_size": 0, "micro_batch_size": 4, "logging_steps": 1, "lora_r": 16, "bf16": False}


def run(model_dir, data, out, overwrite=False, **settings):
    """Train on the tiny model with fast settings; ``settings`` override them."""
    from tunelab.config import load_config
    from tunelab.train.run import train

    overrides = {**FAST, "base_model": str(model_dir), "datasets": [{"path": str(data)}]}
    overrides.update(output_dir=str(out), **settings)
    return train(load_config(overrides=overrides), overwrite=overwrite, quiet=True)


@pytest.fixture(scope="session")
def trained(tiny_model_dir, tmp_path_factory):
    """One LoRA run on the memorisable set, with a validation split and checkpoints at
    steps 20 and 40. Tests read it; a test that changes it works on a copy."""
    tmp = tmp_path_factory.mktemp("run")
    data = write_json(tmp / "data.json", MEMORISE * 3)  # 12 rows: 3 held out
    return run(
        tiny_model_dir, data, tmp / "out", max_steps=40, learning_rate=3e-2,
        val_set_size=3, eval_steps=20, save_steps=20,
    )  # fmt: skip


@pytest.fixture
def closed_port():
    """A port on 127.0.0.1 that refuses connections: bound by this test (so no other process
    can take it) but never listening."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def cli(args, capsys):
    """Run the ``tunelab`` command in-process; (exit code, stderr), stdout in ``cli.out``."""
    from tunelab.cli import main

    code = main(args)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    cli.out = out
    return code, err


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server this test session started (see tests/postgres.py)."""
    from .postgres import PostgresServer

    server = PostgresServer()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path) -> str:
    """An empty job store: an SQLite file, then a database on the session's PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'lab.db'}"
    return request.getfixturevalue("postgres").new_database()


@pytest.fixture(scope="session")
def smol_tiny_run(tmp_path_factory):
    """A LoRA run on a tiny random Llama that uses SmolLM2's real tokenizer (one that
    llama.cpp's converter knows), read from the built-in model's GGUF file."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tunelab.model.loading import builtin_gguf, converted_path, is_converted

    tmp = tmp_path_factory.mktemp("smol-tiny")
    gguf = builtin_gguf()
    if is_converted(gguf):  # the built-in model's cache (quick), else its GGUF file (5 s)
        tokenizer = AutoTokenizer.from_pretrained(converted_path(gguf))
    else:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.save_pretrained(tmp / "model")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True, initializer_range=0.3,
    )  # fmt: skip
    import torch

    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp / "model")
    data = write_json(tmp / "data.json", MEMORISE * 3)
    return run(tmp / "model", data, tmp / "run", max_steps=40, learning_rate=3e-2)
