"""The PostgreSQL store (DB_URL): connections, the pool the daemon uses, and the schema.

The SQL of switchdb is written once, in SQLite's `?` style; `PgConnection` is the thin
dialect layer that turns it into psycopg's (`%s`) and maps the few SQLite-only statements
(`BEGIN IMMEDIATE`). Only the schema and the usage write (`usage.record_rows`, which must stay
exact with several replicas writing at once) have PostgreSQL text of their own.

psycopg is used from worker threads (`trio.to_thread.run_sync`): its async API runs on asyncio
only, not on Trio, and a blocking call on a worker thread keeps the event loop free while a
query waits on the network.
"""
from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

import psycopg
import psycopg_pool
import trio

from common.errors import ErrorCode, SwitchError

log = logging.getLogger(__name__)

T = TypeVar("T")

# How long a request waits for a pooled connection (PostgreSQL down or restarting) before its
# batch is answered INTERNAL_DB_UNAVAILABLE, which switchd retries.
POOL_TIMEOUT_S = 2.0
CONNECT_TIMEOUT_S = 5
# Every replica takes this advisory lock around a migration: two starting at once apply it once.
MIGRATION_LOCK = 0x5357_4442  # "SWDB"


def is_postgres_url(url: str | None) -> bool:
    return bool(url) and urlsplit(url or "").scheme in ("postgresql", "postgres")


def redact_url(url: str) -> str:
    """The URL without its password (and query, which may carry one), for logs and messages."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        netloc = f"{user}:***@{host}" if ":" in userinfo else f"{user}@{host}"
    return f"{parts.scheme}://{netloc}{parts.path}"


@functools.lru_cache(maxsize=1024)
def translate(sql: str) -> str:
    """SQLite-style SQL as psycopg's: `?` placeholders to `%s`, a literal `%` doubled."""
    if sql.startswith("BEGIN IMMEDIATE"):
        return "BEGIN"
    return re.sub(r"\?", "%s", sql.replace("%", "%%"))


class PgConnection:
    """A psycopg connection (autocommit: transactions are explicit, as on SQLite) taking switchdb's SQL."""

    dialect = "postgresql"

    def __init__(self, raw: psycopg.Connection[Any]) -> None:
        self.raw = raw

    def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> psycopg.Cursor[Any]:
        return self.raw.execute(translate(sql), params)

    def close(self) -> None:
        self.raw.close()


def connect(url: str) -> PgConnection:
    """One connection (CLI, migrations, copy); raises INTERNAL_DB_UNAVAILABLE naming the host, never the password."""
    try:
        raw = psycopg.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)
    except psycopg.Error as exc:
        raise SwitchError(
            ErrorCode.INTERNAL_DB_UNAVAILABLE, f"cannot connect to DB_URL {redact_url(url)}: {_first_line(exc)}"
        ) from None
    return PgConnection(raw)


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


class PgDatabase:
    """The daemon's pool: `run(fn, *args)` calls `fn(conn, *args)` in a worker thread on a pooled connection.

    A connection broken by a PostgreSQL restart is dropped by the pool and replaced (the server
    tries a batch that failed that way once more).
    """

    def __init__(self, url: str, size: int = 4) -> None:
        self._pool = psycopg_pool.ConnectionPool(
            url,
            min_size=1,
            max_size=size,
            kwargs={"autocommit": True, "connect_timeout": CONNECT_TIMEOUT_S},
            timeout=POOL_TIMEOUT_S,
            # No check on checkout (a round trip per request): a connection broken by a restart
            # fails its batch, is dropped by the pool, and the batch is tried once more.
            open=False,
            name="switchdb",
        )
        self._limiter = trio.CapacityLimiter(size)

    def open(self) -> None:
        self._pool.open(wait=False)

    def close(self) -> None:
        self._pool.close()

    def call(self, fn: Callable[..., T], *args: object) -> T:
        with self._pool.connection() as raw:
            return fn(PgConnection(raw), *args)

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """Not abandoned on cancel: a started commit finishes."""
        return await trio.to_thread.run_sync(self.call, fn, *args, limiter=self._limiter)


# --- schema -----------------------------------------------------------------------------------
# PostgreSQL's text of the migrations of switchdb.db.MIGRATIONS that need one (same names);
# a migration missing here runs its SQLite step, which must then be SQL both take. Counts are
# BIGINT (64 bits, as SQLite's integers), times the same fixed-format UTC text.

_CREATE_ACCOUNTS = """CREATE TABLE IF NOT EXISTS accounts (
    id TEXT PRIMARY KEY,
    email TEXT NOT NULL,
    plan_name TEXT NOT NULL,
    token_remaining BIGINT NOT NULL DEFAULT 0,
    topup_remaining BIGINT NOT NULL DEFAULT 0,
    status TEXT NOT NULL DEFAULT 'active',
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
)"""
# SQLite's email is UNIQUE COLLATE NOCASE (ASCII case folding): the same with lower().
_ACCOUNTS_EMAIL = "CREATE UNIQUE INDEX IF NOT EXISTS accounts_email ON accounts (lower(email))"

_CREATE_API_KEYS = """CREATE TABLE IF NOT EXISTS api_keys (
    key_hash TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts(id),
    key_indicator TEXT NOT NULL,
    label TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL,
    expires_at TEXT,
    last_used_at TEXT
)"""

_CREATE_SESSIONS = """CREATE TABLE IF NOT EXISTS sessions (
    account_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    type TEXT NOT NULL CHECK (type IN ('SESSION', 'CONV')),
    data TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (account_id, session_id, type)
)"""

_CREATE_USAGE = """CREATE TABLE IF NOT EXISTS usage_metrics (
    id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    batch_id TEXT NOT NULL UNIQUE,
    account_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    provider TEXT NOT NULL,
    model TEXT NOT NULL,
    input_tokens BIGINT NOT NULL,
    output_tokens BIGINT NOT NULL,
    transcription_tokens BIGINT NOT NULL,
    input_text BIGINT NOT NULL,
    input_audio BIGINT NOT NULL,
    input_image BIGINT NOT NULL,
    input_cached BIGINT NOT NULL,
    output_text BIGINT NOT NULL,
    output_audio BIGINT NOT NULL,
    transcription_seconds DOUBLE PRECISION NOT NULL,
    reports BIGINT NOT NULL,
    total_tokens BIGINT NOT NULL,
    created_at TEXT NOT NULL
)"""

MIGRATIONS: dict[str, tuple[str, ...]] = {
    "0001_create_accounts": (_CREATE_ACCOUNTS, _ACCOUNTS_EMAIL),
    "0002_create_api_keys": (
        _CREATE_API_KEYS,
        "CREATE INDEX IF NOT EXISTS api_keys_account ON api_keys(account_id)",
        "CREATE INDEX IF NOT EXISTS api_keys_indicator ON api_keys(key_indicator)",
    ),
    "0003_create_sessions": (_CREATE_SESSIONS,),
    "0004_create_usage_metrics": (
        _CREATE_USAGE,
        "CREATE INDEX IF NOT EXISTS usage_metrics_account ON usage_metrics(account_id)",
    ),
    "0005_api_keys_revoked_at": ("ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS revoked_at TEXT",),
}


def lock_migrations(conn: PgConnection) -> None:
    """Inside a transaction: wait for any other replica migrating; released at its end."""
    conn.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK,))
