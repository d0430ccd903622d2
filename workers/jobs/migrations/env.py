"""Alembic environment for the job store. Run programmatically by workers.jobs.db.upgrade(url)
(also usable as `alembic -c workers/jobs/alembic.ini upgrade head` with SUBMERGE_DATABASE_URL set)."""
from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, text

from workers.config import Settings
from workers.jobs.db import normalize_url
from workers.jobs.models import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        url = Settings().db_url
    return normalize_url(url)


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = create_engine(_url())
    try:
        with engine.connect() as conn:
            _run(conn)
    finally:
        engine.dispose()


def _run(conn) -> None:
    if conn.dialect.name == "postgresql":
        # API and workers may start together: one migrates, the others wait, then find nothing to do.
        conn.execute(text("SELECT pg_advisory_lock(72519013)"))
        conn.commit()
    try:
        context.configure(connection=conn, target_metadata=target_metadata, render_as_batch=conn.dialect.name == "sqlite")
        with context.begin_transaction():
            context.run_migrations()
        conn.commit()
    finally:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_unlock(72519013)"))
            conn.commit()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
