"""Accounts and their API keys.

Keys are `rsk_` + 43 URL-safe characters (256 random bits). Only the sha256 hex is stored; the
plaintext exists once, in the answer to `create_key`. The indicator (`rsk_` + 4 characters +
`...` + the last 4) lets an operator recognise a key without holding it. A revoked key keeps
its row with `revoked_at` set.
"""
from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from common.emails import check_email, email_key
from common.errors import ErrorCode, SwitchError
from common.limits import check_amount
from switchdb import ledger
from switchdb.db import Connection, is_unique_violation, utc_now

KEY_PREFIX = "rsk_"
ACCOUNT_PREFIX = "acct_"
PLAN_ALLOWANCES = {"Free": 1_000, "Pro": 50_000, "Enterprise": 500_000}
ACTIVE = "active"


@dataclass(frozen=True, slots=True)
class Account:
    id: str
    email: str
    plan_name: str
    token_remaining: int
    topup_remaining: int
    status: str
    created_at: str
    unit: str = ledger.TOKENS  # what the balance counts: tokens, or nano-USD for "usd"
    markup: int = ledger.DEFAULT_MARKUP  # ten-thousandths: the operator's price over the list price

    @property
    def credits(self) -> int:
        """The balance, in the account's unit (nano-USD for a USD account)."""
        return self.token_remaining + self.topup_remaining

    def as_json(self) -> dict[str, object]:
        data: dict[str, object] = {**asdict(self), "credits": self.credits, "markup": ledger.format_markup(self.markup)}
        if self.unit == ledger.USD:
            data["balance_usd"] = ledger.format_amount(self.unit, self.credits)
        return data


@dataclass(frozen=True, slots=True)
class ApiKey:
    key_hash: str
    account_id: str
    key_indicator: str
    label: str
    created_at: str
    expires_at: str | None
    last_used_at: str | None
    revoked_at: str | None

    def usable(self, now: str) -> bool:
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)

    def as_json(self) -> dict[str, object]:
        return asdict(self)


_ACCOUNT_COLUMNS = "id, email, plan_name, token_remaining, topup_remaining, status, created_at, unit, markup"
_KEY_COLUMNS = "key_hash, account_id, key_indicator, label, created_at, expires_at, last_used_at, revoked_at"


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode()).hexdigest()


def key_indicator(plaintext: str) -> str:
    return f"{plaintext[: len(KEY_PREFIX) + 4]}...{plaintext[-4:]}"


def create_account(
    conn: Connection, email: str, plan: str = "Free", tokens: int | None = None, topup: int = 0,
    *, usd: int | None = None, markup: int = ledger.DEFAULT_MARKUP,
) -> Account:
    """A token account (plan allowance or `tokens`, plus `topup`), or with `usd` (nano-USD) a USD
    account; its opening balance is its first credit entry."""
    if plan not in PLAN_ALLOWANCES:
        raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, f"unknown plan {plan!r} (Free, Pro or Enterprise)")
    check_email(email)
    check_amount("markup", markup)
    if usd is not None:
        if tokens is not None or topup:
            raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, "a USD account takes --usd, not --tokens or --topup")
        unit, plan_part, topup = ledger.USD, check_amount("balance_usd", usd), 0
    else:
        unit = ledger.TOKENS
        plan_part = PLAN_ALLOWANCES[plan] if tokens is None else check_amount("balance_tokens", tokens)
        check_amount("balance_tokens", topup)
        check_amount("balance_tokens", plan_part + topup)
    now = utc_now()
    account = Account(
        id=ACCOUNT_PREFIX + secrets.token_hex(8),
        email=email,
        plan_name=plan,
        token_remaining=plan_part,
        topup_remaining=topup,
        status=ACTIVE,
        created_at=now,
        unit=unit,
        markup=markup,
    )
    try:
        conn.execute(
            f"INSERT INTO accounts ({_ACCOUNT_COLUMNS}, email_key, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (*_account_row(account), email_key(email), now),
        )
    except Exception as exc:
        if is_unique_violation(exc, "email"):
            raise SwitchError(ErrorCode.EXTERNAL_CONFLICT, f"an account with email {email} already exists") from None
        raise
    ledger.add_entry(conn, account.id, "create", account.credits, "account created", now)
    return account


def _account_row(a: Account) -> tuple[object, ...]:
    return (a.id, a.email, a.plan_name, a.token_remaining, a.topup_remaining, a.status, a.created_at, a.unit, a.markup)


def get_account(conn: Connection, account_id: str) -> Account | None:
    row = conn.execute(f"SELECT {_ACCOUNT_COLUMNS} FROM accounts WHERE id = ?", (account_id,)).fetchone()
    return Account(*row) if row else None


def find_account(conn: Connection, id_or_email: str) -> Account:
    """An account by id or email; raises EXTERNAL_NOT_FOUND."""
    row = conn.execute(
        # email_key: the email is unique without regard to case (any script), on both stores.
        f"SELECT {_ACCOUNT_COLUMNS} FROM accounts WHERE id = ? OR email_key = ?", (id_or_email, email_key(id_or_email))
    ).fetchone()
    if row is None:
        raise SwitchError(ErrorCode.EXTERNAL_NOT_FOUND, f"no account {id_or_email}")
    return Account(*row)


def require_account(conn: Connection, account_id: str) -> Account:
    account = get_account(conn, account_id)
    if account is None:
        raise SwitchError(ErrorCode.EXTERNAL_NOT_FOUND, f"no account {account_id}")
    return account


def top_up(conn: Connection, account_id: str, tokens: int, unit: str = ledger.TOKENS) -> Account:
    """Add `tokens` (nano-USD when `unit` is usd: it must be the account's unit) to the top-up part."""
    if type(tokens) is not int or tokens <= 0:
        raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, "a top-up must be a positive amount")
    ledger.credit(conn, account_id, unit, tokens, "topup", "top-up")
    return require_account(conn, account_id)


def create_key(conn: Connection, account_id: str, label: str, expires_at: str | None = None) -> tuple[str, ApiKey]:
    """A new key for the account: (plaintext, stored row). The plaintext is not kept anywhere."""
    require_account(conn, account_id)
    plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(
        key_hash=hash_key(plaintext),
        account_id=account_id,
        key_indicator=key_indicator(plaintext),
        label=label,
        created_at=utc_now(),
        expires_at=expires_at,
        last_used_at=None,
        revoked_at=None,
    )
    conn.execute(
        f"INSERT INTO api_keys ({_KEY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (key.key_hash, key.account_id, key.key_indicator, key.label, key.created_at, key.expires_at, None, None),
    )
    return plaintext, key


def get_key(conn: Connection, key_hash: str) -> ApiKey | None:
    row = conn.execute(f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE key_hash = ?", (key_hash,)).fetchone()
    return ApiKey(*row) if row else None


def list_keys(conn: Connection, account_id: str) -> list[ApiKey]:
    require_account(conn, account_id)
    rows = conn.execute(
        f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE account_id = ? ORDER BY created_at, key_hash", (account_id,)
    )
    return [ApiKey(*row) for row in rows]


def revoke_key(conn: Connection, hash_or_indicator: str) -> ApiKey:
    """Revoke one key named by its hash, its indicator or its plaintext (a leaked key); an indicator
    shared by several keys is refused."""
    if hash_or_indicator.startswith(KEY_PREFIX) and "..." not in hash_or_indicator:
        hash_or_indicator = hash_key(hash_or_indicator)
    rows = conn.execute(
        f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE key_hash = ? OR key_indicator = ?",
        (hash_or_indicator.lower() if len(hash_or_indicator) == 64 else hash_or_indicator, hash_or_indicator),
    ).fetchall()
    if not rows:
        raise SwitchError(ErrorCode.EXTERNAL_NOT_FOUND, f"no key {hash_or_indicator}")  # a hash, never a plaintext
    if len(rows) > 1:
        raise SwitchError(
            ErrorCode.EXTERNAL_CONFLICT,
            f"indicator {hash_or_indicator} matches {len(rows)} keys; revoke by key hash instead",
        )
    key = ApiKey(*rows[0])
    if key.revoked_at is None:
        conn.execute("UPDATE api_keys SET revoked_at = ? WHERE key_hash = ?", (utc_now(), key.key_hash))
        key = get_key(conn, key.key_hash)  # type: ignore[assignment]
    return key


def find_usable_key(conn: Connection, plaintext: str, now: str) -> tuple[Account, str]:
    """(the account behind a usable key, the key's hash); raises EXTERNAL_INVALID_AUTH. Reads only."""
    key_hash = hash_key(plaintext)
    row = conn.execute(
        "SELECT k.expires_at, k.revoked_at, a.id, a.email, a.plan_name, a.token_remaining, a.topup_remaining,"
        " a.status, a.created_at, a.unit, a.markup FROM api_keys k JOIN accounts a ON a.id = k.account_id"
        " WHERE k.key_hash = ?",
        (key_hash,),
    ).fetchall()
    return _usable(row[0] if row else None, now), key_hash


# The key, its account and the session's stored rows in one statement (one round trip to
# PostgreSQL): one row per stored row of the session, or one with NULLs when there is none.
_KEY_AND_SESSION = (
    "SELECT k.expires_at, k.revoked_at, a.id, a.email, a.plan_name, a.token_remaining, a.topup_remaining,"
    " a.status, a.created_at, s.type, s.data, a.unit, a.markup FROM api_keys k JOIN accounts a ON a.id = k.account_id"
    " LEFT JOIN sessions s ON s.account_id = a.id AND s.session_id = ? WHERE k.key_hash = ?"
)


def find_usable_key_and_session(
    conn: Connection, plaintext: str, session_id: str, now: str
) -> tuple[Account, str, dict[str, str]]:
    """`find_usable_key` and the session's stored rows by type (`sessions.load`'s), in one statement."""
    key_hash = hash_key(plaintext)
    rows = conn.execute(_KEY_AND_SESSION, (session_id, key_hash)).fetchall()
    account = _usable((*rows[0][:9], *rows[0][11:13]) if rows else None, now)
    return account, key_hash, {row[9]: row[10] for row in rows if row[9] is not None}


def _usable(row: Sequence[Any] | None, now: str) -> Account:
    """The account of a key's (expires_at, revoked_at, account columns...) row; raises EXTERNAL_INVALID_AUTH."""
    if row is None:
        raise SwitchError(ErrorCode.EXTERNAL_INVALID_AUTH, "unknown key")
    expires_at, revoked_at, *account_row = row
    if revoked_at is not None:
        raise SwitchError(ErrorCode.EXTERNAL_INVALID_AUTH, "revoked key")
    if expires_at is not None and expires_at <= now:
        raise SwitchError(ErrorCode.EXTERNAL_INVALID_AUTH, "expired key")
    account = Account(*account_row)
    if account.status != ACTIVE:
        raise SwitchError(ErrorCode.EXTERNAL_INVALID_AUTH, "account is not active")
    return account


def mark_keys_used(conn: Connection, key_hashes: list[str], now: str) -> None:
    """Set last_used_at; a key already marked at this second is not written again."""
    for key_hash in key_hashes:
        conn.execute(
            "UPDATE api_keys SET last_used_at = ? WHERE key_hash = ? AND (last_used_at IS NULL OR last_used_at <> ?)",
            (now, key_hash, now),
        )


def authenticate(conn: Connection, plaintext: str, now: str) -> Account:
    """The account behind a usable key, marking the key used; raises EXTERNAL_INVALID_AUTH."""
    account, key_hash = find_usable_key(conn, plaintext, now)
    mark_keys_used(conn, [key_hash], now)
    return account
