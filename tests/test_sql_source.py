"""A dataset entry read with a SQL query: the same rows as a file, checked like one."""

import json
import math
import sqlite3

import pytest
import yaml

from tunelab.config import load_config
from tunelab.data.prepare import load_examples, prepare_data
from tunelab.data.sources import _engine
from tunelab.errors import ConfigError, DataError

from .conftest import MEMORISE, cli, run, write_json

QUERY = "SELECT instruction, input, output FROM examples WHERE split = 'train' ORDER BY id"
ROWS = [*MEMORISE, {"instruction": "Count to two.", "input": None, "output": "One, two."}]


def write_db(path, rows=ROWS, extra=()):
    """An SQLite file with ``rows`` (split 'train') and ``extra`` rows (split 'test')."""
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE IF EXISTS examples")
        db.execute(
            "CREATE TABLE examples (id INTEGER PRIMARY KEY, instruction TEXT, input TEXT, "
            "output TEXT, split TEXT)"
        )
        db.executemany(
            "INSERT INTO examples (instruction, input, output, split) VALUES (?, ?, ?, ?)",
            [(r["instruction"], r["input"], r["output"], s) for r, s in
             [*((r, "train") for r in rows), *((r, "test") for r in extra)]],
        )  # fmt: skip
    return f"sqlite:///{path}"  # an absolute path: sqlite:////tmp/...


@pytest.fixture
def db_url(tmp_path):
    return write_db(tmp_path / "rows.db", extra=[{"instruction": "x", "input": "", "output": "y"}])


def config(source, **settings):
    return load_config(overrides={"datasets": [source], "val_set_size": 0, **settings}).config


def problems(source):
    with pytest.raises(ConfigError) as caught:
        config(source)
    return caught.value.problems


def test_sql_rows_tokenize_like_the_same_rows_from_a_json_file(tmp_path, db_url, tiny_tokenizer):
    assert db_url.startswith("sqlite:////")
    from_file = config({"path": str(write_json(tmp_path / "rows.json", ROWS))})
    from_sql = config({"path": db_url, "query": QUERY})
    loaded = load_examples(from_sql)
    [report] = loaded.sources
    assert (report.format, report.rows) == ("alpaca", len(ROWS))  # the 'test' row left out
    assert report.path == f"database {db_url} (query: {QUERY})"
    assert sorted(ex.where for ex in loaded.examples) == [f"row {i}" for i in range(1, 6)]
    file_data = prepare_data(from_file, tiny_tokenizer)
    sql_data = prepare_data(from_sql, tiny_tokenizer)
    assert sql_data.train == file_data.train
    assert len(sql_data.train) == len(ROWS)
    typed = config({"path": db_url, "query": QUERY, "type": "alpaca"})
    assert prepare_data(typed, tiny_tokenizer).train == file_data.train


def test_query_on_a_file_or_a_database_without_one_is_a_config_error(tmp_path, db_url):
    assert problems({"path": db_url}) == [
        "datasets.0.query: a database path needs a query: the SELECT statement that gives the "
        "training rows, e.g. SELECT instruction, input, output FROM examples (got null)"
    ]
    [problem] = problems({"path": str(write_json(tmp_path / "a.json", ROWS)), "query": QUERY})
    assert problem.startswith("datasets.0.query: query applies only when path is a database URL")


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("DELETE FROM examples", "must be a SELECT (or WITH ... SELECT) statement, not DELETE"),
        ("SELECT * FROM examples; DROP TABLE examples", "must be a single statement"),
        ("WITH gone AS (DELETE FROM examples RETURNING *) SELECT * FROM gone", "holds DELETE"),
        ("SELECT * INTO copied FROM examples", "holds INTO"),
        ("SELECT * FROM examples FOR UPDATE", "holds UPDATE"),
        ("  -- nothing\n ;", "the query is empty"),
    ],
)
def test_only_one_select_is_accepted(db_url, query, message):
    [problem] = problems({"path": db_url, "query": query})
    assert problem.startswith("datasets.0.query: ")
    assert message in problem


def test_words_inside_strings_and_comments_do_not_count(db_url):
    query = (
        "-- rows to train on; never DELETE them\n"
        "WITH t AS (SELECT * FROM examples WHERE split <> 'delete; update') "
        "SELECT instruction, input, output FROM t WHERE split = 'train';"
    )
    assert len(load_examples(config({"path": db_url, "query": query})).examples) == len(ROWS)


def test_database_paths_that_cannot_be_read_are_config_errors(tmp_path, db_url):
    missing = tmp_path / "missing.db"
    assert problems({"path": f"sqlite:///{missing}", "query": QUERY}) == [
        f"datasets.0.path: 'sqlite:///{missing}': no such SQLite database file {missing}"
    ]
    [problem] = problems({"path": "mysql://me:pw@host/db", "query": QUERY})
    assert problem == (
        "datasets.0.path: 'mysql://me:***@host/db': tunelab reads SQLite and PostgreSQL "
        "databases only (sqlite:////abs/path/rows.db or postgresql://user:password@host/db)"
    )
    [problem] = problems({"path": "postgresql://me:***@host/db", "query": QUERY})
    assert "the password in this URL was masked (***)" in problem
    [problem] = problems({"path": "postgresql://me:pw@host", "query": QUERY})
    assert problem == "datasets.0.path: 'postgresql://me:***@host': names no database; " + (
        "expected postgresql://user:password@host/database"
    )
    listed = f"{write_json(tmp_path / 'a.json', ROWS)},{db_url}"
    [problem] = problems({"path": listed})
    assert "a database URL is the whole path of a datasets entry" in problem


@pytest.mark.parametrize(
    ("query", "message", "hint"),
    [
        ("SELECT * FROM nope", "the query failed: no such table: nope", "tables ['examples']"),
        ("SELECT instruction FROM examples WHERE", "the query failed: incomplete input", None),
        ("SELECT * FROM examples WHERE split = 'none'", "the query returned no rows", "WHERE"),
    ],
)
def test_queries_that_give_no_rows_are_data_errors(db_url, query, message, hint):
    with pytest.raises(DataError) as caught:
        load_examples(config({"path": db_url, "query": query}))
    assert caught.value.message.startswith(f"database {db_url} (query: {query}): {message}")
    assert hint is None or hint in caught.value.hint


def test_a_database_gone_after_the_config_was_loaded_is_a_data_error(tmp_path):
    loaded = config({"path": write_db(tmp_path / "gone.db"), "query": QUERY})
    (tmp_path / "gone.db").unlink()
    with pytest.raises(DataError, match=r"no such SQLite database file .*gone\.db"):
        load_examples(loaded)


def test_sqlite_is_opened_read_only(db_url):
    engine = _engine(db_url)
    with engine.connect() as connection, pytest.raises(Exception, match="readonly database"):
        connection.exec_driver_sql("DELETE FROM examples")
    engine.dispose()
    with sqlite3.connect(db_url.removeprefix("sqlite:///")) as db:
        assert db.execute("SELECT count(*) FROM examples").fetchone() == (len(ROWS) + 1,)


def test_postgresql_url_goes_through_psycopg_and_its_password_is_never_shown(
    tmp_path, closed_port, capsys
):
    url = f"postgresql://trainer:s3cret@127.0.0.1:{closed_port}/rows"
    assert _engine(url).url.drivername == "postgresql+psycopg"
    assert _engine(url).url.password == "s3cret"  # used as given, shown masked
    with pytest.raises(DataError) as caught:
        load_examples(config({"path": url, "query": QUERY}))
    error = f"{caught.value.message} {caught.value.hint}"
    assert "trainer:***@127.0.0.1" in error and "s3cret" not in error
    assert "the query failed: connection failed" in error  # psycopg tried; nothing listens
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"datasets": [{"path": url, "query": QUERY}]}))
    code, err = cli(["validate", str(path)], capsys)
    assert code != 0 and "trainer:***@127.0.0.1" in err
    assert "s3cret" not in err + cli.out


def test_changed_rows_are_not_served_from_the_prepared_cache(tmp_path, tiny_tokenizer):
    url = write_db(tmp_path / "rows.db")
    settings = {"dataset_prepared_path": str(tmp_path / "prepared")}
    loaded = config({"path": url, "query": QUERY}, **settings)
    first = prepare_data(loaded, tiny_tokenizer)
    assert any(note.startswith("saved the prepared dataset") for note in first.notes)
    again = prepare_data(loaded, tiny_tokenizer)
    assert any(note.startswith("reused the prepared dataset") for note in again.notes)
    write_db(tmp_path / "rows.db", [*ROWS[:-1], {**ROWS[-1], "output": "One, two, three."}])
    changed = prepare_data(loaded, tiny_tokenizer)  # as many rows, one of them changed
    assert not any(note.startswith("reused") for note in changed.notes)
    assert changed.stats["rows"] == len(ROWS) and changed.train != first.train


def test_a_short_training_run_on_a_sql_source(tiny_model_dir, db_url, tmp_path):
    source = {"path": db_url, "query": QUERY}
    result = run(tiny_model_dir, db_url, tmp_path / "out", max_steps=3, datasets=[source])
    assert result.steps == 3
    metrics = (result.run_dir / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in metrics if '"loss"' in line]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    saved = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert saved["datasets"][0]["query"] == QUERY
