import json
from pathlib import Path

import pytest

from tunelab.config import BUILTIN_MODEL, load_config
from tunelab.errors import ConfigError

SEEDS = Path(__file__).resolve().parents[2] / "shared" / "seeds"


def problems_of(**kwargs) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(**kwargs)
    return info.value.problems


def test_defaults_with_only_data(alpaca_file):
    config = load_config(overrides={"datasets": [{"path": str(alpaca_file)}]}).config
    assert config.base_model == BUILTIN_MODEL
    assert config.adapter == "lora"
    assert config.lora_alpha_value == 2 * config.lora_r
    assert config.learning_rate_value == 2e-4
    assert config.lora_targets == "all-linear"
    assert config.datasets[0].type == "auto"


def test_yaml_file_and_command_line_precedence(tmp_path, alpaca_file):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"datasets:\n  - path: {alpaca_file}\nnum_epochs: 5\nlora_r: 4\nlearning_rate: 1e-3\n"
    )
    loaded = load_config(
        cfg, overrides={"num_epochs": 2}, sets=["lora_r=32", "datasets.0.type=alpaca"]
    )
    assert loaded.config.num_epochs == 2  # named flag wins over the file
    assert loaded.config.lora_r == 32  # --set wins over the file
    assert loaded.config.datasets[0].type == "alpaca"  # dotted nested key
    assert loaded.config.learning_rate == 1e-3  # YAML's '1e-3' string still becomes a float


def test_json_file(tmp_path, alpaca_file):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"datasets": [{"path": str(alpaca_file)}], "lora_dropout": 0.1}))
    assert load_config(cfg).config.lora_dropout == 0.1


def test_transformers_style_aliases(alpaca_file):
    config = load_config(
        overrides={"datasets": [{"path": str(alpaca_file)}]},
        sets=["num_train_epochs=7", "per_device_train_batch_size=3", "max_seq_length=128"],
    ).config
    assert (config.num_epochs, config.micro_batch_size, config.sequence_len) == (7, 3, 128)


def test_alias_conflict_in_a_file_is_an_error(tmp_path, alpaca_file):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"datasets:\n  - path: {alpaca_file}\nnum_train_epochs: 7\nnum_epochs: 2\n")
    assert problems_of(path=cfg) == [
        "num_train_epochs: same setting as num_epochs; give only one of them"
    ]


def test_every_problem_at_once_with_dotted_paths(tmp_path):
    problems = problems_of(
        sets=[
            "lerning_rate=1",
            "lora_r=0",
            "learning_rate=-1",
            f"datasets.0.path={tmp_path / 'missing.json'}",
            "datasets.0.typ=alpaca",
            "lr_scheduler=wobbly",
        ]
    )
    text = "\n".join(problems)
    assert "lerning_rate: unknown key; did you mean 'learning_rate'?" in text
    assert any(p.startswith("lora_r:") and "greater than or equal to 1" in p for p in problems)
    assert any(p.startswith("learning_rate:") and "greater than 0" in p for p in problems)
    assert f"datasets.0.path: '{tmp_path / 'missing.json'}': no such file" in text
    assert "datasets.0.typ: unknown key; did you mean 'type'?" in text
    assert any(p.startswith("lr_scheduler:") and "'cosine'" in p for p in problems)
    assert len(problems) == 6


def test_missing_datasets():
    assert problems_of() == ["datasets: no training data; give --data FILE or a datasets list"]


def test_base_model_checks(tmp_path, alpaca_file):
    data = {"datasets": [{"path": str(alpaca_file)}]}
    (tmp_path / "notamodel").mkdir()
    problems = problems_of(overrides={**data, "base_model": str(tmp_path / "notamodel")})
    assert problems == [
        f"base_model: '{tmp_path / 'notamodel'}' is a directory but not a model: "
        "it has no config.json"
    ]
    problems = problems_of(overrides={**data, "base_model": "./nowhere/model.gguf"})
    assert problems == ["base_model: './nowhere/model.gguf': no such file or directory"]
    # A hub id is accepted (it is loaded, or fails clearly, at run time).
    assert (
        load_config(overrides={**data, "base_model": "org/some-model"}).config.base_model
        == "org/some-model"
    )


def test_syntax_error_names_file_and_line(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("lora_r: 8\ndatasets: [\n  - nope: : :\n")
    problems = problems_of(path=cfg)
    assert problems[0].startswith(f"{cfg}:")
    assert "invalid YAML" in problems[0]


def test_request_envelope(tmp_path, alpaca_file):
    request = {
        "input": {
            "user_id": "u1",
            "credentials": {"hf_token": "secret-token"},
            "args": {"datasets": [{"path": str(alpaca_file)}], "lora_r": 4, "wandb_watch": "all"},
        }
    }
    path = tmp_path / "request.json"
    path.write_text(json.dumps(request))
    loaded = load_config(path)
    # a request takes axolotl's schema: without an adapter, every weight is trained
    assert loaded.dialect == "axolotl" and loaded.config.adapter == "full"
    notes = "\n".join(loaded.notes)
    assert "input.user_id" in notes and "ignored: wandb_watch" in notes
    assert "credentials are ignored" in notes and "secret-token" not in notes


@pytest.mark.skipif(not SEEDS.is_dir(), reason="the seed documents are not beside this checkout")
def test_runpod_example_request_validates(tmp_path, alpaca_file):
    seed = (SEEDS / "003_e90ef2b62a6316dc.txt").read_text()
    start = seed.index("```json", seed.index("Example Configuration Request"))
    request = json.loads(seed[start + len("```json") : seed.index("```", start + 7)])
    request["input"]["args"]["base_model"] = BUILTIN_MODEL
    request["input"]["args"]["datasets"][0]["path"] = str(alpaca_file)
    path = tmp_path / "request.json"
    path.write_text(json.dumps(request))
    loaded = load_config(path)
    assert loaded.config.lora_r == 16 and loaded.config.micro_batch_size == 2
    assert loaded.config.optimizer == "adamw_bnb_8bit"  # axolotl's adamw_8bit
    notes = "\n".join(loaded.notes)
    assert loaded.config.hub_model_id == "runpod/llama-fr-lora"  # pushed after training
    assert "ignored: strict, eval_sample_packing" not in notes  # strict is false: the default
    assert "eval_sample_packing" in notes
    config = loaded.config
    assert config.attn_implementation == "flash_attention_2"  # axolotl's flash_attention: true
    assert config.special_tokens == {"pad_token": "<|end_of_text|>"}
    assert config.pad_to_sequence_len and config.adapter == "lora"
    assert config.sample_packing and config.evals_per_epoch == 4 and config.saves_per_epoch == 1
    assert config.loss_watchdog_threshold == 5 and config.loss_watchdog_patience == 3
    assert (config.wandb_project, config.wandb_entity) == ("test-run-1", "axo-test")
    assert "input.user_id" in notes
    assert "load_in_4bit" not in notes  # false is its default: nothing to say


def test_misspelt_builtin_name_suggests_it(alpaca_file):
    problems = problems_of(
        overrides={"datasets": [{"path": str(alpaca_file)}], "base_model": "SmolLM2-135M-Instrct"}
    )
    assert problems == [
        "base_model: 'SmolLM2-135M-Instrct' is not a local path; "
        "did you mean the built-in 'SmolLM2-135M-Instruct'?"
    ]


def test_overlap_must_be_smaller_than_the_chunk(alpaca_file):
    problems = problems_of(
        overrides={"datasets": [{"path": str(alpaca_file), "cutoff_len": 64, "overlap_len": 64}]}
    )
    assert problems == [
        "datasets.0.overlap_len: 64 must be smaller than the chunk length (64, cutoff_len or sequence_len)"
    ]
