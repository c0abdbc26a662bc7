"""Tiny random-weight image-text models beyond conftest's Llava, built in a second or two.

``make_tiny_idefics3`` lays out a directory like HuggingFaceM4/Idefics3-8B-Llama3's
(``Idefics3ForConditionalGeneration``, the architecture SmolVLM is built on: a SigLIP-style
vision tower, a pixel-shuffle connector and a Llama text model whose modules are
``model.text_model.layers.N.self_attn.q_proj``...), saved by transformers' own
``Idefics3Processor``: a small image processor that does not split images, the tokenizer
with Idefics3's special tokens and a SmolVLM-style chat template. Unlike SmolVLM's processor
(which needs torchvision and num2words for its videos), Idefics3's needs nothing beyond PIL.
"""

from __future__ import annotations

from pathlib import Path

# SmolVLM's chat template without its video parts: content must be a list of parts (a plain
# string content renders nothing), the first message opens with <|im_start|>, and every turn
# ends with <end_of_utterance>.
IDEFICS3_CHAT = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# The tokens Idefics3's processor writes: around and in front of each image, and (for split
# images, which this model does not use) the tile of each part.
IDEFICS3_TOKENS = [
    "<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>",
    *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)),
]  # fmt: skip

IMAGE_SIZE = 64  # the vision tower's input: 64x64 pixels
PATCH_SIZE = 16  # 4x4 patches
SCALE_FACTOR = 2  # the connector's pixel shuffle merges 2x2 patches
IMAGE_SEQ_LEN = (IMAGE_SIZE // PATCH_SIZE) ** 2 // SCALE_FACTOR**2  # 4 <image> tokens an image


def idefics3_image_prompt(tokens_per_image: int = IMAGE_SEQ_LEN) -> str:
    """What Idefics3Processor puts in place of one ``<image>`` when images are not split."""
    image = "<image>" * tokens_per_image
    return f"<fake_token_around_image><global-img>{image}<fake_token_around_image>"


def make_tiny_idefics3(path: Path, tokenizer_dir: Path) -> Path:
    """A 2-layer Idefics3 (random weights) and its processor in ``path``; the tokenizer is
    ``tokenizer_dir``'s (conftest's tiny BPE) with Idefics3's special tokens, and
    <end_of_utterance> as EOS."""
    import torch
    from transformers import (
        AutoTokenizer,
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
        Idefics3VisionConfig,
        LlamaConfig,
    )  # fmt: skip

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": IDEFICS3_TOKENS})
    tokenizer.eos_token = "<end_of_utterance>"
    edge = {"longest_edge": IMAGE_SIZE}
    # The PIL backend: Idefics3ImageProcessor itself needs torchvision, and falls back to it
    images = Idefics3ImageProcessorPil(do_image_splitting=False, size=edge, max_image_size=edge)
    processor = Idefics3Processor(
        image_processor=images, tokenizer=tokenizer, image_seq_len=IMAGE_SEQ_LEN,
        chat_template=IDEFICS3_CHAT,
    )  # fmt: skip
    processor.save_pretrained(path)

    config = Idefics3Config(
        vision_config=Idefics3VisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            initializer_range=0.3, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        ),
        image_token_id=processor.image_token_id,
        scale_factor=SCALE_FACTOR,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Idefics3ForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    return path
