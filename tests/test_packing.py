"""Packing: several samples per row, each with exactly the loss it has on its own."""

import json

import torch

from tunelab.config import load_config
from tunelab.data.packing import efficiency, pack
from tunelab.data.prepare import prepare_data
from tunelab.train.trainer import PackedRowsCollator


def per_sample_losses(model, batch, boundaries):
    """Summed token losses of each sample (labels shifted as the model does)."""
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits[
            0
        ]
    labels = batch["labels"][0]
    token_loss = torch.nn.functional.cross_entropy(
        logits[:-1].float(), labels[1:], ignore_index=-100, reduction="none"
    )
    return [token_loss[a : b - 1].sum().item() for a, b in boundaries]


def test_best_fit_packing_respects_capacity():
    samples = [{"input_ids": [1] * n, "labels": [1] * n} for n in (7, 5, 4, 3, 1)]
    rows = pack(samples, capacity=8)
    sizes = sorted(sum(len(s) for s in row["input_ids"]) for row in rows)
    assert sizes == [5, 7, 8] or sizes == [7, 8, 5] or max(sizes) <= 8
    assert sorted(len(s) for row in rows for s in row["input_ids"]) == [1, 3, 4, 5, 7]
    assert len(rows) == 3 and efficiency(rows, 8) == 20 / 24


def test_each_sample_has_the_same_loss_packed_or_not(tiny_model_dir, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    rows = [
        {"instruction": "What is the capital of France?", "output": "Paris."},
        {"instruction": "Repeat the word.", "input": "tree", "output": "tree tree"},
        {"instruction": "Say hello.", "output": "Hello there!"},
    ]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows))
    config = load_config(
        overrides={"datasets": [{"path": str(path)}], "val_set_size": 0, "sample_packing": True,
                   "sequence_len": 256, "shuffle_merged_datasets": False}
    ).config  # fmt: skip
    data = prepare_data(config, tiny_tokenizer)
    assert data.stats["packed_rows"] == 1 and data.stats["samples_per_row"] == 3
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    collate = PackedRowsCollator()
    packed = collate(data.train)
    assert "attention_mask" not in packed
    samples = data.train[0]
    bounds, start = [], 0
    for ids in samples["input_ids"]:
        bounds.append((start, start + len(ids)))
        start += len(ids)
    assert packed["position_ids"][0].tolist() == [
        i for ids in samples["input_ids"] for i in range(len(ids))
    ]
    together = per_sample_losses(model, packed, bounds)
    alone = []
    for ids, labels in zip(samples["input_ids"], samples["labels"], strict=True):
        single = {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels])}
        alone += per_sample_losses(model, single, [(0, len(ids))])
    assert all(abs(a - b) < 1e-5 for a, b in zip(alone, together, strict=True)), (alone, together)
    # and without the restart the samples would see each other: the check can fail
    crossed = dict(packed, position_ids=torch.arange(start)[None])
    assert (
        max(
            abs(a - b)
            for a, b in zip(alone, per_sample_losses(model, crossed, bounds), strict=True)
        )
        > 1e-3
    )


def test_packed_training_runs(tiny_model_dir, tmp_path):
    from tunelab.train.run import train

    from .conftest import MEMORISE

    path = tmp_path / "d.json"
    path.write_text(json.dumps(MEMORISE))
    overrides = {
        "base_model": str(tiny_model_dir), "datasets": [{"path": str(path)}], "val_set_size": 0,
        "sample_packing": True, "sequence_len": 64, "max_steps": 3, "output_dir": str(tmp_path / "run"),
    }  # fmt: skip
    result = train(load_config(overrides=overrides), quiet=True)
    info = json.loads((result.run_dir / "adapter_info.json").read_text())
    assert result.steps == 3 and info["data"]["packing_efficiency"] > 0.5
