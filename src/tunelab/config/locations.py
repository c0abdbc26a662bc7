"""What a ``base_model`` or dataset ``path`` string points at, decided without loading it.

A dataset ``path`` may also be a database URL; its ``query`` is checked here too."""

from __future__ import annotations

import difflib
import glob
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from tunelab.config.schema import BUILTIN_MODELS, DatasetSource
from tunelab.redact import MASK, is_masked, redact

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt")


def _looks_like_path(text: str) -> bool:
    return (
        text.startswith(("/", "./", "../", "~", "."))
        or "\\" in text
        or text.count("/") > 1
        or Path(text).suffix.lower() in (*DATA_SUFFIXES, ".gguf")
    )


@dataclass(frozen=True)
class ModelRef:
    """Where a base model comes from."""

    kind: Literal["builtin", "hf_dir", "gguf", "hub"]
    location: str

    def describe(self) -> str:
        return {
            "builtin": f"built-in {self.location}",
            "hf_dir": f"model directory {self.location}",
            "gguf": f"GGUF file {self.location}",
            "hub": f"hub model {self.location}",
        }[self.kind]


def builtin_name(name: str) -> str | None:
    """The built-in model ``name`` means (in any letter case), or None."""
    return next((b for b in BUILTIN_MODELS if b.lower() == name.strip().lower()), None)


def model_problem(name: str) -> str | None:
    """Why ``name`` cannot be a base model, or None if it can."""
    if builtin_name(name):
        return None
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return None
        if (path / "adapter_config.json").is_file():
            return (
                f"'{name}' is a LoRA adapter, not a base model; give the model it was trained "
                "from (its adapter_config.json names it)"
            )
        return f"'{name}' is a directory but not a model: it has no config.json"
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return None
        return f"'{name}' is a file but not a model: expected a model directory or a .gguf file"
    if _looks_like_path(name):
        return f"'{name}': no such file or directory"
    if not _HUB_ID.match(name):
        return f"'{name}' is neither a local path nor a hub id like 'org/name'"
    close = difflib.get_close_matches(name.lower(), [b.lower() for b in BUILTIN_MODELS], n=1)
    if "/" not in name and close:
        suggestion = builtin_name(close[0])
        return f"'{name}' is not a local path; did you mean the built-in '{suggestion}'?"
    return None


def resolve_model(name: str) -> ModelRef:
    """Classify a checked ``base_model`` string."""
    if builtin_name(name):
        return ModelRef("builtin", builtin_name(name))
    path = Path(name).expanduser()
    if path.is_dir():
        return ModelRef("hf_dir", str(path.resolve()))
    if path.is_file():
        return ModelRef("gguf", str(path.resolve()))
    return ModelRef("hub", name)


def same_model(a: str, b: str) -> bool:
    """Whether two model names or paths point at the same model."""
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


REGISTRY = "dataset_info.json"


def split_paths(path: str) -> list[str]:
    """A comma-separated ``path`` into its parts. Names after ``dataset_info.json:name``
    (``dataset_info.json:a,b``) stay with it: they select registry entries."""
    parts: list[str] = []
    for part in (p.strip() for p in path.split(",")):
        if not part:
            continue
        selecting = parts and f"{REGISTRY}:" in parts[-1]
        if selecting and "/" not in part and "." not in part and not Path(part).exists():
            parts[-1] += f",{part}"
        else:
            parts.append(part)
    return parts


def data_path_problem(path: str) -> str | None:
    """Why a dataset ``path`` names nothing readable, or None (hub ids are checked on load).

    A path may be a comma-separated list of files, directories, quoted globs, a
    ``dataset_info.json`` (optionally ``:name,name``) and hub ids (optionally ``:split``);
    or it is one database URL (read with the entry's ``query``).
    """
    if database_kind(path):
        return database_problem(path)
    for part in split_paths(path):
        if database_kind(part):
            return (
                f"'{redact(part)}': a database URL is the whole path of a datasets entry, "
                "with its query; give it an entry of its own"
            )
        base = part.rpartition(":")[0] if f"{REGISTRY}:" in part else part
        if any(ch in base for ch in "*?["):
            if not any(
                Path(m).is_file() for m in glob.glob(str(Path(base).expanduser()), recursive=True)
            ):
                return f"'{part}': no files match this pattern"
            continue
        p = Path(base).expanduser()
        if p.is_file() and p.suffix.lower() not in DATA_SUFFIXES:
            return f"'{part}': unsupported file type '{p.suffix}'; use {', '.join(DATA_SUFFIXES)}"
        if p.exists():
            continue
        if _looks_like_path(base):
            return f"'{part}': no such file or directory"
        if not _HUB_ID.match(base.partition(":")[0]):
            return f"'{part}' is neither a local file nor a hub dataset id like 'org/name'"
    return None


# --- databases ------------------------------------------------------------------------

DATABASE_EXAMPLES = "sqlite:////abs/path/rows.db or postgresql://user:password@host/db"
# the schema checks a dataset's path and query with these (it cannot import this module)
database_kind = DatasetSource.database_kind
select_problem = DatasetSource.select_problem


def sqlite_file(url: str) -> Path:
    """The file of ``sqlite:///relative.db`` or ``sqlite:////absolute.db``."""
    return Path(url.strip().split("://", 1)[1][1:]).expanduser()


def database_problem(url: str) -> str | None:
    """Why a database URL cannot be read, or None (PostgreSQL is reached only on load)."""
    kind, shown = database_kind(url), f"'{redact(url.strip())}'"
    if kind == "other":
        return f"{shown}: tunelab reads SQLite and PostgreSQL databases only ({DATABASE_EXAMPLES})"
    if is_masked(url):
        return (
            f"{shown}: the password in this URL was masked ({MASK}) when the config was saved; "
            "give the whole URL again"
        )
    if kind == "sqlite":
        rest = url.strip().split("://", 1)[1]
        if not rest.startswith("/") or rest in ("/", "/:memory:") or "?" in rest:
            return (
                f"{shown}: expected sqlite:///relative/file.db or sqlite:////absolute/file.db "
                "(a database file, no ?options: tunelab opens it read-only itself)"
            )
        file = sqlite_file(url)
        if not file.is_file():
            return f"{shown}: no such SQLite database file {file}"
        return None
    try:
        parts = urlsplit(url.strip())
        parts.port  # noqa: B018 -- raises on a port that is not a number
    except ValueError as exc:
        return f"{shown}: not a valid database URL ({exc})"
    if not parts.path.strip("/"):
        return f"{shown}: names no database; expected postgresql://user:password@host/database"
    return None
