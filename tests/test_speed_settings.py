"""Speed settings change how fast a run trains, never what it learns: each is compared on
and off, per sample and over whole runs."""

import json

import pytest
import torch

from tunelab.train.fastlora import cpu_dropout, speed_up_lora
from tunelab.train.loss import chunked_causal_lm_loss, chunked_loss_problem

from .conftest import MEMORISE, run, write_json


def lora_model(model_dir, dropout=0.0, seed=0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    settings = LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear",
                          task_type="CAUSAL_LM")  # fmt: skip
    model = get_peft_model(model, settings)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero; give the adapter an effect to compare
            torch.nn.init.normal_(param, std=0.05)
    return model


def batch(vocab: int, seed: int = 1):
    """Three samples of different lengths, right-padded, prompts masked."""
    g = torch.Generator().manual_seed(seed)
    lengths, width = [17, 9, 12], 17
    ids = torch.randint(3, vocab, (3, width), generator=g)
    mask = torch.zeros(3, width, dtype=torch.long)
    labels = torch.full((3, width), -100)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
        labels[row, n // 2 : n] = ids[row, n // 2 : n]  # the second half is the answer
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def own_loss(model, inputs, count=None):
    extra = {"num_items_in_batch": count} if count is not None else {}
    return model(**inputs, **extra).loss


def chunked_loss(model, inputs, count=None):
    head = model.get_output_embeddings()
    return chunked_causal_lm_loss(model, head, dict(inputs), count)[0]


def per_sample(loss_fn, model, inputs):
    return torch.stack(
        [loss_fn(model, {k: v[i : i + 1] for k, v in inputs.items()}) for i in range(3)]
    )


def lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_the_chunked_loss_is_the_models_own_loss(tiny_model_dir, monkeypatch):
    from tunelab.train import loss as loss_module

    monkeypatch.setattr(loss_module, "CHUNK", 5)  # several chunks, the last one short
    model = lora_model(tiny_model_dir)
    assert chunked_loss_problem(model) is None
    inputs = batch(model.config.vocab_size)
    own, chunked = per_sample(own_loss, model, inputs), per_sample(chunked_loss, model, inputs)
    assert torch.allclose(own, chunked, rtol=1e-5), (own, chunked)
    assert len(set(own.tolist())) == 3  # three different samples, three different losses
    for count in (None, 40):  # the mean over the batch, or the sum over a given count
        model.zero_grad()
        expected = own_loss(model, inputs, count)
        expected.backward()
        want = lora_grads(model)
        model.zero_grad()
        got = chunked_loss(model, inputs, count)
        got.backward()
        have = lora_grads(model)
        assert torch.allclose(expected, got, rtol=1e-5)
        assert want.keys() == have.keys() and len(want) > 0
        for name in want:
            assert torch.allclose(want[name], have[name], rtol=1e-4, atol=1e-7), name


def test_the_chunked_loss_trains_a_full_fine_tune_head_too(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    inputs = batch(model.config.vocab_size)
    own_loss(model, inputs).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    chunked_loss(model, inputs).backward()
    for name, param in model.named_parameters():  # the head (tied or not) included
        assert torch.allclose(want[name], param.grad, rtol=1e-4, atol=1e-6), name


def test_fast_lora_is_peft_lora(tiny_model_dir):
    reference = lora_model(tiny_model_dir)
    fast = lora_model(tiny_model_dir)
    assert speed_up_lora(fast) == 7 * reference.config.num_hidden_layers
    inputs = batch(reference.config.vocab_size)
    assert torch.allclose(
        per_sample(own_loss, reference, inputs), per_sample(own_loss, fast, inputs), rtol=1e-5
    )
    own_loss(reference, inputs).backward()
    own_loss(fast, inputs).backward()
    want, have = lora_grads(reference), lora_grads(fast)
    assert want.keys() == have.keys() and len(want) > 0
    for name in want:
        assert torch.allclose(want[name], have[name], rtol=1e-4, atol=1e-7), name


def test_fast_lora_falls_back_where_it_does_not_apply(tiny_model_dir):
    model = lora_model(tiny_model_dir)
    speed_up_lora(model)
    inputs = batch(model.config.vocab_size)
    with model.disable_adapter():  # the base model alone: peft's own path
        base = own_loss(model, inputs)
    assert not torch.allclose(base, own_loss(model, inputs))


def test_the_cpu_dropout_drops_with_probability_p():
    x = torch.ones(1000, 1000)
    for p in (0.05, 0.3):
        dropped, factor = cpu_dropout(x, p)
        share = (dropped == 0).float().mean().item()
        # 10^6 draws: five standard deviations of the share dropped
        assert abs(share - p) < 5 * (p * (1 - p) / 1e6) ** 0.5, (p, share)
        assert factor == pytest.approx(1 / (1 - p))
        assert set(dropped.unique().tolist()) == {0.0, 1.0}
    torch.manual_seed(3)
    first = cpu_dropout(x, 0.3)[0]
    torch.manual_seed(3)
    assert torch.equal(first, cpu_dropout(x, 0.3)[0])  # torch's seed decides the mask
    assert not torch.equal(first, cpu_dropout(x, 0.3)[0])


def test_bf16_autocast_keeps_per_sample_losses(tiny_model_dir):
    model = lora_model(tiny_model_dir)
    inputs = batch(model.config.vocab_size)
    full = per_sample(own_loss, model, inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = per_sample(chunked_loss, model, inputs)
    assert torch.allclose(full, half.float(), rtol=2e-2), (full, half)


def losses(result):
    lines = (result.run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


def test_runs_learn_the_same_with_each_speed_setting_on_and_off(tiny_model_dir, tmp_path):
    data = write_json(tmp_path / "data.json", MEMORISE * 2)
    same = {"max_steps": 6, "learning_rate": 1e-2, "lora_dropout": 0.0, "bf16": False,
            "micro_batch_size": 2}  # fmt: skip
    on = run(tiny_model_dir, data, tmp_path / "on", **same)
    off = run(tiny_model_dir, data, tmp_path / "off", chunked_cross_entropy=False,
              fast_lora=False, padding_free=False, **same)  # fmt: skip
    log = (on.run_dir / "train.log").read_text()
    assert "chunked_cross_entropy on" in log and "padding_free on" in log
    assert on.model.config._attn_implementation == "sdpa_per_sample"
    assert off.model.config._attn_implementation == "sdpa"
    fast = [any("forward" in vars(m) for m in r.model.modules()) for r in (on, off)]
    assert fast == [True, False]
    first, second = losses(on), losses(off)
    assert len(first) == 6 and first[-1] < first[0]  # it learned
    assert first == pytest.approx(second, rel=1e-4)


def test_cpu_precision_follows_the_measured_bf16_speed(alpaca_file):
    from tunelab.config import load_config
    from tunelab.model.hardware import Hardware
    from tunelab.train.preflight import hardware_problems, machine_plan

    config = load_config(overrides={"datasets": [{"path": str(alpaca_file)}]}).config
    amx = Hardware("cpu", True, "CPU", None, 3.6)
    slow = Hardware("cpu", False, "CPU", None, 0.4)
    plan = machine_plan(config, amx)
    assert plan.precision == "bf16"
    assert "precision bf16 (bf16 matmuls 3.6x as fast as fp32 on this CPU, measured)" in (
        plan.reasons
    )
    plan = machine_plan(config, slow)
    assert plan.precision == "fp32" and any("0.4x" in r for r in plan.reasons)
    forced = config.model_copy(update={"bf16": True})
    assert hardware_problems(forced, amx) == []
    (problem,) = hardware_problems(forced, slow)
    assert problem.startswith("bf16: ") and "use bf16: auto" in problem
    assert machine_plan(config.model_copy(update={"bf16": False}), amx).precision == "fp32"


def test_samples_end_to_end_attend_as_a_padded_batch(tiny_model_dir):
    from tunelab.model.varlen import use_per_sample_attention
    from tunelab.train.trainer import FlatRowsCollator

    model = lora_model(tiny_model_dir)
    inputs = batch(model.config.vocab_size)
    padded = own_loss(model, inputs, count=30)
    rows = [
        {"input_ids": ids[mask == 1].tolist(), "labels": labels[mask == 1].tolist()}
        for ids, mask, labels in zip(
            inputs["input_ids"], inputs["attention_mask"], inputs["labels"], strict=True
        )
    ]
    flat = FlatRowsCollator()(rows)
    assert flat["input_ids"].shape == (1, 17 + 9 + 12)  # no padding
    assert flat["cu_seq_lens_q"].tolist() == [0, 17, 26, 38]
    assert use_per_sample_attention(model.get_base_model())
    assert torch.allclose(own_loss(model, flat, count=30), padded, rtol=1e-5)
    # and without the bounds the row would be one long sample: a different loss
    joined = {k: v for k, v in flat.items() if k in ("input_ids", "labels")}
    assert not torch.allclose(own_loss(model, joined, count=30), padded, rtol=1e-3)
