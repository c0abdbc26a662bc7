"""After training, on the tiny model: load runs and checkpoints, generate, chat, compare,
measure perplexity, merge, export to GGUF and push, with the errors users meet."""

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .conftest import MEMORISE, cli, run, write_json


@pytest.mark.cpu_only(reason="loaded and trained logits agree to 1e-5 in float32")
def test_load_run_reproduces_the_trained_model(trained):
    from tunelab.infer.load import load_run

    model, tokenizer = load_run(trained.run_dir)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, trained.model.eval()(ids).logits, atol=1e-5)
    assert tokenizer.chat_template == trained.tokenizer.chat_template


@pytest.mark.cpu_only(reason="a float32 merged model against base + adapter, to 1e-5")
def test_merge_matches_base_plus_adapter(trained, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from tunelab.infer.load import load_run

    out = tmp_path / "merged"
    code, err = cli(["merge", str(trained.run_dir), "--output", str(out)], capsys)
    assert code == 0, err
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    adapted, tokenizer = load_run(trained.run_dir)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        got, want = merged(ids).logits, adapted.eval()(ids).logits
        # merged weights (W + s*B@A) round differently from W and B@A apart: float32 noise
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)
        with adapted.disable_adapter():  # and the adapter moves the logits far more than that
            assert (want - adapted(ids).logits).abs().max() > 1e-2
        greedy = dict(max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert torch.equal(
            merged.generate(ids, **greedy), adapted.generate(input_ids=ids, **greedy)
        )
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    code, err = cli(["merge", str(trained.run_dir), "--output", str(out)], capsys)
    assert code == 2 and "already exists" in err
    code, err = cli(["merge", str(tmp_path), "--output", str(tmp_path / "x")], capsys)
    assert code == 1 and "no adapter here" in err and not (tmp_path / "x").exists()


def test_merge_into_a_quantized_base_is_refused(trained, tiny_model_dir, tmp_path, capsys):
    import shutil

    base = tmp_path / "quantized-base"
    shutil.copytree(tiny_model_dir, base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(
        json.dumps({**config, "quantization_config": {"load_in_4bit": True}})
    )
    run = tmp_path / "run"
    shutil.copytree(trained.run_dir, run)
    adapter = json.loads((run / "adapter_config.json").read_text())
    (run / "adapter_config.json").write_text(
        json.dumps({**adapter, "base_model_name_or_path": str(base)})
    )
    code, err = cli(["merge", str(run), "--output", str(tmp_path / "m")], capsys)
    assert code == 1 and "is quantized" in err and "full-precision" in err
    assert not (tmp_path / "m").exists()


def test_generate_command(trained, tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is the capital of France?\n\nSay hello.\n")
    base = [
        "generate",
        "--run",
        str(trained.run_dir),
        "--file",
        str(prompts),
        "--json",
        "--max-new-tokens",
        "6",
    ]
    code, _ = cli(base, capsys)
    first = [json.loads(line) for line in cli.out.splitlines()]
    assert code == 0 and [r["prompt"] for r in first] == [
        "What is the capital of France?",
        "Say hello.",
    ]
    cli(base, capsys)
    assert [json.loads(line) for line in cli.out.splitlines()] == first  # greedy is deterministic
    sampled = base + ["--temperature", "1.5", "--seed", "3"]
    cli(sampled, capsys)
    again = cli.out
    cli(sampled, capsys)
    assert cli.out == again  # a seed makes sampling repeatable
    code, _ = cli(
        [
            "generate",
            "--model",
            str(tiny_model_dir),
            "--adapter",
            str(trained.run_dir),
            "Say hello.",
            "--json",
            "--max-new-tokens",
            "6",
        ],
        capsys,
    )
    assert code == 0 and json.loads(cli.out)["completion"] == first[1]["completion"]
    code, err = cli(["generate", "--model", str(tmp_path / "nope"), "hi"], capsys)
    assert code == 2 and "no such file or directory" in err


def test_runs_lists_runs_and_resumability(trained, tmp_path, capsys):
    import shutil

    folder = tmp_path / "runs"
    shutil.copytree(trained.run_dir, folder / "done")
    shutil.copytree(trained.run_dir, folder / "crashed")
    status = json.loads((folder / "crashed" / "status.json").read_text())
    (folder / "crashed" / "status.json").write_text(json.dumps({**status, "state": "failed"}))
    shutil.rmtree(folder / "done" / "checkpoints")
    code, _ = cli(["runs", str(folder), "--json"], capsys)
    runs = {Path(r["run"]).name: r for r in json.loads(cli.out)}
    assert code == 0 and set(runs) == {"done", "crashed"}
    assert runs["crashed"]["resumable"] == "yes" and runs["done"]["resumable"].startswith(
        "no: finished"
    )
    assert runs["done"]["steps"] == 40 and runs["done"]["data"] == "data.json"
    assert runs["done"]["best_eval_loss"] == trained.losses["best_eval_loss"]


# --- checkpoints ---------------------------------------------------------------------


def _logits(model, ids=((5, 6, 7, 8, 9),)):
    with torch.no_grad():
        return model.eval()(torch.tensor(ids)).logits


@pytest.mark.cpu_only(
    reason="checkpoints loaded by tunelab against peft's float32 loading, to 1e-6"
)
def test_checkpoints_load_by_name(trained, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunelab.infer.load import load_run, resolve_target

    run_dir = trained.run_dir
    at_20, _ = load_run(run_dir, "20")
    base = AutoModelForCausalLM.from_pretrained(resolve_target(run_dir).base_location)
    direct = PeftModel.from_pretrained(base, run_dir / "checkpoints" / "checkpoint-20")
    assert torch.allclose(_logits(at_20), _logits(direct), atol=1e-6)
    assert not torch.allclose(_logits(at_20), _logits(trained.model), atol=1e-3)
    assert torch.allclose(_logits(load_run(run_dir, "checkpoint-40")[0]), _logits(trained.model))
    for same in ("best", "last"):
        by_flag, by_suffix = load_run(run_dir, same)[0], load_run(f"{run_dir}@{same}")[0]
        assert torch.allclose(_logits(by_flag), _logits(by_suffix))
    code, err = cli(["generate", "--run", str(run_dir), "--checkpoint", "99", "hi"], capsys)
    assert code == 1 and "no checkpoint 'checkpoint-99'" in err
    assert "best, last, checkpoint-20, checkpoint-40" in err


# --- generate and compare ------------------------------------------------------------


def test_compare_shows_base_and_tuned_answers(trained, tiny_model_dir, capsys):
    args = ["--max-new-tokens", "6", "--json", "Say hello.", "Name a colour."]
    cli(["generate", "--run", str(trained.run_dir), *args], capsys)
    tuned = [json.loads(line)["completion"] for line in cli.out.splitlines()]
    cli(["generate", "--model", str(tiny_model_dir), *args], capsys)
    base = [json.loads(line)["completion"] for line in cli.out.splitlines()]
    code, _ = cli(["generate", "--run", str(trained.run_dir), "--compare", *args], capsys)
    both = [json.loads(line) for line in cli.out.splitlines()]
    assert code == 0 and [r["completion"] for r in both] == tuned
    assert [r["base"] for r in both] == base and base != tuned
    code, _ = cli(["generate", "--run", str(trained.run_dir), "--compare", *args[:2],
                   "Say hello."], capsys)  # fmt: skip
    assert code == 0 and "base" in cli.out and str(trained.run_dir.name) in cli.out
    assert tuned[0][:5] in cli.out and base[0][:5] in cli.out  # the table shows both answers
    code, err = cli(["generate", "--model", str(tiny_model_dir), "--compare", "hi"], capsys)
    assert code == 1 and "--compare needs a trained run" in err


def test_latest_run_is_used_when_none_is_named(trained, tmp_path, monkeypatch, capsys):
    shutil.copytree(trained.run_dir, tmp_path / "outputs" / "mine")
    monkeypatch.chdir(tmp_path)
    code, err = cli(["generate", "--json", "--max-new-tokens", "4", "Say hello."], capsys)
    assert code == 0 and "using the latest finished run, outputs/mine" in err


def test_adapter_on_another_base_is_refused(trained, tiny_model_dir, tmp_path, capsys):
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model_dir, other)
    code, err = cli(["generate", "--model", str(other), "--adapter", str(trained.run_dir),
                     "hi"], capsys)  # fmt: skip
    assert code == 2 and "this adapter was trained on" in err and "not on" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU machine")
def test_quantized_loading_needs_a_gpu(trained, capsys):
    for flag in ("--load-in-4bit", "--load-in-8bit"):
        code, err = cli(["generate", "--run", str(trained.run_dir), flag, "hi"], capsys)
        assert code == 2 and f"{flag} needs a CUDA GPU" in err


def test_a_directory_without_an_adapter_is_refused(trained, tmp_path, capsys):
    empty = tmp_path / "crashed"
    empty.mkdir()
    (empty / "status.json").write_text(json.dumps({"state": "failed"}))
    for command in (
        ["chat", str(empty)],
        ["generate", "--run", str(empty), "hi"],
        ["merge", str(empty), "--output", str(tmp_path / "m")],
        ["export", str(empty), "--output", str(tmp_path / "e")],
        ["eval", "perplexity", str(empty), "--data", str(trained.run_dir / "config.yaml")],
    ):
        code, err = cli(command, capsys)
        assert code == 1 and "no adapter here (adapter_config.json is missing)" in err, command
    assert not (tmp_path / "m").exists() and not (tmp_path / "e").exists()


# --- chat ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def session(trained):
    from tunelab.infer.load import load, resolve_target

    return load([resolve_target(trained.run_dir)], log=lambda _: None)


def test_chat_streams_answers_and_obeys_commands(session):
    from tunelab.infer.chat import Chat, run_chat
    from tunelab.model.generate import Sampling, generate

    out = io.StringIO()
    chat = Chat(session, session.labels, Sampling(max_new_tokens=8), out=out)
    expected = generate(session.model, session.tokenizer, "Say hello.", max_new_tokens=8)
    run_chat(chat, ["Say hello."])
    assert expected and expected in out.getvalue()  # streamed as it was generated
    assert [m["role"] for m in chat.history[session.labels[0]]] == ["user", "assistant"]
    lines = ["/reset", "/system Be brief.", "What is the capital of France?", "/nope", "/quit",
             "never asked"]  # fmt: skip
    run_chat(chat, lines)
    history = chat.history[session.labels[0]]
    assert [m["content"] for m in history][0] == "What is the capital of France?"
    assert len(history) == 2 and chat.messages(session.labels[0])[0]["content"] == "Be brief."
    assert "conversation cleared" in out.getvalue() and "unknown command /nope" in out.getvalue()


def test_chat_drops_old_exchanges_beyond_the_context(session):
    from tunelab.infer.chat import Chat
    from tunelab.model.generate import Sampling

    out = io.StringIO()
    chat = Chat(session, session.labels, Sampling(max_new_tokens=180), out=out)
    long = "Repeat the word. " * 12
    for _ in range(3):
        chat.ask(long)
    assert "dropped the oldest exchange" in out.getvalue()
    assert len(chat.history[session.labels[0]]) == 2


def test_chat_command_reads_stdin(trained, monkeypatch, capsys):
    args = ["--run", str(trained.run_dir), "--json", "--max-new-tokens", "6", "Say hello."]
    cli(["generate", *args], capsys)
    answer = json.loads(cli.out)["completion"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("Say hello.\n/quit\n"))
    code, err = cli(["chat", str(trained.run_dir), "--max-new-tokens", "6"], capsys)
    assert code == 0 and answer and answer in cli.out, err


# --- perplexity ----------------------------------------------------------------------


def _sentences(seed: int, n: int) -> str:
    import random

    rng = random.Random(seed)
    things = ["tree", "colour", "word", "capital", "hello"]
    return "\n".join(
        f"Say the {rng.choice(things)} and repeat the {rng.choice(things)}." for _ in range(n)
    )


@pytest.fixture(scope="module")
def text_run(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("text")
    train_file = tmp / "train.txt"
    train_file.write_text(_sentences(0, 60))
    held_out = tmp / "held_out.txt"
    held_out.write_text(_sentences(1, 20))
    result = run(tiny_model_dir, train_file, tmp / "run", max_steps=30, learning_rate=2e-2)
    return result, held_out


def test_perplexity_falls_after_training_on_the_same_kind_of_text(text_run, capsys):
    result, held_out = text_run
    command = ["eval", "perplexity", str(result.run_dir), "--base", "--data", str(held_out),
               "--json", "--comment", "first look"]  # fmt: skip
    code, err = cli(command, capsys)
    rows = {r["adapter"]: r for r in json.loads(cli.out)}
    assert code == 0, err
    base, tuned = float(rows["-"]["perplexity"]), float(rows[str(result.run_dir)]["perplexity"])
    assert tuned < 0.5 * base
    table = result.run_dir / "evaluations.csv"
    assert table.read_text().count("first look") == 2
    code, _ = cli(command[:-3], capsys)  # again, printed as a table
    assert code == 0 and table.read_text().count("\n") == 5  # header + 4 rows
    printed = cli.out
    assert printed.index(f"{float(rows[str(result.run_dir)]['perplexity']):.4f}") < printed.index(
        f"{base:.4f}"
    )  # sorted, lowest first


@pytest.mark.cpu_only(reason="sliding-window perplexity against one float32 forward pass, to 1e-4")
def test_perplexity_is_the_exponent_of_the_mean_loss(text_run, session):
    from tunelab.infer.perplexity import perplexity, token_stream

    result, held_out = text_run
    model, tokenizer = session.model, session.tokenizer
    stream = token_stream(str(held_out), tokenizer)
    assert len(stream.ids) < 256
    ppl, tokens = perplexity(model, stream, max_length=256, stride=128)
    with torch.no_grad():
        loss = model(
            input_ids=torch.tensor([stream.ids]), labels=torch.tensor([stream.labels])
        ).loss
    assert tokens == stream.scored and ppl == pytest.approx(float(torch.exp(loss)), rel=1e-4)
    for max_length, stride in ((64, 16), (32, 31), (50, 7), (2, 1)):
        assert perplexity(model, stream, max_length, stride)[1] == stream.scored  # each once
    for stride in (0, 32, 40):
        with pytest.raises(Exception, match="smaller than max_length"):
            perplexity(model, stream, 32, stride)


def test_perplexity_on_instruction_data_scores_the_answers(trained, session, tmp_path):
    from tunelab.infer.perplexity import token_stream

    data = write_json(tmp_path / "qa.json", MEMORISE)
    stream = token_stream(str(data), session.tokenizer)
    answers = "".join(session.tokenizer.decode([t]) for t in stream.labels if t != -100)
    assert "Paris." in answers and "capital" not in answers


# --- GGUF export ---------------------------------------------------------------------


PROMPTS = ["What is the capital of France?", "Say hello.", "Name a colour."]


def _greedy(model, tokenizer, prompt):
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt",
        return_dict=True,
    )["input_ids"]  # fmt: skip
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
        out = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    return logits, out[0, ids.shape[1] :].tolist()


def _stored_as(weight: torch.Tensor, quant: str) -> torch.Tensor:
    """What a GGUF file of type ``quant`` holds for a float32 matrix, read back as float32:
    rounded to float16, or 8-bit blocks of 32 with a float16 scale (gguf's own quantizer)."""
    from gguf import GGMLQuantizationType, quants

    if quant == "f16":
        return weight.half().float()
    kind = GGMLQuantizationType.Q8_0
    return torch.from_numpy(quants.dequantize(quants.quantize(weight.numpy(), kind), kind))


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_gguf_export_holds_the_merged_weights(smol_tiny_run, tmp_path, capsys, quant):
    """The file holds base + adapter merged, each matrix as the quant type stores it and every
    vector in full precision: compared tensor by tensor, then by greedy answers."""
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, merged_dir = tmp_path / "gguf", tmp_path / "merged"
    code, err = cli(["export", str(smol_tiny_run.run_dir), "--quant", quant, "--output",
                     str(out)], capsys)  # fmt: skip
    assert code == 0, err
    name = f"run-{quant}.gguf"
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", name]
    reader = GGUFReader(out / name)
    stored = {t.tensor_type.name for t in reader.tensors if len(t.shape) == 2}
    assert stored == {quant.upper()}  # every matrix, in the type asked for
    assert cli(["merge", str(smol_tiny_run.run_dir), "--output", str(merged_dir)], capsys)[0] == 0
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    exported = AutoModelForCausalLM.from_pretrained(out, gguf_file=name).eval()
    got = exported.state_dict()
    with torch.no_grad():
        for key, weight in merged.state_dict().items():
            want = _stored_as(weight, quant) if weight.ndim == 2 else weight
            assert torch.equal(got[key], want), key
            weight.copy_(want)  # merged now holds what the file should hold
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    template = bytes(reader.fields["tokenizer.chat_template"].parts[-1]).decode()
    assert template == tokenizer.chat_template
    if quant == "f16":  # the tokenizer inside the file tokenizes as the original does
        exported_tokenizer = AutoTokenizer.from_pretrained(out, gguf_file=name)
        text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[0]}],
                                             tokenize=False)  # fmt: skip
        assert exported_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    for prompt in PROMPTS:
        assert _greedy(exported, tokenizer, prompt)[1] == _greedy(merged, tokenizer, prompt)[1]
    modelfile = (out / "Modelfile").read_text()
    assert f"FROM ./{name}" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert "<|im_start|>{{ .Role }}" in modelfile
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM' in modelfile


def test_export_refuses_what_it_cannot_do(smol_tiny_run, trained, tmp_path, capsys):
    run_dir = str(smol_tiny_run.run_dir)
    code, err = cli(["export", run_dir, "--quant", "q4_k_m", "--output", str(tmp_path / "a")],
                    capsys)  # fmt: skip
    assert code == 1 and "--quant q4_k_m: not supported" in err and "llama-quantize" in err
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "keep.txt").write_text("mine")
    code, err = cli(["export", run_dir, "--output", str(tmp_path / "b")], capsys)
    assert code == 2 and "already exists" in err
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["keep.txt"]
    # the tiny test tokenizer is not one llama.cpp knows: refused, nothing written
    code, err = cli(["export", str(trained.run_dir), "--output", str(tmp_path / "c")], capsys)
    assert code == 1 and "llama.cpp does not know this model's tokenizer" in err
    assert not (tmp_path / "c").exists() and not list(tmp_path.glob(".c*"))


# --- Hugging Face Hub ----------------------------------------------------------------


def _tunelab(args, tmp_path, **env):
    """The real command in a fresh process, with a Hub configuration of its own."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    clean.update(HF_HOME=str(tmp_path / "hf-home"), **env)
    return subprocess.run([sys.executable, "-m", "tunelab.cli", *args], env=clean,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_push_without_a_token_or_network_is_a_clear_error(trained, tmp_path):
    import time

    done = _tunelab(["push", str(trained.run_dir), "--repo", "me/adapter"], tmp_path)
    assert done.returncode == 1 and "needs a token, and none is set" in done.stderr
    assert "HF_TOKEN" in done.stderr and "Traceback" not in done.stderr
    start = time.monotonic()
    done = _tunelab(["push", str(trained.run_dir), "--repo", "me/adapter"], tmp_path,
                    HF_TOKEN="hf_test", HF_ENDPOINT="http://127.0.0.1:9")  # fmt: skip
    assert (
        done.returncode == 1
        and "Hugging Face Hub at http://127.0.0.1:9 is unreachable" in done.stderr
    )
    assert "tunelab push" in done.stderr and time.monotonic() - start < 60
    done = _tunelab(["push", str(trained.run_dir), "--repo", "me/adapter"], tmp_path,
                    HF_TOKEN="hf_test", HF_HUB_OFFLINE="1")  # fmt: skip
    assert done.returncode == 1 and "HF_HUB_OFFLINE is set" in done.stderr


def test_training_with_hub_model_id_needs_a_token_first(tiny_model_dir, alpaca_file, tmp_path):
    out = tmp_path / "run"
    done = _tunelab(["train", "--model", str(tiny_model_dir), "--data", str(alpaca_file),
                     "--output", str(out), "--push-to-hub", "me/adapter", "--max-steps", "1"],
                    tmp_path)  # fmt: skip
    assert done.returncode == 2 and "hub_model_id: pushing to me/adapter needs" in done.stderr
    assert not out.exists()


def test_a_failed_push_after_training_leaves_the_run_saved(tiny_model_dir, alpaca_file, tmp_path):
    # pushing is the CLI's step after train() returns: the run is complete whatever happens
    out = tmp_path / "run"
    done = _tunelab(["train", "--model", str(tiny_model_dir), "--data", str(alpaca_file),
                     "--output", str(out), "--push-to-hub", "me/adapter", "--max-steps", "1"],
                    tmp_path, HF_TOKEN="hf_test", HF_ENDPOINT="http://127.0.0.1:9")  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert f"the run is saved in {out}, but pushing it to the Hub failed" in done.stderr
    assert f"tunelab push {out} --repo me/adapter" in done.stderr
    assert json.loads((out / "status.json").read_text())["state"] == "completed"
    assert (out / "adapter_model.safetensors").is_file()


def test_what_a_push_uploads(trained):
    from tunelab.infer.hub import model_card
    from tunelab.rundir import files_to_push

    names = {str(p.relative_to(trained.run_dir)) for p in files_to_push(trained.run_dir)}
    assert {"adapter_config.json", "adapter_model.safetensors", "adapter_info.json"} <= names
    assert not any(n.startswith(("checkpoints", "logs")) or n == "train.log" for n in names)
    card = model_card(trained.run_dir, "me/adapter")
    assert card.startswith("---\nlibrary_name: peft") and "# adapter" in card
    assert "data.json" in card and "best_eval_loss" in card


# --- what the review of these commands turned up -------------------------------------


def test_model_text_is_never_read_as_markup(trained, capsys):
    prompt = "Say [bold]hello[/bold] [/INST]"
    code, err = cli(["generate", "--run", str(trained.run_dir), "--compare", "--max-new-tokens",
                     "4", prompt], capsys)  # fmt: skip
    assert code == 0, err
    assert "[bold]hello[/bold]" in cli.out and "[/INST]" in cli.out  # shown, not styled


def test_a_foreign_results_table_is_left_alone(text_run, tmp_path, capsys):
    result, held_out = text_run
    table = tmp_path / "theirs.csv"
    table.write_text("Model,LoRAs,Dataset,Perplexity\nx,y,z,3.2\n")
    code, err = cli(["eval", "perplexity", str(result.run_dir), "--data", str(held_out),
                     "--table", str(table)], capsys)  # fmt: skip
    assert code == 1 and "not a tunelab results table" in err
    assert table.read_text() == "Model,LoRAs,Dataset,Perplexity\nx,y,z,3.2\n"
    code, err = cli(["eval", "perplexity", str(result.run_dir), "--data", str(held_out),
                     "--max-length", "100000"], capsys)  # fmt: skip
    assert code == 1 and "the model reads at most 256 tokens" in err


def test_ctrl_c_in_chat_forgets_the_turn_for_every_model(trained, monkeypatch):
    from tunelab.infer import chat as chat_module
    from tunelab.infer.load import load, resolve_target

    loaded = load([resolve_target(trained.run_dir)], with_base=True, log=lambda _: None)
    chat = chat_module.Chat(loaded, loaded.labels, chat_module.Sampling(max_new_tokens=4),
                            out=io.StringIO())  # fmt: skip
    chat.ask("Say hello.")
    real, calls = chat_module.reply, []

    def interrupted_on_the_second_model(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(chat_module, "reply", interrupted_on_the_second_model)
    chat_module.run_chat(chat, ["Name a colour.", "/quit"])
    assert "(stopped; that turn is forgotten" in chat.out.getvalue()
    assert all(len(turns) == 2 for turns in chat.history.values())  # only the first exchange


def test_a_checkpoint_cut_short_is_refused(trained, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(trained.run_dir, run_dir)
    (run_dir / "checkpoints" / "checkpoint-20" / "tunelab-complete.json").unlink()
    code, err = cli(["generate", "--run", str(run_dir), "--checkpoint", "20", "hi"], capsys)
    assert code == 1 and "cut short" in err and "checkpoint-40" in err


def test_a_model_without_a_chat_template_continues_the_text(tiny_model_dir, tmp_path, capsys):
    plain = tmp_path / "plain"
    shutil.copytree(tiny_model_dir, plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    code, err = cli(["generate", "--model", str(plain), "--json", "--max-new-tokens", "5",
                     "Paris is the capital of"], capsys)  # fmt: skip
    assert code == 0 and isinstance(json.loads(cli.out)["completion"], str), err


def test_a_base_model_alone_is_scored_into_outputs(text_run, tiny_model_dir, tmp_path,
                                                   monkeypatch, capsys):  # fmt: skip
    _, held_out = text_run
    monkeypatch.chdir(tmp_path)
    code, err = cli(["eval", "perplexity", "--model", str(tiny_model_dir), "--data",
                     str(held_out), "--json"], capsys)  # fmt: skip
    rows = json.loads(cli.out)
    assert code == 0 and [r["adapter"] for r in rows] == ["-"], err
    assert (tmp_path / "outputs" / "evaluations.csv").read_text().count("\n") == 2


def test_missing_or_damaged_weights_are_named(trained, tmp_path, capsys):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(trained.run_dir, run_dir)
    weights = run_dir / "adapter_model.safetensors"
    whole = weights.read_bytes()
    weights.unlink()
    code, err = cli(["merge", str(run_dir), "--output", str(tmp_path / "m")], capsys)
    assert code == 2 and f"{weights}: the adapter's weights are missing" in err
    assert "does not fit" not in err and not (tmp_path / "m").exists()
    weights.write_bytes(whole[: len(whole) // 2])
    for command in (["merge", str(run_dir), "--output", str(tmp_path / "m")],
                    ["generate", "--run", str(run_dir), "hi"]):  # fmt: skip
        code, err = cli(command, capsys)
        assert code == 2 and f"{weights}: the adapter's weights cannot be read" in err
        assert "truncated or damaged" in err and "does not fit" not in err
    assert not (tmp_path / "m").exists()
