"""Training smoke tests on the tiny model: real steps, real effects."""

import json

import pytest
import torch
import yaml

from tunelab.config import load_config
from tunelab.errors import RunDirError

from .conftest import cli, run


def records(result):
    return [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_on_a_memorisable_set(trained):
    losses = [r["loss"] for r in records(trained) if "loss" in r]
    assert len(losses) == 40
    assert all(map(lambda x: x == x and x < float("inf"), losses))
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


def test_metrics_records_have_the_documented_fields(trained):
    recs = records(trained)
    step = next(r for r in recs if "loss" in r)
    assert {"step", "epoch", "loss", "learning_rate", "grad_norm", "tokens_per_second"} <= set(step)
    assert step["tokens_per_second"] > 0
    evals = [r for r in recs if "eval_loss" in r]
    assert [r["step"] for r in evals] == [20, 40]


def test_lora_changes_and_base_does_not(trained, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    trained_state = trained.model.state_dict()
    lora_b = [v for k, v in trained_state.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero
    for name, value in original.items():
        key = next(
            k
            for k in trained_state
            if k.endswith(name.replace(".weight", ".base_layer.weight")) or k.endswith(name)
        )
        kept = trained_state[key]  # on a GPU: in bfloat16 there, exactly the cast of the base
        assert torch.equal(kept.cpu(), value.to(kept.dtype)), name


def test_run_directory_layout(trained):
    root = trained.run_dir
    for name in (
        "config.yaml", "status.json", "train.log", "metrics.jsonl", "adapter_config.json",
        "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
        "adapter_info.json", "training_history.png",
    ):  # fmt: skip
        assert (root / name).is_file(), name
    assert list((root / "logs").glob("events.out.tfevents.*"))
    assert (root / "checkpoints" / "checkpoint-20").is_dir()
    assert json.loads((root / "status.json").read_text())["state"] == "completed"
    info = json.loads((root / "adapter_info.json").read_text())
    assert info["steps"] == 40 and info["datasets"][0]["sha256"]
    assert {"final_loss", "best_loss", "best_eval_loss"} <= set(info["losses"])
    assert {"torch", "transformers", "peft"} <= set(info["versions"])
    assert info["duration_s"] > 0
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no staging left behind


@pytest.mark.cpu_only(
    reason="the reloaded adapter on the float32 base against the trained model, to 1e-5"
)
def test_saved_adapter_reloads_and_changes_output(trained, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 6, 7, 8, 9]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        before = base(ids).logits
        tuned = PeftModel.from_pretrained(base, str(trained.run_dir))
        after = tuned(ids).logits
        in_memory = trained.model.eval()(ids).logits
    assert not torch.allclose(before, after, atol=1e-4)
    assert torch.allclose(after, in_memory, atol=1e-5)


def test_config_yaml_trains_again(trained):
    loaded = load_config(trained.run_dir / "config.yaml")
    assert loaded.config.max_steps == 40 and loaded.config.output_dir == str(trained.run_dir)


def test_refuses_to_overwrite_a_finished_run(trained, tiny_model_dir, alpaca_file):
    weights = (trained.run_dir / "adapter_model.safetensors").read_bytes()
    with pytest.raises(RunDirError, match="already holds a finished adapter"):
        run(tiny_model_dir, alpaca_file, trained.run_dir, max_steps=2)
    assert (trained.run_dir / "adapter_model.safetensors").read_bytes() == weights


def test_overwrite_replaces_the_run(tiny_model_dir, alpaca_file, tmp_path):
    out = tmp_path / "out"
    run(tiny_model_dir, alpaca_file, out, max_steps=2)
    (out / "stale.txt").write_text("from the first run")
    result = run(tiny_model_dir, alpaca_file, out, overwrite=True, max_steps=3)
    assert result.steps == 3 and not (out / "stale.txt").exists()
    assert json.loads((out / "adapter_info.json").read_text())["steps"] == 3
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_an_overwrite_run_trains_at_its_path(tiny_model_dir, alpaca_file, tmp_path, monkeypatch):
    """While a replacement run prepares and trains, status.json at the path is the new run's;
    the earlier run waits in a hidden sibling, deleted once the new one completes."""
    import os

    import tunelab.train.run as train_run
    from tunelab.rundir import read_status

    out = tmp_path / "out"
    run(tiny_model_dir, alpaca_file, out, max_steps=2)
    seen = []
    real = train_run.load_model

    def load_model(*args, **kwargs):
        seen.append(read_status(out / "status.json"))
        seen.append([p.name for p in tmp_path.glob(".tunelab-tmp-out.previous-*/run")])
        return real(*args, **kwargs)

    monkeypatch.setattr(train_run, "load_model", load_model)
    result = run(tiny_model_dir, alpaca_file, out, overwrite=True, max_steps=3)
    during, aside = seen
    assert during.state == "preparing" and during.pid == os.getpid() and during.total_steps == 3
    assert aside == ["run"] and result.run_dir == out.resolve()
    assert read_status(out / "status.json").state == "completed"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tunelab-tmp-")]


def test_a_failed_overwrite_puts_the_old_run_back(tiny_model_dir, alpaca_file, tmp_path,
                                                  monkeypatch):  # fmt: skip
    import tunelab.train.run as train_run

    out = tmp_path / "out"
    run(tiny_model_dir, alpaca_file, out, max_steps=2)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def load_model(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(train_run, "load_model", load_model)
    with pytest.raises(RuntimeError, match="boom"):
        run(tiny_model_dir, alpaca_file, out, overwrite=True, max_steps=3)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tunelab-tmp-")]


def test_full_fine_tuning_saves_a_whole_model(tiny_model_dir, alpaca_file, tmp_path):
    from transformers import AutoModelForCausalLM

    result = run(
        tiny_model_dir,
        alpaca_file,
        tmp_path / "full",
        adapter="full",
        max_steps=3,
        learning_rate=1e-3,
    )
    assert (result.run_dir / "model.safetensors").is_file()
    assert not (result.run_dir / "adapter_config.json").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(result.run_dir)
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(reloaded.state_dict()[name], original.state_dict()[name])


# --- bad input through the command line: a clear error, exit 2, nothing left behind ---


@pytest.mark.parametrize(
    "content, expected",
    [
        (None, "no such file"),
        ("[]", "the dataset is empty"),
        ('[{"instruction": "a", "output": "b"},\n{"instruction": }]', "data.json:2: invalid JSON"),
        ('[{"instruction": "a", "output": "b"}, {"instruction": "c"}, {"instruction": "d"}]',
         "2 of 3 rows cannot be read as alpaca:\n  2 rows: 'output' is missing (first at row 2)"),
    ],
)  # fmt: skip
def test_bad_data_via_cli(tiny_model_dir, tmp_path, capsys, content, expected):
    data = tmp_path / "data.json"
    if content is not None:
        data.write_text(content)
    out = tmp_path / "out"
    code, err = cli(
        ["train", "--data", str(data), "--base-model", str(tiny_model_dir), "--output", str(out)],
        capsys,
    )
    assert code == 2
    assert expected in err and str(data) in err
    assert not out.exists()


@pytest.mark.parametrize(
    "sets, expected",
    [
        (["lora_rr=8"], "lora_rr: unknown key; did you mean 'lora_r'?"),
        (["lora_r=0"], "lora_r: Input should be greater than or equal to 1"),
        (["learning_rate=-0.001"], "learning_rate: Input should be greater than 0"),
    ],
)
def test_bad_config_via_cli(tiny_model_dir, alpaca_file, tmp_path, capsys, sets, expected):
    out = tmp_path / "out"
    args = [
        "train",
        "--data",
        str(alpaca_file),
        "--base-model",
        str(tiny_model_dir),
        "--output",
        str(out),
    ]
    code, err = cli(args + [a for s in sets for a in ("--set", s)], capsys)
    assert code == 2 and expected in err and not out.exists()


def test_base_model_that_is_not_a_model(alpaca_file, tmp_path, capsys):
    not_model = tmp_path / "weights"
    not_model.mkdir()
    code, err = cli(
        [
            "train",
            "--data",
            str(alpaca_file),
            "--base-model",
            str(not_model),
            "--output",
            str(tmp_path / "o"),
        ],
        capsys,
    )
    assert code == 2 and "is a directory but not a model: it has no config.json" in err
    assert not (tmp_path / "o").exists()


def test_validate_prints_resolved_config(tiny_model_dir, alpaca_file, capsys):
    args = ["validate", "--data", str(alpaca_file), "--base-model", str(tiny_model_dir)]
    code, err = cli([*args, "--epochs", "2"], capsys)
    assert code == 0 and "(4 rows checked)" in err
    resolved = yaml.safe_load(cli.out)
    assert resolved["num_epochs"] == 2 and resolved["base_model"] == str(tiny_model_dir)
    assert resolved["lora_r"] == 8 and resolved["datasets"][0]["type"] == "auto"


def test_validate_lists_every_problem(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("datasets:\n  - path: missing.json\nlora_r: 0\nlearning_rte: 0.1\n")
    code, err = cli(["validate", str(cfg)], capsys)
    assert code == 2
    assert (
        "3 problems" in err
        and "datasets.0.path" in err
        and "lora_r" in err
        and "learning_rate" in err
    )


def test_unreachable_hub_model_is_a_clear_error(alpaca_file, tmp_path):
    import os
    import subprocess
    import sys

    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = ["train", "--data", str(alpaca_file), "--base-model", "someorg/no-such-model"]
    proc = subprocess.run(
        [sys.executable, "-m", "tunelab.cli", *args, "--output", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "could not load 'someorg/no-such-model' from the Hugging Face Hub" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_a_hub_model_without_network_fails_at_once(alpaca_file, tmp_path, closed_port):
    """No network (here: a Hub endpoint nothing listens on): the error comes from one quick
    connection attempt, not from the Hub client's retries, for train and --dry-run alike."""
    import os
    import subprocess
    import sys

    port = closed_port
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HOME": str(tmp_path)}
    env.pop("HF_HUB_OFFLINE", None)
    base = ["train", "--data", str(alpaca_file), "--base-model", "someorg/no-such-model"]
    for extra in (["--output", str(tmp_path / "out")], ["--dry-run"]):
        proc = subprocess.run([sys.executable, "-m", "tunelab.cli", *base, *extra],
                              capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
        assert proc.returncode == 2, proc.stderr
        assert f"the Hugging Face Hub at http://127.0.0.1:{port} is unreachable" in proc.stderr
        assert "not in the local cache" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_overwrite_refuses_a_directory_that_is_not_a_run(tiny_model_dir, alpaca_file, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    with pytest.raises(RunDirError, match="not a tunelab run"):
        run(tiny_model_dir, alpaca_file, out, overwrite=True, max_steps=1)
    assert (out / "notes.txt").read_text() == "precious"


def test_interrupted_overwrite_keeps_the_old_run(tiny_model_dir, alpaca_file, tmp_path):
    """SIGINT while a replacement run trains: the finished run stays exactly as it was."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    run(tiny_model_dir, alpaca_file, out, max_steps=2)
    weights = (out / "adapter_model.safetensors").read_bytes()
    args = ["train", "--data", str(alpaca_file), "--base-model", str(tiny_model_dir)]
    args += [
        "--output",
        str(out),
        "--overwrite",
        "--max-steps",
        "100000",
        "--set",
        "logging_steps=1",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tunelab.cli", *args], stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    # the old run is moved aside when the new one starts; then out/metrics.jsonl is the new one's
    while not (
        list(tmp_path.glob(".tunelab-tmp-out.previous-*")) and (out / "metrics.jsonl").exists()
    ):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err
    assert (out / "adapter_model.safetensors").read_bytes() == weights
    assert json.loads((out / "status.json").read_text())["state"] == "completed"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_tensorboard_serves_past_runs(trained):
    import subprocess
    import sys
    import time
    import urllib.request

    from tunelab.train.board import free_port

    port = free_port(16006)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tunelab.cli", "tensorboard", str(trained.run_dir.parent), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        deadline, status = time.monotonic() + 90, None
        while status != 200:
            assert proc.poll() is None and time.monotonic() < deadline, (
                "TensorBoard did not come up"
            )
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=2) as r:
                    status, runs = r.status, r.read().decode()
            except OSError:
                time.sleep(0.2)
        assert "logs" in runs  # the run's event files are found
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_an_output_that_cannot_be_locked_is_a_clear_error(
    tiny_model_dir, alpaca_file, tmp_path, capsys
):
    (tmp_path / "a-file").write_text("not a folder")
    args = ["train", "--data", str(alpaca_file), "--base-model", str(tiny_model_dir),
            "--output", str(tmp_path / "a-file" / "run"), "--no-tensorboard"]  # fmt: skip
    code, err = cli(args, capsys)
    assert code == 2 and "cannot lock it for this run" in err and "choose an --output" in err


def test_a_replacement_cut_short_between_its_renames_is_recovered(
    tiny_model_dir, alpaca_file, tmp_path
):
    """Older versions' --overwrite swap killed between its two renames (.new-/.old- leftovers):
    the finished replacement goes
    into place (or, without one, the earlier run goes back); neither is ever deleted."""
    import shutil

    first = run(tiny_model_dir, alpaca_file, tmp_path / "first", max_steps=1)
    second = run(tiny_model_dir, alpaca_file, tmp_path / "second", max_steps=2)
    out = tmp_path / "out"
    for present, expected in ((("old", "new"), second), (("old",), first)):
        for name, source in (("old", first), ("new", second)):
            if name in present:
                target = tmp_path / f".tunelab-tmp-out.{name}-x1"
                target.mkdir()
                shutil.copytree(source.run_dir, target / "run" if name == "old" else target,
                                dirs_exist_ok=True)  # fmt: skip
        with pytest.raises(RunDirError, match="already holds a finished adapter"):
            run(tiny_model_dir, alpaca_file, out, max_steps=1)
        weights = (out / "adapter_model.safetensors").read_bytes()
        assert weights == (expected.run_dir / "adapter_model.safetensors").read_bytes()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
        shutil.rmtree(out)


def test_an_overwrite_killed_while_the_old_run_is_aside_is_recovered(
    tiny_model_dir, alpaca_file, tmp_path
):
    """A replacement killed while the earlier run waits aside (before the new run has
    completed, or before it was even started): the next train into the path puts the earlier
    run back, discarding the killed run's files. A completed replacement stays."""
    import shutil

    from tunelab.rundir import read_status

    first = run(tiny_model_dir, alpaca_file, tmp_path / "first", max_steps=1)
    second = run(tiny_model_dir, alpaca_file, tmp_path / "second", max_steps=2)
    out = tmp_path / "out"

    def kill_with(new_run):
        aside = tmp_path / ".tunelab-tmp-out.previous-x1"
        shutil.copytree(first.run_dir, aside / "run")
        if new_run is not None:
            shutil.copytree(new_run, out)

    killed = tmp_path / "killed"  # a new run cut short while it trained
    shutil.copytree(second.run_dir, killed)
    (killed / "adapter_model.safetensors").unlink()
    status = json.loads((killed / "status.json").read_text())
    (killed / "status.json").write_text(json.dumps({**status, "state": "running"}))
    for new_run, expected in ((None, first), (killed, first), (second.run_dir, second)):
        kill_with(new_run)
        with pytest.raises(RunDirError, match="already holds a finished adapter"):
            run(tiny_model_dir, alpaca_file, out, max_steps=1)
        weights = (out / "adapter_model.safetensors").read_bytes()
        assert weights == (expected.run_dir / "adapter_model.safetensors").read_bytes()
        assert read_status(out / "status.json").state == "completed"
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tunelab-tmp-")]
        shutil.rmtree(out)
