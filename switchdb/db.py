"""The store: the SQLite file (with SQLCipher when a key is set) or PostgreSQL (`switchdb.pg`),
opening it, transactions, the schema, and which errors are worth a retry.

The schema is built by ordered migrations recorded in `schema_migrations`. Each one checks its
own preconditions (IF NOT EXISTS, a column lookup), so running it again, or from two processes
at once (daemon and CLI), is harmless; on PostgreSQL each also runs under an advisory lock, so
replicas starting together apply it once.
"""
from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from typing import Any

import sqlcipher3

from common.config import Settings
from common.errors import ErrorCode, SwitchError

# psycopg (and switchdb.pg) are imported only with DB_URL: they would double the start-up time
# of every SQLite CLI command.

log = logging.getLogger(__name__)

# A sqlcipher3 connection or a `pg.PgConnection`: both take the same (SQLite-style) SQL.
Connection = Any
DatabaseError = sqlcipher3.DatabaseError  # SQLite's; `is_database_error` knows both stores'
# SQLite errors that say nothing about the batch itself: the disk, the file, the lock.
_TRANSIENT_SQLITE = ("SQLITE_FULL", "SQLITE_IOERR", "SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_CANTOPEN", "SQLITE_NOMEM")

# How long a writer waits for another process (the CLI next to the daemon) to release the lock.
BUSY_TIMEOUT_MS = 5000
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def utc_now() -> str:
    """Timestamps are fixed-format UTC text, so they compare correctly as strings in SQL."""
    return datetime.now(UTC).strftime(TIME_FORMAT)


def format_time(moment: datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime(TIME_FORMAT)


def open_database(path: str, key: str | None) -> Connection:
    """Open (creating if needed) the database; a wrong or missing key fails here, not later.

    One connection serves the whole daemon from one worker thread at a time, hence
    check_same_thread=False; transactions are explicit (isolation_level=None).
    """
    try:
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # cached_statements: room for every size of usage insert (usage.INSERT_ROWS) besides the rest.
        conn = sqlcipher3.connect(path, check_same_thread=False, isolation_level=None, cached_statements=256)
        # SQLCipher otherwise writes its own HMAC failure lines straight to stderr.
        conn.execute("PRAGMA cipher_log_level = NONE")
    except (OSError, sqlcipher3.Error) as exc:
        raise SwitchError(ErrorCode.INTERNAL_BAD_CONFIG, f"cannot open DB_PATH {path}: {exc}") from None
    try:
        if key:
            conn.execute("PRAGMA key = " + _quote(key))
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except DatabaseError:
            if key:
                message = f"cannot open {path}: wrong DB_ENCRYPTION_KEY, or the file is not an encrypted database"
            else:
                message = f"cannot open {path}: the file is encrypted (set DB_ENCRYPTION_KEY) or is not a database"
            raise SwitchError(ErrorCode.INTERNAL_DB_ENCRYPTION, message) from None
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        if path != ":memory:":
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                log.warning("could not switch %s to WAL (journal_mode=%s)", path, mode)
        # In WAL mode NORMAL never corrupts and survives a process crash; only a power cut can
        # lose the last commits, a trade the throughput target needs.
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
    except BaseException:
        conn.close()
        raise
    return conn


def open_store(settings: Settings) -> Connection:
    """One connection to the configured store: PostgreSQL when DB_URL is set, else SQLite at DB_PATH."""
    if settings.db_url:
        from switchdb import pg

        if not pg.is_postgres_url(settings.db_url):
            raise SwitchError(ErrorCode.INTERNAL_BAD_CONFIG, "config key DB_URL must be a postgresql:// URL")
        return pg.connect(settings.db_url)
    return open_database(settings.db_path, settings.db_encryption_key)


def store_name(settings: Settings) -> str:
    """The store as it may be logged: DB_URL without its password, or DB_PATH."""
    if settings.db_url:
        from switchdb import pg

        return pg.redact_url(settings.db_url)
    return settings.db_path


def is_postgres(conn: Connection) -> bool:
    return getattr(conn, "dialect", "") == "postgresql"


def _psycopg() -> Any:
    """psycopg if it is in use (imported); no psycopg error can exist otherwise."""
    return sys.modules.get("psycopg")


def is_database_error(exc: BaseException) -> bool:
    psycopg = _psycopg()
    return isinstance(exc, sqlcipher3.DatabaseError) or (psycopg is not None and isinstance(exc, psycopg.Error))


def is_unique_violation(exc: BaseException, column: str) -> bool:
    psycopg = _psycopg()
    if psycopg is not None and isinstance(exc, psycopg.errors.UniqueViolation):
        return column in str(exc)
    return isinstance(exc, sqlcipher3.IntegrityError) and "UNIQUE" in str(exc) and column in str(exc)


def is_transient(exc: BaseException) -> bool:
    """True for a storage failure (disk full, I/O error, lock, lost connection): the request may succeed later.

    Such an error must never turn into a refusal: the request is answered INTERNAL_DB_UNAVAILABLE
    and switchd keeps it and retries.
    """
    psycopg = _psycopg()
    if psycopg is not None and isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)):
        return True  # connection lost, pool timeout, disk full, deadlock, serialisation, shutdown
    if isinstance(exc, sqlcipher3.OperationalError):
        name = getattr(exc, "sqlite_errorname", "") or ""
        text = str(exc)
        return name.startswith(_TRANSIENT_SQLITE) or any(
            marker in text for marker in ("disk is full", "disk I/O", "locked", "unable to open")
        )
    return False


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


@contextmanager
def transaction(conn: Connection) -> Iterator[None]:
    """One write transaction, taken at once so a busy database waits here rather than failing later."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


@contextmanager
def savepoint(conn: Connection) -> Iterator[None]:
    """A nested unit inside a transaction: a failure undoes only its own writes."""
    conn.execute("SAVEPOINT unit")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK TO unit")
        conn.execute("RELEASE unit")
        raise
    conn.execute("RELEASE unit")


def _columns(conn: Connection, table: str) -> set[str]:
    return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}


def _create_accounts(conn: Connection) -> None:
    conn.execute(
        """CREATE TABLE IF NOT EXISTS accounts (
            id TEXT PRIMARY KEY,
            email TEXT NOT NULL UNIQUE COLLATE NOCASE,
            plan_name TEXT NOT NULL,
            token_remaining INTEGER NOT NULL DEFAULT 0,
            topup_remaining INTEGER NOT NULL DEFAULT 0,
            status TEXT NOT NULL DEFAULT 'active',
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        )"""
    )


def _create_api_keys(conn: Connection) -> None:
    conn.execute(
        """CREATE TABLE IF NOT EXISTS api_keys (
            key_hash TEXT PRIMARY KEY,
            account_id TEXT NOT NULL REFERENCES accounts(id),
            key_indicator TEXT NOT NULL,
            label TEXT NOT NULL DEFAULT '',
            created_at TEXT NOT NULL,
            expires_at TEXT,
            last_used_at TEXT
        )"""
    )
    conn.execute("CREATE INDEX IF NOT EXISTS api_keys_account ON api_keys(account_id)")
    conn.execute("CREATE INDEX IF NOT EXISTS api_keys_indicator ON api_keys(key_indicator)")


def _create_sessions(conn: Connection) -> None:
    conn.execute(
        """CREATE TABLE IF NOT EXISTS sessions (
            account_id TEXT NOT NULL,
            session_id TEXT NOT NULL,
            type TEXT NOT NULL CHECK (type IN ('SESSION', 'CONV')),
            data TEXT NOT NULL,
            created_at TEXT NOT NULL,
            PRIMARY KEY (account_id, session_id, type)
        )"""
    )


def _create_usage_metrics(conn: Connection) -> None:
    conn.execute(
        """CREATE TABLE IF NOT EXISTS usage_metrics (
            id INTEGER PRIMARY KEY,
            batch_id TEXT NOT NULL UNIQUE,
            account_id TEXT NOT NULL,
            session_id TEXT NOT NULL,
            provider TEXT NOT NULL,
            model TEXT NOT NULL,
            input_tokens INTEGER NOT NULL,
            output_tokens INTEGER NOT NULL,
            transcription_tokens INTEGER NOT NULL,
            input_text INTEGER NOT NULL,
            input_audio INTEGER NOT NULL,
            input_image INTEGER NOT NULL,
            input_cached INTEGER NOT NULL,
            output_text INTEGER NOT NULL,
            output_audio INTEGER NOT NULL,
            transcription_seconds REAL NOT NULL,
            reports INTEGER NOT NULL,
            total_tokens INTEGER NOT NULL,
            created_at TEXT NOT NULL
        )"""
    )
    conn.execute("CREATE INDEX IF NOT EXISTS usage_metrics_account ON usage_metrics(account_id)")


def _add_api_keys_revoked_at(conn: Connection) -> None:
    # Revoked keys are kept (with the time) so `key list` and audits still show them.
    if "revoked_at" not in _columns(conn, "api_keys"):
        conn.execute("ALTER TABLE api_keys ADD COLUMN revoked_at TEXT")


def _create_summary_claims(conn: Connection) -> None:
    # With several replicas, the one holding an unexpired claim summarises a conversation.
    conn.execute(
        """CREATE TABLE IF NOT EXISTS summary_claims (
            account_id TEXT NOT NULL,
            session_id TEXT NOT NULL,
            claimed_until TEXT NOT NULL,
            PRIMARY KEY (account_id, session_id)
        )"""
    )


def _create_client_secrets(conn: Connection) -> None:
    from switchdb import secrets  # it builds on this module

    secrets.create_table(conn)


def _ledger(module: str, function: str) -> Callable[[Connection], None]:
    """A migration step of a switchdb module that builds on this one (prices, ledger, leases, calls)."""

    def step(conn: Connection) -> None:
        import importlib

        getattr(importlib.import_module(f"switchdb.{module}"), function)(conn)

    return step


MIGRATIONS: list[tuple[str, Callable[[Connection], None]]] = [
    ("0001_create_accounts", _create_accounts),
    ("0002_create_api_keys", _create_api_keys),
    ("0003_create_sessions", _create_sessions),
    ("0004_create_usage_metrics", _create_usage_metrics),
    ("0005_api_keys_revoked_at", _add_api_keys_revoked_at),
    ("0006_summary_claims", _create_summary_claims),
    ("0007_client_secrets", _create_client_secrets),  # SQL both stores take
    # The ledger (issue 16): each step takes both stores itself.
    ("0008_ledger_prices", _ledger("prices", "create_tables")),
    ("0009_ledger_accounts", _ledger("ledger", "migrate_accounts")),
    ("0010_ledger_usage_cost", _ledger("ledger", "migrate_usage_cost")),
    ("0011_ledger_credit_entries", _ledger("ledger", "create_entries")),
    ("0012_balance_leases", _ledger("leases", "create_table")),  # SQL both stores take
    ("0013_call_owners", _ledger("calls", "create_table")),  # SQL both stores take
]


def migrate(conn: Connection) -> list[str]:
    """Apply the migrations not yet recorded; returns the names applied now."""
    postgres = is_postgres(conn)
    if postgres:
        from switchdb import pg
    with transaction(conn):
        if postgres:
            pg.lock_migrations(conn)  # concurrent CREATE TABLE IF NOT EXISTS can fail on PostgreSQL
        conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)")
    applied: list[str] = []
    for name, step in MIGRATIONS:
        with transaction(conn):
            if postgres:
                pg.lock_migrations(conn)
            if conn.execute("SELECT 1 FROM schema_migrations WHERE name = ?", (name,)).fetchone():
                continue
            if postgres and name in pg.MIGRATIONS:
                for statement in pg.MIGRATIONS[name]:
                    conn.execute(statement)
            else:  # SQLite, or a step written in SQL both stores take
                step(conn)
            conn.execute("INSERT INTO schema_migrations (name, applied_at) VALUES (?, ?)", (name, utc_now()))
        applied.append(name)
        log.info("applied migration %s", name)
    return applied


def applied_migrations(conn: Connection) -> list[str]:
    return [row[0] for row in conn.execute("SELECT name FROM schema_migrations ORDER BY name")]
