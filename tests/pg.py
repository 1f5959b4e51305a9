"""A throwaway PostgreSQL server for the tests (the `pgserver` wheel's binaries), one database per test.

The server starts once per test run, on a Unix socket in a fresh directory, and is deleted at
exit. Each test gets a database of its own, dropped afterwards.

Test modules use the fixtures by importing them: `from tests.pg import pg_url, store_kind  # noqa: F401`.
"""
from __future__ import annotations

import itertools
import os
import tempfile
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest

from switchdb import db, pg

_lock = threading.Lock()
_server: Any = None
_names = itertools.count()
STORES = ["sqlite", "postgresql"]


def server_url(database: str = "postgres") -> str:
    """The URL of `database` on the run's server, starting the server on first use."""
    global _server
    # platformdirs warns that there is no XDG_RUNTIME_DIR here, which is fine.
    with _lock, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if _server is None:
            import pgserver

            _server = pgserver.get_server(tempfile.mkdtemp(prefix="rs-pg-"), cleanup_mode="delete")
        return str(_server.get_uri(database))


def create_database() -> str:
    """A new empty database: its URL."""
    name = f"t{os.getpid()}_{next(_names)}"
    with psycopg.connect(server_url(), autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    return server_url(name)


def drop_database(url: str) -> None:
    name = urlsplit(url).path.lstrip("/")
    with psycopg.connect(server_url(), autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@contextmanager
def fresh_database() -> Iterator[str]:
    url = create_database()
    try:
        yield url
    finally:
        drop_database(url)


@pytest.fixture
def pg_url() -> Iterator[str]:
    with fresh_database() as url:
        yield url


@pytest.fixture(params=STORES)
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def store_env(kind: str, tmp_path: Path, pg: str | None) -> dict[str, str]:
    """DB_PATH or DB_URL for a daemon or the CLI on this store."""
    if kind == "postgresql":
        assert pg is not None
        return {"DB_URL": pg}
    return {"DB_PATH": str(tmp_path / "db.sqlite")}


@pytest.fixture
def store_url(store_kind: str) -> Iterator[str | None]:
    """A fresh PostgreSQL database's URL for the postgresql store, None for sqlite."""
    if store_kind == "sqlite":
        yield None
        return
    with fresh_database() as url:
        yield url


def open_conn(kind: str, tmp_path: Path, url: str | None, name: str = "db.sqlite") -> db.Connection:
    """A migrated connection to the store."""
    conn = pg.connect(url) if kind == "postgresql" and url else db.open_database(str(tmp_path / name), None)
    db.migrate(conn)
    return conn
