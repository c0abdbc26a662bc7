"""Stopping rules: each one fires when it should and not otherwise."""

import json
import math
from types import SimpleNamespace

import pytest
from transformers import TrainerControl

from tunelab.config import load_config
from tunelab.errors import TrainingFailed
from tunelab.train.run import train
from tunelab.train.stopping import StoppingRules, thresholds

from .conftest import write_json


def rules_for(formats=("alpaca",), **settings):
    config = SimpleNamespace(
        early_stopping_patience=settings.get("early_stopping_patience"),
        overfitting_threshold=settings.get("overfitting_threshold"),
        loss_watchdog_threshold=settings.get("loss_watchdog_threshold"),
        loss_watchdog_patience=settings.get("loss_watchdog_patience", 3),
        force_epochs=settings.get("force_epochs", False),
        circular=settings.get("circular", False),
    )
    lines = []
    return StoppingRules(thresholds(config, list(formats)), lines.append), lines


def feed(rules, train_losses=(), eval_losses=(), eval_strategy="steps", norms=None, rates=None,
         peak=0.0):  # fmt: skip
    """Training logs (with gradient norms ``norms``, else 1.0, where None leaves one out; and
    learning rates ``rates``, else none, on a schedule peaking at ``peak``), then
    evaluations; the control the rules left."""
    args = SimpleNamespace(eval_strategy=eval_strategy, learning_rate=peak)
    control = TrainerControl()
    norms = [1.0] * len(train_losses) if norms is None else norms
    rates = [None] * len(train_losses) if rates is None else rates
    for step, (loss, norm, rate) in enumerate(
        zip(train_losses, norms, rates, strict=True), start=1
    ):
        logs = {"loss": loss, "grad_norm": norm, "learning_rate": rate}
        logs = {key: value for key, value in logs.items() if value is not None}
        rules.on_log(args, SimpleNamespace(global_step=step), control, logs=logs)
    for loss in eval_losses:
        rules.on_evaluate(
            args, SimpleNamespace(global_step=0), control, metrics={"eval_loss": loss}
        )
    return control


def test_task_thresholds():
    text, _ = rules_for(("text", "raw"))
    chat, _ = rules_for(("sharegpt", "text"))
    assert (text.rules.task, text.rules.patience, text.rules.overfitting) == ("text", 5, 0.2)
    assert (chat.rules.task, chat.rules.patience, chat.rules.overfitting) == ("instruction", 3, 0.1)


def test_early_stopping_fires_after_patience_and_not_before():
    rules, lines = rules_for()
    control = feed(rules, [1.0], [1.0, 1.1, 1.05])
    assert not control.should_training_stop and lines[-1].endswith("patience 1 left")
    control = feed(rules, [], [1.2])
    assert control.should_training_stop and rules.reason.startswith("overfitting:")  # gap 20% > 10%
    rules, _ = rules_for()
    control = feed(rules, [1.0], [1.0, 1.02, 1.03, 1.04])
    assert control.should_training_stop and rules.reason.startswith("early stopping:")


def test_improving_validation_never_stops():
    rules, lines = rules_for(early_stopping_patience=1)
    control = feed(rules, [2.0], [1.9, 1.8, 1.7, 1.6])
    assert not control.should_training_stop and rules.reason is None
    assert (
        lines[0].startswith("eval #1 | time ") and "train loss 2.0000 | val loss 1.9000" in lines[0]
    )


def test_overfitting_threshold_is_respected():
    rules, _ = rules_for(overfitting_threshold=0.5, early_stopping_patience=10)
    assert not feed(rules, [1.0], [1.0, 1.3, 1.4]).should_training_stop


def test_perfect_loss_and_perplexity_on_text():
    rules, lines = rules_for(("text",))
    assert feed(rules, [3.0], [0.4]).should_training_stop and rules.reason.startswith("perfect:")
    assert "perplexity 1.5" in lines[0]
    rules, _ = rules_for(("text",), early_stopping_patience=50)
    assert feed(rules, [3.0], [3.0, 4.8]).should_training_stop and rules.reason.startswith(
        "perplexity:"
    )
    rules, _ = rules_for(("alpaca",))
    assert feed(
        rules, [0.005], [], eval_strategy="no"
    ).should_training_stop  # no validation: training loss


def test_circular_training_keeps_only_perfect_and_nan_stops():
    rules, _ = rules_for(circular=True)
    assert not feed(rules, [1.0], [1.0, 1.5, 2.0, 2.5, 3.0]).should_training_stop
    assert feed(
        rules, [0.005], [], eval_strategy="no"
    ).should_training_stop and rules.reason.startswith("perfect:")


def test_watchdog_and_nan_fail_the_run():
    rules, _ = rules_for(loss_watchdog_threshold=5.0, loss_watchdog_patience=3)
    assert not feed(rules, [6.0, 6.0, 4.0, 6.0]).should_training_stop
    assert (
        feed(rules, [6.0, 6.0]).should_training_stop
        and rules.failed
        and rules.reason.startswith("watchdog:")
    )
    rules, _ = rules_for()
    assert (
        feed(rules, [1.0, math.nan]).should_training_stop and rules.failed and "nan" in rules.reason
    )


def test_force_epochs_keeps_only_the_nan_and_divergence_stops():
    rules, lines = rules_for(force_epochs=True, loss_watchdog_threshold=0.1)
    assert not feed(rules, [1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0, 0.001]).should_training_stop
    assert "patience" not in lines[-1]
    assert feed(rules, [math.inf]).should_training_stop and rules.failed
    # a dead run is a failure however long it was asked to train (non-stop: forever)
    rules, _ = rules_for(force_epochs=True)
    control = feed(rules, [6.0, 6.1, 5.9, 6.0, 6.2], norms=[2.0, 8.0, 0.0, 0.0, 0.0])
    assert control.should_training_stop and rules.failed and rules.reason.startswith("vanishing:")


def wobbly(n, level=2.0):
    """``n`` healthy training losses: falling slowly, different from log to log."""
    return [level - 0.01 * i + 0.05 * math.sin(i) for i in range(n)]


def test_exploding_gradients_fail_only_when_they_last():
    rules, _ = rules_for()
    # warm-up growth, then single spikes far above the running median: clipping handles them
    norms = [0.1, 0.5, 2.0, 5.0, 10.0, 1.0, 500.0, 1.0, 1.2, 800.0, 0.9, 1e4, 1.0, 1.1]
    assert not feed(rules, wobbly(len(norms)), norms=norms).should_training_stop
    rules, _ = rules_for()
    norms = [1.0, 1.2, 0.9, 1.1, 1e4, 3e5, 2e6]
    control = feed(rules, wobbly(len(norms)), norms=norms)
    assert control.should_training_stop and rules.failed
    assert rules.reason.startswith("exploding: the gradient norm was over 100x its median 1.05")
    assert rules.reason.endswith("3 logs in a row from step 5 to 7")


def test_vanishing_gradients_fail_while_there_is_loss_left():
    # the reported run: an explosion, then a gradient of exactly 0 on every step
    rules, _ = rules_for()
    control = feed(rules, [6.67, 6.81, 6.04, 6.04, 6.04], norms=[5.03, 7e11, 0.0, 0.0, 0.0])
    assert control.should_training_stop and rules.failed
    assert rules.reason == (
        "vanishing: the gradient norm was 0, the loss still 6.0400, 3 logs in a row from step 3 "
        "to 5 (the gradient norm peaked at 7e+11 at step 2)"
    )
    # or a collapse by many orders of magnitude in one log (a saturated model)
    rules, _ = rules_for()
    norms = [1.9, 8.7, 1e-6, 8e-7, 5e-7]
    assert feed(rules, wobbly(5, 6.0), norms=norms).should_training_stop and rules.failed
    assert rules.reason.startswith("vanishing: the gradient norm was below 0.0001 of its median")
    # not for two logs only, nor for a norm that falls steadily as the model learns
    rules, _ = rules_for()
    assert not feed(rules, wobbly(5, 6.0), norms=[2.0, 3.0, 0.0, 0.0, 2.5]).should_training_stop
    rules, _ = rules_for()
    norms = [5.0 * 0.8**i for i in range(40)]
    assert not feed(rules, wobbly(40), norms=norms).should_training_stop
    # nor when the loss is perfect: then there is rightly nothing left to learn
    rules, _ = rules_for(force_epochs=True)
    assert not feed(
        rules, [0.5, 0.1, 0.0, 0.0, 0.0], norms=[1.0, 0.5, 0.0, 0.0, 0.0]
    ).should_training_stop


def test_a_frozen_loss_fails_but_a_small_learning_rate_does_not():
    # (without a gradient norm in the logs, the frozen loss is the one sign of a dead model)
    rules, _ = rules_for()
    assert not feed(rules, [5.82008] * 7, norms=[None] * 7).should_training_stop
    rules, _ = rules_for()
    control = feed(rules, [5.82008] * 8, norms=[None] * 8)
    assert control.should_training_stop and rules.failed
    assert (
        rules.reason
        == "frozen: the training loss stayed at 5.8201, 8 logs in a row from step 1 to 8"
    )
    # identical to float precision is frozen too
    rules, _ = rules_for()
    almost = [6.0426 * (1 + 1e-8 * (i % 3)) for i in range(8)]
    assert feed(rules, almost, norms=[None] * 8).should_training_stop and rules.failed
    # a tiny learning rate on the same batch every step still moves the loss a little
    rules, _ = rules_for()
    creeping = [6.66792 - 1.5e-5 * i for i in range(30)]
    assert not feed(rules, creeping).should_training_stop
    # and different batches give different losses, however small the learning rate
    rules, _ = rules_for()
    assert not feed(rules, [6.67 + 0.3 * math.sin(i) for i in range(30)]).should_training_stop
    # a perfect loss may stay put (force_epochs keeps training it)
    rules, _ = rules_for(force_epochs=True)
    assert not feed(rules, [0.004] * 20).should_training_stop
    # and so may any loss while the learning rate is all but 0 (warm-up, end of schedule)
    rules, _ = rules_for()
    warming = [i * 1e-9 for i in range(1, 9)]  # warm-up towards a peak of 2e-4
    assert not feed(rules, [1.5] * 8, rates=warming, peak=2e-4).should_training_stop
    for rate, dead in ((1e-6, False), (2e-4, True)):
        rules, _ = rules_for()
        control = feed(rules, [*wobbly(30), *[1.5] * 10], rates=[2e-4] * 30 + [rate] * 10)
        assert control.should_training_stop == dead == rules.failed


def test_a_diverged_loss_fails_when_it_lasts():
    rules, _ = rules_for()
    losses = [2.0, 2.1, 1.9, 7.0, 2.0, 6.5, 6.6]  # starting level 2.0: the limit is 6.0
    assert not feed(rules, losses).should_training_stop
    rules, _ = rules_for()
    control = feed(rules, [*losses, 7.0])
    assert control.should_training_stop and rules.failed
    assert rules.reason.startswith(
        "diverged: the training loss was over 3x its starting level 2.0000 (now 7.0000), "
        "3 logs in a row from step 6 to 8"
    )
    # a low start counts as 1.0, so that ordinary noise on it is not a divergence
    rules, _ = rules_for()
    assert not feed(rules, [0.1, 0.12, 0.11, 0.5, 0.6, 0.9, 0.8, 2.9, 2.5]).should_training_stop


def test_a_dead_model_does_not_stop_early_with_its_best_weights():
    # validation losses that stopped changing: the weights no longer change the output
    rules, _ = rules_for()
    control = feed(rules, wobbly(3, 7.0), [5.8201, 5.8201, 5.8201, 5.8201])
    assert control.should_training_stop and rules.failed
    assert rules.reason.startswith("frozen: the validation loss stayed at 5.8201 for 4 evaluations")
    # or the latest log shows a dead gradient, though not yet for long enough to fail alone
    rules, _ = rules_for()
    control = feed(rules, [7.2, 7.3, 5.8], [5.9, 6.0, 5.95, 6.1], norms=[2.0, 7.4, 0.0])
    assert control.should_training_stop and rules.failed
    assert rules.reason.startswith(
        "vanishing: the gradient norm was 0, the loss still 5.8000, 1 log"
    )
    # a healthy run still stops early, and keeps its best weights
    rules, _ = rules_for()
    control = feed(rules, wobbly(3), [1.9, 2.0, 1.95, 2.1])
    assert control.should_training_stop and not rules.failed
    assert rules.reason.startswith("early stopping:")


def test_a_dead_real_run_fails_instead_of_stopping_early(tiny_model_dir, tmp_path):
    # LoRA on v_proj and o_proj at lr 1e6: the first update drives the model into saturation
    # (an exact 0 gradient and a frozen loss from step 3, for every seed tried), where
    # early stopping used to report "keeping the best weights" and complete the run.
    rows = [{"instruction": f"Item {i}?", "output": f"Answer {i} " * 3} for i in range(16)]
    data = write_json(tmp_path / "d.json", rows)
    # fp32 on any machine: on a GPU, bf16 might turn the saturation into NaNs
    overrides = {
        "base_model": str(tiny_model_dir), "datasets": [{"path": str(data)}], "val_set_size": 4,
        "max_steps": 30, "eval_steps": 2, "learning_rate": 1e6, "early_stopping_patience": 2,
        "lora_target_modules": ["v_proj", "o_proj"], "logging_steps": 1, "bf16": False,
        "output_dir": str(tmp_path / "run"),
    }  # fmt: skip
    reason = r"vanishing: the gradient norm was 0, .* 3 logs in a row from step \d+ to \d+"
    with pytest.raises(TrainingFailed, match=f"training failed: {reason}") as exc:
        train(load_config(overrides=overrides), quiet=True)
    assert "lower learning_rate" in exc.value.hint
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "failed" and "vanishing: the gradient norm was 0" in status["error"]
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    norms = [r["grad_norm"] for r in records if "grad_norm" in r]
    assert norms[-3:] == [0.0, 0.0, 0.0] and len(norms) < 30  # ended as soon as it died


def test_nan_ends_a_real_run_as_failed(tiny_model_dir, tmp_path, alpaca_file):
    overrides = {
        "base_model": str(tiny_model_dir), "datasets": [{"path": str(alpaca_file)}], "val_set_size": 0,
        "max_steps": 30, "learning_rate": 1e38, "warmup_steps": 0, "optimizer": "sgd", "max_grad_norm": 0, "logging_steps": 1,
        "output_dir": str(tmp_path / "run"),
    }  # fmt: skip
    with pytest.raises(
        TrainingFailed, match="training failed: nan: the (loss|gradient norm) became"
    ):
        train(load_config(overrides=overrides), quiet=True)
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "failed"
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(
        not math.isfinite(r.get("loss", 0.0)) or not math.isfinite(r.get("grad_norm", 0.0))
        for r in records
    )


def test_early_stop_keeps_the_best_weights(tiny_model_dir, tmp_path):
    rows = [{"instruction": f"Item {i}?", "output": f"Answer {i} " * 3} for i in range(16)]
    data = write_json(tmp_path / "d.json", rows)
    overrides = {
        "base_model": str(tiny_model_dir), "datasets": [{"path": str(data)}], "val_set_size": 4,
        "max_steps": 60, "eval_steps": 2, "learning_rate": 0.3, "early_stopping_patience": 2,
        "logging_steps": 1, "output_dir": str(tmp_path / "run"), "lora_r": 16,
    }  # fmt: skip
    result = train(load_config(overrides=overrides), quiet=True)
    status = json.loads((result.run_dir / "status.json").read_text())
    assert result.steps < 60 and status["stop_reason"].split(":")[0] in {
        "early stopping",
        "overfitting",
    }
    best = json.loads((result.run_dir / "checkpoints" / "best" / "checkpoint.json").read_text())
    assert best["eval_loss"] == result.losses["best_eval_loss"]
    # the saved adapter is the best checkpoint's, not the last step's
    saved = (result.run_dir / "adapter_model.safetensors").read_bytes()
    assert (
        saved
        == (result.run_dir / "checkpoints" / "best" / "adapter_model.safetensors").read_bytes()
    )
