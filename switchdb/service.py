"""What switchdb does with each request, over the three stores; no sockets here.

`handle_batch` runs many requests in one transaction (a savepoint each) inside the database
worker thread. `run_summariser` is the background task that shortens long conversations.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from common.errors import ErrorCode, SwitchError
from common.usage import UsageTotals
from common.wire import OK, MessageType, Request
from switchdb import accounts, sessions, summarise, usage
from switchdb.db import Connection, savepoint, transaction
from switchdb.worker import Database

log = logging.getLogger(__name__)

SESSION_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# After a failed summary, the next try waits until the conversation has grown this much, so a
# broken LLM is not called again on every append.
RETRY_GROWTH = 4_000


@dataclass(frozen=True, slots=True)
class Outcome:
    status: str = OK
    fields: tuple[str, ...] = ()
    message: str = ""
    summarise: bool = False  # the conversation has outgrown the injected context


def validate_and_load(conn: Connection, api_key: str, session_id: str, now: str) -> Outcome:
    if not SESSION_ID.fullmatch(session_id):
        raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, "session id must be 1-128 characters of A-Za-z0-9._:-")
    account = accounts.authenticate(conn, api_key, now)
    stored, conversation = sessions.load(conn, account.id, session_id)
    fields = (account.id, str(account.credits), sessions.restored_session(stored, conversation))
    if account.credits <= 0:
        return Outcome(ErrorCode.EXTERNAL_NO_CREDITS, fields, "no credits left")
    return Outcome(OK, fields)


def handle(conn: Connection, request: Request, now: str) -> Outcome:
    """One request, inside the caller's transaction; raises SwitchError for a refusal."""
    args = request.args
    match request.type:
        case MessageType.VALIDATE_AND_LOAD:
            return validate_and_load(conn, args[0], args[1], now)
        case MessageType.GET_CREDITS:
            return Outcome(OK, (str(usage.get_credits(conn, args[0])),))
        case MessageType.RECORD_USAGE:
            batch_id, account_id, session_id, provider, model, usage_json = args
            totals = UsageTotals.from_json(usage_json)
            credits = usage.record_usage(conn, batch_id, account_id, session_id, provider, model, totals, now)
            return Outcome(OK, (str(credits),))
        case MessageType.SAVE_SESSION:
            accounts.require_account(conn, args[0])
            sessions.save_session(conn, args[0], args[1], args[2], now)
            return Outcome()
        case MessageType.APPEND_CONVERSATION:
            accounts.require_account(conn, args[0])
            length = sessions.append_conversation(conn, args[0], args[1], args[2], now)
            return Outcome(summarise=length > sessions.MAX_CONTEXT_CHARS)
        case MessageType.PING:
            return Outcome()
    raise SwitchError(ErrorCode.INTERNAL_UNKNOWN_TYPE, f"no handler for {request.type}")


def handle_batch(conn: Connection, requests: Sequence[Request], now: str) -> list[Outcome]:
    """All requests in one transaction; each in its own savepoint, so a refusal undoes only itself."""
    outcomes: list[Outcome] = []
    with transaction(conn):
        for request in requests:
            try:
                with savepoint(conn):
                    outcomes.append(handle(conn, request, now))
            except SwitchError as exc:
                outcomes.append(Outcome(exc.code, message=exc.message))
            except Exception:
                log.exception("%s failed", request.type)
                outcomes.append(Outcome(ErrorCode.INTERNAL_ERROR, message="internal error"))
    return outcomes


def _replace_head(conn: Connection, account_id: str, session_id: str, head: str, replacement: str) -> bool:
    with transaction(conn):
        return sessions.replace_conversation_head(conn, account_id, session_id, head, replacement)


async def summarise_conversation(
    db: Database, url: str, api_key: str, account_id: str, session_id: str, conversation: str
) -> bool:
    """Replace the conversation's complete lines by an LLM summary; True when replaced.

    Text appended while the LLM works stays after the summary, and so does a line still being
    written (only complete lines are sent). Raises SwitchError when the LLM fails.
    """
    head = conversation[: conversation.rfind("\n") + 1] or conversation
    summary = await trio.to_thread.run_sync(summarise.summarise, url, api_key, head, abandon_on_cancel=True)
    if len(summary) >= len(head):
        raise SwitchError(ErrorCode.INTERNAL_ERROR, f"summary ({len(summary)} chars) is not shorter than the text")
    return await db.run(_replace_head, account_id, session_id, head, summary + "\n")


async def run_summariser(
    db: Database, url: str, api_key: str, requests: trio.MemoryReceiveChannel[tuple[str, str]]
) -> None:
    """Summarise the conversations named on `requests`, at most one at a time per session."""
    busy: set[tuple[str, str]] = set()
    retry_after: dict[tuple[str, str], int] = {}

    async def summarise_one(key: tuple[str, str]) -> None:
        account_id, session_id = key
        try:
            conversation = await db.run(sessions.get_conversation, account_id, session_id)
            if conversation is None or len(conversation) <= max(sessions.MAX_CONTEXT_CHARS, retry_after.get(key, 0)):
                return
            try:
                replaced = await summarise_conversation(db, url, api_key, account_id, session_id, conversation)
            except SwitchError as exc:
                retry_after[key] = len(conversation) + RETRY_GROWTH
                log.warning("conversation summary failed: %s", exc.message, extra={"account": account_id})
                return
            retry_after.pop(key, None)
            if replaced:
                log.info("conversation summarised (%d chars before)", len(conversation), extra={"account": account_id})
            else:
                log.info("conversation changed during its summary; summary dropped", extra={"account": account_id})
        finally:
            busy.discard(key)

    async with requests, trio.open_nursery() as nursery:
        async for key in requests:
            if key not in busy:
                busy.add(key)
                nursery.start_soon(summarise_one, key)
