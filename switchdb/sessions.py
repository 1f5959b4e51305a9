"""Stored sessions and conversations, and the pure functions that shape them.

Each (account, session) has up to two rows: `SESSION`, a ready-to-send `session.update` JSON
cleaned of what the provider refuses, and `CONV`, the conversation as `user:...`/`agent:...`
lines. A restore appends the conversation to the instructions after `MARKER`; whatever follows
the marker is never saved back, so a session restored N times carries its context once.
"""
from __future__ import annotations

import json
from typing import Any

from common.errors import ErrorCode, SwitchError
from switchdb.db import Connection

MARKER = "\n\nHere is the previous conversation that happened which should be continued now:\n"
OMITTED = "[...earlier context omitted...]\n"
MAX_CONTEXT_CHARS = 32_000
# Top-level fields of `session.updated` that the provider refuses in a `session.update`.
# Only the top level: nested `model` (input transcription), `id` (a stored prompt) or a tool
# parameter named `object` are real configuration.
REFUSED_FIELDS = frozenset({"id", "object", "expires_at", "model", "tracing"})
SESSION = "SESSION"
CONV = "CONV"


def strip_context(instructions: str) -> str:
    """The instructions without any restore-injected context."""
    return instructions.partition(MARKER)[0]


def _drop_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def clean_session(event: object) -> dict[str, Any]:
    """`session.updated` event → `session.update` that can be sent again as is."""
    if not isinstance(event, dict) or not isinstance(event.get("session"), dict):
        raise SwitchError(ErrorCode.INTERNAL_MALFORMED_MESSAGE, "session_updated_json has no session object")
    session = {k: v for k, v in event["session"].items() if k not in REFUSED_FIELDS}
    session = _drop_nulls(session)
    if isinstance(session.get("instructions"), str):
        session["instructions"] = strip_context(session["instructions"])
    return {"type": "session.update", "session": session}


def truncate_conversation(text: str, limit: int = MAX_CONTEXT_CHARS) -> str:
    """The newest `limit` characters, starting at a line start, marked as cut when anything was cut.

    When the last `limit` characters hold no line start at all, they are kept as they are:
    some context beats none.
    """
    if len(text) <= limit:
        return text
    tail = text[-limit:]
    if text[-limit - 1] != "\n":
        newline = tail.find("\n", 0, len(tail) - 1)  # a line start with something after it
        if newline != -1:
            tail = tail[newline + 1 :]
    return OMITTED + tail


def restored_session(stored: str | None, conversation: str | None) -> str:
    """The `session.update` JSON to send first on (re)connect; "" when nothing is stored.

    With only a conversation, a minimal realtime session carries it; its instructions are the
    marker and the context, so that when the provider echoes them back, saving strips them to "".
    """
    if not conversation:
        return stored or ""
    fresh = {"type": "session.update", "session": {"type": "realtime"}}
    update: dict[str, Any] = json.loads(stored) if stored else fresh
    session: dict[str, Any] = update.setdefault("session", {})
    base = session.get("instructions")
    session["instructions"] = strip_context(base if isinstance(base, str) else "") + MARKER + truncate_conversation(
        conversation
    )
    return json.dumps(update, ensure_ascii=False, separators=(",", ":"))


def save_session(conn: Connection, account_id: str, session_id: str, session_updated_json: str, now: str) -> None:
    try:
        event = json.loads(session_updated_json)
    except (ValueError, RecursionError):
        raise SwitchError(ErrorCode.INTERNAL_MALFORMED_MESSAGE, "session_updated_json is not JSON") from None
    data = json.dumps(clean_session(event), ensure_ascii=False, separators=(",", ":"))
    conn.execute(
        "INSERT INTO sessions (account_id, session_id, type, data, created_at) VALUES (?, ?, 'SESSION', ?, ?)"
        " ON CONFLICT (account_id, session_id, type) DO UPDATE SET data = excluded.data",
        (account_id, session_id, data, now),
    )


def put_session_update(conn: Connection, account_id: str, session_id: str, update: dict[str, Any], now: str) -> bool:
    """Store a `session.update` unless one exists (for seeding); True when stored."""
    return bool(
        conn.execute(
            "INSERT INTO sessions (account_id, session_id, type, data, created_at) VALUES (?, ?, 'SESSION', ?, ?)"
            " ON CONFLICT DO NOTHING",
            (account_id, session_id, json.dumps(update, ensure_ascii=False, separators=(",", ":")), now),
        ).rowcount
    )


def append_conversation(conn: Connection, account_id: str, session_id: str, text: str, now: str) -> int:
    """Append to the conversation; returns its length in characters afterwards.

    A NUL character (which PostgreSQL text cannot hold) is stored as U+FFFD, on both stores alike.
    """
    text = text.replace("\x00", "\ufffd")
    (length,) = conn.execute(
        "INSERT INTO sessions (account_id, session_id, type, data, created_at) VALUES (?, ?, 'CONV', ?, ?)"
        " ON CONFLICT (account_id, session_id, type) DO UPDATE SET data = sessions.data || excluded.data"
        " RETURNING length(data)",
        (account_id, session_id, text, now),
    ).fetchone()
    return int(length)


def load(conn: Connection, account_id: str, session_id: str) -> tuple[str | None, str | None]:
    """(stored session.update JSON, conversation) of one session; None for what is missing."""
    found = dict(
        conn.execute(
            "SELECT type, data FROM sessions WHERE account_id = ? AND session_id = ?", (account_id, session_id)
        ).fetchall()
    )
    return found.get(SESSION), found.get(CONV)


def get_conversation(conn: Connection, account_id: str, session_id: str) -> str | None:
    row = conn.execute(
        "SELECT data FROM sessions WHERE account_id = ? AND session_id = ? AND type = 'CONV'", (account_id, session_id)
    ).fetchone()
    return row[0] if row else None


def replace_conversation_head(conn: Connection, account_id: str, session_id: str, head: str, replacement: str) -> bool:
    """Replace the text `head` that the conversation starts with, keeping whatever was appended after it.

    False (and nothing changed) when the conversation no longer starts with `head`. One
    statement, so an append committed meanwhile by another replica is never lost.
    """
    return bool(
        conn.execute(
            "UPDATE sessions SET data = ? || substr(data, ?) WHERE account_id = ? AND session_id = ? AND type = 'CONV'"
            " AND substr(data, 1, ?) = ?",
            (replacement, len(head) + 1, account_id, session_id, len(head), head),
        ).rowcount
    )


def claim_summary(conn: Connection, account_id: str, session_id: str, now: str, until: str) -> bool:
    """Take the right to summarise this conversation until `until`, unless another holds it; True when taken."""
    return bool(
        conn.execute(
            "INSERT INTO summary_claims (account_id, session_id, claimed_until) VALUES (?, ?, ?)"
            " ON CONFLICT (account_id, session_id) DO UPDATE SET claimed_until = excluded.claimed_until"
            " WHERE summary_claims.claimed_until <= ?",
            (account_id, session_id, until, now),
        ).rowcount
    )


def release_summary(conn: Connection, account_id: str, session_id: str) -> None:
    conn.execute("DELETE FROM summary_claims WHERE account_id = ? AND session_id = ?", (account_id, session_id))
