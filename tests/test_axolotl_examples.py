"""Every axolotl config in ../shared/data/axolotl validates, with only its paths changed.

Each config is ported as a user would: ``base_model`` becomes a local tiny model (an
image-text one for image-text configs), each dataset path a local file in the shape the
dataset's ``type`` reads, ``output_dir`` and ``dataset_prepared_path`` a temporary folder.
Nothing else is touched. Preference and reward configs get one line saying that this
training is not supported yet.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tunelab.cli import main
from tunelab.config import load_config
from tunelab.config.keys import IGNORED, axolotl_keys, axolotl_top_keys
from tunelab.config.schema import DatasetSource, TuneConfig
from tunelab.errors import ConfigError

from .conftest import _long_context

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "axolotl"
CONFIGS = sorted(SHARED.glob("examples/*.y*ml")) + sorted(SHARED.glob("*.yml"))
pytestmark = pytest.mark.skipif(not CONFIGS, reason="../shared/data/axolotl is not here")

PREFERENCE = {
    "falcon-e__falcon-e-3b-dpo.yaml",
    "llama-3__instruct-dpo-lora-8b.yml",
    "llama-3__qlora-1b-kto.yaml",
    "mistral__orpo__mistral-qlora-orpo.yml",
    "qwen2__dpo.yaml",
    "qwen2__prm.yaml",
    "qwen2__reward-model.yaml",
}
# Supervised configs tunelab cannot train yet, each with the reason it says.
NOT_YET = {
    "voxtral__voxtral-mini-audio-qlora.yml": "audio",
}
AUDIO = {"voxtral__voxtral-mini-audio-qlora.yml"}
IMAGE_TEXT = {
    "gemma3__gemma-3-4b-vision-qlora.yml",
    "llama-3-vision__lora-11b.yaml",
    "qwen2-vl__lora-7b.yaml",
    "smolvlm2__smolvlm2-2B-lora.yaml",
}
LONG_TEXT = " ".join(["the user asked and the assistant answered"] * 40)


def _turn(entry: dict, role: str, content) -> dict:
    props = dict(entry.get("message_property_mappings") or {})
    role_key = entry.get("message_field_role") or props.get("role", "role")
    content_key = entry.get("message_field_content") or props.get("content", "content")
    names = entry.get("roles") or {}
    name = (names.get(role) or [role])[0]
    return {role_key: name, content_key: content}


def _rows(entry: dict, media: str | None, image_dir: Path, min_len: int) -> list[dict]:
    """Rows in the shape axolotl reads for this dataset entry (``media``: 'image' or 'audio'
    parts in the user turns; ``min_len``: the fewest tokens a sample may have)."""
    kind = str(entry.get("type", "alpaca")).split(":")[0]
    if kind in ("completion", "pretrain"):
        column = entry.get("field") or entry.get("text_column") or "text"
        repeat = 1 + min_len // 200  # LONG_TEXT is more than 200 tokens
        return [
            {column: f"{LONG_TEXT * repeat} number {i}"} for i in range(8 if repeat == 1 else 2)
        ]
    if kind == "alpaca":
        return [
            {"instruction": f"Say {w}.", "input": "" if i % 2 else "twice", "output": f"{w} {w}"}
            for i, w in enumerate(["red", "green", "blue", "tree", "sky", "sea", "sun", "moon"])
        ]
    rows = []
    for i, w in enumerate(["red", "green", "blue", "tree", "sky", "sea", "sun", "moon"]):
        question: object = f"Name something {w}, number {i}."
        if media == "image":
            question = [{"type": "image"}, {"type": "text", "text": question}]
        elif media == "audio":
            question = [{"type": "audio", "path": "sound.oga"}, {"type": "text", "text": question}]
        answer = _turn(entry, "assistant", f"A {w} thing.")
        if entry.get("field_thinking"):
            answer[entry["field_thinking"]] = f"They want {w}."
        row = {entry.get("field_messages", "messages"): [_turn(entry, "user", question), answer]}
        if media == "image":
            row["images"] = [str(image_dir / f"{i % 2}.png")]
        rows.append(row)
    return rows


def port(config: dict, tmp: Path, model: Path, media: str | None, image_dir: Path) -> dict:
    """The config with only its model, data and output paths changed to local ones."""
    config = dict(config)
    config["base_model"] = str(model)
    for key in ("base_model_config", "tokenizer_config"):
        if config.get(key):
            config[key] = str(model)
    for key in ("datasets", "pretraining_dataset"):
        entries = []
        for i, entry in enumerate(config.get(key) or []):
            entry = {k: v for k, v in entry.items() if k not in ("data_files", "name")}
            path = tmp / f"{key}-{i}.jsonl"
            rows = _rows(entry, media, image_dir, config.get("min_sample_len") or 0)
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            entries.append({**entry, "path": str(path)})
        if entries:
            config[key] = entries
    config["output_dir"] = str(tmp / "out")
    if config.get("dataset_prepared_path"):
        config["dataset_prepared_path"] = str(tmp / "prepared")
    return config


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    for i, colour in enumerate(["red", "blue"]):
        Image.new("RGB", (40, 30), colour).save(folder / f"{i}.png")
    return folder


def _validate(path: Path, capsys) -> tuple[int, str]:
    code = main(["validate", str(path)])
    captured = capsys.readouterr()
    return code, captured.err


# Configs whose settings name the modules or config of their own architecture get a tiny
# random model of that architecture (SmolVLM's is Idefics3's; gpt-oss is stored in MXFP4).
STAND_INS = {
    "smolvlm2__smolvlm2-2B-lora.yaml": "idefics3",
    "mistral__bigstral__bigstral-ds-zero3.yaml": "mixtral",
    "gpt-oss__gpt-oss-20b-fft-deepspeed-zero3.yaml": "gpt_oss",
    "gpt-oss__gpt-oss-20b-fft-fsdp2.yaml": "gpt_oss",
    "gpt-oss__gpt-oss-20b-sft-lora-singlegpu.yaml": "gpt_oss",
}
_SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=1 << 20)  # fmt: skip


def _text_stand_in(kind: str, path: Path, tokenizer_dir: Path) -> Path:
    import torch
    from transformers import (
        AutoTokenizer,
        GptOssConfig,
        GptOssForCausalLM,
        MixtralConfig,
        MixtralForCausalLM,
    )

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    if kind == "mixtral":
        config = MixtralConfig(vocab_size=len(tokenizer), num_local_experts=2, **_SMALL)
        model = MixtralForCausalLM(config)
    else:
        config = GptOssConfig(vocab_size=len(tokenizer), head_dim=8, num_local_experts=4,
                              num_experts_per_tok=2, **_SMALL)  # fmt: skip
        model = GptOssForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    if kind == "gpt_oss":  # its checkpoints are stored in MXFP4, which the configs dequantize
        saved = json.loads((path / "config.json").read_text())
        saved["quantization_config"] = {"quant_method": "mxfp4"}
        (path / "config.json").write_text(json.dumps(saved))
    return path


@pytest.fixture(scope="module")
def stand_ins(long_model_dir, tiny_model_dir, tmp_path_factory):
    """Tiny models of the architectures in STAND_INS, built when first asked for."""
    built: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in built:
            path = tmp_path_factory.mktemp(kind)
            if kind == "idefics3":
                from .vlm_models import make_tiny_idefics3

                make_tiny_idefics3(path, tiny_model_dir)
                config = json.loads((path / "config.json").read_text())
                _long_context(config)
                (path / "config.json").write_text(json.dumps(config))
            else:
                _text_stand_in(kind, path, long_model_dir)
            built[kind] = path
        return built[kind]

    return get


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_validates(path, tmp_path, long_model_dir, long_vlm_dir, stand_ins, images,
                           capsys):  # fmt: skip
    config = yaml.safe_load(path.read_text())
    if path.name in PREFERENCE:
        with pytest.raises(ConfigError) as caught:
            load_config(path)
        assert len(caught.value.problems) == 1
        assert "is not supported yet" in caught.value.problems[0]
        return
    image_text = path.name in IMAGE_TEXT
    model = long_vlm_dir if image_text else long_model_dir
    if path.name in STAND_INS:
        model = stand_ins(STAND_INS[path.name])
    ported = tmp_path / path.name
    media = "image" if image_text else "audio" if path.name in AUDIO else None
    ported.write_text(yaml.safe_dump(port(config, tmp_path, model, media, images)))
    code, err = _validate(ported, capsys)
    if path.name in NOT_YET:
        assert code != 0 and NOT_YET[path.name] in err and "not supported yet" in err
        return
    assert code == 0, err
    assert "ok: the configuration is valid" in err
    loaded = load_config(ported)
    assert loaded.dialect == "axolotl"
    if not config.get("adapter"):  # axolotl's rule: no adapter is full fine-tuning
        assert loaded.config.adapter == "full"
    needs_gpu = (
        config.get("adapter") == "qlora"
        or config.get("load_in_8bit")
        or "bnb" in str(config.get("optimizer"))
        or "8bit" in str(config.get("optimizer"))
        or "4bit" in str(config.get("optimizer"))
        or config.get("flash_attention")
        or "flash" in str(config.get("attn_implementation"))
    )
    if needs_gpu:  # it validates, and says that this machine cannot run it
        assert "valid, but this machine cannot run it" in err


def test_every_key_of_the_examples_is_known():
    """A key in the shared examples is tunelab's, or in axolotl's key list (implemented,
    ignored with a note, or refused): never an unknown key."""
    top = axolotl_top_keys() | set(TuneConfig.model_fields)
    entry = axolotl_keys()["dataset"] | set(DatasetSource.model_fields)
    for path in CONFIGS:
        config = yaml.safe_load(path.read_text())
        assert not set(config) - top, path.name
        for ds in (config.get("datasets") or []) + (config.get("pretraining_dataset") or []):
            assert not set(ds) - entry, path.name


def test_key_list_names_its_source():
    text = (Path(__file__).parents[1] / "src/tunelab/config/axolotl_keys.txt").read_text()
    assert "axolotl 0.19.0" in text.splitlines()[0]
    assert len(axolotl_keys()["config"]) > 300
    assert set(IGNORED) <= axolotl_top_keys()  # every ignored key is one of axolotl's


def test_measured_share_matches_the_readme():
    """The README states how many of the examples validate; keep it true."""
    supervised = [p for p in CONFIGS if p.parent.name == "examples" and p.name not in PREFERENCE]
    passing = len([p for p in supervised if p.name not in NOT_YET])
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert f"{passing} of the {len(supervised)} supervised" in readme
