"""`tunelab data inspect` and `tunelab preprocess` through the command line."""

import json

from tunelab.cli import main

from .conftest import MEMORISE


def run_cli(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def test_inspect_json_contract(tiny_model_dir, tiny_tokenizer, tmp_path, capsys):
    data = tmp_path / "d.json"
    data.write_text(json.dumps(MEMORISE + MEMORISE[:1]))
    args = ["data", "inspect", "--data", str(data), "--model", str(tiny_model_dir)]
    code, out, _ = run_cli([*args, "-n", "2", "--json", "--validation-split", "0"], capsys)
    assert code == 0
    rep = json.loads(out)
    assert rep["files"] == [{"path": str(data), "format": "alpaca", "rows": 5}]
    assert rep["stats"]["duplicates"] == 1 and rep["stats"]["train_samples"] == 4
    assert len(rep["examples"]) == 2
    for example in rep["examples"]:
        text = "".join(s["text"] for s in example["segments"])
        trained = "".join(s["text"] for s in example["segments"] if s["trained"])
        assert text.startswith("<|im_start|>user\n") and trained.endswith("<|im_end|>\n")
        assert trained in {r["output"] + "<|im_end|>\n" for r in MEMORISE}
        # joined segments are exactly the decoded training text
        ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tiny_tokenizer.decode(ids) == text


def test_inspect_readable_marks_trained_text(tiny_model_dir, alpaca_file, capsys):
    code, out, _ = run_cli(
        ["data", "inspect", "--data", str(alpaca_file), "--model", str(tiny_model_dir), "-n", "1"],
        capsys,
    )
    assert code == 0
    assert "format: alpaca  rows: 4" in out and "[[" in out and "<|im_end|>\n]]" in out


def test_inspect_bad_template_column(tiny_model_dir, alpaca_file, capsys):
    args = ["data", "inspect", "--data", str(alpaca_file), "--model", str(tiny_model_dir)]
    code, _, err = run_cli([*args, "--data-template", "Q: {{question}}\nA: {{output}}"], capsys)
    assert code == 2 and "names column(s) ['question'] that the data does not have" in err


def test_preprocess_then_train_reuses(tiny_model_dir, alpaca_file, tmp_path, capsys):
    cache = tmp_path / "prepared"
    common = [
        "--data",
        str(alpaca_file),
        "--model",
        str(tiny_model_dir),
        "--set",
        f"dataset_prepared_path={cache}",
    ]
    code, out, err = run_cli(["preprocess", *common], capsys)
    assert code == 0 and "prepared 4 training" in out and "saved the prepared dataset" in err
    (entry,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    code, out, _ = run_cli(
        ["train", *common, "--max-steps", "1", "--output", str(tmp_path / "run")], capsys
    )
    assert code == 0 and f"reused the prepared dataset in {entry}" in out
    # a changed setting makes a new entry instead of reusing a stale one
    code, out, _ = run_cli(["preprocess", *common, "--sequence-len", "64"], capsys)
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 2
    stats = json.loads((tmp_path / "run" / "adapter_info.json").read_text())["data"]
    assert stats["train_samples"] == 4
