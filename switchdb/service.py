"""What switchdb does with each request, over the three stores; no sockets here.

`run_batch` runs many requests in one transaction inside the database worker thread: each
in a savepoint of its own, except runs of usage batches, recorded together (one code path for
usage: `usage.record_rows`); `read_record` turns a RECORD_USAGE's frames into its row on the
event loop. `handle_reads` answers read-only requests on a second, reading
connection. `run_summariser` is the background task that shortens long conversations.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

import trio

from common.errors import ErrorCode, SwitchError
from common.usage import UsageTotals
from common.wire import MAX_MESSAGE_BYTES, OK, MessageType, Request, decode_request
from switchdb import accounts, calls, leases, ledger, prices, secrets, sessions, summarise, usage
from switchdb.db import Connection, format_time, is_postgres, is_transient, savepoint, transaction
from switchdb.worker import Store

log = logging.getLogger(__name__)

SESSION_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# After a failed summary, the next try waits until the conversation has grown this much, so a
# broken LLM is not called again on every append.
RETRY_GROWTH = 4_000
# A summary claim outlives the longest LLM call, so an abandoned one frees itself.
CLAIM_S = summarise.TIMEOUT_S + 30


class Outcome(NamedTuple):
    """What became of a request (a tuple: one is made per request, tens of thousands a second)."""

    status: str = OK
    fields: tuple[str, ...] = ()
    message: str = ""
    summarise: bool = False  # the conversation has outgrown the injected context


_NO_OUTCOME = Outcome(ErrorCode.INTERNAL_ERROR, message="not handled")



def _load_validated(conn: Connection, api_key: str, session_id: str, now: str) -> tuple[Outcome, str]:
    """VALIDATE_AND_LOAD without its one write: (outcome, hash of the key to mark used)."""
    if not SESSION_ID.fullmatch(session_id):
        raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, "session id must be 1-128 characters of A-Za-z0-9._:-")
    if api_key.startswith(secrets.SECRET_PREFIX):
        account, key_hash, restore = secrets.load(conn, api_key, session_id, now)
        row = conn.execute("SELECT unit, markup FROM accounts WHERE id = ?", (account.id,)).fetchone()
        if row is not None and row[0] != account.unit:
            account = dataclasses.replace(account, unit=str(row[0]), markup=int(row[1]))
    else:
        account, key_hash, found = accounts.find_usable_key_and_session(conn, api_key, session_id, now)
        stored, conversation = found.get(sessions.SESSION), found.get(sessions.CONV)
        restore = sessions.restored_session(stored, conversation)
    fields: tuple[str, ...] = (account.id, str(account.credits), restore)
    if account.unit == ledger.USD:
        # A USD account's balance is nano-USD; switchd prices its reports by this book and markup
        # (a token account's reply keeps today's three fields).
        fields += (ledger.USD, str(account.markup), prices.book_json(prices.load_book(conn)))
    if account.credits <= 0:
        return Outcome(ErrorCode.EXTERNAL_NO_CREDITS, fields, "no credits left"), key_hash
    return Outcome(OK, fields), key_hash


def validate_and_load(conn: Connection, api_key: str, session_id: str, now: str) -> Outcome:
    outcome, key_hash = _load_validated(conn, api_key, session_id, now)
    accounts.mark_keys_used(conn, [key_hash], now)
    return outcome


# Requests that only read (but for VALIDATE_AND_LOAD marking its key used, which can follow).
READ_ONLY = frozenset({MessageType.VALIDATE_AND_LOAD, MessageType.GET_CREDITS})


def handle_reads(
    conn: Connection, requests: Sequence[Request], now: str, in_transaction: bool = True
) -> tuple[list[Outcome], list[str]]:
    """READ_ONLY requests in one read transaction: (outcomes, hashes of keys to mark used).

    For a reading connection used off the worker thread: it sees what is committed, so the
    caller must have nothing of its own uncommitted. A database error (busy) is raised, to
    run the requests the ordinary way instead. Without `in_transaction` (PostgreSQL, where
    each statement commits by itself) the two round trips of BEGIN and COMMIT are saved.
    """
    outcomes: list[Outcome] = []
    used: list[str] = []
    if in_transaction:
        conn.execute("BEGIN")
    try:
        for request in requests:
            try:
                if request.type is MessageType.VALIDATE_AND_LOAD:
                    outcome, key_hash = _load_validated(conn, request.args[0], request.args[1], now)
                    used.append(key_hash)
                elif request.type is MessageType.GET_CREDITS:
                    outcome = Outcome(OK, (str(usage.get_credits(conn, request.args[0])),))
                else:
                    raise ValueError(f"{request.type} is not read-only")
            except SwitchError as exc:
                outcome = Outcome(exc.code, message=exc.message)
            outcomes.append(outcome)
    finally:
        if in_transaction:
            conn.execute("COMMIT")
    return outcomes, used


def mark_keys_used(conn: Connection, key_hashes: list[str], now: str) -> None:
    """The write that `handle_reads` leaves out, in a transaction of its own (worker thread).

    On PostgreSQL each key's one UPDATE commits by itself: no BEGIN and COMMIT round trips.
    """
    if is_postgres(conn):
        accounts.mark_keys_used(conn, key_hashes, now)
        return
    with transaction(conn):
        accounts.mark_keys_used(conn, key_hashes, now)


def read_row(
    batch_id: str, account_id: str, session_id: str, provider: str, model: str, usage_json: str
) -> usage.Row:
    """A RECORD_USAGE's arguments as its usage row, usage_json read strictly; raises INTERNAL_BAD_USAGE.

    Pure (no database): the server reads usage on the event loop as requests arrive, so the
    worker thread gets ready rows and holds the GIL as little as possible.
    """
    row = usage.canonical_row(batch_id, account_id, session_id, provider, model, usage_json)
    if row is not None:
        return row
    return usage.usage_row(batch_id, account_id, session_id, provider, model, UsageTotals.from_json(usage_json))


def read_usage(request: Request) -> usage.Row:
    """`read_row` of a decoded RECORD_USAGE."""
    return read_row(*request.args)


_RECORD_USAGE = MessageType.RECORD_USAGE.value.encode()


def read_record(frames: Sequence[bytes]) -> usage.Row:
    """`read_usage(decode_request(frames))` for a RECORD_USAGE's frames (request id, type, 6 arguments).

    The same row and the same refusals, without the Request in between: this is the reader's
    path for every usage batch.
    """
    try:
        if len(frames) != 8 or frames[1] != _RECORD_USAGE or sum(map(len, frames)) > MAX_MESSAGE_BYTES:
            raise ValueError
        frames[0].decode()  # the id goes back as its bytes, but must be text like every frame
        args = (frames[2].decode(), frames[3].decode(), frames[4].decode(), frames[5].decode(), frames[6].decode(),
                frames[7].decode())
    except (ValueError, AttributeError):  # wrong shape, not UTF-8, or buffers: decode_request says which
        request = decode_request(frames)
        if request.type is not MessageType.RECORD_USAGE:
            raise ValueError(f"{request.type} is not RECORD_USAGE") from None
        return read_usage(request)
    return read_row(*args)


def handle(conn: Connection, request: Request, now: str) -> Outcome:
    """One request, inside the caller's transaction; raises SwitchError for a refusal."""
    args = request.args
    match request.type:
        case MessageType.VALIDATE_AND_LOAD:
            return validate_and_load(conn, args[0], args[1], now)
        case MessageType.GET_CREDITS:
            return Outcome(OK, (str(usage.get_credits(conn, args[0])),))
        case MessageType.RECORD_USAGE:
            (result,) = usage.record_rows(conn, [read_usage(request)], now)
            if isinstance(result, SwitchError):
                raise result
            return _usage_result(result)  # type: ignore[return-value]
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
        case MessageType.MINT_SECRET:
            return Outcome(OK, secrets.mint(conn, args[0], int(args[1]) if args[1].isdigit() else 0, args[2], now))
        case MessageType.CHECK_SECRET:
            secrets.find_usable_secret(conn, args[0], now, allow_expired=True)
            return Outcome()
        case MessageType.SECRET_CONFIG:
            return Outcome(OK, (secrets.find_usable_secret(conn, args[0], now)[2],))
        case MessageType.LEASE:
            held, wanted = leases.parse_amount(args[2]), leases.parse_amount(args[3])
            return Outcome(OK, (str(leases.lease(conn, args[0], args[1], wanted, held=held)),))
        case MessageType.SAVE_CALL:
            calls.save(conn, args[0], args[1], args[2], now)
            return Outcome()
        case MessageType.CALL_OWNER:
            return Outcome(OK, (calls.owner(conn, args[0], args[1], now),))
        case MessageType.REVOKE_SECRET:
            secrets.revoke(conn, args[0], args[1], now)
            return Outcome()
    raise SwitchError(ErrorCode.INTERNAL_UNKNOWN_TYPE, f"no handler for {request.type}")


def _handle_one(conn: Connection, request: Request, now: str) -> Outcome:
    """One request in its own savepoint, so a refusal (or a failure) undoes only itself."""
    try:
        with savepoint(conn):
            return handle(conn, request, now)
    except SwitchError as exc:
        return Outcome(exc.code, message=exc.message)
    except Exception as exc:
        if is_transient(exc):  # the whole batch is answered INTERNAL_DB_UNAVAILABLE and retried
            raise
        log.exception("%s failed", request.type)
        return Outcome(ErrorCode.INTERNAL_ERROR, message="internal error")


# What became of each request of a batch: an Outcome, or for a recorded usage row simply the
# balance after it (an int, the one field of its OK reply: nothing to build per row).
Result = Outcome | int


def _usage_result(recorded: int | SwitchError | usage.Charged) -> Result:
    if isinstance(recorded, SwitchError):
        return Outcome(recorded.code, message=recorded.message)
    if type(recorded) is usage.Charged:  # a USD account's: unit, markup and cost follow the balance
        return Outcome(OK, recorded.fields())
    return recorded  # type: ignore[return-value]


def _record(conn: Connection, run: list[tuple[int, usage.Row]], results: list[Result], now: str) -> None:
    """Consecutive usage rows in one savepoint; if that fails, each again alone, to isolate the failure."""
    try:
        with savepoint(conn):
            recorded = usage.record_rows(conn, [row for _, row in run], now)
    except Exception as exc:
        if is_transient(exc):
            raise
        if len(run) > 1:
            for item in run:
                _record(conn, [item], results, now)
            return
        log.exception("%s failed", MessageType.RECORD_USAGE)
        results[run[0][0]] = Outcome(ErrorCode.INTERNAL_ERROR, message="internal error")
        return
    for (i, _), result in zip(run, recorded, strict=True):
        results[i] = _usage_result(result)


def run_batch(conn: Connection, requests: Sequence[Request | usage.Row], now: str) -> list[Result]:
    """All requests in one transaction, in order; a refusal undoes only itself.

    RECORD_USAGE may come already read (`read_record`, `read_usage`) as a `usage.Row`; its
    result is then the balance after it. Consecutive usage rows are recorded together by
    `usage.record_rows` (a fixed number of statements however many there are); any other
    request runs alone in its own savepoint. A batch of usage rows only (what a flood brings)
    needs no savepoint at all.
    """
    if all(type(request) is tuple for request in requests):
        # Only usage rows, the shape of a flood: no savepoint (two statements fewer, each a GIL
        # hand-off). Should anything fail, the transaction is undone and the general way below
        # finds which row it was.
        conn.execute("BEGIN IMMEDIATE")
        try:
            recorded = usage.record_rows(conn, requests, now)  # type: ignore[arg-type]
        except BaseException as exc:
            conn.execute("ROLLBACK")
            if not isinstance(exc, Exception) or is_transient(exc):
                raise
            log.debug("a batch of %d usage rows failed; recording them one by one", len(requests))
        else:
            conn.execute("COMMIT")  # a failure here is the caller's, as for any batch
            return [_usage_result(result) for result in recorded]
    results: list[Result] = [_NO_OUTCOME] * len(requests)
    run: list[tuple[int, usage.Row]] = []
    with transaction(conn):
        for i, request in enumerate(requests):
            if type(request) is Request:
                if request.type is not MessageType.RECORD_USAGE:
                    if run:
                        _record(conn, run, results, now)
                        run = []
                    results[i] = _handle_one(conn, request, now)
                    continue
                try:
                    request = read_usage(request)
                except SwitchError as exc:
                    results[i] = Outcome(exc.code, message=exc.message)
                    continue
            run.append((i, request))  # type: ignore[arg-type]
        if run:
            _record(conn, run, results, now)
    return results


def _replace_head(conn: Connection, account_id: str, session_id: str, head: str, replacement: str) -> bool:
    with transaction(conn):
        return sessions.replace_conversation_head(conn, account_id, session_id, head, replacement)


async def summarise_conversation(
    db: Store, url: str, api_key: str, account_id: str, session_id: str, conversation: str
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


def _claim(conn: Connection, account_id: str, session_id: str) -> bool:
    now = datetime.now(UTC)
    until = format_time(now + timedelta(seconds=CLAIM_S))
    with transaction(conn):
        return sessions.claim_summary(conn, account_id, session_id, format_time(now), until)


def _release(conn: Connection, account_id: str, session_id: str) -> None:
    with transaction(conn):
        sessions.release_summary(conn, account_id, session_id)


async def run_summariser(
    db: Store, url: str, api_key: str, requests: trio.MemoryReceiveChannel[tuple[str, str]]
) -> None:
    """Summarise the conversations named on `requests`, at most one at a time per session.

    Across replicas too: a summary starts only under a claim in the store (`summary_claims`),
    which expires by itself should its replica die.
    """
    busy: set[tuple[str, str]] = set()
    retry_after: dict[tuple[str, str], int] = {}

    async def summarise_one(key: tuple[str, str]) -> None:
        account_id, session_id = key
        try:
            conversation = await db.run(sessions.get_conversation, account_id, session_id)
            if conversation is None or len(conversation) <= max(sessions.MAX_CONTEXT_CHARS, retry_after.get(key, 0)):
                return
            if not await db.run(_claim, account_id, session_id):
                return  # another replica is summarising it
            try:
                replaced = await summarise_conversation(db, url, api_key, account_id, session_id, conversation)
            except SwitchError as exc:
                retry_after[key] = len(conversation) + RETRY_GROWTH
                log.warning("conversation summary failed: %s", exc.message, extra={"account": account_id})
                return
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    try:
                        await db.run(_release, account_id, session_id)
                    except Exception:  # the claim expires by itself
                        log.warning("could not release a summary claim", extra={"account": account_id})
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
