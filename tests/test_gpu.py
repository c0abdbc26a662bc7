"""On a CUDA GPU: QLoRA, 8-bit bases, bitsandbytes optimizers, bf16, and loading runs in
4 or 8 bits for generation and perplexity. Skipped on machines without one."""

import json

import pytest
import torch

from .conftest import MEMORISE, cli, run, write_json

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def qlora_run(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qlora")
    data = write_json(tmp / "data.json", MEMORISE * 3)
    return run(tiny_model_dir, data, tmp / "run", adapter="qlora", max_steps=30,
               learning_rate=3e-2)  # fmt: skip


def test_qlora_trains_in_4_bits_with_bf16(qlora_run):
    info = json.loads((qlora_run.run_dir / "adapter_info.json").read_text())
    assert info["adapter"] == "qlora" and info["effective"]["precision"] == "bf16"
    losses = [json.loads(x)["loss"] for x in (qlora_run.run_dir / "metrics.jsonl").open()
              if '"loss"' in x]  # fmt: skip
    assert len(losses) == 30 and sum(losses[-5:]) < 0.6 * sum(losses[:5])
    assert (qlora_run.run_dir / "adapter_model.safetensors").is_file()


def test_a_qlora_run_loads_in_4_bits_and_merges_in_full_precision(qlora_run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from tunelab.infer.load import load, load_run, resolve_target

    loaded = load([resolve_target(qlora_run.run_dir)], log=lambda _: None)
    base_layer = loaded.base.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert type(base_layer).__name__ == "Linear4bit"  # the base as it was trained
    code, err = cli(["generate", "--run", str(qlora_run.run_dir), "--json", "Say hello."], capsys)
    assert code == 0 and json.loads(cli.out)["completion"], err
    code, err = cli(["merge", str(qlora_run.run_dir), "--output", str(tmp_path / "m")], capsys)
    assert code == 0, err
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert merged.dtype == torch.float32  # merged into the full-precision base, on the CPU
    adapted, _ = load_run(qlora_run.run_dir, for_merge=True)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapted.eval()(ids).logits, atol=1e-4)


@pytest.mark.parametrize("flag", ["--load-in-4bit", "--load-in-8bit"])
def test_generate_and_perplexity_with_a_quantized_base(trained, tmp_path, capsys, flag):
    code, err = cli(["generate", "--run", str(trained.run_dir), flag, "--json", "Say hello."],
                    capsys)  # fmt: skip
    assert code == 0 and json.loads(cli.out)["completion"], err
    data = write_json(tmp_path / "qa.json", MEMORISE)
    table = str(tmp_path / "t.csv")
    scores = {}
    for extra in ([], [flag]):
        code, err = cli(["eval", "perplexity", str(trained.run_dir), "--data", str(data),
                         "--table", table, "--json", *extra], capsys)  # fmt: skip
        assert code == 0, err
        scores[bool(extra)] = float(json.loads(cli.out)[0]["perplexity"])
    assert scores[True] == pytest.approx(scores[False], rel=0.5)


@pytest.mark.parametrize(
    "settings",
    [{"load_in_8bit": True}, {"optimizer": "adamw_bnb_8bit"}, {"optimizer": "paged_adamw_8bit"}],
)
def test_bitsandbytes_options_train(tiny_model_dir, alpaca_file, tmp_path, settings):
    result = run(tiny_model_dir, alpaca_file, tmp_path / "r", max_steps=4, **settings)
    assert result.steps == 4 and result.losses["final_loss"] == result.losses["final_loss"]
