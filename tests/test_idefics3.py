"""Image + caption rows on a tiny random Idefics3 (SmolVLM's architecture: a vision tower, a
pixel-shuffle connector and a Llama text model under ``model.text_model``), with
transformers' own Idefics3Processor."""

import json

import pytest

from tunelab.config import load_config
from tunelab.data.prepare import prepare_data
from tunelab.data.tokenize import IGNORE_INDEX
from tunelab.train.run import train

from .conftest import cli, write_image_rows
from .vlm_models import IMAGE_SEQ_LEN, idefics3_image_prompt, make_tiny_idefics3

TEXT_LAYERS = r"model.text_model.layers.[\d]+.(mlp|self_attn).(up|down|gate|q|k|v|o)_proj"


@pytest.fixture(scope="module")
def idefics3(tiny_model_dir, tmp_path_factory):
    return make_tiny_idefics3(tmp_path_factory.mktemp("tiny-idefics3"), tiny_model_dir)


@pytest.fixture(scope="module")
def image_rows(tmp_path_factory):
    """Four image + caption rows (the ``vision`` format), shared by this module's tests."""
    return write_image_rows(tmp_path_factory.mktemp("idefics3-rows"))


@pytest.fixture(scope="module")
def processor(idefics3):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(idefics3)


@pytest.fixture(scope="module")
def trained(idefics3, image_rows, tmp_path_factory):
    """Two steps of the default LoRA run on the image rows."""
    overrides = {
        "base_model": str(idefics3), "datasets": [{"path": str(image_rows)}],
        "val_set_size": 0, "max_steps": 2, "micro_batch_size": 1,
        "output_dir": str(tmp_path_factory.mktemp("idefics3-run") / "run"),
    }  # fmt: skip
    return train(load_config(overrides=overrides), quiet=True)


def prepared_red(processor, image_rows):
    """The prepared row of img/0.png (red), whatever the shuffled order."""
    config = load_config(
        overrides={"datasets": [{"path": str(image_rows)}], "val_set_size": 0}
    ).config
    data = prepare_data(config, processor.tokenizer, processor=processor)
    return next(item for item in data.train if item["images"][0].endswith("0.png"))


def lora_modules(run_dir):
    from safetensors import safe_open

    with safe_open(str(run_dir / "adapter_model.safetensors"), "pt") as f:
        return {k.split(".lora_")[0] for k in f.keys() if ".lora_" in k}


def test_the_tiny_model_has_idefics3s_layout(idefics3):
    import re

    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(idefics3)
    assert config.model_type == "idefics3" and config.vision_config.image_size == 64
    model = AutoModelForImageTextToText.from_pretrained(idefics3)
    assert type(model).__name__ == "Idefics3ForConditionalGeneration"
    names = [n for n, _ in model.named_modules()]
    assert "model.text_model.layers.1.self_attn.q_proj" in names
    targeted = [n for n in names if re.fullmatch(TEXT_LAYERS, n)]
    assert len(targeted) == 2 * 7  # 2 layers x q k v o gate up down; nothing in vision
    assert sum(p.numel() for p in model.parameters()) < 200_000


def test_the_processor_expands_an_image_as_idefics3_does(processor):
    from PIL import Image

    assert type(processor).__name__ == "Idefics3Processor" and processor.image_seq_len == 4
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A square."}]},
    ]
    text = processor.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|im_start|>User:<image>What?<end_of_utterance>\nAssistant: A square.<end_of_utterance>\n"
    )
    out = processor(text=[text], images=[Image.new("RGB", (40, 30), "red")])
    assert tuple(out["pixel_values"].shape) == (1, 1, 3, 64, 64)
    decoded = processor.tokenizer.decode(out["input_ids"][0])
    assert idefics3_image_prompt() in decoded and decoded.count("<image>") == IMAGE_SEQ_LEN


def test_trains_two_steps_on_image_rows(trained):
    assert trained.steps == 2
    lines = (trained.run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(x)["loss"] > 0 for x in lines)
    assert (trained.run_dir / "processor_config.json").is_file()  # the processor is saved
    adapted = lora_modules(trained.run_dir)
    assert "base_model.model.model.text_model.layers.1.mlp.down_proj" in adapted
    assert not any("vision_model" in m for m in adapted)


def test_lora_on_a_regular_expression_of_text_layers_validates(idefics3, image_rows, tmp_path,
                                                               capsys):  # fmt: skip
    import yaml

    settings = {
        "base_model": str(idefics3), "datasets": [{"path": str(image_rows)}], "val_set_size": 0,
        "adapter": "lora", "lora_target_modules": TEXT_LAYERS, "max_steps": 2,
        "micro_batch_size": 1, "output_dir": str(tmp_path / "run"),
    }  # fmt: skip
    path = tmp_path / "idefics3.yaml"
    path.write_text(yaml.safe_dump(settings), encoding="utf-8")
    code, err = cli(["validate", str(path)], capsys)
    assert code == 0, err
    assert "(vision, 4 rows)" in err and "configuration is valid" in err


# The row's text as the processor sees it: the caption trained, the images expanded as the
# processor expands them (the tokens around them too) and never trained; LoRA leaves the
# vision tower and the connector alone.


def test_the_caption_is_trained(processor, image_rows):
    item = prepared_red(processor, image_rows)
    trained = [i for i, lab in zip(item["input_ids"], item["labels"], strict=True)
               if lab != IGNORE_INDEX]  # fmt: skip
    assert processor.tokenizer.decode(trained) == " A red square.<end_of_utterance>\n"


def test_image_tokens_are_expanded_as_the_processor_does(processor, image_rows):
    from tunelab.data.formats import FORMATS
    from tunelab.data.vision import load_image

    item = prepared_red(processor, image_rows)
    sample = FORMATS["vision"].convert({"image": "img/0.png", "caption": "A red square."})
    text = processor.apply_chat_template(sample.messages, tokenize=False)
    image = load_image(str(image_rows.parent / "img" / "0.png"))
    expected = list(processor(text=[text], images=[image])["input_ids"][0])
    assert item["input_ids"] == expected
    assert all(
        lab == IGNORE_INDEX
        for i, lab in zip(item["input_ids"], item["labels"], strict=True)
        if processor.tokenizer.convert_ids_to_tokens(i) in ("<fake_token_around_image>",
                                                            "<global-img>", "<image>")
    )  # fmt: skip


def test_every_image_of_a_row_is_expanded_as_the_processor_does(processor, image_rows):
    from tunelab.data.formats import FORMATS
    from tunelab.data.vision import load_image, tokenize_vision

    folder = image_rows.parent / "img"
    paths = [str(folder / "1.png"), str(folder / "2.png")]
    sample = FORMATS["vision"].convert({"image": paths, "caption": "Green, then blue."})
    ids, labels = tokenize_vision(sample, processor, train_on_inputs=False)
    text = processor.apply_chat_template(sample.messages, tokenize=False)
    images = [load_image(p) for p in paths]
    assert ids == list(processor(text=[text], images=images)["input_ids"][0])
    decoded = processor.tokenizer.decode(ids)
    assert decoded.count(idefics3_image_prompt()) == 2
    trained = [i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]
    assert processor.tokenizer.decode(trained) == " Green, then blue.<end_of_utterance>\n"


def test_lora_leaves_the_connector_alone(trained):
    assert not any("connector" in m for m in lora_modules(trained.run_dir))
