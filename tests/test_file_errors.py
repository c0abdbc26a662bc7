"""Files that cannot be read as data or config: the file (and line) named, what is wrong and
the fix, exit code 2, no traceback; even when the file is one of many in a directory."""

import json

import pytest

from tunelab.config.load import read_config_file
from tunelab.data.sources import read_file

from .conftest import cli

ROWS = [{"instruction": "Café?", "output": "Oui."}]
JSON = json.dumps(ROWS, ensure_ascii=False)
CSV = "instruction,output\nCafé?,Oui.\n"
TXT = "first line\nCafé au lait\n"

# (file name, bytes, what the message says after the path)
UNREADABLE = [
    ("d.json", JSON.encode("latin-1"), ":1: line 1 is not UTF-8 text (byte 0xe9 in '[{\"instr"),
    ("d.csv", CSV.encode("cp1252"), ":2: line 2 is not UTF-8 text (byte 0xe9 in 'Caf\\xe9?,Oui.')"),
    ("d.txt", TXT.encode("latin-1"), ":2: line 2 is not UTF-8 text (byte 0xe9"),
    ("d.json", JSON.encode("utf-16"), ": the file is UTF-16 text (it starts with a UTF-16 byte"),
    ("d.csv", CSV.encode("utf-16"), ": the file is UTF-16 text"),
    ("d.jsonl", (json.dumps(ROWS[0]) + "\n").encode("utf-16"), ": the file is UTF-16 text"),
    ("d.txt", TXT.encode("utf-16"), ": the file is UTF-16 text"),
    ("d.jsonl", (json.dumps(ROWS[0]) + "\n").encode("utf-16-le"), ": the file looks like UTF-16"),
    ("d.json", bytes(range(256)) * 4, ": a binary file, not text"),
    ("d.json", b"PAR1\x15\x04\x00\x00", ": a Parquet file, not text"),
    ("d.csv", b"PK\x03\x04\x14\x00\x06\x00", ": a ZIP archive (an Excel .xlsx workbook is one)"),
    ("d.json", b"[" * 100_000 + b"]" * 100_000, ": the JSON is nested too deeply to read"),
    ("d.json", b'{"a":' * 100_000 + b"1" + b"}" * 100_000, ": the JSON is nested too deeply"),
    ("d.jsonl", b'{"a": 1}\n' + b'{"a":' * 100_000 + b"1" + b"}" * 100_000, ":2: the JSON is"),
    ("d.json", b'[{"n": ' + b"1" * 5000 + b"}]", ": a number in the JSON is too long to read"),
]


@pytest.mark.parametrize("name, content, problem", UNREADABLE)
def test_an_unreadable_file_among_others_is_named(name, content, problem, tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a_good.json").write_text(json.dumps(ROWS), encoding="utf-8")
    (folder / name).write_bytes(content)
    code, err = cli(["validate", "--data", str(folder)], capsys)
    assert code == 2
    assert f"error: {folder / name}{problem}" in err
    assert "\n  fix: " in err


@pytest.mark.parametrize("name", ["d.json", "d.csv", "d.txt", "d.jsonl"])
def test_utf8_with_a_bom_still_reads(name, tmp_path):
    text = {"d.json": JSON, "d.csv": CSV, "d.txt": TXT, "d.jsonl": json.dumps(ROWS[0]) + "\n"}
    (tmp_path / name).write_bytes(text[name].encode("utf-8-sig"))
    rows = read_file(tmp_path / name).rows
    assert rows[-1].data in ({"text": "Café au lait"}, ROWS[0])


def test_txt_lines_keep_reading_with_windows_newlines(tmp_path):
    (tmp_path / "d.txt").write_bytes(b"one\r\ntwo\r\n\r\n\r\nthree")
    table = read_file(tmp_path / "d.txt")
    assert [r.data["text"] for r in table.rows] == ["one", "two", "three"]
    assert table.text == "one\ntwo\n\n\nthree"  # raw text splits at three newlines


CONFIGS = [
    ("c.yml", "base_model: café\n".encode("latin-1"), ":1: line 1 is not UTF-8 text (byte 0xe9 in"),
    ("c.json", '{"base_model": "x"}'.encode("utf-16"), ": the file is UTF-16 text (it starts"),
    ("c.yml", ("a: " + "[" * 100_000 + "]" * 100_000).encode(), ": nested too deeply to read"),
    (
        "c.json",
        ('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}").encode(),
        ": the JSON is nested too deeply",
    ),
    ("c.yml", ("seed: " + "1" * 5000).encode(), ": a number is too long to read"),
    (
        "c.json",
        ('{"seed": ' + "1" * 5000 + "}").encode(),
        ": a number in the JSON is too long to read",
    ),
]


@pytest.mark.parametrize("name, content, problem", CONFIGS)
def test_an_unreadable_config_file_is_named(name, content, problem, tmp_path, capsys):
    (tmp_path / name).write_bytes(content)
    code, err = cli(["validate", str(tmp_path / name)], capsys)
    assert code == 2 and f"  - {tmp_path / name}{problem}" in err


def test_config_files_with_a_bom_read(tmp_path):
    (tmp_path / "c.yml").write_bytes("seed: 7\n".encode("utf-8-sig"))
    (tmp_path / "c.json").write_bytes('{"seed": 7}'.encode("utf-8-sig"))
    assert read_config_file(tmp_path / "c.yml") == read_config_file(tmp_path / "c.json")


def _registry(folder, entries):
    folder.mkdir()
    (folder / "dataset_info.json").write_text(json.dumps(entries))
    return folder


# Other files a user may give by mistake: (file name, text, the message after the path)
MALFORMED = [
    ("d.csv", "instruction,output\n", ": the dataset is empty (no rows)"),
    ("d.json", '"just a string"', ": expected a JSON array of objects, found str"),
    ("d.csv", "instruction,output,output\na,b,c\n", ":1: the header names ['output'] twice"),
    ("d.jsonl", '{"text": "a"}\n{"text": "b"', ":2: invalid JSON on line 2"),
]


@pytest.mark.parametrize("name, text, problem", MALFORMED)
def test_malformed_files_are_named(name, text, problem, tmp_path, capsys):
    (tmp_path / name).write_text(text, encoding="utf-8")
    code, err = cli(["validate", "--data", str(tmp_path / name)], capsys)
    assert code == 2 and f"error: {tmp_path / name}{problem}" in err


@pytest.mark.parametrize(
    "entries, problem",
    [
        (["a"], ": expected an object of dataset names -> entries"),
        ({"a": {"file_name": 5}}, ": 'a': file_name must be text"),
        ({"a": {"file_name": "d.json", "columns": ["q"]}}, ": 'a': columns must map names"),
    ],
)
def test_a_malformed_registry_is_named(entries, problem, tmp_path, capsys):
    folder = _registry(tmp_path / "reg", entries)
    code, err = cli(["validate", "--data", str(folder)], capsys)
    assert code == 2 and f"error: {folder / 'dataset_info.json'}{problem}" in err


def test_a_broken_saved_dataset_is_named(tmp_path, capsys):
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "state.json").write_text("not json")
    code, err = cli(["validate", "--data", str(tmp_path / "saved")], capsys)
    assert code == 2 and f"error: {tmp_path / 'saved'}: not a readable saved dataset" in err


def test_a_csv_field_longer_than_the_csv_modules_limit_reads(tmp_path):
    (tmp_path / "d.csv").write_text("text\n" + "word " * 40_000 + "\n", encoding="utf-8")
    assert len(read_file(tmp_path / "d.csv").rows[0].data["text"]) == 200_000
