"""Preparing data at scale: chunks over several processes, Arrow rows, instant reuse."""

import random

import pytest

from tunelab.config import load_config
from tunelab.data import encode as encode_module
from tunelab.data.prepare import prepare_data
from tunelab.data.rows import Rows
from tunelab.errors import DataError

from .conftest import write_json

WORDS = "alpha beta gamma delta river stone cloud apple seven orange green quiet".split()


def alpaca_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Rows of very different lengths, some far past a short sequence_len."""
    rng = random.Random(seed)

    def text(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    return [
        {"instruction": f"{i} " + text(rng.randint(1, 12)), "input": text(rng.choice([0, 5])),
         "output": text(rng.randint(1, 60))}
        for i in range(n)
    ]  # fmt: skip


def config(path, **settings):
    base = {"datasets": [{"path": str(path), "type": "alpaca"}], "sequence_len": 48,
            "val_set_size": 0.1}  # fmt: skip
    return load_config(overrides={**base, **settings}).config


def test_several_processes_prepare_exactly_what_one_does(tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(encode_module, "CHUNK", 7)  # many chunks, unevenly shared out
    data = write_json(tmp_path / "rows.json", alpaca_rows(150))
    one = prepare_data(config(data, dataset_processes=1), tiny_tokenizer)
    three = prepare_data(config(data, dataset_processes=3), tiny_tokenizer)
    assert isinstance(three.train, Rows)
    assert one.stats == three.stats
    assert one.stats["truncated"] > 0  # the length rules ran in the workers too
    assert list(one.train) == list(three.train) and list(one.eval) == list(three.eval)
    first = three.train[0]
    assert set(first) == {"input_ids", "attention_mask", "labels"}
    assert len(first["input_ids"]) == len(first["labels"]) <= 48


def test_a_worker_error_names_the_row(tiny_model_dir, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)  # its chat template is replaced
    monkeypatch.setattr(encode_module, "CHUNK", 5)
    rows = alpaca_rows(40)
    rows[33]["output"] = "FORBIDDEN"
    data = write_json(tmp_path / "rows.json", rows)
    template = (
        "{% for m in messages %}{% if 'FORBIDDEN' in m['content'] %}"
        "{{ raise_exception('this word is not allowed') }}{% endif %}"
        "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    )
    settings = {"chat_template": "jinja", "chat_template_jinja": template, "val_set_size": 0}
    with pytest.raises(DataError) as err:
        prepare_data(config(data, dataset_processes=2, **settings), tokenizer)
    assert f"{data}" in err.value.message and "row 34" in err.value.message
    assert "this word is not allowed" in err.value.message


def test_prepared_data_is_reused_memory_mapped_without_tokenizing(
    tiny_tokenizer, tmp_path, monkeypatch
):
    data = write_json(tmp_path / "rows.json", alpaca_rows(60))
    cfg = config(data, dataset_prepared_path=str(tmp_path / "prepared"))
    first = prepare_data(cfg, tiny_tokenizer)
    assert any("saved the prepared dataset" in n for n in first.notes)
    (entry,) = (tmp_path / "prepared").iterdir()
    assert sorted(p.name for p in entry.iterdir()) == ["eval.arrow", "meta.json", "train.arrow"]

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(encode_module.Encoder, "chunk", no_tokenizing)
    again = prepare_data(cfg, tiny_tokenizer)
    assert any("reused the prepared dataset" in n for n in again.notes)
    assert again.train == first.train and again.stats == first.stats
    assert [f["filename"] for f in again.train.dataset.cache_files] == [
        str(entry / "train.arrow")
    ]  # read from the file, not loaded into memory


PEAK_SCRIPT = """
import resource, sys
from transformers import AutoTokenizer
from tunelab.config import load_config
from tunelab.data.prepare import prepare_data

data, model, prepared = sys.argv[1:4]
tokenizer = AutoTokenizer.from_pretrained(model)
config = load_config(overrides={
    "datasets": [{"path": data, "type": "alpaca"}], "sequence_len": 512,
    "dataset_prepared_path": prepared, "dataset_processes": 1,
}).config
result = prepare_data(config, tokenizer)
print(len(result.train) + len(result.eval), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _peak_kib(data, tiny_model_dir, prepared) -> tuple[int, int]:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(data), str(tiny_model_dir), str(prepared)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    samples, peak = done.stdout.split()[-2:]
    return int(samples), int(peak)


def test_memory_does_not_grow_with_the_rows_of_a_jsonl_file(tiny_model_dir, tmp_path):
    """Each row carries 8 KB that is read but never tokenized, so rows held in memory would
    show at once: four times the rows (75 MB more data) must not cost a quarter of that."""
    import json

    filler = "x" * 8192
    sizes = {}
    for n in (3000, 12000):
        path = tmp_path / f"rows{n}.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for i, row in enumerate(alpaca_rows(n, seed=n)):
                f.write(json.dumps({**row, "instruction": f"{i} {row['instruction']}",
                                    "notes": filler}) + "\n")  # fmt: skip
        samples, peak = _peak_kib(path, tiny_model_dir, tmp_path / "prepared")
        assert samples == n
        sizes[n] = (path.stat().st_size, peak)
    added_data = sizes[12000][0] - sizes[3000][0]
    added_peak = (sizes[12000][1] - sizes[3000][1]) * 1024
    assert added_data > 70e6
    assert added_peak < added_data / 4, (added_peak / 1e6, added_data / 1e6)
