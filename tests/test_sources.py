"""Sources (files, globs, directories, saved datasets, registries), templates, chunking."""

import json

import pytest

from tunelab.config import load_config
from tunelab.data.chunking import chunk_text, favor_newline, windows
from tunelab.data.formats import TextSample
from tunelab.data.prepare import load_examples, prepare_data
from tunelab.data.templates import DataTemplate, FormatFile
from tunelab.errors import DataError

ALPACA = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(3)]


def load(path, **settings):
    source = {"path": str(path), **settings.pop("source", {})}
    return load_examples(load_config(overrides={"datasets": [source], **settings}).config)


def test_glob_directory_and_comma_list(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.json").write_text(json.dumps(ALPACA))
    (tmp_path / "a" / "deep").mkdir()
    (tmp_path / "a" / "deep" / "y.jsonl").write_text(
        "\n".join(json.dumps({"question": f"Q{i}", "answer": f"A{i}"}) for i in range(2))
    )
    (tmp_path / "b.txt").write_text("line one\n\nline two\n")
    by_dir = load(tmp_path / "a")
    assert [(s.format, s.rows) for s in by_dir.sources] == [("qa", 2), ("alpaca", 3)]
    by_glob = load(f"{tmp_path}/a/*.json")
    assert [s.rows for s in by_glob.sources] == [3]
    mixed = load(f"{tmp_path / 'a'},{tmp_path / 'b.txt'}")
    assert [s.format for s in mixed.sources] == ["qa", "alpaca", "text"]
    assert len(mixed.examples) == 7


def test_glob_matching_nothing_is_an_error(tmp_path):
    with pytest.raises(Exception, match="no files match this pattern"):
        load(f"{tmp_path}/*.json")


def test_csv_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "d.csv").write_text("question,answer\nWhy?,Because.\nHow?,Like this.\n")
    pq.write_table(pa.Table.from_pylist(ALPACA), tmp_path / "d.parquet")
    assert [(s.format, s.rows) for s in load(tmp_path / "d.csv").sources] == [("qa", 2)]
    assert [(s.format, s.rows) for s in load(tmp_path / "d.parquet").sources] == [("alpaca", 3)]


def test_csv_with_wrong_columns(tmp_path):
    (tmp_path / "d.csv").write_text("name,age\nann,3\n")
    with pytest.raises(
        DataError, match=r"cannot tell the format from its columns \['age', 'name'\]"
    ):
        load(tmp_path / "d.csv")


def test_saved_dataset(tmp_path):
    from datasets import Dataset

    Dataset.from_list(ALPACA).save_to_disk(tmp_path / "saved")
    data = load(tmp_path / "saved")
    assert data.sources[0].format == "alpaca" and len(data.examples) == 3


def test_llamafactory_registry(tmp_path):
    (tmp_path / "pairs.json").write_text(json.dumps([{"q": "Hi", "a": "Hello"}]))
    (tmp_path / "chat.json").write_text(json.dumps([
        {"dialog": [{"who": "me", "said": "Hi"}, {"who": "bot", "said": "Yo"}]}
    ]))  # fmt: skip
    (tmp_path / "dataset_info.json").write_text(json.dumps({
        "pairs": {"file_name": "pairs.json", "columns": {"prompt": "q", "response": "a"}},
        "chat": {"file_name": "chat.json", "formatting": "sharegpt", "columns": {"messages": "dialog"},
                 "tags": {"role_tag": "who", "content_tag": "said", "user_tag": "me", "assistant_tag": "bot"}},
        "remote": {"hf_hub_url": "org/data"},
    }))  # fmt: skip
    data = load(tmp_path)
    samples = sorted(json.dumps(e.sample) for e in data.examples)
    assert samples == sorted(
        json.dumps([{"role": "user", "content": u}, {"role": "assistant", "content": a}])
        for u, a in (("Hi", "Hello"), ("Hi", "Yo"))
    )
    assert any("skipped 1 entries with no local file (remote)" in n for n in data.notes)
    only = load(f"{tmp_path / 'dataset_info.json'}:pairs")
    assert [s.rows for s in only.sources] == [1]


def test_preference_pairs_train_on_chosen(tmp_path):
    rows = [{"conversations": [{"from": "human", "value": "Hi"}],
             "chosen": {"from": "gpt", "value": "Hello!"}, "rejected": {"from": "gpt", "value": "Go."}}]  # fmt: skip
    (tmp_path / "d.json").write_text(json.dumps(rows))
    data = load(tmp_path / "d.json")
    assert data.examples[0].sample[-1] == {"role": "assistant", "content": "Hello!"}


def test_dedup_shuffle_and_max_examples(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps(ALPACA + ALPACA[:2]))
    data = load(tmp_path / "d.json")
    assert data.duplicates == 2 and len(data.examples) == 3
    kept = load(tmp_path / "d.json", dataset_exact_deduplication=False)
    assert kept.duplicates == 0 and len(kept.examples) == 5
    assert len(load(tmp_path / "d.json", max_examples=2).examples) == 2
    assert len(load(tmp_path / "d.json", source={"max_examples": 1}).examples) == 1


def test_data_template_rule():
    template = DataTemplate("Instruction: Summarize\nPrompt: {{dialogue}}\nGeneration: {{summary}}")
    sample = template({"dialogue": "A: hi B: yo", "summary": "They greet."})
    assert sample == TextSample(
        (
            ("Instruction: Summarize\nPrompt: A: hi B: yo\nGeneration: ", False),
            ("They greet.", True),
        )
    )
    with pytest.raises(DataError, match=r"names column\(s\) \['summary'\]"):
        template.check_columns({"dialogue"}, "d.json")


def test_data_template_end_to_end(tmp_path, tiny_tokenizer):
    (tmp_path / "d.json").write_text(json.dumps([{"q": "Hi", "a": "Hello"}]))
    source = {"path": str(tmp_path / "d.json"), "data_template": "Q: {{q}}\nA: {{a}}"}
    config = load_config(overrides={"datasets": [source], "val_set_size": 0}).config
    item = prepare_data(config, tiny_tokenizer).train[0]
    pairs = zip(item["input_ids"], item["labels"], strict=True)
    assert tiny_tokenizer.decode(item["input_ids"]) == "Q: Hi\nA: Hello<|im_end|>"
    assert tiny_tokenizer.decode([i for i, lab in pairs if lab != -100]) == "Hello<|im_end|>"


def test_format_file(tmp_path):
    path = tmp_path / "fmt.json"
    path.write_text(json.dumps({
        "instruction,output": "User: %instruction%\nAssistant: %output%",
        "instruction,input,output": "User: %instruction%: %input%\nAssistant: %output%",
    }))  # fmt: skip
    fmt = FormatFile(str(path))
    assert fmt({"instruction": "Hi", "input": "", "output": "Yo"}) == TextSample(
        (("User: Hi\nAssistant: ", False), ("Yo", True))
    )
    assert (
        fmt({"instruction": "Add", "input": "1 2", "output": "3"}).parts[0][0]
        == "User: Add: 1 2\nAssistant: "
    )
    with pytest.raises(Exception, match="has no entry in"):
        fmt({"question": "x", "answer": "y"})


def test_chunk_windows_and_overlap():
    assert windows(10, 4, 1) == [(0, 4), (3, 7), (6, 10)]
    assert windows(3, 4, 0) == [(0, 3)]
    with pytest.raises(DataError, match="overlap_len"):
        windows(10, 4, 4)


def test_hard_cut_and_newline_favor(tiny_tokenizer):
    text = "first part\n\n\nsecond part"
    chunks = chunk_text(text, tiny_tokenizer, cutoff_len=200)
    assert chunks == ["first part", "second part"]
    assert all("\n\n\n" not in c for c in chunks)
    assert favor_newline("abc\ndefghij\nkl", 4, cut_start=True, cut_end=True) == "defghij"
    assert favor_newline("abc\ndefghij\nkl", 3, cut_start=True, cut_end=True) == "abc\ndefghij"
    assert favor_newline("abcdefgh\nij", 3, cut_start=False, cut_end=True) == "abcdefgh"
    assert favor_newline("abcdefgh\nij", 3, cut_start=True, cut_end=False) == "abcdefgh\nij"


def test_raw_text_file_trains_in_chunks(tmp_path, tiny_tokenizer):
    (tmp_path / "book.txt").write_text(("the capital of france is paris. " * 20 + "\n\n\n") * 2)
    source = {"path": str(tmp_path / "book.txt"), "type": "raw", "cutoff_len": 32, "overlap_len": 8}
    config = load_config(overrides={"datasets": [source], "val_set_size": 0}).config
    data = prepare_data(config, tiny_tokenizer)
    assert len(data.train) > 4
    assert all(len(x["input_ids"]) <= 34 for x in data.train)
    assert all(x["labels"] == x["input_ids"] for x in data.train)


def test_a_file_mixing_formats_is_an_error(tmp_path):
    rows = [
        {"instruction": "a", "output": "b"},
        {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]},
    ]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    with pytest.raises(
        DataError,
        match=r"rows are in different formats: alpaca \(first at row 1\), sharegpt \(first at row 2\)",
    ):
        load(tmp_path / "d.json")


def test_unreachable_hub_dataset_is_a_clear_error(tmp_path, closed_port):
    """Offline, or with a Hub nothing answers at: one quick check, the reason, no retries."""
    import os
    import subprocess
    import sys

    code = (
        "from tunelab.config import load_config\n"
        "from tunelab.data.prepare import load_examples\n"
        "from tunelab.errors import DataError\n"
        "try:\n"
        "    load_examples(load_config(overrides={'datasets': [{'path': 'someorg/nodata:test'}]}).config)\n"
        "except DataError as exc:\n"
        "    print(exc)\n"
    )
    port = closed_port
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    for env, reason in (
        ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
        ({"HF_ENDPOINT": f"http://127.0.0.1:{port}"}, f"127.0.0.1:{port} is unreachable"),
    ):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env={**clean, "HF_HOME": str(tmp_path), **env}, timeout=120)  # fmt: skip
        assert "could not load hub dataset 'someorg/nodata'" in proc.stdout, proc.stderr
        assert reason in proc.stdout and "not in the local cache" in proc.stdout


def test_truncation_that_throws_most_of_a_sample_away_is_a_loud_note(tmp_path, tiny_tokenizer):
    from tunelab.data.formats import FORMATS
    from tunelab.data.tokenize import sample_segments, tokenize_segments

    def tokens(line):
        sample = FORMATS["text"].convert({"text": line})
        return len(
            tokenize_segments(sample_segments(sample, tiny_tokenizer, False), tiny_tokenizer)[0]
        )

    long, medium = "the capital of france is paris. " * 100, "the capital of france is paris. " * 7
    assert tokens(long) > 2 * 64 and 64 < tokens(medium) < 2 * 64
    (tmp_path / "d.txt").write_text(f"{long}\n{medium}\nshort line\n")
    overrides = {"datasets": [{"path": str(tmp_path / "d.txt")}], "val_set_size": 0}
    config = load_config(overrides={**overrides, "sequence_len": 64}).config
    data = prepare_data(config, tiny_tokenizer)
    lost = tokens(long) - 64 + tokens(medium) - 64
    assert data.stats["truncated"] == 2 and data.stats["truncated_tokens"] == lost
    assert data.stats["truncated_over_half"] == 1  # the medium line kept more than half
    assert data.notes == [
        f"1 sample lost more than half of its tokens to sequence_len=64: {lost:,} tokens were "
        "thrown away in all. Raise sequence_len, or for long documents (text rows, .txt "
        "files) set the dataset's type: raw (--dataset-format raw), which cuts them into "
        "chunks that are all trained"
    ]
    config = load_config(overrides={**overrides, "sequence_len": 128}).config
    mild = prepare_data(config, tiny_tokenizer)  # only the long line is cut, by more than half
    assert mild.stats["truncated"] == 1 and "1 sample lost" in mild.notes[0]
    config = load_config(overrides={**overrides, "sequence_len": tokens(long)}).config
    none = prepare_data(config, tiny_tokenizer)
    assert none.stats["truncated_tokens"] == 0 and none.notes == []


def test_the_truncation_note_survives_a_reused_prepared_dataset(tmp_path, tiny_tokenizer):
    (tmp_path / "d.txt").write_text("the capital of france is paris. " * 100 + "\n")
    overrides = {
        "datasets": [{"path": str(tmp_path / "d.txt")}], "val_set_size": 0, "sequence_len": 32,
        "dataset_prepared_path": str(tmp_path / "prepared"),
    }  # fmt: skip
    config = load_config(overrides=overrides).config
    first, again = prepare_data(config, tiny_tokenizer), prepare_data(config, tiny_tokenizer)
    assert "reused the prepared dataset" in again.notes[-1]
    assert first.notes[0] == again.notes[0] and "lost more than half" in again.notes[0]


def test_raw_rows_must_hold_text(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "fine"}\n{"text": NaN}\n{"body": "x"}\n')
    with pytest.raises(DataError) as info:
        load(tmp_path / "d.jsonl", source={"type": "raw"})
    assert "2 of 3 rows cannot be read as raw" in info.value.message
    assert (
        "1 row: 'text' must be text, found a number (NaN); write it as a string (first at line 2)"
        in info.value.message
    )
    assert "1 row: 'text' is missing (first at line 3)" in info.value.message
