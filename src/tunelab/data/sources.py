"""Where rows come from: files, globs, directories, saved datasets, registries, the hub,
and SQL queries on a database.

A ``datasets`` entry's ``path`` expands into :class:`Table` objects, one per file or
dataset, each with its rows (and where each row came from) and, when the source says
so, the format its rows are in.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import sqlite3
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.config.locations import (
    REGISTRY,
    database_kind,
    database_problem,
    select_problem,
    split_paths,
    sqlite_file,
)
from tunelab.data.formats import Mapping
from tunelab.data.lazy import JsonLines, Row, json_line
from tunelab.errors import DataError
from tunelab.network import HubUnavailable, hub_or_cache
from tunelab.redact import redact
from tunelab.textfile import loads_json, read_text

FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt")


@dataclass
class Table:
    name: str  # a file path or a dataset id, for messages
    rows: Sequence[Row]  # a list, or a .jsonl file's rows read when needed
    sha256: str | None = None
    format: str | None = None  # known from the source (registry, .txt); else detected
    mapping: Mapping | None = None  # conversation layout from a registry
    text: str | None = None  # a whole .txt file, for raw text
    preference: bool = False  # preference pairs, reduced to their chosen answers
    folder: Path | None = None  # relative paths in rows (images) are read from here


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- files -------------------------------------------------------------------------


def _jsonl(path: Path, text: str) -> list[Row]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            rows.append(Row(json_line(path, line, number), f"line {number}"))
    return rows


def read_json(path: Path) -> Sequence[Row]:
    """Rows of a JSON array file or a JSON-lines file; bad syntax names file and line. A
    .jsonl file's rows are read from disk when needed (:class:`~tunelab.data.lazy.JsonLines`),
    so a file larger than memory can be prepared."""
    if path.suffix.lower() == ".jsonl":  # read line by line, kept on disk
        return JsonLines(path)
    text = read_text(path)
    try:
        data = loads_json(text, str(path))
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and text.lstrip().startswith("{"):
            return _jsonl(path, text)  # JSON lines in a .json file
        raise DataError(
            f"{path}:{exc.lineno}: invalid JSON ({exc.msg}, column {exc.colno})",
            "fix the file at that line; JSON-lines files should end in .jsonl",
        ) from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of objects, found {type(data).__name__}")
    rows = []
    for i, item in enumerate(data, start=1):
        if not isinstance(item, dict):
            raise DataError(f"{path}: row {i} is {type(item).__name__}, expected an object")
        rows.append(Row(item, f"row {i}"))
    return rows


def read_csv(path: Path) -> list[Row]:
    """Rows of a CSV file with a header line; every value is text."""
    text = read_text(path)
    csv.field_size_limit(max(csv.field_size_limit(), len(text)))  # a long document is one field
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        columns = reader.fieldnames or []
        twice = sorted({c for c in columns if columns.count(c) > 1})
        if twice:
            raise DataError(
                f"{path}:1: the header names {twice} twice", "give each column its own name"
            )
        rows = []
        for record in reader:
            if None in record:
                raise DataError(f"{path}:{reader.line_num}: more values than columns on this line")
            rows.append(Row(dict(record), f"line {reader.line_num}"))
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: cannot read this CSV line ({exc})") from None
    return rows


def read_parquet(path: Path) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises its own error types
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    return [Row(item, f"row {i}") for i, item in enumerate(table.to_pylist(), start=1)]


def read_txt(path: Path) -> Table:
    """A .txt file: one example per non-empty line (``text``), or the whole text (``raw``)."""
    text = read_text(path).replace("\r\n", "\n").replace("\r", "\n")  # as open() reads text
    rows = [
        Row({"text": line}, f"line {n}")
        for n, line in enumerate(text.splitlines(), start=1)
        if line.strip()
    ]
    return Table(str(path), rows, sha256(path), "text", text=text, folder=path.parent)


def read_file(path: Path) -> Table:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return read_txt(path)
    readers = {".json": read_json, ".jsonl": read_json, ".csv": read_csv, ".parquet": read_parquet}
    if suffix not in readers:
        raise DataError(
            f"{path}: unsupported file type '{suffix}'",
            f"use one of {', '.join(FILE_SUFFIXES)}",
        )
    return Table(str(path), readers[suffix](path), sha256(path), folder=path.parent)


# --- saved datasets and the hub -------------------------------------------------------


def _dataset_rows(ds: Any) -> list[Row]:
    return [Row(dict(item), f"row {i}") for i, item in enumerate(ds, start=1)]


def read_saved_dataset(path: Path, split: str) -> Table:
    """A directory written by ``datasets.Dataset.save_to_disk`` (or a DatasetDict)."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets and pyarrow raise many types; all mean "cannot read it"
        raise DataError(
            f"{path}: not a readable saved dataset ({type(exc).__name__}: {exc})",
            "write it again with Dataset.save_to_disk, or give the data as files",
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path}: no split '{split}'; it has {sorted(ds)}")
        ds = ds[split]
    return Table(str(path), _dataset_rows(ds))


def read_hub(dataset_id: str, split: str, name: str | None = None, data_files: Any = None) -> Table:
    """A hub dataset split, of configuration ``name`` and from ``data_files`` if given (needs
    network access to the hub, or a cached copy)."""
    import datasets

    try:
        source, _ = hub_or_cache(dataset_id, "dataset")
    except HubUnavailable as exc:
        raise DataError(
            f"could not load hub dataset '{dataset_id}': {exc}",
            "connect to the network, or download it and give a local file",
        ) from None
    try:
        ds = datasets.load_dataset(source, name=name, split=split, data_files=data_files)
    except Exception as exc:  # the hub client raises many types; all mean "could not get it"
        raise DataError(
            f"could not load hub dataset '{dataset_id}' (split '{split}'): "
            f"{type(exc).__name__}: {exc}",
            "check the id and your network, or download it and give a local file",
        ) from None
    return Table(f"{dataset_id}:{split}", _dataset_rows(ds))


# --- SQL queries on a database ----------------------------------------------------------


def _engine(url: str) -> Any:
    """A SQLAlchemy engine that only reads: SQLite opened read-only, PostgreSQL (psycopg 3)
    in read-only transactions."""
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    if database_kind(url) == "sqlite":
        uri = sqlite_file(url).resolve().as_uri() + "?mode=ro"
        return sqlalchemy.create_engine(
            "sqlite://", creator=lambda: sqlite3.connect(uri, uri=True), poolclass=NullPool
        )
    address = sqlalchemy.engine.make_url(url.strip()).set(drivername="postgresql+psycopg")
    return sqlalchemy.create_engine(
        address,
        poolclass=NullPool,
        connect_args={"options": "-c default_transaction_read_only=on", "connect_timeout": 30},
    )


def _first_cause(exc: BaseException) -> BaseException:
    """The error the database driver raised, under the layers datasets and SQLAlchemy add."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    return exc


def _sqlite_tables(url: str) -> list[str]:
    try:
        uri = sqlite_file(url).resolve().as_uri() + "?mode=ro"
        with sqlite3.connect(uri, uri=True) as db:
            rows = db.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")
            return sorted(name for (name,) in rows)
    except sqlite3.Error:
        return []


def _query_rows(url: str, query: str, shown: str) -> list[Row]:
    """Rows of ``query`` through ``datasets.Dataset.from_sql``, never from its cache."""
    import datasets
    from datasets.utils.tqdm import are_progress_bars_disabled

    quiet = are_progress_bars_disabled()
    datasets.disable_progress_bars()
    engine = _engine(url)
    try:  # a fresh cache folder: datasets would serve the rows of an earlier, same query
        with tempfile.TemporaryDirectory(prefix="tunelab-sql-") as cache:
            ds = datasets.Dataset.from_sql(query, con=engine, cache_dir=cache, keep_in_memory=True)
            return _dataset_rows(ds)
    except Exception as exc:  # datasets wraps what SQLAlchemy and the driver raise
        cause = _first_cause(exc)
        if isinstance(cause, ValueError) and "corresponds to no data" in str(cause):
            return []  # datasets' word for a query that returned no rows
        tables = _sqlite_tables(url) if database_kind(url) == "sqlite" else []
        raise DataError(
            f"{shown}: the query failed: {redact(str(cause).strip())}",
            "check that the database is reachable and that the query runs there by itself"
            + (f"; the database has tables {tables}" if tables else ""),
        ) from None
    finally:
        engine.dispose()
        if not quiet:
            datasets.enable_progress_bars()


def read_sql(url: str, query: str) -> Table:
    """The rows a read-only ``query`` returns from a SQLite or PostgreSQL database.

    The table's ``sha256`` covers the URL (without its password), the query and the rows,
    so that a prepared dataset made from them is not reused once the rows change.
    """
    short = " ".join(query.split())
    short = short if len(short) <= 120 else short[:117] + "..."
    shown = f"database {redact(url.strip())} (query: {short})"
    problem = database_problem(url) or select_problem(query)
    if problem:
        raise DataError(f"{shown}: {problem}", "fix the path and query of this datasets entry")
    rows = _query_rows(url, query, shown)
    if not rows:
        raise DataError(
            f"{shown}: the query returned no rows",
            "check its WHERE clause and that the table holds the training rows",
        )
    content = json.dumps(
        [redact(url.strip()), query, [r.data for r in rows]], sort_keys=True, default=str
    )
    folder = sqlite_file(url).resolve().parent if database_kind(url) == "sqlite" else None
    return Table(shown, rows, hashlib.sha256(content.encode()).hexdigest(), folder=folder)


# --- LLaMA-Factory registries -----------------------------------------------------------


def _registry_table(folder: Path, name: str, entry: dict[str, Any]) -> Table:
    table = read_file(folder / entry["file_name"])
    formatting = entry.get("formatting", "alpaca")
    columns = entry.get("columns", {})
    if formatting == "alpaca" and set(columns) == {"prompt"}:  # pre-training text
        column = columns["prompt"]
        table.rows = [Row({"text": r.data.get(column)}, r.where) for r in table.rows]
        table.format = "text"
    elif formatting == "alpaca":
        names = {"prompt": "instruction", "query": "input", "response": "output"}
        renames = {columns[k]: v for k, v in names.items() if k in columns}
        renames.update({columns[k]: k for k in ("system", "history") if k in columns})
        if renames:
            table.rows = [
                Row({renames.get(k, k): v for k, v in r.data.items()}, r.where) for r in table.rows
            ]
        table.format = "alpaca"
    elif formatting == "sharegpt":
        tags = entry.get("tags", {})
        roles = {
            tags.get(f"{tag}_tag", default): ours
            for tag, default, ours in (
                ("user", "human", "user"), ("assistant", "gpt", "assistant"),
                ("observation", "observation", "tool"),
                ("function", "function_call", "function_call"),
                ("system", "system", "system"),
            )
        }  # fmt: skip
        table.mapping = Mapping(
            messages=columns.get("messages", "conversations"),
            role=tags.get("role_tag", "from"),
            content=tags.get("content_tag", "value"),
            system=columns.get("system", "system"),
            tools=columns.get("tools", "tools"),
            roles=roles,
        )
        table.format = "sharegpt"
    else:
        raise DataError(f"{folder / REGISTRY}: '{name}' has unknown formatting '{formatting}'")
    if entry.get("ranking"):
        table.rows = [_chosen_only(r, table.mapping or Mapping()) for r in table.rows]
        table.preference = True
    table.name = f"{table.name} ({name})"
    return table


def reduce_preferences(table: Table) -> None:
    """Rows with ``chosen``/``rejected`` answers train on the chosen one (supervised)."""
    columns = {key for row in table.rows[:100] for key in row.data}
    if table.preference or not {"chosen", "rejected"} <= columns:
        return
    mapping = table.mapping or (
        Mapping() if "conversations" in columns else Mapping("messages", "role", "content")
    )
    table.rows = [_chosen_only(r, mapping) for r in table.rows]
    table.preference = True


def _chosen_only(row: Row, mapping: Mapping) -> Row:
    """A preference pair trains as supervised data: the conversation plus the chosen answer."""
    data = dict(row.data)
    chosen = data.pop("chosen", None)
    data.pop("rejected", None)
    if isinstance(chosen, dict):
        data[mapping.messages] = [*data.get(mapping.messages, []), chosen]
    elif isinstance(chosen, str):
        data["output"] = chosen
    return Row(data, row.where)


def _check_registry(registry: Path, entries: Any) -> None:
    """The shape the registry code relies on: names -> entries with text settings."""
    if not isinstance(entries, dict) or not all(isinstance(e, dict) for e in entries.values()):
        raise DataError(
            f"{registry}: expected an object of dataset names -> entries",
            'each entry looks like {"file_name": "data.json", "columns": {...}}',
        )
    for name, entry in entries.items():
        for key in ("file_name", "formatting"):
            if key in entry and not isinstance(entry[key], str):
                raise DataError(f"{registry}: '{name}': {key} must be text")
        for key in ("columns", "tags"):
            value = entry.get(key, {})
            if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
                raise DataError(f"{registry}: '{name}': {key} must map names to column names")


def read_registry(registry: Path, names: list[str], notes: list[str]) -> list[Table]:
    """Datasets named in a LLaMA-Factory ``dataset_info.json`` (all local ones if no names)."""
    try:
        entries = loads_json(read_text(registry), str(registry))
    except json.JSONDecodeError as exc:
        raise DataError(f"{registry}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    _check_registry(registry, entries)
    unknown = [n for n in names if n not in entries]
    if unknown:
        raise DataError(f"{registry}: no dataset named {unknown}; it has {sorted(entries)}")
    chosen = names or list(entries)
    tables, skipped = [], []
    for name in chosen:
        entry = entries[name]
        local = "file_name" in entry and (registry.parent / entry["file_name"]).is_file()
        if not local:
            if names:
                raise DataError(f"{registry}: '{name}' has no local file here")
            skipped.append(name)
            continue
        tables.append(_registry_table(registry.parent, name, entry))
    if skipped:
        shown = ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        notes.append(f"{registry}: skipped {len(skipped)} entries with no local file ({shown})")
    return tables


# --- expanding a path -----------------------------------------------------------------


def _split_selector(path: str) -> tuple[str, list[str]]:
    """``dir/dataset_info.json:a,b`` -> (``dir/dataset_info.json``, [a, b])."""
    head, sep, tail = path.rpartition(":")
    if sep and head.endswith(REGISTRY):
        return head, [n.strip() for n in tail.split(",") if n.strip()]
    return path, []


def expand(
    path: str,
    split: str,
    notes: list[str],
    hub: bool = True,
    name: str | None = None,
    data_files: Any = None,
    query: str | None = None,
) -> list[Table]:
    """All tables a ``datasets`` path names; a path that names nothing is an error.

    With ``hub=False`` hub ids give no table (nothing is downloaded). ``name`` is the
    configuration of a hub dataset; for local data it is noted and not used. A database
    URL gives the one table its ``query`` returns.
    """
    if database_kind(path):
        shown = f"database {redact(path.strip())}"
        if query is None:
            raise DataError(
                f"{shown}: a database path needs a query",
                "add query: SELECT ... (the statement that gives the rows) to this datasets entry",
            )
        if data_files is not None:
            raise DataError(
                f"{shown}: data_files picks files from a hub dataset; this is a database",
                "leave data_files out; the query chooses the rows",
            )
        if name is not None:
            notes.append(f"{shown}: name '{name}' (a hub dataset's configuration) is not used")
        return [read_sql(path, query)]
    if query is not None:
        raise DataError(
            f"{path}: query applies only to a database URL (sqlite:///file.db, postgresql://...)",
            "leave query out for files and hub datasets",
        )
    tables: list[Table] = []
    for part in split_paths(path):
        tables += _expand_one(part, split, notes, hub, name, data_files)
    return tables


def _expand_one(
    part: str, split: str, notes: list[str], hub: bool, name: str | None, data_files: Any
) -> list[Table]:
    if database_kind(part):
        raise DataError(
            f"'{redact(part)}': a database URL is the whole path of a datasets entry, with its "
            "query",
            "give the database an entry of its own",
        )
    part, names = _split_selector(part)
    p = Path(part).expanduser()
    if any(ch in part for ch in "*?["):
        matches = sorted(Path(m) for m in glob.glob(str(p), recursive=True) if Path(m).is_file())
        if not matches:
            raise DataError(f"'{part}': no files match this pattern")
        return [read_file(m) for m in matches]
    if data_files is not None and (p.exists() or any(ch in part for ch in "*?[")):
        raise DataError(
            f"{part}: data_files picks files from a hub dataset's repository; this is local data",
            "give the files themselves as the path (a list, a glob or a folder)",
        )
    if name is not None and (p.exists() or any(ch in part for ch in "*?[")):
        notes.append(
            f"{part}: name '{name}' (a hub dataset's configuration) is not used for local data"
        )
    if p.is_file():
        if p.name == REGISTRY:
            return read_registry(p, names, notes)
        return [read_file(p)]
    if p.is_dir():
        if (p / "state.json").is_file() or (p / "dataset_dict.json").is_file():
            return [read_saved_dataset(p, split)]
        if (p / REGISTRY).is_file():
            return read_registry(p / REGISTRY, names, notes)
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in FILE_SUFFIXES)
        if not files:
            raise DataError(
                f"{part}: the directory holds no data files ({', '.join(FILE_SUFFIXES)})"
            )
        return [read_file(f) for f in files]
    from tunelab.config.locations import data_path_problem

    problem = data_path_problem(part)
    if problem:
        raise DataError(problem)
    dataset_id, _, hub_split = part.partition(":")
    if not hub:
        notes.append(f"{part}: hub dataset, read when training")
        return []
    return [read_hub(dataset_id, hub_split or split, name, data_files)]
