"""Automatic settings: modes, model families and sizes; the user's own keys always win."""

import json

import pytest

from tunelab.config import load_config
from tunelab.model.hardware import detect_hardware
from tunelab.train.auto import choose, family_of, rank_for
from tunelab.train.run import train


def loaded(alpaca_file, **settings):
    return load_config(
        overrides={"datasets": [{"path": str(alpaca_file)}]},
        sets=[f"{k}={v}" for k, v in settings.items()],
    )


def test_rank_table_by_model_size():
    assert [rank_for(n) for n in (135e6, 1.5e9, 3.2e9, 8e9, 14e9, 70e9)] == [
        8,
        16,
        32,
        64,
        128,
        256,
    ]


def test_family_handlers():
    assert family_of("llama").targets == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert family_of("gemma3_text").targets[-3:] == ("gate_proj", "up_proj", "down_proj")
    assert family_of("gpt2").targets == ("c_attn", "c_proj")
    assert family_of("phi").name == "phi" and family_of("something-new").targets is None


def test_modes_change_only_what_the_user_left_open(alpaca_file):
    for mode, lr, epochs, evals in (
        ("slow", 1e-4, 5, 1),
        ("medium", 2e-4, 3, 2),
        ("fast", 4e-4, 1, 4),
    ):
        cfg = loaded(alpaca_file, mode=mode)
        config, why = choose(cfg, cfg.config, "llama", 135_000_000)
        assert (config.learning_rate, config.num_epochs, config.evals_per_epoch) == (
            lr,
            epochs,
            evals,
        )
        assert why["learning_rate"] == f"mode {mode}" and not config.force_epochs
    cfg = loaded(alpaca_file, mode="fast", learning_rate=1e-5, lora_r=4)
    config, why = choose(cfg, cfg.config, "llama", 8_000_000_000)
    assert config.learning_rate == 1e-5 and why["learning_rate"] == "--set"
    assert config.lora_r == 4 and config.lora_target_modules == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
    ]
    assert why["lora_target_modules"] == "llama family handler"
    nonstop = loaded(alpaca_file, mode="non-stop")
    config, _ = choose(nonstop, nonstop.config, None, 10)
    assert (
        config.force_epochs
        and config.learning_rate == 2e-4 * 0.3
        and config.lora_targets == "all-linear"
    )


def test_size_rank_and_linear_choice(alpaca_file):
    cfg = loaded(alpaca_file, lora_target_linear=True)
    config, why = choose(cfg, cfg.config, "llama", 2_000_000_000)
    assert (
        config.lora_r == 16
        and why["lora_r"] == "model size 2.0B"
        and config.lora_targets == "all-linear"
    )


def test_a_run_records_where_settings_came_from(tiny_model_dir, alpaca_file, tmp_path):
    overrides = {"base_model": str(tiny_model_dir), "datasets": [{"path": str(alpaca_file)}],
                 "max_steps": 2, "output_dir": str(tmp_path / "run")}  # fmt: skip
    result = train(load_config(overrides=overrides, sets=["mode=fast"]), quiet=True)
    info = json.loads((result.run_dir / "adapter_info.json").read_text())
    assert info["origins"]["mode"] == "--set" and info["origins"]["learning_rate"] == "mode fast"
    assert (
        info["origins"]["lora_r"].startswith("model size")
        and info["effective"]["learning_rate"] == 4e-4
    )


def test_dry_run_json_plans_without_training(tiny_model_dir, alpaca_file, tmp_path, capsys):
    from tunelab.cli import main

    out = tmp_path / "never"
    args = [
        "train",
        "--data",
        str(alpaca_file),
        "--base-model",
        str(tiny_model_dir),
        "--output",
        str(out),
    ]
    assert main([*args, "--dry-run", "--json", "--mode", "slow", "--lora-r", "4"]) == 0
    report = json.loads(capsys.readouterr().out)
    settings = report["settings"]
    assert settings["lora_r"] == {"value": 4, "from": "flag"}
    assert settings["learning_rate"] == {"value": 1e-4, "from": "mode slow"}
    assert settings["lora_target_modules"]["from"] == "llama family handler"
    assert settings["lora_alpha"] == {"value": 8, "from": "2 x lora_r"}
    hardware = detect_hardware()
    expected = "bf16" if hardware.bf16 else "fp32"  # what auto precision picks on this machine
    assert settings["precision"]["value"] == expected
    assert settings["precision"]["from"].startswith("auto: ")  # with the reason for this machine
    for key in ("chunked_cross_entropy", "padding_free", "fast_lora"):  # on, with a reason
        assert settings[key]["value"] is True and settings[key]["from"].startswith("auto: "), key
    assert (
        report["parameters"]["trainable"] > 0
        and report["parameters"]["total"] > report["parameters"]["trainable"]
    )
    assert report["steps"] == 5 * report["steps_per_epoch"] and report["tokens_per_epoch"] > 0
    assert report["estimate"]["seconds"] > 0 and report["estimate"]["memory_gib"] > 0
    assert not out.exists()
    assert main([*args, "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "settings (value, from):" in text and "estimate: about" in text


def test_adaptive_mode_lowers_the_rate_on_plateaus(tiny_model_dir, tmp_path):
    """A learning rate far too small to move the weights makes a validation loss that truly
    stalls, whatever the seed: the rate must halve at the first plateau (patience 1). (Not
    smaller than 1e-6: torch ignores a reduction below its eps, 1e-8.)"""
    from .conftest import write_json

    data = write_json(
        tmp_path / "d.json",
        [{"instruction": f"Item {i}?", "output": f"Answer {i}"} for i in range(16)],
    )
    overrides = {"base_model": str(tiny_model_dir), "datasets": [{"path": str(data)}], "val_set_size": 4,
                 "max_steps": 12, "eval_steps": 2, "learning_rate": 1e-6, "output_dir": str(tmp_path / "run"),
                 "force_epochs": True, "logging_steps": 1, "warmup_steps": 0}  # fmt: skip
    result = train(load_config(overrides=overrides, sets=["mode=adaptive"]), quiet=True)
    info = json.loads((result.run_dir / "adapter_info.json").read_text())
    assert info["config"]["lr_scheduler"] == "reduce_lr_on_plateau"
    assert info["origins"]["lr_scheduler"] == "mode adaptive"
    records = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert max(evals) - min(evals) < 1e-4 * min(evals)  # the plateau: no improvement counts
    rates = {r["step"]: r["learning_rate"] for r in records if "loss" in r}
    # best at the eval of step 2, no better at 4 and 6: more than `patience` bad evaluations
    assert rates[1] == rates[6] == 1e-6 and rates[7] == 0.5e-6
    assert min(rates.values()) < 0.5e-6  # and again at the next plateau


def test_adaptive_mode_needs_validation(tiny_model_dir, alpaca_file, tmp_path):
    from tunelab.errors import ConfigError

    overrides = {"base_model": str(tiny_model_dir), "datasets": [{"path": str(alpaca_file)}], "val_set_size": 0,
                 "output_dir": str(tmp_path / "run")}  # fmt: skip
    with pytest.raises(ConfigError, match="needs a validation set"):
        train(load_config(overrides=overrides, sets=["mode=adaptive"]), quiet=True)
    assert not (tmp_path / "run").exists()


def test_8bit_needs_a_gpu(alpaca_file, tmp_path, capsys):
    from tunelab.cli import main

    code = main(
        ["train", "--data", str(alpaca_file), "--use-8bit", "--output", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err
    assert code == 2 and "load_in_8bit (--use-8bit) needs a CUDA GPU with bitsandbytes" in err


def test_continue_training_a_finished_adapter(tiny_model_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    from tunelab.errors import ConfigError, RunDirError

    from .conftest import MEMORISE, write_json

    first = write_json(tmp_path / "a.json", MEMORISE)
    second = write_json(
        tmp_path / "b.json",
        [{"instruction": "New?", "output": "Yes."}, {"instruction": "Old?", "output": "No."}],
    )
    base = {"base_model": str(tiny_model_dir), "val_set_size": 0, "lora_r": 4, "lora_alpha": 8}
    a = train(load_config(overrides={**base, "datasets": [{"path": str(first)}], "max_steps": 3,
                                     "learning_rate": 1e-2, "output_dir": str(tmp_path / "a")}), quiet=True)  # fmt: skip
    # a vanishing learning rate: the continued run ends where the first one ended
    cont = {"base_model": str(tiny_model_dir), "val_set_size": 0, "datasets": [{"path": str(second)}],
            "max_steps": 1, "learning_rate": 1e-12, "lora_model_dir": str(a.run_dir),
            "output_dir": str(tmp_path / "b")}  # fmt: skip
    b = train(load_config(overrides=cont), quiet=True)
    wa, wb = (
        load_file(a.run_dir / "adapter_model.safetensors"),
        load_file(b.run_dir / "adapter_model.safetensors"),
    )
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    info = json.loads((b.run_dir / "adapter_info.json").read_text())
    assert info["origins"]["lora_r"] == "lora_model_dir" and info["config"]["lora_r"] == 4
    with pytest.raises(ConfigError, match="lora_r: the adapter has 4, the config asks for 16"):
        train(
            load_config(overrides={**cont, "lora_r": 16, "output_dir": str(tmp_path / "c")}),
            quiet=True,
        )
    with pytest.raises(ConfigError, match="holds no adapter"):
        load_config(overrides={**cont, "lora_model_dir": str(tmp_path)})
    other = tmp_path / "other-base"
    other.mkdir()
    for f in tiny_model_dir.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    with pytest.raises(RunDirError, match="this adapter was trained on"):
        train(
            load_config(
                overrides={**cont, "base_model": str(other), "output_dir": str(tmp_path / "d")}
            ),
            quiet=True,
        )


def test_circular_schedule_grows_the_batch():
    from tunelab.train.circular import batch_size, schedule

    batches, ends = schedule(16, 1, 30, seed=3)
    assert [batch_size(c, 1, 16) for c in (0, 9, 10, 19, 20, 29)] == [1, 1, 2, 2, 4, 4]
    assert len(batches) == 10 * 16 + 10 * 8 + 10 * 4 and ends[0] == 16 and ends[-1] == len(batches)
    first_cycle = sorted(i for b in batches[: ends[0]] for i in b)
    assert first_cycle == list(range(16))  # each cycle visits every sample once
    assert batches[: ends[0]] != batches[ends[0] : ends[1]]  # in a new order


def test_circular_run_cycles_until_the_cycles_run_out(tiny_model_dir, tmp_path):
    from .conftest import write_json

    data = write_json(
        tmp_path / "d.json",
        [{"instruction": f"Item {i}?", "output": f"Answer {i}"} for i in range(16)],
    )
    overrides = {"base_model": str(tiny_model_dir), "datasets": [{"path": str(data)}], "val_set_size": 0,
                 "micro_batch_size": 1, "max_circular_epochs": 12, "learning_rate": 1e-3,
                 "output_dir": str(tmp_path / "run"), "logging_steps": 1}  # fmt: skip
    result = train(load_config(overrides=overrides, sets=["mode=circular"]), quiet=True)
    assert result.steps == 10 * 16 + 2 * 8
    info = json.loads((result.run_dir / "adapter_info.json").read_text())
    assert info["origins"]["circular"] == "mode circular"


def test_circular_validates_at_each_cycle_end(tiny_model_dir, tmp_path):
    from .conftest import write_json

    data = write_json(
        tmp_path / "d.json",
        [{"instruction": f"Item {i}?", "output": f"Answer {i}"} for i in range(20)],
    )
    overrides = {"base_model": str(tiny_model_dir), "datasets": [{"path": str(data)}], "val_set_size": 4,
                 "micro_batch_size": 2, "max_circular_epochs": 3, "output_dir": str(tmp_path / "run"),
                 "circular": True}  # fmt: skip
    result = train(load_config(overrides=overrides), quiet=True)
    records = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_loss" in r] == [8, 16, 24]


def test_batch_that_fits_the_memory():
    from tunelab.train.estimate import fitting_batch

    def peak(batch):
        return 10 + 2 * batch  # GiB: weights plus activations growing with the batch

    assert fitting_batch(80, peak) == 16  # 10 + 32 = 42 <= 64; 10 + 64 = 74 > 64
    assert fitting_batch(20, peak) == 2
    assert fitting_batch(5, peak) == 1  # never below one


def test_bitsandbytes_optimizers_are_refused_on_cpu(alpaca_file, tmp_path, capsys):
    from tunelab.cli import main

    for name in ("adamw_bnb_8bit", "paged_adamw_8bit", "lion_8bit"):
        code = main(
            [
                "train",
                "--data",
                str(alpaca_file),
                "--optimizer",
                name,
                "--output",
                str(tmp_path / "o"),
            ]
        )
        assert (
            code == 2
            and f"optimizer: {name} needs a CUDA GPU with bitsandbytes" in capsys.readouterr().err
        )
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "flag, value, key, expected",
    [
        ("--epochs", "2", "num_epochs", 2.0),
        ("--learning-rate", "3e-4", "learning_rate", 3e-4),
        ("--batch-size", "2", "micro_batch_size", 2),
        ("--gradient-accumulation-steps", "4", "gradient_accumulation_steps", 4),
        ("--lora-r", "4", "lora_r", 4),
        ("--lora-alpha", "32", "lora_alpha", 32),
        ("--method", "full", "adapter", "full"),
        ("--optimizer", "adafactor", "optimizer", "adafactor"),
        ("--max-examples", "3", "max_examples", 3),
        ("--validation-split", "0.25", "val_set_size", 0.25),
        ("--patience", "7", "early_stopping_patience", 7),
        ("--overfitting-threshold", "0.3", "overfitting_threshold", 0.3),
        ("--mode", "fast", "mode", "fast"),
        ("--max-circular-epochs", "5", "max_circular_epochs", 5),
        ("--save-steps", "10", "save_steps", 10),
        ("--force-epochs", None, "force_epochs", True),
        ("--circular", None, "circular", True),
    ],
)
def test_each_flag_sets_its_key(flag, value, key, expected, tiny_model_dir, alpaca_file, capsys):
    from tunelab.cli import main

    args = [
        "train",
        "--data",
        str(alpaca_file),
        "--base-model",
        str(tiny_model_dir),
        "--dry-run",
        "--json",
    ]
    assert main([*args, flag] + ([value] if value is not None else [])) == 0
    setting = json.loads(capsys.readouterr().out)["settings"][key]
    assert setting == {"value": expected, "from": "flag"}


def test_review_edge_cases(tiny_model_dir, alpaca_file, tmp_path):
    from tunelab.errors import ConfigError

    # a key written as null (or max_steps: -1) does not count as given
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"datasets:\n  - path: {alpaca_file}\nmode: non-stop\nmax_steps: -1\nlearning_rate:\n"
    )
    got = load_config(cfg)
    config, why = choose(got, got.config, None, 10)
    assert config.num_epochs == 10_000 and why["learning_rate"] == "mode non-stop"
    with pytest.raises(ConfigError, match="circular training grows its own batch"):
        load_config(
            overrides={
                "datasets": [{"path": str(alpaca_file)}],
                "circular": True,
                "gradient_accumulation_steps": 2,
            }
        )
    overrides = {
        "base_model": str(tiny_model_dir),
        "datasets": [{"path": str(alpaca_file)}],
        "output_dir": str(tmp_path / "r"),
    }
    with pytest.raises(ConfigError, match="choose one"):
        train(load_config(overrides=overrides), overwrite=True, resume=True, quiet=True)


def test_a_continued_adapter_is_planned_with_its_trainable_weights(
    tiny_model_dir, tmp_path, capsys
):
    from tunelab.cli import main

    from .conftest import MEMORISE, write_json

    data = write_json(tmp_path / "a.json", MEMORISE)
    first = train(load_config(overrides={"base_model": str(tiny_model_dir), "val_set_size": 0,
                                         "datasets": [{"path": str(data)}], "max_steps": 1,
                                         "output_dir": str(tmp_path / "a")}), quiet=True)  # fmt: skip
    trained = json.loads((first.run_dir / "adapter_info.json").read_text())["parameters"]
    args = ["train", "--data", str(data), "--base-model", str(tiny_model_dir), "--continue-from",
            str(first.run_dir), "--dry-run", "--json"]  # fmt: skip
    assert main(args) == 0
    planned = json.loads(capsys.readouterr().out)["parameters"]
    assert planned == trained and planned["trainable"] > 0
