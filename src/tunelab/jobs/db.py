"""The job store's tables (SQLAlchemy 2) and how a store is opened: SQLite in the lab by
default, PostgreSQL when ``TUNELAB_DB`` names one, migrated to the current schema by Alembic
on opening. No torch here: the worker and the server use this module."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Engine,
    ForeignKey,
    Integer,
    String,
    Text,
    TypeDecorator,
    create_engine,
    event,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from tunelab.errors import TunelabError
from tunelab.redact import redact

MIGRATIONS = Path(__file__).parent / "migrations"
BUSY_TIMEOUT_MS = 30_000


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """A moment in UTC: stored without a zone (SQLite keeps none), read back as aware."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("store times in UTC, with their zone")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    pass


class TemplateRow(Base):
    """A saved, validated training config that jobs can be queued from."""

    __tablename__ = "templates"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    config: Mapped[dict] = mapped_column(JSON)
    description: Mapped[str | None] = mapped_column(Text)
    source: Mapped[str | None] = mapped_column(Text)  # the file or run it was saved from
    created: Mapped[datetime] = mapped_column(UTCDateTime)
    updated: Mapped[datetime] = mapped_column(UTCDateTime)


class JobRow(Base):
    """One queued piece of work and where it stands."""

    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    kind: Mapped[str] = mapped_column(String(20), default="train")
    state: Mapped[str] = mapped_column(String(20), index=True)
    config: Mapped[dict] = mapped_column(JSON)
    run_dir: Mapped[str] = mapped_column(Text)
    template: Mapped[str | None] = mapped_column(String(100))
    group: Mapped[str | None] = mapped_column("group_name", String(200), index=True)
    request_id: Mapped[str | None] = mapped_column(String(200), unique=True)
    owner: Mapped[str | None] = mapped_column(String(200))
    model_id: Mapped[str | None] = mapped_column(String(200))
    retry_of: Mapped[int | None] = mapped_column(Integer)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    secrets: Mapped[str | None] = mapped_column(Text)  # encrypted; wiped when the job ends
    worker: Mapped[str | None] = mapped_column(String(200))
    host: Mapped[str | None] = mapped_column(String(200))
    device: Mapped[str | None] = mapped_column(String(50))
    pid: Mapped[int | None] = mapped_column(Integer)
    pid_started: Mapped[str | None] = mapped_column(String(40))  # tells a reused pid apart
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    exit_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    hint: Mapped[str | None] = mapped_column(Text)
    result: Mapped[dict | None] = mapped_column(JSON)
    created: Mapped[datetime] = mapped_column(UTCDateTime)
    started: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished: Mapped[datetime | None] = mapped_column(UTCDateTime)


class EventRow(Base):
    """A change of a job's state (or a request on it), with its time and reason."""

    __tablename__ = "job_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    from_state: Mapped[str | None] = mapped_column(String(20))
    state: Mapped[str] = mapped_column(String(20))
    reason: Mapped[str] = mapped_column(Text)
    worker: Mapped[str | None] = mapped_column(String(200))


def _sqlite_pragmas(engine: Engine) -> None:
    # Python's sqlite3 opens transactions lazily and a reader that later writes can fail
    # with "database is locked" at once; every transaction here begins IMMEDIATE instead,
    # so writers queue on the busy timeout.
    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def database_url(url: str) -> str:
    """``postgresql://`` as psycopg 3 (the driver tunelab installs); others as given."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise TunelabError(
            f"TUNELAB_DB is not a database URL: {redact(url)}",
            "use postgresql://USER:PASSWORD@HOST/DB or sqlite:////path/to/lab.db",
        ) from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise TunelabError(
            f"the job store runs on SQLite or PostgreSQL, not {parsed.get_backend_name()}",
            "use postgresql://... in TUNELAB_DB, or leave it unset for the lab's SQLite file",
        )
    return parsed.render_as_string(hide_password=False)


def open_engine(url: str) -> Engine:
    """An engine on the store at ``url``, its schema migrated to this version's."""
    url = database_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000})
        _sqlite_pragmas(engine)
    else:
        engine = create_engine(url, pool_pre_ping=True, pool_size=2, max_overflow=4)
    try:
        migrate(engine)
    except OperationalError as exc:
        engine.dispose()
        first = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        raise TunelabError(
            f"cannot open the job store {redact(engine.url.render_as_string())}: {redact(first)}",
            "check that the database server runs and the URL in TUNELAB_DB is right",
        ) from None
    return engine


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[Any]:
    """One process at a time migrates: a file lock beside an SQLite file, an advisory lock
    on PostgreSQL (held for the migration's transaction)."""
    if engine.dialect.name == "sqlite":
        database = engine.url.database or ""
        lock = Path(database + ".migrate-lock") if database else None
        with engine.connect() as connection:
            if lock is None:
                yield connection
                return
            with open(lock, "a") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                yield connection
        return
    with engine.begin() as connection:
        connection.execute(text("SELECT pg_advisory_xact_lock(727365)"))  # "tunelab" store
        yield connection


def migrate(engine: Engine) -> None:
    """Bring the store's schema to the newest revision; refuse one newer than this code."""
    from alembic import command
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    script = ScriptDirectory.from_config(config)
    head = script.get_current_head()
    with _migration_lock(engine) as connection:
        current = MigrationContext.configure(connection).get_current_revision()
        if current == head:
            return
        known = {r.revision for r in script.walk_revisions()}
        if current is not None and current not in known:
            raise TunelabError(
                f"the job store was made by a newer tunelab (schema {current})",
                "upgrade tunelab on this machine to the version the other machines run",
            )
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
        if connection.in_transaction():
            connection.commit()
