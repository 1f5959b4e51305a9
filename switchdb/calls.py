"""Who made each WebRTC call (issue 17): so that any switchd worker can hang a call up for its owner.

A call runs on the switchd worker that created it, but its client's hangup may reach another
worker of the same port (SO_REUSEPORT) or another switchd. Each call is recorded here when it
starts, keyed by the provider's call id, with its account; `owner` answers a hangup: the call's
account when the key (or client secret) asking is one of that account's, else EXTERNAL_NOT_FOUND,
so that another account cannot even learn that the call exists. Records older than KEEP_S are
dropped as new calls are recorded (a call lasts an hour at most at the provider).
The SQL is the same on SQLite and PostgreSQL.
"""
from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from common.errors import ErrorCode, SwitchError
from switchdb import accounts, secrets
from switchdb.db import Connection, TIME_FORMAT, format_time

MIGRATION = "0013_call_owners"
KEEP_S = 24 * 3600
CALL_ID = re.compile(r"rtc_[A-Za-z0-9_-]{1,128}")  # as switchd.http_api accepts them
CREATE_STATEMENTS = (
    """CREATE TABLE IF NOT EXISTS call_owners (
        call_id TEXT PRIMARY KEY,
        account_id TEXT NOT NULL REFERENCES accounts(id),
        session_id TEXT NOT NULL,
        created_at TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS call_owners_created ON call_owners(created_at)",
)
NOT_FOUND = "No session found for the provided call_id"  # the provider's words


def create_table(conn: Connection) -> None:
    """The migration step (both stores take these statements as they are)."""
    for statement in CREATE_STATEMENTS:
        conn.execute(statement)


def save(conn: Connection, call_id: str, account_id: str, session_id: str, now: str) -> None:
    """Record a new call's owner; a call id already recorded keeps its first owner (EXTERNAL_CONFLICT)."""
    if not CALL_ID.fullmatch(call_id):
        raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, "not a call id")
    accounts.require_account(conn, account_id)
    cutoff = format_time(datetime.strptime(now, TIME_FORMAT).replace(tzinfo=UTC) - timedelta(seconds=KEEP_S))
    conn.execute("DELETE FROM call_owners WHERE created_at < ?", (cutoff,))
    inserted = conn.execute(
        "INSERT INTO call_owners (call_id, account_id, session_id, created_at) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (call_id) DO NOTHING",
        (call_id, account_id, session_id, now),
    ).rowcount
    if not inserted:
        raise SwitchError(ErrorCode.EXTERNAL_CONFLICT, "this call id is already recorded")


def owner(conn: Connection, api_key: str, call_id: str, now: str) -> str:
    """The account of `call_id` when `api_key` (a key, or a client secret) is one of its usable keys. Reads only.

    EXTERNAL_INVALID_AUTH for a key that is not usable (a secret that started a call may have
    expired since: a started call outlives its secret, and so does its hangup);
    EXTERNAL_NOT_FOUND for a call never recorded or of another account.
    """
    if api_key.startswith(secrets.SECRET_PREFIX):
        account = secrets.find_usable_secret(conn, api_key, now, allow_expired=True)[0]
    else:
        account = accounts.find_usable_key(conn, api_key, now)[0]
    row = conn.execute("SELECT account_id FROM call_owners WHERE call_id = ?", (call_id,)).fetchone()
    if row is None or row[0] != account.id:
        raise SwitchError(ErrorCode.EXTERNAL_NOT_FOUND, NOT_FOUND)
    return account.id
