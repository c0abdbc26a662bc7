"""Training honours the axolotl keys: attention, checkpointing, LoRA variants, optimizer and
schedule settings, padding, new tokens and models that ship their own code."""

import json
import math
import shutil

import pytest
import torch

from tunelab.config import load_config
from tunelab.errors import ConfigError, ModelError
from tunelab.infer.load import load_run
from tunelab.model.hardware import Hardware
from tunelab.rundir import RunLayout
from tunelab.train.plan import plan_run
from tunelab.train.preflight import machine_plan
from tunelab.train.trainer import checkpointing_kwargs, count_parameters, training_arguments

from .conftest import MEMORISE, cli, run, write_json

CPU = Hardware("cpu", False, "CPU", None)
GPU = Hardware("cuda", True, "GPU", 80.0)
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a CPU refuses")


def metrics(run_dir) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def adapter_config(run_dir) -> dict:
    return json.loads((run_dir / "adapter_config.json").read_text())


def adapter_shapes(run_dir) -> dict[str, list[int]]:
    from safetensors import safe_open

    with safe_open(str(run_dir / "adapter_model.safetensors"), "pt") as f:
        return {key: list(f.get_slice(key).get_shape()) for key in f.keys()}


def settings(data, **more):
    return load_config(overrides={"datasets": [{"path": str(data)}], **more}).config


def arguments(tmp_path, config, hardware=CPU, has_eval=True):
    plan = machine_plan(config, hardware)
    return training_arguments(config, plan, RunLayout(tmp_path), 10, 5, has_eval)


# --- LoRA variants -----------------------------------------------------------------------


def test_lora_variants_reach_the_saved_adapter(tiny_model_dir, alpaca_file, tmp_path):
    result = run(
        tiny_model_dir, alpaca_file, tmp_path / "out", max_steps=2,
        lora_target_modules=r".*layers\.0\.self_attn\.(q|v)_proj",
        lora_modules_to_save=["lm_head"], peft_use_rslora=True, peft_use_dora=True,
    )  # fmt: skip
    saved = adapter_config(result.run_dir)
    assert saved["use_rslora"] is True and saved["use_dora"] is True
    assert saved["modules_to_save"] == ["lm_head"]
    assert saved["target_modules"] == r".*layers\.0\.self_attn\.(q|v)_proj"
    adapted = sorted(
        name.removeprefix("base_model.model.").removesuffix(".lora_A")
        for name, _ in result.model.named_modules()
        if name.endswith("lora_A")
    )
    assert adapted == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    shapes = adapter_shapes(result.run_dir)
    assert any("lora_magnitude_vector" in key for key in shapes)  # DoRA's magnitudes
    assert any(key.endswith("lm_head.weight") for key in shapes)  # trained in full
    model, _ = load_run(result.run_dir)  # and it loads again
    assert next(iter(model.peft_config.values())).use_dora


def test_fan_in_fan_out_reaches_lora(alpaca_file, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from tunelab.train.trainer import lora_settings

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert lora_settings(model, settings(alpaca_file, lora_fan_in_fan_out=True)).fan_in_fan_out
    assert not lora_settings(model, settings(alpaca_file)).fan_in_fan_out


def test_a_regex_matching_no_layer_names_the_layers(tiny_model_dir, alpaca_file, capsys):
    code, err = cli(
        ["validate", "--data", str(alpaca_file), "--base-model", str(tiny_model_dir),
         "--set", "lora_target_modules=.*nothing_like_this.*"], capsys,
    )  # fmt: skip
    assert code == 2 and "regular expression '.*nothing_like_this.*' matches no" in err
    assert "q_proj" in err and "like 'model.layers.0.self_attn.q_proj'" in err


# axolotl's configs for image-text models, written for transformers 4's names
OLD_VLM_TARGETS = (
    r"language_model.model.layers.[\d]+.(mlp|cross_attn|self_attn).(up|down|gate|q|k|v|o)_proj"
)


def test_lora_targets_written_for_transformers_4s_image_text_layout(tiny_vlm, image_rows,
                                                                    tmp_path, capsys):  # fmt: skip
    note = ("note: lora_target_modules was written for transformers 4's layout "
            "(language_model.model.*); it matches 14 layers under their names now "
            "(model.language_model.*)")  # fmt: skip
    text_layers = sorted(
        f"model.language_model.layers.{i}.{part}"
        for i in range(2)
        for part in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                     "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    )  # fmt: skip
    config = write_json(tmp_path / "config.json", {"lora_target_modules": OLD_VLM_TARGETS})
    code, err = cli(["validate", str(config), "--data", str(image_rows), "--base-model",
                     str(tiny_vlm)], capsys)  # fmt: skip
    assert code == 0 and note in err, err
    result = run(tiny_vlm, image_rows, tmp_path / "out", max_steps=2,
                 lora_target_modules=OLD_VLM_TARGETS)  # fmt: skip
    assert note in RunLayout(result.run_dir).log.read_text()

    def adapted(model):
        return sorted(
            name.removeprefix("base_model.model.").removesuffix(".lora_A")
            for name, _ in model.named_modules()
            if name.endswith("lora_A")
        )

    assert adapted(result.model) == text_layers
    planned = _plan(tiny_vlm, image_rows, lora_target_modules=OLD_VLM_TARGETS)
    assert planned.trainable == count_parameters(result.model)[0]
    assert sorted(adapter_config(result.run_dir)["target_modules"]) == text_layers
    model, _ = load_run(result.run_dir)  # and the adapter loads again
    assert adapted(model) == text_layers
    trained = result.model.state_dict()
    for name, weight in model.state_dict().items():
        if "lora_B" in name:
            expected = trained[name.replace(".a0.", ".default.")]
            assert torch.allclose(weight.float().cpu(), expected.float().cpu(), atol=1e-3), name


# --- optimizer, schedule, evaluation, checkpointing: the Trainer's arguments --------------


def test_adam_settings_and_eval_batch_size(tmp_path, alpaca_file):
    config = settings(alpaca_file, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6,
                      eval_batch_size=3, micro_batch_size=2)  # fmt: skip
    args = arguments(tmp_path, config)
    assert (args.adam_beta1, args.adam_beta2, args.adam_epsilon) == (0.8, 0.95, 1e-6)
    assert args.per_device_eval_batch_size == 3 and args.per_device_train_batch_size == 2
    default = arguments(tmp_path, settings(alpaca_file, micro_batch_size=2))
    assert (default.adam_beta1, default.adam_beta2, default.per_device_eval_batch_size) == (
        0.9, 0.999, 2
    )  # fmt: skip


def test_scheduler_kwargs_are_merged_over_tunelabs(tmp_path, alpaca_file):
    args = arguments(tmp_path, settings(alpaca_file, lr_scheduler="reduce_lr_on_plateau",
                                        lr_scheduler_kwargs={"patience": 4}))  # fmt: skip
    assert args.lr_scheduler_kwargs == {"factor": 0.5, "patience": 4}
    args = arguments(tmp_path, settings(alpaca_file, cosine_min_lr_ratio=0.2))
    assert args.lr_scheduler_type == "cosine_with_min_lr"
    assert args.lr_scheduler_kwargs == {"min_lr_rate": 0.2}
    args = arguments(tmp_path, settings(alpaca_file, cosine_min_lr_ratio=0.2,
                                        lr_scheduler_kwargs={"min_lr_rate": 0.3}))  # fmt: skip
    assert args.lr_scheduler_kwargs == {"min_lr_rate": 0.3}  # the user's word wins


def test_evals_per_epoch_zero_means_no_evaluation_during_training(tmp_path, alpaca_file):
    args = arguments(tmp_path, settings(alpaca_file, evals_per_epoch=0))
    assert args.eval_strategy == "no" and not args.load_best_model_at_end
    assert arguments(tmp_path, settings(alpaca_file, evals_per_epoch=2)).eval_strategy == "steps"


def test_cosine_floor_and_a_single_final_evaluation(tiny_model_dir, tmp_path):
    data = write_json(tmp_path / "data.json", MEMORISE * 2)  # 8 rows: 2 held out
    result = run(
        tiny_model_dir, data, tmp_path / "out", max_steps=4, val_set_size=2, evals_per_epoch=0,
        cosine_min_lr_ratio=0.5, learning_rate=1e-2, warmup_steps=0, micro_batch_size=2,
    )  # fmt: skip
    records = metrics(result.run_dir)
    evaluations = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evaluations] == [4]  # none during training, one at the end
    rates = [r["learning_rate"] for r in records if "learning_rate" in r]
    assert len(rates) == 4 and min(rates) >= 5e-3 and rates[-1] < 6e-3  # plain cosine: 1.5e-3


def test_checkpointing_kwargs_keep_the_users_word(tmp_path, alpaca_file):
    config = settings(alpaca_file, gradient_checkpointing=True,
                      gradient_checkpointing_kwargs={"use_reentrant": True})  # fmt: skip
    args = arguments(tmp_path, config)
    assert args.activation_checkpointing
    assert args.activation_checkpointing_kwargs == {"use_reentrant": True}
    args = arguments(tmp_path, settings(alpaca_file, gradient_checkpointing=True))
    assert args.activation_checkpointing_kwargs == {"use_reentrant": False}


def test_offloaded_checkpointing(tmp_path, alpaca_file):
    config = settings(alpaca_file, gradient_checkpointing="offload")
    gpu = machine_plan(config, GPU)
    assert gpu.gradient_checkpointing and gpu.offload_activations
    assert checkpointing_kwargs(config, gpu) == {"use_reentrant": False, "offload": True}
    cpu = machine_plan(config, CPU)  # on a CPU the activations are in CPU memory already
    assert cpu.gradient_checkpointing and not cpu.offload_activations
    assert any("not offloaded" in reason for reason in cpu.reasons)
    assert arguments(tmp_path, config).activation_checkpointing_kwargs == {"use_reentrant": False}


def test_training_with_checkpointing_kwargs(tiny_model_dir, alpaca_file, tmp_path):
    result = run(
        tiny_model_dir, alpaca_file, tmp_path / "out", max_steps=2,
        gradient_checkpointing="offload", gradient_checkpointing_kwargs={"use_reentrant": True},
    )  # fmt: skip
    layers = result.model.base_model.model.model.layers
    assert all(layer.gradient_checkpointing for layer in layers)
    assert layers[0]._gradient_checkpointing_func.keywords == {"use_reentrant": True}
    info = json.loads((result.run_dir / "adapter_info.json").read_text())
    assert info["effective"]["gradient_checkpointing"] == (
        "offload" if torch.cuda.is_available() else True
    )


# --- padding ------------------------------------------------------------------------------


def test_pad_to_sequence_len_pads_every_batch(tiny_model_dir, alpaca_file, tmp_path, monkeypatch):
    from transformers import DataCollatorForSeq2Seq

    widths = []
    collate = DataCollatorForSeq2Seq.__call__

    def recording(self, features, return_tensors=None):  # the real collator, watched
        batch = collate(self, features, return_tensors)
        widths.append((batch["input_ids"].shape[1], batch["labels"].shape[1]))
        return batch

    monkeypatch.setattr(DataCollatorForSeq2Seq, "__call__", recording)
    run(tiny_model_dir, alpaca_file, tmp_path / "out", max_steps=2, micro_batch_size=2,
        sequence_len=96, pad_to_sequence_len=True)  # fmt: skip
    assert widths and set(widths) == {(96, 96)}
    widths.clear()
    run(tiny_model_dir, alpaca_file, tmp_path / "plain", max_steps=2, micro_batch_size=2,
        sequence_len=96, padding_free=False)  # fmt: skip
    assert widths and all(w < 96 for w, _ in widths)  # padded only to the longest


# --- new tokens ---------------------------------------------------------------------------


@pytest.fixture
def thinking_data(tmp_path):
    rows = [{**row, "output": "<think>" + row["output"]} for row in MEMORISE]
    return write_json(tmp_path / "thinking.json", rows)


def test_special_tokens_and_new_tokens_are_trained_and_saved(tiny_model_dir, thinking_data,
                                                             tmp_path):  # fmt: skip
    from transformers import AutoTokenizer

    base = AutoTokenizer.from_pretrained(tiny_model_dir)
    special = {"pad_token": "<|pad|>", "eos_token": "<|endoftext|>"}  # one new, one known
    more = {"max_steps": 3, "special_tokens": special, "tokens": ["<think>"],
            "learning_rate": 1e-2}  # fmt: skip
    result = run(tiny_model_dir, thinking_data, tmp_path / "out", **more)
    saved = AutoTokenizer.from_pretrained(result.run_dir)
    assert len(saved) == len(base) + 2
    assert saved.pad_token == "<|pad|>" and saved.eos_token == "<|endoftext|>"
    think = saved.convert_tokens_to_ids("<think>")
    assert think >= len(base) and saved("<think>Paris")["input_ids"][0] == think
    # with LoRA, the embeddings and the output head are trained in full, at the new size
    assert adapter_config(result.run_dir)["modules_to_save"] == ["model.embed_tokens", "lm_head"]
    shapes = {k: v for k, v in adapter_shapes(result.run_dir).items() if "lora" not in k}
    assert shapes == {
        "base_model.model.lm_head.weight": [len(saved), 32],
        "base_model.model.model.embed_tokens.weight": [len(saved), 32],
    }
    embed = result.model.base_model.model.model.embed_tokens
    trained, start = embed.modules_to_save["default"].weight, embed.original_module.weight
    assert not torch.equal(trained[think], start[think])  # the new token learned something
    # the plan counts what training trains
    overrides = {"base_model": str(tiny_model_dir), "datasets": [{"path": str(thinking_data)}],
                 "val_set_size": 0, "micro_batch_size": 4, "lora_r": 16, **more}  # fmt: skip
    planned = plan_run(load_config(overrides=overrides), log=lambda _: None)
    assert planned.trainable == count_parameters(result.model)[0]
    # generation stops at the new EOS, in training and when the run is loaded again
    eos = saved.eos_token_id
    assert eos in result.model.generation_config.eos_token_id
    model, tokenizer = load_run(result.run_dir)
    assert len(tokenizer) == len(saved) and eos in model.generation_config.eos_token_id
    assert model.get_input_embeddings().weight.shape[0] == len(saved)


def test_new_tokens_under_full_fine_tuning(tiny_model_dir, thinking_data, tmp_path):
    result = run(tiny_model_dir, thinking_data, tmp_path / "out", max_steps=2, adapter="full",
                 tokens=["<think>", "</think>"])  # fmt: skip
    config = json.loads((result.run_dir / "config.json").read_text())
    base = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["vocab_size"] == base["vocab_size"] + 2


def test_an_unknown_special_token_name_is_refused(tiny_model_dir, alpaca_file, tmp_path):
    with pytest.raises(ConfigError, match="special_tokens.end_token: not a special token"):
        run(tiny_model_dir, alpaca_file, tmp_path / "out", max_steps=2,
            special_tokens={"end_token": "<|im_end|>"})  # fmt: skip
    assert not (tmp_path / "out").exists()


# --- attention ----------------------------------------------------------------------------


def test_attn_implementation_reaches_the_model(tiny_model_dir, alpaca_file, tmp_path):
    from transformers import AutoModelForCausalLM

    default = AutoModelForCausalLM.from_pretrained(tiny_model_dir).config._attn_implementation
    assert default != "eager"
    result = run(tiny_model_dir, alpaca_file, tmp_path / "out", max_steps=2,
                 attn_implementation="eager")  # fmt: skip
    assert result.model.config._attn_implementation == "eager"
    model, _ = load_run(result.run_dir)  # as the run trained
    assert model.config._attn_implementation == "eager"


@pytest.mark.parametrize(
    "setting, problem",
    [
        ("cosine_min_lr_ratio=0.1", "cosine_min_lr_ratio: applies to the cosine schedule"),
        ("attn_implementation=sdpaa", "attn_implementation: 'sdpaa' is not an attention"),
    ],
)
def test_settings_that_cannot_apply_are_refused(setting, problem, tiny_model_dir, alpaca_file,
                                                capsys):  # fmt: skip
    more = ["--set", "lr_scheduler=linear"] if "cosine" in setting else []
    code, err = cli(
        ["validate", "--data", str(alpaca_file), "--base-model", str(tiny_model_dir),
         "--set", setting, *more], capsys,
    )  # fmt: skip
    assert code == 2 and problem in err


# --- what a CPU cannot run ----------------------------------------------------------------


@no_cuda
@pytest.mark.parametrize(
    "setting, reason",
    [
        ("attn_implementation=flash_attention_2",
         "attn_implementation: flash_attention_2 needs a CUDA GPU"),
        ("attn_implementation=kernels-community/vllm-flash-attn3",
         "attn_implementation: kernels-community/vllm-flash-attn3 is a Hub kernel and needs a "
         "CUDA GPU"),
        ("optimizer=adamw_torch_8bit", "optimizer: adamw_torch_8bit needs a CUDA GPU with torchao"),
        ("optimizer=adamw_torch_4bit", "optimizer: adamw_torch_4bit needs a CUDA GPU with torchao"),
        ("optimizer=paged_adamw_32bit",
         "optimizer: paged_adamw_32bit needs a CUDA GPU with bitsandbytes"),
        ("optimizer=paged_lion_8bit",
         "optimizer: paged_lion_8bit needs a CUDA GPU with bitsandbytes"),
    ],
)  # fmt: skip
def test_a_cpu_refuses_what_needs_a_gpu(setting, reason, tiny_model_dir, alpaca_file, tmp_path,
                                        capsys):  # fmt: skip
    common = ["--data", str(alpaca_file), "--base-model", str(tiny_model_dir), "--set", setting]
    code, err = cli(["train", *common, "--output", str(tmp_path / "o"), "--max-steps", "1"],
                    capsys)  # fmt: skip
    assert code == 2 and reason in err and not (tmp_path / "o").exists()
    code, err = cli(["validate", *common], capsys)
    assert code == 0 and f"warning: valid, but this machine cannot run it: {reason}" in err


# --- models that ship their own code --------------------------------------------------------

CONFIG_CODE = """from transformers import LlamaConfig


class CustomConfig(LlamaConfig):
    model_type = "tunelab_custom"
"""
MODEL_CODE = """from transformers import LlamaForCausalLM

from .configuration_custom import CustomConfig


class CustomForCausalLM(LlamaForCausalLM):
    config_class = CustomConfig
"""


def _with_auto_map(tiny_model_dir, path, model_type):
    shutil.copytree(tiny_model_dir, path)
    (path / "configuration_custom.py").write_text(CONFIG_CODE)
    (path / "modeling_custom.py").write_text(MODEL_CODE)
    config = json.loads((path / "config.json").read_text())
    config.update(
        model_type=model_type,
        auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                  "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"},
    )  # fmt: skip
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def custom_code_model(tiny_model_dir, tmp_path_factory):
    """The tiny model as an architecture transformers does not know, with its own code."""
    return _with_auto_map(tiny_model_dir, tmp_path_factory.mktemp("custom") / "model",
                          "tunelab_custom")  # fmt: skip


def test_a_model_with_its_own_code_needs_trust(custom_code_model, alpaca_file, tmp_path,
                                               capsys):  # fmt: skip
    with pytest.raises(ModelError) as caught:
        run(custom_code_model, alpaca_file, tmp_path / "out", max_steps=2)
    assert str(custom_code_model) in caught.value.message
    assert "it runs its own Python code (auto_map in config.json)" in caught.value.message
    assert caught.value.hint == "set trust_remote_code: true if you trust it"
    assert not (tmp_path / "out").exists()
    code, err = cli(["validate", "--data", str(alpaca_file), "--base-model",
                     str(custom_code_model)], capsys)  # fmt: skip
    assert code == 2 and "trust_remote_code: true" in err


def test_trusted_code_trains_and_loads_again(custom_code_model, alpaca_file, tmp_path):
    result = run(custom_code_model, alpaca_file, tmp_path / "out", max_steps=2,
                 trust_remote_code=True)  # fmt: skip
    assert type(result.model.base_model.model).__name__ == "CustomForCausalLM"
    model, _ = load_run(result.run_dir)  # with the trust the run was trained with
    assert type(model.base_model.model).__name__ == "CustomForCausalLM"


def test_a_known_architecture_listing_its_code_loads_without_it(tiny_model_dir, alpaca_file,
                                                                tmp_path, capsys):  # fmt: skip
    path = _with_auto_map(tiny_model_dir, tmp_path / "model", "llama")
    code, err = cli(["validate", "--data", str(alpaca_file), "--base-model", str(path)], capsys)
    assert code == 0, err  # transformers' own Llama code runs, none of the model's


# --- unfrozen_parameters ----------------------------------------------------------------


def _plan(model_dir, data, log=lambda _: None, **more):
    overrides = {"base_model": str(model_dir), "datasets": [{"path": str(data)}],
                 "val_set_size": 0, "micro_batch_size": 4, "lora_r": 16, **more}  # fmt: skip
    return plan_run(load_config(overrides=overrides), log=log)


def _base_weights(tiny_model_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(tiny_model_dir / "model.safetensors"))


def test_unfrozen_parameters_under_full_fine_tuning(tiny_model_dir, alpaca_file, tmp_path):
    unfrozen = ["model.layers.1.mlp", "lm_head"]  # '.' is a literal dot, matched from the start
    more = {"adapter": "full", "unfrozen_parameters": unfrozen, "learning_rate": 1e-2}
    result = run(tiny_model_dir, alpaca_file, tmp_path / "out", max_steps=2, **more)
    trainable = {name for name, p in result.model.named_parameters() if p.requires_grad}
    assert trainable == {
        "model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight",
        "model.layers.1.mlp.down_proj.weight", "lm_head.weight",
    }  # fmt: skip
    base, trained = _base_weights(tiny_model_dir), result.model.state_dict()
    for name, weight in base.items():
        assert torch.equal(trained[name], weight) == (name not in trainable), name
    planned = _plan(tiny_model_dir, alpaca_file, **more)
    assert planned.trainable == count_parameters(result.model)[0] < planned.total


def test_unfrozen_parameters_with_lora_train_only_adapters_inside(tiny_model_dir, alpaca_file,
                                                                  tmp_path):  # fmt: skip
    more = {"unfrozen_parameters": [r"model.layers.0.self_attn.(q|v)_proj"],
            "learning_rate": 1e-2}  # fmt: skip
    result = run(tiny_model_dir, alpaca_file, tmp_path / "out", max_steps=2, **more)
    trainable = sorted(n for n, p in result.model.named_parameters() if p.requires_grad)
    prefix = "base_model.model.model.layers.0.self_attn."
    assert trainable == [f"{prefix}{m}_proj.lora_{ab}.default.weight"
                         for m in "qv" for ab in "AB"]  # fmt: skip
    state = result.model.state_dict()
    assert state[f"{prefix}q_proj.lora_B.default.weight"].abs().sum() > 0  # trained
    untouched = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.default.weight"
    assert state[untouched].abs().sum() == 0  # lora_B starts at zero and stayed there
    assert _plan(tiny_model_dir, alpaca_file, **more).trainable == count_parameters(result.model)[0]


@pytest.mark.parametrize(
    "patterns, problem",
    [
        # under full fine-tuning, patterns matching nothing would leave every weight trained
        (
            ["model.layers.7", "layers.0"],
            "unfrozen_parameters.0: 'model.layers.7' matches no "
            "parameter of the model (matched from the start of the name, like "
            "'model.layers.0.self_attn.q_proj.weight')\n",
        ),
        (["model.layers.7", "layers.0"], "unfrozen_parameters.1: 'layers.0' matches no"),
        (["model.layers.7", "layers.0"], "unfrozen_parameters: none matches a parameter of"),
        (
            ["model.embed_tokens.weight$[:32000]"],
            "a row range like [:32000] (training part of a parameter) is not supported yet",
        ),  # fmt: skip
    ],
)
def test_unfrozen_parameters_that_cannot_apply(patterns, problem, tiny_model_dir, alpaca_file,
                                               tmp_path, capsys):  # fmt: skip
    settings = {"unfrozen_parameters": patterns}
    if "layers.0" in patterns:
        settings["adapter"] = "full"
    config = write_json(tmp_path / "config.json", settings)
    code, err = cli(["validate", str(config), "--data", str(alpaca_file), "--base-model",
                     str(tiny_model_dir)], capsys)  # fmt: skip
    assert code == 2 and problem in err


def test_unfrozen_parameters_without_adapter_weights_are_ignored(tiny_model_dir, alpaca_file,
                                                                 capsys):  # fmt: skip
    """With LoRA, patterns that match only parameters LoRA does not adapt (an axolotl config
    written for an image-text model's language part, say) leave the adapter as it is."""
    notes = []
    plain = _plan(tiny_model_dir, alpaca_file)
    ignored = _plan(tiny_model_dir, alpaca_file, log=notes.append,
                    unfrozen_parameters=["model.norm"])  # fmt: skip
    assert ignored.trainable == plain.trainable > 0
    assert ignored.config.unfrozen_parameters is None
    assert any("unfrozen_parameters hold no weight of the adapter" in n for n in notes)


def test_unfrozen_parameters_that_match_nothing_with_an_adapter(tiny_model_dir, alpaca_file,
                                                                tmp_path, capsys):  # fmt: skip
    notes = []
    unmatched = "note: unfrozen_parameters.1: 'model.layers.7' matches no parameter of the model"
    some = _plan(tiny_model_dir, alpaca_file, log=notes.append,
                 unfrozen_parameters=["model.layers.0.self_attn.q_proj", "model.layers.7"])  # fmt: skip
    assert some.config.unfrozen_parameters == ["model.layers.0.self_attn.q_proj", "model.layers.7"]
    assert some.trainable == 2 * 16 * 32  # q_proj's LoRA A and B in layer 0
    assert [n for n in notes if n.startswith("note: unfrozen_parameters")] == [
        f"{unmatched} (matched from the start of the name, like "
        "'model.layers.0.self_attn.q_proj.weight'); it unfreezes nothing"
    ]
    without = _plan(tiny_model_dir, alpaca_file)
    config = write_json(tmp_path / "config.json",
                        {"unfrozen_parameters": ["layers.0", "model.layers.7"]})  # fmt: skip
    code, err = cli(["validate", str(config), "--data", str(alpaca_file), "--base-model",
                     str(tiny_model_dir)], capsys)  # fmt: skip
    assert code == 0, err
    assert "note: unfrozen_parameters.0: 'layers.0' matches no parameter" in err
    assert unmatched in err
    assert (
        f"note: unfrozen_parameters match no parameter of '{tiny_model_dir}' (its parameters are "
        "named like model.layers.0.self_attn.q_proj.weight); ignored: the adapter trains as it "
        "would without them"
    ) in err
    none = _plan(tiny_model_dir, alpaca_file, unfrozen_parameters=["layers.0", "model.layers.7"])
    assert none.config.unfrozen_parameters is None and none.trainable == without.trainable
    result = run(tiny_model_dir, alpaca_file, tmp_path / "out", max_steps=1,
                 unfrozen_parameters=["layers.0"])  # fmt: skip
    assert count_parameters(result.model)[0] == without.trainable


# --- reinit_weights -----------------------------------------------------------------------


def test_reinit_weights_starts_from_fresh_weights(tiny_model_dir, alpaca_file, tmp_path):
    # only lm_head trains, so the rest shows the weights the run started from
    result = run(tiny_model_dir, alpaca_file, tmp_path / "out", max_steps=2, adapter="full",
                 reinit_weights=True, unfrozen_parameters=["lm_head"])  # fmt: skip
    base, trained = _base_weights(tiny_model_dir), result.model.state_dict()
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(trained[name], base[name])
    assert abs(trained[name].std().item() - 0.3) < 0.05  # the config's initializer_range
    assert "note: reinit_weights: the model starts from freshly initialised weights" in (
        RunLayout(result.run_dir).log.read_text()
    )
    with pytest.raises(ConfigError, match="reinit_weights: an adapter on freshly initialised"):
        run(tiny_model_dir, alpaca_file, tmp_path / "lora", max_steps=2, reinit_weights=True)


# --- resize_token_embeddings_to_32x --------------------------------------------------------


def test_embeddings_padded_to_a_multiple_of_32(tiny_model_dir, alpaca_file, tmp_path):
    from transformers import AutoTokenizer

    vocabulary = len(AutoTokenizer.from_pretrained(tiny_model_dir))
    assert vocabulary % 32  # else there is nothing to pad
    padded = (vocabulary // 32 + 1) * 32
    more = {"resize_token_embeddings_to_32x": True, "lora_target_modules": ["q_proj", "lm_head"]}
    result = run(tiny_model_dir, alpaca_file, tmp_path / "out", max_steps=2, **more)
    assert result.model.get_input_embeddings().weight.shape[0] == padded
    assert result.model.get_output_embeddings().weight.shape[0] == padded
    planned = _plan(tiny_model_dir, alpaca_file, **more)
    assert (planned.trainable, planned.total) == count_parameters(result.model)
    model, tokenizer = load_run(result.run_dir)  # the adapter's lm_head fits the padded base
    assert model.get_input_embeddings().weight.shape[0] == padded
    ids = tokenizer("Name a colour.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, result.model.eval()(ids).logits, atol=1e-5)


# --- overrides_of_model_config ---------------------------------------------------------------


def test_overrides_of_model_config_reach_the_model(tiny_model_dir, alpaca_file, tmp_path,
                                                   capsys):  # fmt: skip
    more = {"overrides_of_model_config": {"rms_norm_eps": 0.5}}
    result = run(tiny_model_dir, alpaca_file, tmp_path / "out", max_steps=2, **more)
    assert result.model.config.rms_norm_eps == 0.5
    assert result.model.base_model.model.model.norm.variance_epsilon == 0.5
    model, _ = load_run(result.run_dir)  # the base loads with them again
    assert model.base_model.model.model.norm.variance_epsilon == 0.5
    layers = {"overrides_of_model_config": {"num_hidden_layers": 1}}  # planning sees them too
    assert _plan(tiny_model_dir, alpaca_file, **layers).total < _plan(
        tiny_model_dir, alpaca_file).total  # fmt: skip
    write_json(tmp_path / "bad.json", {"overrides_of_model_config": {"rms_norm_epsilon": 0.5}})
    code, err = cli(["validate", str(tmp_path / "bad.json"), "--data", str(alpaca_file),
                     "--base-model", str(tiny_model_dir)], capsys)  # fmt: skip
    assert (
        code == 2
        and (
            "overrides_of_model_config.rms_norm_epsilon: the llama model's config has no such "
            "setting; did you mean 'rms_norm_eps'?"
        )
        in err
    )


# --- model_quantization_config ---------------------------------------------------------------


@pytest.fixture(scope="module")
def mxfp4_model(tiny_model_dir, tmp_path_factory):
    """The tiny model as a checkpoint that says it is stored in MXFP4, as gpt-oss does."""
    path = tmp_path_factory.mktemp("mxfp4") / "model"
    shutil.copytree(tiny_model_dir, path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4"}
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_mxfp4_dequantized_trains(mxfp4_model, alpaca_file, tmp_path):
    from transformers import Mxfp4Config

    from tunelab.train.trainer import quantization

    more = {"model_quantization_config": "Mxfp4Config",
            "model_quantization_config_kwargs": {"dequantize": True}}  # fmt: skip
    config = settings(alpaca_file, **more)
    built = quantization(config, machine_plan(config, CPU))
    assert isinstance(built, Mxfp4Config) and built.dequantize
    result = run(mxfp4_model, alpaca_file, tmp_path / "out", max_steps=2, adapter="full",
                 learning_rate=1e-3, **more)  # fmt: skip
    assert not getattr(result.model, "is_quantized", False)
    assert "quantization_config" not in json.loads((result.run_dir / "config.json").read_text())


@pytest.mark.parametrize(
    "more, problem",
    [
        ({"model_quantization_config": "Mxfp5Config"},
         "model_quantization_config: 'Mxfp5Config' is not a transformers quantization config; "
         "use one of"),
        ({"model_quantization_config": "Mxfp4Config",
          "model_quantization_config_kwargs": {"dequantise": True}},
         "model_quantization_config_kwargs.dequantise: Mxfp4Config has no such argument; it "
         "takes modules_to_not_convert, dequantize"),
        # the tiny model is not stored quantized: Mxfp4Config would quantize it
        ({"model_quantization_config": "Mxfp4Config", "adapter": "full",
          "model_quantization_config_kwargs": {"dequantize": True}},
         "model_quantization_config: Mxfp4Config keeps the weights quantized, and quantized "
         "weights cannot be fully fine-tuned"),
        ({"model_quantization_config": "Mxfp4Config", "reinit_weights": True, "adapter": "full"},
         "model_quantization_config: reinit_weights starts from new weights"),
    ],
)  # fmt: skip
def test_quantization_configs_that_cannot_apply(more, problem, tiny_model_dir, alpaca_file,
                                                tmp_path, capsys):  # fmt: skip
    write_json(tmp_path / "config.json", more)
    code, err = cli(["validate", str(tmp_path / "config.json"), "--data", str(alpaca_file),
                     "--base-model", str(tiny_model_dir)], capsys)  # fmt: skip
    assert code == 2 and problem in err
    if "Mxfp5Config" in problem:
        assert "Mxfp4Config" in err and "BitsAndBytesConfig" in err


@no_cuda
def test_a_quantization_needing_a_gpu_is_a_machine_problem(alpaca_file):
    from tunelab.train.preflight import hardware_problems

    config = settings(alpaca_file, model_quantization_config="FbgemmFp8Config")
    assert any(
        p.startswith("model_quantization_config: FbgemmFp8Config cannot load on this machine:")
        and "GPU" in p
        for p in hardware_problems(config, CPU)
    )
    dequantized = settings(alpaca_file, model_quantization_config="Mxfp4Config",
                           model_quantization_config_kwargs={"dequantize": True})  # fmt: skip
    assert not hardware_problems(dequantized, CPU)  # dequantizing runs on a CPU


# --- scaling_softmax (SSMax) -----------------------------------------------------------------


def _scaled_queries(model, factor, bias, positions):
    """Hooks that multiply each q_proj output by s*log(max(p+1, 2)) + b: SSMax by hand."""
    scale = factor * torch.log((positions.float() + 1).clamp(min=2)) + bias
    return [
        layer.self_attn.q_proj.register_forward_hook(lambda m, i, out: out * scale[..., None])
        for layer in model.model.layers
    ]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_ssmax_scales_each_querys_scores(attention, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from tunelab.model.ssmax import use_ssmax

    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attention)
    ssmax = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attention)
    name = use_ssmax(ssmax, 0.5, 0.2)
    assert name.startswith(f"ssmax_{attention}")
    ids = torch.randint(3, 300, (2, 7))
    packed = torch.tensor([[0, 1, 2, 0, 1, 2, 3]])  # two samples in one row: positions restart
    for positions, kwargs in ((torch.arange(7)[None], {}), (packed, {"position_ids": packed})):
        with torch.no_grad():
            got = ssmax(ids[:1], **kwargs).logits
            unscaled = plain(ids[:1], **kwargs).logits
            hooks = _scaled_queries(plain, 0.5, 0.2, positions)
            expected = plain(ids[:1], **kwargs).logits
        for hook in hooks:
            hook.remove()
        assert torch.allclose(got, expected, atol=1e-5)
        assert not torch.allclose(got, unscaled, atol=1e-3)


def test_training_with_ssmax_and_loading_it_again(tiny_model_dir, alpaca_file, tmp_path,
                                                  capsys):  # fmt: skip
    more = {"scaling_softmax": True, "scaling_softmax_factor": 0.6}
    result = run(tiny_model_dir, alpaca_file, tmp_path / "out", max_steps=3, **more)
    assert result.model.config._attn_implementation == "ssmax_sdpa_0.6_0.0"
    assert all(math.isfinite(r["loss"]) for r in metrics(result.run_dir) if "loss" in r)
    model, tokenizer = load_run(result.run_dir)
    assert model.config._attn_implementation == "ssmax_sdpa_0.6_0.0"
    ids = tokenizer("Name a colour.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, result.model.eval()(ids).logits, atol=1e-5)
    code, err = cli(["validate", "--data", str(alpaca_file), "--base-model", str(tiny_model_dir),
                     "--set", "scaling_softmax=true", "--set", "attn_implementation=flex_attention"],
                    capsys)  # fmt: skip
    assert code == 0, err  # SSMax wraps any attention


SEEN = []  # the attention each call of the test's attention function was told it is


def _recording_attention(module, query, key, value, attention_mask, **kwargs):
    """sdpa, noting the attention the module's config names (flash attention reads it)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    SEEN.append(module.config._attn_implementation)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def test_ssmax_wraps_whatever_attention_the_model_uses(tiny_model_dir):
    from transformers import AttentionInterface, AutoModelForCausalLM
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    from tunelab.model.ssmax import registered_name, use_ssmax, wrapped_attention

    AttentionInterface.register("tunelab_recording", _recording_attention)
    AttentionMaskInterface.register("tunelab_recording", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    ssmax = AutoModelForCausalLM.from_pretrained(tiny_model_dir,
                                                 attn_implementation="tunelab_recording")  # fmt: skip
    name = use_ssmax(ssmax, 0.5, 0.2)
    assert (
        name == "ssmax_tunelab_recording_0.5_0.2" and wrapped_attention(name) == "tunelab_recording"
    )
    ids = torch.randint(3, 300, (1, 7))
    SEEN.clear()
    with torch.no_grad():
        got = ssmax(ids).logits
        hooks = _scaled_queries(plain, 0.5, 0.2, torch.arange(7)[None])
        expected = plain(ids).logits
    for hook in hooks:
        hook.remove()
    assert torch.allclose(got, expected, atol=1e-5)
    assert SEEN == ["tunelab_recording"] * 2  # each layer's attention sees its own name
    # the names transformers would read as a flash attention or a Hub kernel to load
    for inner in ("flash_attention_2", "kernels-community/flash-attn2", "paged|sdpa"):
        registered = registered_name(inner, 0.43, 0.0)
        assert not any(mark in registered for mark in ("flash", "/", "|")), registered


@no_cuda
def test_ssmax_with_flash_attention_is_only_a_machine_problem(tiny_model_dir, alpaca_file,
                                                               tmp_path, capsys):  # fmt: skip
    common = ["--data", str(alpaca_file), "--base-model", str(tiny_model_dir), "--set",
              "scaling_softmax=true", "--set", "attn_implementation=flash_attention_2"]  # fmt: skip
    code, err = cli(["validate", *common], capsys)
    reason = "attn_implementation: flash_attention_2 needs a CUDA GPU"
    assert code == 0 and f"warning: valid, but this machine cannot run it: {reason}" in err
    assert "scaling_softmax:" not in err  # no problem with it (a plan note may name it)
    code, err = cli(["train", *common, "--output", str(tmp_path / "o"), "--max-steps", "1"],
                    capsys)  # fmt: skip
    assert code == 2 and reason in err and not (tmp_path / "o").exists()


# --- pretraining_dataset ----------------------------------------------------------------------


def test_streamed_pretraining_reads_for_the_planned_micro_batch(tiny_model_dir, tmp_path):
    path = tmp_path / "text.jsonl"
    path.write_text("".join(json.dumps({"text": f"the cat is on the mat {i}"}) + "\n"
                            for i in range(2000)), encoding="utf-8")  # fmt: skip
    notes = []
    overrides = {"base_model": str(tiny_model_dir), "pretraining_dataset": [{"path": str(path)}],
                 "max_steps": 3, "gradient_accumulation_steps": 2, "sequence_len": 16,
                 "val_set_size": 0}  # fmt: skip
    planned = plan_run(load_config(overrides=overrides), log=notes.append)
    batch = planned.plan.micro_batch_size
    unset = planned.config.model_copy(update={"micro_batch_size": None})
    assert batch == machine_plan(unset, planned.plan.hardware).micro_batch_size > 1
    assert planned.config.micro_batch_size == batch  # fixed before the data was read
    assert planned.data.stats["pretraining_chunks"] == len(planned.data.train) == 3 * batch * 2
    assert planned.origins["micro_batch_size"].startswith("chosen for this machine: default on")
    chosen = next(n for n in notes if n.startswith("chosen automatically:"))
    assert f"micro_batch_size {batch} (chosen for this machine" in chosen
    assert not any(n.startswith("chosen for this machine:") and "micro_batch_size" in n
                   for n in notes)  # fmt: skip


def test_a_new_pad_token_alone_trains_no_embeddings(tiny_model_dir, alpaca_file):
    """axolotl configs often set a pad token the model lacks: padding is masked, so LoRA stays
    LoRA (no embeddings or output head trained in full)."""
    plain = _plan(tiny_model_dir, alpaca_file)
    padded = _plan(tiny_model_dir, alpaca_file, special_tokens={"pad_token": "<|pad_new|>"})
    assert padded.config.lora_modules_to_save is None
    assert padded.tokenizer.pad_token == "<|pad_new|>"
    assert padded.trainable == plain.trainable
    eos = _plan(tiny_model_dir, alpaca_file, special_tokens={"eos_token": "<|eos_new|>"})
    assert eos.config.lora_modules_to_save  # a new EOS is trained: it must mean "stop"
