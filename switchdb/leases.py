"""Balance leases: the part of an account's balance each open session may spend before asking again.

Every session spends against a lease, not against its own copy of the balance, so however many
sessions an account has open, on whichever switchd or replica, together they can only spend what
the account holds, plus the one response each may have under way when its lease runs out.

A lease is set, not added to: a LEASE asks for the session's whole lease (what it has spent and
switchdb has not recorded yet, plus what it wants to spend next) and is granted at most the
account's balance less the other sessions' unexpired leases. A batch recorded before the
session's next LEASE still counts in the lease until then: the error is on the safe side, and
the session renews after every batch. A lease never drops below what its session `held` when it
asked: what it has spent and not had recorded, plus what is left of the lease it was granted
before. So what one session overran is never granted to another, and neither is what it goes on
spending when the answer to a renewal is lost (switchd's request timed out, switchdb set the
lease all the same). A lease not renewed within LEASE_S is void, so the leases of a switchd that
died free themselves; switchd stops spending a lease it could not renew for LEASE_VALID_S, less.
"""
from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from common.errors import ErrorCode, SwitchError
from common.limits import MAX_BALANCE_TOKENS, MAX_BALANCE_USD
from switchdb.db import Connection, format_time, is_postgres

LEASE_S = 30
LEASE_KEY = re.compile(r"[A-Za-z0-9._:-]{1,128}")
MAX_LEASE = max(MAX_BALANCE_TOKENS, MAX_BALANCE_USD)


def create_table(conn: Connection) -> None:
    """SQL both stores take."""
    conn.execute(
        """CREATE TABLE IF NOT EXISTS balance_leases (
            account_id TEXT NOT NULL,
            lease_key TEXT NOT NULL,
            amount BIGINT NOT NULL,
            expires_at TEXT NOT NULL,
            PRIMARY KEY (account_id, lease_key)
        )"""
    )


def parse_amount(text: str) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 19 or int(text) > MAX_LEASE:
        raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, f"a lease is an integer from 0 to {MAX_LEASE}")
    return int(text)


def lease(
    conn: Connection, account_id: str, lease_key: str, wanted: int, now: datetime | None = None, held: int = 0
) -> int:
    """Set the session's lease to at most `wanted` (0 releases it); returns the amount granted.

    `held` is what the session holds already: spent and not recorded yet, plus what is left of its
    lease. The lease keeps at least that, even beyond the balance (a response that overran its
    lease is spent all the same, and the rest was granted before), so no other session is ever
    granted what a session has spent or may still spend without hearing back.

    Inside the caller's transaction. The account's row is locked first (PostgreSQL: FOR UPDATE;
    SQLite's BEGIN IMMEDIATE keeps every other writer out), so two replicas leasing on one
    account, or recording its usage, take turns and each sees the other's lease.
    """
    if not LEASE_KEY.fullmatch(lease_key):
        raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, "a lease key is 1-128 characters of A-Za-z0-9._:-")
    moment = now or datetime.now(UTC)
    lock = " FOR UPDATE" if is_postgres(conn) else ""
    row = conn.execute(
        "SELECT token_remaining + topup_remaining FROM accounts WHERE id = ?" + lock, (account_id,)
    ).fetchone()
    if row is None:
        raise SwitchError(ErrorCode.EXTERNAL_NOT_FOUND, f"no account {account_id}")
    current = format_time(moment)
    conn.execute("DELETE FROM balance_leases WHERE account_id = ? AND expires_at <= ?", (account_id, current))
    (others,) = conn.execute(
        "SELECT coalesce(sum(amount), 0) FROM balance_leases WHERE account_id = ? AND lease_key <> ?",
        (account_id, lease_key),
    ).fetchone()
    if held > wanted:
        raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, "a lease cannot hold more than is wanted")
    granted = max(held, min(wanted, int(row[0]) - int(others)))
    if granted:
        conn.execute(
            "INSERT INTO balance_leases (account_id, lease_key, amount, expires_at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (account_id, lease_key) DO UPDATE SET amount = excluded.amount,"
            " expires_at = excluded.expires_at",
            (account_id, lease_key, granted, format_time(moment + timedelta(seconds=LEASE_S))),
        )
    else:
        conn.execute("DELETE FROM balance_leases WHERE account_id = ? AND lease_key = ?", (account_id, lease_key))
    return granted


def leased(conn: Connection, account_id: str, now: datetime | None = None) -> int:
    """The sum of the account's unexpired leases."""
    (total,) = conn.execute(
        "SELECT coalesce(sum(amount), 0) FROM balance_leases WHERE account_id = ? AND expires_at > ?",
        (account_id, format_time(now or datetime.now(UTC))),
    ).fetchone()
    return int(total)
