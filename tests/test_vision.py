"""Image + caption rows on a tiny random image-text model (Llava layout)."""

import json

from tunelab.config import load_config
from tunelab.data.prepare import prepare_data
from tunelab.data.tokenize import IGNORE_INDEX
from tunelab.train.run import train


def test_image_tokens_expand_and_only_the_caption_is_trained(tiny_vlm, image_rows):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_vlm)
    config = load_config(
        overrides={"datasets": [{"path": str(image_rows)}], "val_set_size": 0}
    ).config
    data = prepare_data(config, processor.tokenizer, processor=processor)
    item = data.train[0]
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert item["input_ids"].count(image_id) == 5  # 4 patches + the class token
    assert item["images"][0].endswith(".png")
    trained = [
        i for i, lab in zip(item["input_ids"], item["labels"], strict=True) if lab != IGNORE_INDEX
    ]
    text = processor.tokenizer.decode(trained)
    assert text.startswith("A ") and text.endswith("square.<|im_end|>\n")
    assert all(
        lab == IGNORE_INDEX
        for i, lab in zip(item["input_ids"], item["labels"], strict=True)
        if i == image_id
    )


def test_trains_an_image_text_model(tiny_vlm, image_rows, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    overrides = {
        "base_model": str(tiny_vlm), "datasets": [{"path": str(image_rows)}], "val_set_size": 0,
        "max_steps": 6, "learning_rate": 1e-2, "micro_batch_size": 4, "logging_steps": 1,
        "output_dir": str(tmp_path / "run"),
    }  # fmt: skip
    result = train(load_config(overrides=overrides), quiet=True)
    assert result.steps == 6
    losses = [
        json.loads(x)["loss"] for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert losses[-1] < losses[0]  # every step sees all four rows: the same batch, learned
    adapted = json.loads((result.run_dir / "adapter_config.json").read_text())
    assert "vision" in (adapted.get("exclude_modules") or "")
    assert (result.run_dir / "processor_config.json").is_file()  # the processor is saved
    base = AutoModelForImageTextToText.from_pretrained(tiny_vlm)
    tuned = PeftModel.from_pretrained(base, str(result.run_dir))
    names = [n for n, _ in tuned.named_modules() if n.endswith("lora_A")]
    assert names and not any("vision" in n or "projector" in n for n in names)


def test_inspect_image_rows(tiny_vlm, image_rows, capsys):
    from tunelab.cli import main

    code = main(
        [
            "data",
            "inspect",
            "--data",
            str(image_rows),
            "--model",
            str(tiny_vlm),
            "--json",
            "-n",
            "1",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0 and "Traceback" not in err
    rep = json.loads(out)
    assert rep["files"][0]["format"] == "vision"
    segments = rep["examples"][0]["segments"]
    assert segments[-1]["trained"] and segments[-1]["text"].endswith("square.<|im_end|>\n")
    assert "<image>" in segments[0]["text"] and not segments[0]["trained"]
