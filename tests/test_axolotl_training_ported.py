"""Three of axolotl's own configs, ported, train on a tiny model with the prompt format and
loss mask axolotl builds.

The expected texts are written from axolotl's format strings (its AlpacaPrompter and the
llama3 chat template), not from tunelab's code. Settings this CPU cannot run (a paged 8-bit
optimizer, flash attention, an 8-bit base) are swapped for ones it can, and
``sequence_len`` is shortened so that a few steps take seconds.
"""

from __future__ import annotations

import json

import pytest
import yaml

from tunelab.config import load_config
from tunelab.data.tokenize import IGNORE_INDEX
from tunelab.train.plan import plan_run
from tunelab.train.run import train

from .test_axolotl_examples import SHARED, port

pytestmark = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data/axolotl is not here")

ON_A_CPU = ["sequence_len=256", "max_steps=3", "logging_steps=1", "attn_implementation=sdpa"]
SYSTEM_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
)
SYSTEM_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n"
)


def _ported(name: str, tmp_path, model, extra: dict | None = None):
    config = yaml.safe_load((SHARED / "examples" / name).read_text())
    ported = port(config, tmp_path, model, None, tmp_path)
    ported.update(extra or {})
    path = tmp_path / name
    path.write_text(yaml.safe_dump(ported))
    return path


def _runs(ids: list[int], labels: list[int], tokenizer) -> list[tuple[str, bool]]:
    """The sample as runs of (text, trained), in order."""
    runs: list[tuple[list[int], bool]] = []
    for token, label in zip(ids, labels, strict=True):
        trained = label != IGNORE_INDEX
        if runs and runs[-1][1] == trained:
            runs[-1][0].append(token)
        else:
            runs.append(([token], trained))
    return [(tokenizer.decode(t), trained) for t, trained in runs]


def _sample_runs(rp) -> list[tuple[str, bool]]:
    """The runs of every training sample (a packed row keeps its samples apart)."""
    out = []
    for item in rp.data.train:
        ids, labels = item["input_ids"], item["labels"]
        pairs = zip(ids, labels, strict=True) if isinstance(ids[0], list) else [(ids, labels)]
        for sample_ids, sample_labels in pairs:
            out += _runs(sample_ids, sample_labels, rp.tokenizer)
    return out


def _alpaca_runs(tokenizer, rows) -> list[tuple[str, bool]]:
    """What axolotl's `type: alpaca` builds for ``rows``: the prompt, then output + EOS."""
    out = []
    for row in rows:
        if row["input"]:
            prompt = (f"{SYSTEM_INPUT}### Instruction:\n{row['instruction']}\n\n### Input:\n"
                      f"{row['input']}\n\n### Response:\n")  # fmt: skip
        else:
            prompt = f"{SYSTEM_NO_INPUT}### Instruction:\n{row['instruction']}\n\n### Response:\n"
        out += [(prompt, False), (row["output"] + tokenizer.eos_token, True)]
    return out


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _check_trains(loaded) -> dict:
    run = train(loaded, quiet=True)
    status = json.loads((run.run_dir / "status.json").read_text())
    assert status["state"] == "completed" and status["step"] == 3
    return status


def _plan(path, sets):
    loaded = load_config(path, sets=sets)
    return loaded, plan_run(loaded, lambda line: None, strict=False)


def test_full_fine_tune_8b_config(tmp_path, long_model_dir):
    """examples/llama-3/fft-8b.yaml has no adapter: every weight is trained, on the Alpaca
    prompt, with only the response and EOS in the loss."""
    path = _ported("llama-3__fft-8b.yaml", tmp_path, long_model_dir)
    loaded, rp = _plan(path, [*ON_A_CPU, "optimizer=adamw_torch", "val_set_size=0"])
    assert loaded.config.adapter == "full" and loaded.config.learning_rate == 2e-5
    assert rp.trainable == rp.total  # all weights
    rows = _rows(tmp_path / "datasets-0.jsonl")
    expected = _alpaca_runs(rp.tokenizer, rows)
    assert sorted(_sample_runs(rp)) == sorted(expected)  # packed in another order
    run = _check_trains(loaded)
    out = tmp_path / "out"
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    assert run["state"] == "completed"


def test_lora_alpaca_config(tmp_path, long_model_dir):
    """examples/llama-3/lora-1b.yml: LoRA on axolotl's Alpaca prompt."""
    path = _ported("llama-3__lora-1b.yml", tmp_path, long_model_dir)
    # the config's loss watchdog (5.0) would stop a random-weight model: its loss starts at 6.9
    sets = [*ON_A_CPU, "optimizer=adamw_torch", "val_set_size=0", "loss_watchdog_threshold=20"]
    loaded, rp = _plan(path, sets)
    assert loaded.config.adapter == "lora" and loaded.config.lora_r == 16
    expected = _alpaca_runs(rp.tokenizer, _rows(tmp_path / "datasets-0.jsonl"))
    assert sorted(_sample_runs(rp)) == sorted(expected)
    _check_trains(loaded)
    assert (tmp_path / "out" / "adapter_config.json").is_file()


@pytest.mark.parametrize("roles", [["assistant"], ["user", "assistant"]])
def test_chat_template_config_with_roles_to_train(roles, tmp_path, long_model_dir):
    """examples/llama-3/instruct-lora-8b.yml (chat_template: llama3, roles mapped) with
    roles_to_train: the content of those turns and the end-of-turn token after each are
    trained, the template's headers never."""
    name = "llama-3__instruct-lora-8b.yml"
    config = yaml.safe_load((SHARED / "examples" / name).read_text())
    dataset = {**config["datasets"][0], "roles_to_train": roles, "train_on_eos": "turn"}
    path = _ported(name, tmp_path, long_model_dir)
    ported = yaml.safe_load(path.read_text())
    ported["datasets"][0].update({k: dataset[k] for k in ("roles_to_train", "train_on_eos")})
    ported["eot_tokens"] = ["<|eot_id|>"]
    path.write_text(yaml.safe_dump(ported))
    sets = [*ON_A_CPU, "optimizer=adamw_torch", "load_in_8bit=false", "val_set_size=0"]
    loaded, rp = _plan(path, sets)
    header = "<|start_header_id|>{}<|end_header_id|>\n\n"
    expected = []
    for row in _rows(tmp_path / "datasets-0.jsonl"):
        user, answer = (turn["content"] for turn in row["messages"])
        runs = [
            (header.format("user"), False),
            (f"{user}<|eot_id|>", "user" in roles),
            (header.format("assistant"), False),
            (f"{answer}<|eot_id|>", True),
        ]
        merged: list[tuple[str, bool]] = []
        for text, trained in runs:  # neighbours with the same state form one run
            if merged and merged[-1][1] == trained:
                merged[-1] = (merged[-1][0] + text, trained)
            else:
                merged.append((text, trained))
        expected.append(merged)
    found = [_runs(x["input_ids"], x["labels"], rp.tokenizer) for x in rp.data.train]
    assert sorted(found) == sorted(expected)
    _check_trains(loaded)
