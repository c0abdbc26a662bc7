"""Every dataset and format file other projects wrote (../shared/data, when present) loads."""

import json
from pathlib import Path

import pytest

from tunelab.config import load_config
from tunelab.data.prepare import load_examples, prepare_data

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
pytestmark = pytest.mark.skipif(
    not SHARED.is_dir(), reason="../shared/data is not beside this checkout"
)

FILES = [
    ("llamafactory/alpaca_en_demo.json", "alpaca"),
    ("llamafactory/identity.json", "alpaca"),
    ("llamafactory/glaive_toolcall_en_demo.json", "sharegpt"),
    ("llamafactory/dpo_en_demo.json", "sharegpt"),
    ("llamafactory/c4_demo.jsonl", "text"),
    ("llamafactory/wiki_demo.txt", "text"),
    ("textgen-webui/datasets/example_messages.json", "openai"),
    ("textgen-webui/datasets/example_sharegpt.json", "sharegpt"),
    ("textgen-webui/datasets/example_text.json", "text"),
]


def load(path, **source):
    return load_examples(
        load_config(overrides={"datasets": [{"path": str(path), **source}]}).config
    )


@pytest.mark.parametrize("name, fmt", FILES)
def test_each_file_loads_with_its_format(name, fmt):
    data = load(SHARED / name)
    assert data.sources[0].format == fmt and len(data.examples) > 0


def test_the_llamafactory_registry():
    data = load(SHARED / "llamafactory" / "dataset_info.json")
    names = {Path(s.path.split(" ")[0]).name for s in data.sources}
    assert names == {Path(n).name for n, _ in FILES if n.startswith("llamafactory")}


@pytest.mark.parametrize("name", ["ChatML", "alpaca-chatbot", "alpaca"])
def test_format_files_on_alpaca_data(name):
    fmt = SHARED / "textgen-webui" / "formats" / f"{name}-format.json"
    data = load(SHARED / "llamafactory" / "alpaca_en_demo.json", format_file=str(fmt))
    assert len(data.examples) > 900


def test_llama2_and_vicuna_format_files(tmp_path):
    rows = [
        {"modelanswer": "Hi", "userprompt": "Hello"},
        {"modelanswer": "Blue", "userprompt": "Colour?", "systemprompt": "Brief."},
    ]
    (tmp_path / "l2.json").write_text(json.dumps(rows))
    fmt = SHARED / "textgen-webui" / "formats" / "llama2-chat-format.json"
    data = load(tmp_path / "l2.json", format_file=str(fmt))
    prompts = sorted(ex.sample.parts[0][0] for ex in data.examples)
    assert prompts[0] == "<s>[INST] <<SYS>>\n\n<</SYS>>\n\nHello[/INST] "
    assert prompts[1] == "<s>[INST] <<SYS>>\nBrief.\n<</SYS>>\n\nColour?[/INST] "
    vicuna = SHARED / "textgen-webui" / "formats" / "vicuna-format.json"
    (tmp_path / "v.json").write_text(json.dumps([{"instruction": "Hi", "output": "Yo"}]))
    assert load(tmp_path / "v.json", format_file=str(vicuna)).examples[0].sample.parts[1] == (
        "Yo",
        True,
    )


def test_raw_wiki_text_chunks(tiny_tokenizer):
    source = {
        "path": str(SHARED / "llamafactory" / "wiki_demo.txt"),
        "type": "raw",
        "cutoff_len": 256,
        "overlap_len": 32,
    }
    config = load_config(
        overrides={"datasets": [source], "val_set_size": 0, "sequence_len": 300}
    ).config
    data = prepare_data(config, tiny_tokenizer)
    assert data.stats["train_samples"] > 30 and data.stats["truncated"] == 0
