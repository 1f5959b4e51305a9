"""The database worker: the daemon's one connection, used from one thread at a time."""
from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar

import trio

from switchdb.db import Connection

T = TypeVar("T")


class Store(Protocol):
    """What the daemon runs its SQL through: `Database` (SQLite) or `pg.PgDatabase` (a pool)."""

    async def run(self, fn: Callable[..., T], *args: object) -> T: ...


class Database:
    """The daemon's one connection, used by one worker thread at a time, off the event loop."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._limiter = trio.CapacityLimiter(1)

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """`fn(conn, *args)` in the worker thread. Not abandoned on cancel: a started commit finishes."""
        return await trio.to_thread.run_sync(fn, self.conn, *args, limiter=self._limiter)
