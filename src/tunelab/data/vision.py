"""Image + text samples for multimodal base models.

Text is rendered and masked like any conversation (with the processor's chat template);
each image placeholder is then replaced, untrained, by what the processor itself puts in its
place (image tokens, and for some models the tokens around them), so the token ids are the
processor's own. Pixels are not kept with the tokens: the collator loads and processes the images
of each batch, so a large image dataset does not have to fit in memory.
"""

from __future__ import annotations

from typing import Any

from tunelab.data.formats import VisionSample
from tunelab.data.tokenize import IGNORE_INDEX, render_segments, tokenize_segments


def load_image(path: str) -> Any:
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def image_token_id(processor: Any) -> int:
    token_id = getattr(processor, "image_token_id", None)
    if token_id is None:
        token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return token_id


def image_expansions(processor: Any, text: str, images: list[Any]) -> list[list[int]]:
    """The token ids the processor puts in place of each image placeholder of ``text``, in
    order: the image tokens, and whatever it writes around them (Idefics3 and SmolVLM:
    ``<fake_token_around_image><global-img><image>...<fake_token_around_image>``)."""
    tokenizer = processor.tokenizer
    out = processor(text=[text], images=images, return_text_replacement_offsets=True)
    offsets = out.get("text_replacement_offsets")
    if offsets is not None:
        return [
            tokenizer(o["replacement"], add_special_tokens=False)["input_ids"]
            for o in offsets[0]
            if o["type"] == "image"
        ]
    # a processor of its own that does not report its replacements: each image on its own
    placeholder = tokenizer.convert_ids_to_tokens(image_token_id(processor))
    return [
        list(
            processor(text=[placeholder], images=[image], add_special_tokens=False)["input_ids"][0]
        )
        for image in images
    ]


def tokenize_vision(
    sample: VisionSample, processor: Any, train_on_inputs: bool
) -> tuple[list[int], list[int]]:
    """Token ids and labels with every image placeholder expanded as the processor expands
    it; images (and the tokens around them) are never trained."""
    tokenizer = processor.tokenizer
    segments = render_segments(sample.messages, tokenizer, train_on_inputs, renderer=processor)
    ids, labels = tokenize_segments(segments, tokenizer)
    image_id = image_token_id(processor)
    placeholders = ids.count(image_id)
    if placeholders != len(sample.images):
        raise ValueError(
            f"the chat template shows {placeholders} image placeholders "
            f"for {len(sample.images)} images"
        )
    text = "".join(s.text for s in segments)
    expansions = iter(image_expansions(processor, text, [load_image(p) for p in sample.images]))
    out_ids: list[int] = []
    out_labels: list[int] = []
    for token, label in zip(ids, labels, strict=True):
        if token == image_id:
            expansion = next(expansions)
            out_ids += expansion
            out_labels += [IGNORE_INDEX] * len(expansion)
        else:
            out_ids.append(token)
            out_labels.append(label)
    return out_ids, out_labels


class VisionCollator:
    """Pads token ids and labels, and turns each batch's image files into pixel values."""

    def __init__(self, processor: Any) -> None:
        from transformers import DataCollatorForSeq2Seq

        self.processor = processor
        self.pad = DataCollatorForSeq2Seq(
            processor.tokenizer, padding=True, label_pad_token_id=-100
        )

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        paths = [p for f in features for p in f["images"]]
        batch = self.pad([{k: v for k, v in f.items() if k != "images"} for f in features])
        pixels = self.processor.image_processor(
            images=[load_image(p) for p in paths], return_tensors="pt"
        )
        batch.update(pixels)
        return batch
