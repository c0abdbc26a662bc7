"""Experiment trackers through the trainer's own integrations, offline."""

import json

import pytest
import yaml

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


def _settings(model_dir, data, out, **more):
    return {"base_model": str(model_dir), "datasets": [{"path": str(data)}], "val_set_size": 0,
            "max_steps": 2, "logging_steps": 1, "output_dir": str(out), **more}  # fmt: skip


def test_trackers_that_cannot_log_stop_the_run_before_it_starts(
    tiny_model_dir, alpaca_file, tmp_path, monkeypatch, capsys, closed_port
):
    from .conftest import cli

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc from `wandb login`
    base = ["train", "--data", str(alpaca_file), "--base-model", str(tiny_model_dir),
            "--output", str(tmp_path / "run"), "--no-tensorboard"]  # fmt: skip
    code, err = cli([*base, "--set", "wandb_project=p"], capsys)
    assert code == 2 and "needs an API key" in err and "wandb_mode: offline" in err
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_port}")
    code, err = cli([*base, "--set", "wandb_project=p"], capsys)
    assert code == 2 and "Weights & Biases at http://127.0.0.1" in err and "unreachable" in err
    uri = f"http://bob:hunter2@127.0.0.1:{closed_port}"
    code, err = cli([*base, "--set", f"mlflow_tracking_uri={uri}"], capsys)
    assert code == 2 and "the MLflow server http://bob:***@127.0.0.1" in err
    assert "hunter2" not in err and not (tmp_path / "run").exists()


def test_a_password_in_a_tracking_uri_is_used_but_never_saved_or_shown(
    tiny_model_dir, alpaca_file, tmp_path, capsys
):
    """A stand-in MLflow server on 127.0.0.1 accepts whatever the client sends, so the run
    logs to it with the password; nothing the run writes or prints holds the password."""
    import base64
    import http.server
    import threading

    seen = []

    class Server(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            seen.append(self.headers.get("Authorization"))
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b"{}")

        do_GET = do_POST = do_PATCH = _answer

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://alice:s3cretpw@127.0.0.1:{server.server_port}"
    try:
        result = train(load_config(overrides=_settings(
            tiny_model_dir, alpaca_file, tmp_path / "run", mlflow_tracking_uri=uri)))  # fmt: skip
    finally:
        server.shutdown()
    assert f"Basic {base64.b64encode(b'alice:s3cretpw').decode()}" in seen  # it was used
    files = [p for p in result.run_dir.rglob("*") if p.is_file()]
    assert len(files) > 10
    for path in files:
        assert b"s3cretpw" not in path.read_bytes(), path
    saved = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert saved["mlflow_tracking_uri"] == f"http://alice:***@127.0.0.1:{server.server_port}"
    out, err = capsys.readouterr()
    assert "s3cretpw" not in out + err


def test_validate_and_dry_run_never_show_a_password(tiny_model_dir, alpaca_file, capsys):
    from .conftest import cli

    uri = "file://carol:pa55word@/tmp/mlruns"
    base = ["--data", str(alpaca_file), "--base-model", str(tiny_model_dir),
            "--set", f"mlflow_tracking_uri={uri}"]  # fmt: skip
    for args in (["validate", *base], ["train", *base, "--dry-run", "--json"]):
        code, err = cli(args, capsys)
        assert code == 0, err
        assert "pa55word" not in cli.out + err and "carol:***@" in cli.out


def test_a_saved_config_with_a_masked_password_asks_for_it_again(tmp_path, alpaca_file):
    saved = tmp_path / "config.yaml"
    saved.write_text(
        f"datasets:\n  - path: {alpaca_file}\nmlflow_tracking_uri: https://alice:***@mlflow.example\n"
    )
    with pytest.raises(
        ConfigError, match="mlflow_tracking_uri: the password in this URL was masked"
    ):
        load_config(saved)
    again = load_config(saved, sets=["mlflow_tracking_uri=https://alice:pw@mlflow.example"])
    assert again.config.mlflow_tracking_uri == "https://alice:pw@mlflow.example"


def test_credentials_are_masked_in_every_shape_and_every_stream(capsys):
    import logging
    import sys

    from tunelab.redact import is_masked, redact, redacted_output

    cases = {
        "https://user:p@ss@host:5000/x": "https://user:***@host:5000/x",
        "https://ghp_token@github.com/org": "https://***@github.com/org",
        "see http://a:b@c and s3://k:v@bucket/key": "see http://a:***@c and s3://k:***@bucket/key",
        "https://host/path?mail=a@b.c": "https://host/path?mail=a@b.c",
    }
    for given, shown in cases.items():
        assert redact(given) == shown
        assert is_masked(shown) == (shown != given) and not is_masked(given)
    logger = logging.getLogger("tunelab-test-library")
    handler = logging.StreamHandler(sys.stderr)  # made before, as a library makes its own
    logger.addHandler(handler)
    try:
        with redacted_output():
            print("View run at https://alice:s3cret@mlflow.example/#/1")
            logger.warning("connecting to https://alice:s3cret@mlflow.example")
    finally:
        logger.removeHandler(handler)
    out, err = capsys.readouterr()
    assert "s3cret" not in out + err and "https://alice:***@mlflow.example" in out + err
    assert handler.stream is sys.stderr  # put back as it was


def test_a_url_with_a_bad_port_is_a_clear_problem(tiny_model_dir, alpaca_file, capsys):
    from .conftest import cli

    args = ["validate", "--data", str(alpaca_file), "--base-model", str(tiny_model_dir),
            "--set", "mlflow_tracking_uri=http://u:pw@127.0.0.1:abc"]  # fmt: skip
    code, err = cli(args, capsys)
    assert code == 0 and "http://u:***@127.0.0.1:abc has no valid port number" in err
    assert "pw@" not in err
