"""Experiment trackers through the trainer's own integrations, offline."""

import json

import pytest

from tunelab.config import load_config
from tunelab.errors import ConfigError
from tunelab.train.run import train


def test_wandb_offline_and_mlflow_file_store(tiny_model_dir, alpaca_file, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)  # a key in the environment must never be saved
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    store = tmp_path / "mlruns"
    overrides = {
        "base_model": str(tiny_model_dir), "datasets": [{"path": str(alpaca_file)}], "val_set_size": 0,
        "max_steps": 2, "logging_steps": 1, "output_dir": str(tmp_path / "run"),
        "wandb_project": "tunelab-test", "wandb_mode": "offline", "wandb_name": "tiny",
        "mlflow_tracking_uri": store.as_uri(), "mlflow_experiment_name": "tiny-exp",
    }  # fmt: skip
    result = train(load_config(overrides=overrides), quiet=True)
    offline = list((result.run_dir / "wandb").glob("offline-run-*"))
    assert offline and any(p.suffix == ".wandb" for p in offline[0].iterdir())
    assert list(store.rglob("metrics/loss"))
    for path in result.run_dir.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".yaml", ".log", ".jsonl"):
            assert "x" * 40 not in path.read_text(errors="ignore"), path
    saved = json.loads((result.run_dir / "adapter_info.json").read_text())["config"]
    assert saved["wandb_project"] == "tunelab-test" and "wandb_api_key" not in saved


def test_secrets_in_a_config_are_refused_without_echo(tmp_path, alpaca_file):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"datasets:\n  - path: {alpaca_file}\nwandb_api_key: SECRETVALUE\n")
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    assert "set WANDB_API_KEY in the environment" in str(info.value)
    assert "SECRETVALUE" not in str(info.value)
