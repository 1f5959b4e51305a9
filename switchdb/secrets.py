"""Client secrets (`ek_…`): minted for a usable key of an account with credits, stored hashed.

A secret is `ek_` + 43 URL-safe characters (256 random bits); only its sha256 hex is stored,
with the account, the hash of the key that minted it, its expiry and its session config.
It opens sessions until it expires (a started session outlives it) and is usable only while
the key that minted it is: revoking or expiring that key ends its secrets too, by the join.
The SQL is the same on SQLite and PostgreSQL (`CREATE_STATEMENTS`, migration `MIGRATION`).
"""
from __future__ import annotations

import json
import secrets as _random
from datetime import UTC, datetime, timedelta
from typing import Any

import attrs

from common.errors import ErrorCode, SwitchError
from common.merge import deep_merge
from switchdb import accounts, sessions
from switchdb.db import Connection, TIME_FORMAT, format_time

SECRET_PREFIX = "ek_"
MIGRATION = "0007_client_secrets"
CREATE_STATEMENTS = (
    """CREATE TABLE IF NOT EXISTS client_secrets (
        secret_hash TEXT PRIMARY KEY,
        account_id TEXT NOT NULL REFERENCES accounts(id),
        key_hash TEXT NOT NULL REFERENCES api_keys(key_hash),
        session_json TEXT NOT NULL,
        created_at TEXT NOT NULL,
        expires_at TEXT NOT NULL,
        revoked_at TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS client_secrets_key ON client_secrets(key_hash)",
)
# Top-level fields of a secret's config that a session.update never carries (the model is in the URL).
_NOT_IN_UPDATE = frozenset({"id", "object", "expires_at", "model", "client_secret"})


def create_table(conn: Connection) -> None:
    """The migration step (both stores take these statements as they are)."""
    for statement in CREATE_STATEMENTS:
        conn.execute(statement)


def _parse_time(text: str) -> datetime:
    return datetime.strptime(text, TIME_FORMAT).replace(tzinfo=UTC)


def mint(conn: Connection, api_key: str, seconds: int, session_json: str, now: str) -> tuple[str, str, str, str]:
    """A new secret for the key's account: (plaintext, expires_at unix seconds, account id, credits).

    Raises EXTERNAL_INVALID_AUTH (unknown, revoked or expired key; a secret cannot mint another),
    EXTERNAL_NO_CREDITS, EXTERNAL_BAD_PARAMS (expiry or config out of shape).
    """
    if api_key.startswith(SECRET_PREFIX):
        raise SwitchError(ErrorCode.EXTERNAL_INVALID_AUTH, "a client secret cannot mint client secrets")
    if not 10 <= seconds <= 7200:
        raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, "a secret lives 10 to 7200 seconds")
    try:
        config = json.loads(session_json) if session_json else {}
    except ValueError:
        raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, "session_json is not JSON") from None
    if not isinstance(config, dict):
        raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, "session_json must be an object")
    account, key_hash = accounts.find_usable_key(conn, api_key, now)
    if account.credits <= 0:
        raise SwitchError(ErrorCode.EXTERNAL_NO_CREDITS, "no credits left")
    plaintext = SECRET_PREFIX + _random.token_urlsafe(32)
    expires = _parse_time(now) + timedelta(seconds=seconds)
    conn.execute(
        "INSERT INTO client_secrets (secret_hash, account_id, key_hash, session_json, created_at, expires_at)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (accounts.hash_key(plaintext), account.id, key_hash, json.dumps(config), now, format_time(expires)),
    )
    accounts.mark_keys_used(conn, [key_hash], now)
    return plaintext, str(int(expires.timestamp())), account.id, str(account.credits)


def find_usable_secret(
    conn: Connection, plaintext: str, now: str, allow_expired: bool = False
) -> tuple[accounts.Account, str, str]:
    """(account, hash of the minting key, session config JSON) of a usable secret. Reads only.

    Raises EXTERNAL_INVALID_AUTH for an unknown, revoked or expired secret, for a secret whose
    key is revoked or expired, and for an inactive account. `allow_expired` is for the sessions
    a secret started, which outlive it.
    """
    rows = conn.execute(
        "SELECT s.expires_at, s.revoked_at, s.session_json, k.key_hash, k.expires_at, k.revoked_at,"
        " a.id, a.email, a.plan_name, a.token_remaining, a.topup_remaining, a.status, a.created_at"
        " FROM client_secrets s JOIN api_keys k ON k.key_hash = s.key_hash JOIN accounts a ON a.id = s.account_id"
        " WHERE s.secret_hash = ?",
        (accounts.hash_key(plaintext),),
    ).fetchall()
    if not rows:
        raise SwitchError(ErrorCode.EXTERNAL_INVALID_AUTH, "unknown client secret")
    expires_at, revoked_at, config, key_hash, key_expires, key_revoked, *account_row = rows[0]
    if revoked_at is not None:
        raise SwitchError(ErrorCode.EXTERNAL_INVALID_AUTH, "revoked client secret")
    if expires_at <= now and not allow_expired:
        raise SwitchError(ErrorCode.EXTERNAL_INVALID_AUTH, "expired client secret")
    if key_revoked is not None or (key_expires is not None and key_expires <= now):
        raise SwitchError(ErrorCode.EXTERNAL_INVALID_AUTH, "the key that minted this client secret is not usable")
    account = accounts.Account(*account_row)
    if account.status != accounts.ACTIVE:
        raise SwitchError(ErrorCode.EXTERNAL_INVALID_AUTH, "account is not active")
    return account, key_hash, config


def revoke(conn: Connection, api_key: str, secret: str, now: str) -> None:
    """Revoke a secret with the key that minted it; EXTERNAL_NOT_FOUND for any other secret."""
    _, key_hash = accounts.find_usable_key(conn, api_key, now)
    changed = conn.execute(
        "UPDATE client_secrets SET revoked_at = ? WHERE secret_hash = ? AND key_hash = ? AND revoked_at IS NULL",
        (now, accounts.hash_key(secret), key_hash),
    ).rowcount
    if not changed:
        raise SwitchError(ErrorCode.EXTERNAL_NOT_FOUND, "no such client secret of this key")


def apply_config(restore: str, config_json: str) -> str:
    """The first session.update of a secret's session: the stored one (restore) under the secret's config.

    The secret's fields win; instructions it fixes keep the restored conversation after them. A
    transcription secret starts from its own config alone (a conversation does not apply).
    """
    config: dict[str, Any] = json.loads(config_json) if config_json else {}
    if not config:
        return restore
    fixed = {k: v for k, v in config.items() if k not in _NOT_IN_UPDATE}
    if config.get("type") == "transcription" or not restore:
        return json.dumps({"type": "session.update", "session": fixed})
    update = json.loads(restore)
    stored = update.get("session") if isinstance(update.get("session"), dict) else {}
    merged = deep_merge(stored, fixed)
    base = stored.get("instructions")
    if isinstance(fixed.get("instructions"), str) and isinstance(base, str) and sessions.MARKER in base:
        merged["instructions"] = fixed["instructions"] + sessions.MARKER + base.partition(sessions.MARKER)[2]
    return json.dumps({"type": "session.update", "session": merged})


def load(conn: Connection, secret: str, session_id: str, now: str) -> tuple[accounts.Account, str, str]:
    """VALIDATE_AND_LOAD for a secret: (account, minting key's hash, restore with the secret's config)."""
    account, key_hash, config = find_usable_secret(conn, secret, now)
    stored, conversation = sessions.load(conn, account.id, session_id)
    return account, key_hash, apply_config(sessions.restored_session(stored, conversation), config)


# --- the operator's view (switchdb secret list / revoke) ------------------------------------------

@attrs.frozen
class SecretInfo:
    """A stored secret as an operator sees it: its id is the sha256 hex of the plaintext (never stored)."""

    id: str
    account_id: str
    key_indicator: str  # of the key that minted it
    type: str  # realtime or transcription
    created_at: str
    expires_at: str
    revoked_at: str | None

    def state(self, now: str) -> str:
        return "revoked" if self.revoked_at else ("expired" if self.expires_at <= now else "active")

    def as_json(self, now: str) -> dict[str, object]:
        return {**attrs.asdict(self), "state": self.state(now)}


_INFO = ("SELECT s.secret_hash, s.account_id, k.key_indicator, s.session_json, s.created_at, s.expires_at,"
         " s.revoked_at FROM client_secrets s JOIN api_keys k ON k.key_hash = s.key_hash")


def _info(row: tuple[Any, ...]) -> SecretInfo:
    secret_hash, account_id, indicator, session_json, created_at, expires_at, revoked_at = row
    try:
        kind = str(json.loads(session_json).get("type") or "realtime")
    except (ValueError, AttributeError):
        kind = "realtime"
    return SecretInfo(secret_hash, account_id, indicator, kind, created_at, expires_at, revoked_at)


def list_secrets(conn: Connection, account_id: str) -> list[SecretInfo]:
    """An account's secrets, newest first."""
    rows = conn.execute(_INFO + " WHERE s.account_id = ? ORDER BY s.created_at DESC, s.secret_hash",
                        (account_id,)).fetchall()
    return [_info(tuple(row)) for row in rows]


def secret_id(secret_or_id: str) -> str:
    """The id of a secret named by its plaintext (`ek_…`) or by its id; EXTERNAL_BAD_PARAMS for anything else."""
    if secret_or_id.startswith(SECRET_PREFIX):
        return accounts.hash_key(secret_or_id)
    if len(secret_or_id) == 64 and all(c in "0123456789abcdef" for c in secret_or_id.lower()):
        return secret_or_id.lower()
    shown = secret_or_id if len(secret_or_id) <= 12 else secret_or_id[:12] + "..."
    raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS,
                      f"{shown!r} is neither a client secret (ek_...) nor a secret id (64 hex digits)")


def revoke_secret(conn: Connection, secret_or_id: str, now: str) -> SecretInfo:
    """Revoke one secret (the operator's: whichever key minted it); a revoked one stays as it was.

    Its sessions and calls end at their next check (CHECK_SECRET); EXTERNAL_NOT_FOUND for an unknown one.
    """
    wanted = secret_id(secret_or_id)
    conn.execute("UPDATE client_secrets SET revoked_at = ? WHERE secret_hash = ? AND revoked_at IS NULL",
                 (now, wanted))
    row = conn.execute(_INFO + " WHERE s.secret_hash = ?", (wanted,)).fetchone()
    if row is None:
        raise SwitchError(ErrorCode.EXTERNAL_NOT_FOUND, f"no client secret {wanted}")  # the id, never a plaintext
    return _info(tuple(row))
