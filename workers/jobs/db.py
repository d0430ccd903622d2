"""Engine, sessions and migrations for the job store (SQLite by default, PostgreSQL via SUBMERGE_DATABASE_URL)."""
from __future__ import annotations

import os
import threading

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "migrations")

_engines: dict[str, Engine] = {}
_guard = threading.Lock()


def normalize_url(url: str) -> str:
    """``postgresql://`` and ``postgres://`` use psycopg 3 (the driver this project installs)."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://"):]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    return url


def get_engine(url: str) -> Engine:
    url = normalize_url(url)
    with _guard:
        engine = _engines.get(url)
        if engine is None:
            engine = _make_engine(url)
            _engines[url] = engine
        return engine


def _make_engine(url: str) -> Engine:
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        if u.database and u.database != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(u.database)), exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()
        return engine
    return create_engine(url, pool_pre_ping=True)


def session_factory(url: str) -> sessionmaker[Session]:
    return sessionmaker(get_engine(url), expire_on_commit=False)


def upgrade(url: str) -> None:
    """Bring the schema to the newest alembic revision (run at API and worker startup)."""
    cfg = Config()
    cfg.set_main_option("script_location", MIGRATIONS)
    engine = get_engine(url)
    with engine.connect() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def dispose_all() -> None:
    with _guard:
        for e in _engines.values():
            e.dispose()
        _engines.clear()
