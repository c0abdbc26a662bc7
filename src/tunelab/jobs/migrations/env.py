"""Alembic's entry point for the job store: migrations run on the connection tunelab hands
over (``config.attributes["connection"]``), never on a URL read from an ini file."""

from alembic import context

from tunelab.jobs.db import Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying
)
with context.begin_transaction():
    context.run_migrations()
