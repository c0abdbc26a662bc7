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


def test_a_worker_error_names_the_row(tiny_tokenizer, tmp_path, monkeypatch):
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
        prepare_data(config(data, dataset_processes=2, **settings), tiny_tokenizer)
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
