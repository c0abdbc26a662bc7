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


def feed(rules, train_losses=(), eval_losses=(), eval_strategy="steps"):
    args = SimpleNamespace(eval_strategy=eval_strategy)
    control = TrainerControl()
    for step, loss in enumerate(train_losses, start=1):
        rules.on_log(
            args, SimpleNamespace(global_step=step), control, logs={"loss": loss, "grad_norm": 1.0}
        )
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


def test_force_epochs_turns_off_everything_but_nan():
    rules, lines = rules_for(force_epochs=True, loss_watchdog_threshold=0.1)
    assert not feed(rules, [1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0, 0.001]).should_training_stop
    assert "patience" not in lines[-1]
    assert feed(rules, [math.inf]).should_training_stop and rules.failed


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
