"""The switchdb daemon: a ZeroMQ ROUTER in front of the store.

One reader task drains the socket a burst at a time, decodes the requests (a RECORD_USAGE
straight into the row it will be stored as) and queues each burst as one chunk on a bounded
channel (PING and malformed messages are answered on the spot). One handler task takes
everything queued, and what the reader brings while it keeps finding more, up to MAX_BATCH;
runs it in the database worker thread as one transaction; then sends the replies in bursts:
grouping is what makes the throughput, and the event loop never waits on a write. While the
worker thread runs SQL (without the GIL), the reader goes on reading the next batch. Every
turn of the event loop is kept short (bursts of READ_BURST/REPLY_BURST, a short GIL switch
interval, little Python in the worker thread), so a PING waits at most about a burst for the
reader whenever the loop has a core.

The one exception, for latency: a small batch of reads only (VALIDATE_AND_LOAD, GET_CREDITS),
with everything received before it already committed, is answered on the event loop through a
second, reading connection (WAL: it never waits for the writer; busy_timeout 0: it never waits
at all, a busy read goes to the worker thread). That saves the two thread hops, most of such a
request's round trip; the one write VALIDATE_AND_LOAD makes (the key's last_used_at) follows
in the worker thread.

With DB_URL (PostgreSQL) there is no reading connection: every batch goes through the pool
(`pg.PgDatabase`) in a worker thread, and several replicas may serve the same database. A
batch that fails for a storage reason (disk full, I/O error, connection lost) is answered
INTERNAL_DB_UNAVAILABLE: nothing of it was stored, and switchd keeps it and retries.

SIGTERM/SIGINT cancel only the reader; the handler drains the queue, commits and the replies
go out before the socket closes.
"""
from __future__ import annotations

import errno
import gc
import logging
import math
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator

import trio
import zmq

from common.config import Settings
from common.errors import ErrorCode, SwitchError
from common.wire import (
    MAX_MESSAGE_BYTES,
    NO_REPLY,
    OK,
    MessageType,
    Request,
    decode_request,
    encode_reply,
)
from common.zmq_trio import ZmqSocket
from switchdb import service
from switchdb.db import Connection, DatabaseError, is_transient, migrate, open_database, store_name, utc_now
from switchdb.usage import Row as UsageRow
from switchdb.worker import Database, Store

log = logging.getLogger(__name__)

# Requests per database transaction (a batch can end up one chunk above it). Bigger batches
# amortise the transaction better, but the worker thread holds the GIL for its Python part of a
# batch (about 5 µs a request), which the event loop then waits for.
MAX_BATCH = 256
# Messages read (or replies sent) per turn of the event loop: at 20-50 µs each, a turn stays
# under a millisecond, so a PING never waits long for the reader.
READ_BURST = 32
REPLY_BURST = 64
# Read-only batches up to this size are answered on the event loop (see `_read_here`).
READ_HERE_MAX = 8
# The longest the event loop waits for the GIL while the worker thread runs Python (the
# default, 5 ms, is the stall the loop would see each time).
SWITCH_INTERVAL_S = 0.0005
# Chunks (of at most READ_BURST requests) waiting for the database.
QUEUE_CHUNKS = 64
# Many switchd processes with many requests in flight: the default 1000 would make the ROUTER
# drop replies (it never blocks) under a burst.
HWM = 100_000
# Session writes (no reply, so switchd cannot retry them) of a batch the storage failed: kept
# for up to RETRY_QUEUE batches, tried again every RETRY_INTERVAL_S, RETRY_ATTEMPTS times.
RETRY_QUEUE = 256
RETRY_INTERVAL_S = 1.0
RETRY_ATTEMPTS = 60
# Keys remembered as marked used at the current second (see `_mark_keys_used`).
MARKED_KEYS = 10_000
# How long replies already sent may take to leave at shutdown.
LINGER_MS = 2000
_NO_REPLY_NAMES = frozenset(t.value.encode() for t in NO_REPLY)
_RECORD_USAGE = MessageType.RECORD_USAGE.value.encode()
_OK = OK.encode()

# (ROUTER identity, request id frame, what the database gets: the request, or a RECORD_USAGE already read)
Queued = tuple[bytes, bytes, Request | UsageRow]


def refuse_ipc_in_use(endpoint: str) -> None:
    """Raise when another process listens on this ipc:// path: binding would silently take it over.

    A socket file nobody listens on (left by a killed daemon) is fine: bind replaces it.
    """
    if not endpoint.startswith("ipc://") or endpoint.startswith("ipc://@"):
        return
    path = endpoint[len("ipc://") :]
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK):
            return
        raise SwitchError(ErrorCode.INTERNAL_BAD_CONFIG, f"cannot check ZMQ_SOCKET_PATH {endpoint}: {exc}") from None
    finally:
        probe.close()
    raise SwitchError(
        ErrorCode.INTERNAL_BAD_CONFIG,
        f"ZMQ_SOCKET_PATH {endpoint} is in use by another process (another switchdb?): stop it or choose another path",
    )


def bind_router(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    refuse_ipc_in_use(endpoint)
    raw = ctx.socket(zmq.ROUTER)
    raw.setsockopt(zmq.LINGER, LINGER_MS)
    raw.setsockopt(zmq.SNDHWM, HWM)
    raw.setsockopt(zmq.RCVHWM, HWM)
    # A guard for memory only: anything above MAX_MESSAGE_BYTES still gets a proper error reply.
    raw.setsockopt(zmq.MAXMSGSIZE, 2 * MAX_MESSAGE_BYTES)
    try:
        raw.bind(endpoint)
    except zmq.ZMQError as exc:
        raw.close(linger=0)
        raise SwitchError(ErrorCode.INTERNAL_BAD_CONFIG, f"cannot bind ZMQ_SOCKET_PATH {endpoint}: {exc}") from None
    return raw


async def serve(settings: Settings, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve until SIGTERM/SIGINT; `task_status.started(endpoint)` once bound."""
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    refuse_ipc_in_use(settings.zmq_socket_path)  # before touching the store
    if settings.db_url:
        await _serve_postgres(settings, task_status)
        return
    conn = open_database(settings.db_path, settings.db_encryption_key)
    read_conn: Connection | None = None
    ctx = zmq.Context()
    try:
        migrate(conn)
        db = Database(conn)
        read_conn = _open_reading(settings)
        await _serve_bound(settings, ctx, db, read_conn, task_status)
    finally:
        ctx.term()  # waits (at most LINGER_MS) for the last replies to leave
        if read_conn is not None:
            read_conn.close()
        conn.close()
    log.info("switchdb stopped")


async def _serve_postgres(settings: Settings, task_status: trio.TaskStatus[str]) -> None:
    from switchdb import pg

    assert settings.db_url is not None
    if not pg.is_postgres_url(settings.db_url):
        raise SwitchError(ErrorCode.INTERNAL_BAD_CONFIG, "config key DB_URL must be a postgresql:// URL")
    conn = await trio.to_thread.run_sync(pg.connect, settings.db_url)
    try:
        await trio.to_thread.run_sync(migrate, conn)  # under an advisory lock: replicas apply each once
    finally:
        conn.close()
    db = pg.PgDatabase(settings.db_url)
    ctx = zmq.Context()
    try:
        db.open()
        await _serve_bound(settings, ctx, db, None, task_status)
    finally:
        ctx.term()
        await trio.to_thread.run_sync(db.close)
    log.info("switchdb stopped")


async def _serve_bound(
    settings: Settings, ctx: zmq.Context, db: Store, read_conn: Connection | None, task_status: trio.TaskStatus[str]
) -> None:
    raw = bind_router(ctx, settings.zmq_socket_path)
    endpoint = raw.getsockopt_string(zmq.LAST_ENDPOINT)
    sock = ZmqSocket(raw)
    # Everything made so far (modules, trio, the schema) lives as long as the daemon: frozen, a
    # full collection no longer walks it (it took 15 ms of the event loop under load).
    gc.collect()
    gc.freeze()
    try:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            await _serve_socket(settings, db, read_conn, sock, signals, endpoint, task_status)
    finally:
        raw.close(linger=LINGER_MS)


def _open_reading(settings: Settings) -> Connection | None:
    """A second connection, for reads on the event loop (WAL: readers never wait for the writer).

    It never waits for a lock either (busy_timeout 0): a busy read goes to the worker thread.
    None for an in-memory database, which a second connection would not share.
    """
    if settings.db_path == ":memory:":
        return None
    reading = open_database(settings.db_path, settings.db_encryption_key)
    reading.execute("PRAGMA busy_timeout = 0")
    return reading


async def _serve_socket(
    settings: Settings,
    db: Store,
    read_conn: Connection | None,
    sock: ZmqSocket,
    signals: AsyncIterator[int],
    endpoint: str,
    task_status: trio.TaskStatus[str],
) -> None:
    request_send, request_receive = trio.open_memory_channel[list[Queued]](QUEUE_CHUNKS)
    summary_send, summary_receive = trio.open_memory_channel[tuple[str, str]](256)
    async with trio.open_nursery() as background:
        if settings.gemini_api_key:
            background.start_soon(
                service.run_summariser, db, settings.gemini_url, settings.gemini_api_key, summary_receive
            )
        else:
            summary_receive.close()
        async with summary_send, trio.open_nursery() as nursery:
            marks_send, marks_receive = trio.open_memory_channel[tuple[list[str], str]](math.inf)
            nursery.start_soon(_mark_keys_used, db, marks_receive)
            retry_send, retry_receive = trio.open_memory_channel[list[Request]](RETRY_QUEUE)
            background.start_soon(_retry_unanswered, db, retry_receive)
            nursery.start_soon(
                _handle_requests, db, read_conn, sock, request_receive,
                summary_send if settings.gemini_api_key else None, marks_send, retry_send,
            )
            with trio.CancelScope() as reading:
                nursery.start_soon(_cancel_on_signal, signals, reading)
                log.info("switchdb listening on %s (database %s)", endpoint, store_name(settings))
                task_status.started(endpoint)
                await _read_requests(sock, request_send)
        # Summaries in progress are dropped: the text they would replace is still stored.
        background.cancel_scope.cancel()


async def _cancel_on_signal(signals: AsyncIterator[int], reading: trio.CancelScope) -> None:
    async for signum in signals:
        log.info("%s: finishing received requests, then exiting", signal.Signals(signum).name)
        reading.cancel()
        return


async def _read_requests(sock: ZmqSocket, requests: trio.MemorySendChannel[list[Queued]]) -> None:
    """Drain what the socket holds (at most READ_BURST messages per turn) and queue it as one chunk.

    Decoding and reading usage_json happen here, on the event loop, between reads: the worker
    thread then only runs SQL and hardly competes for the GIL. PINGs and malformed messages are
    answered on the spot. A chunk once read is always queued (never dropped by a cancel): on
    SIGTERM what was received gets finished.
    """
    async with requests:
        while True:
            chunk: list[Queued] = []
            message: list[bytes] | None = None
            for _ in range(READ_BURST):
                message = sock.recv_nowait()
                if message is None:
                    break
                identity, *frames = message
                try:
                    if len(frames) == 8 and frames[1] == _RECORD_USAGE:  # most of the traffic
                        chunk.append((identity, frames[0], service.read_record(frames)))
                        continue
                    request = decode_request(frames)
                except SwitchError as exc:
                    _refuse(sock, identity, frames, exc)
                    continue
                if request.type is MessageType.PING:
                    _reply(sock, [identity, frames[0], _OK])
                elif request.type is MessageType.RECORD_USAGE:
                    chunk.append((identity, frames[0], service.read_usage(request)))
                else:
                    chunk.append((identity, frames[0], request))
            if chunk:
                try:
                    requests.send_nowait(chunk)
                except trio.WouldBlock:
                    with trio.CancelScope(shield=True):  # the handler is draining: this ends
                        await requests.send(chunk)
            if message is None:
                await sock.wait_readable()
            else:
                await trio.lowlevel.checkpoint()


def _reply(sock: ZmqSocket, frames: list[bytes]) -> None:
    if not sock.send_nowait(frames):  # only at the high-water mark: the ROUTER drops it
        log.warning("reply dropped at the high-water mark")


def _refuse(sock: ZmqSocket, identity: bytes, frames: list[bytes], exc: SwitchError) -> None:
    if not frames:
        log.warning("dropped a message without a request id")
    elif len(frames) >= 2 and bytes(frames[1]) in _NO_REPLY_NAMES:
        log.warning("dropped malformed %s: %s", frames[1].decode(), exc.message, extra={"code": exc.code})
    elif len(frames) >= 2 and frames[1] == _RECORD_USAGE and exc.code == ErrorCode.INTERNAL_BAD_USAGE:
        log.debug("%s refused: %s", MessageType.RECORD_USAGE, exc.message, extra={"code": exc.code})
        _reply(sock, [identity, *encode_reply(bytes(frames[0]), exc.code)])
    else:
        log.warning("refused a malformed request: %s", exc.message, extra={"code": exc.code})
        _reply(sock, [identity, *encode_reply(bytes(frames[0]), exc.code)])


async def _handle_requests(
    db: Store,
    read_conn: Connection | None,
    sock: ZmqSocket,
    requests: trio.MemoryReceiveChannel[list[Queued]],
    summaries: trio.MemorySendChannel[tuple[str, str]] | None,
    marks: trio.MemorySendChannel[tuple[list[str], str]],
    retries: trio.MemorySendChannel[list[Request]],
) -> None:
    async with requests, marks, retries:
        async for batch in requests:
            _take_queued(requests, batch)
            # Each batch costs a round trip to the worker thread and a transaction (about a
            # millisecond of CPU on 2 cores), so it takes all the reader can bring: the reader
            # drains the socket a burst at a time, and gets a turn as long as it finds more.
            while len(batch) < MAX_BATCH:
                size = len(batch)
                await trio.lowlevel.checkpoint()
                _take_queued(requests, batch)
                if len(batch) == size:
                    break
            works = [work for _, _, work in batch]
            now = utc_now()
            # Only reads, and everything before them committed: answered here on the event loop
            # through the reading connection (a fraction of a millisecond, less than the trip to
            # the worker thread and back), and the keys marked used afterwards.
            read = _read_here(read_conn, works, now)
            if read is None and read_conn is None and _only_reads(works):
                # PostgreSQL: the reads alone, outside a transaction (two queries, no write), on a
                # pooled connection; the keys are marked used afterwards, as above.
                read = await _read_pooled(db, works, now)
            used_keys = None
            outcomes: list[service.Result]
            if read is not None:
                outcomes, used_keys = read  # type: ignore[assignment]
            else:
                try:
                    outcomes = await _run_batch(db, works, now)
                except Exception as exc:
                    # A storage failure (disk full, I/O error, connection lost), or the commit
                    # itself: nothing of the batch is stored, and every request of it may be
                    # sent again. Retryable, never a refusal.
                    if is_transient(exc):
                        log.error("a batch of %d requests failed, to be retried: %s", len(batch), _brief(exc))
                    else:
                        log.exception("a batch of %d requests could not be committed", len(batch))
                    outcomes = [_UNAVAILABLE] * len(batch)
                    _keep_unanswered(batch, retries)
            # The replies go out in bursts, with the reader (and its PINGs) let in between.
            for start in range(0, len(batch), REPLY_BURST):
                if start:
                    await trio.lowlevel.checkpoint()
                replies = _replies(
                    batch[start : start + REPLY_BURST], outcomes[start : start + REPLY_BURST], summaries
                )
                for reply in sock.send_many_nowait(replies):  # refused only at the high-water mark
                    await sock.send(reply)
            if used_keys:
                marks.send_nowait((used_keys, now))  # unbounded: one entry per read batch answered here


async def _run_batch(db: Store, works: list[Request | UsageRow], now: str) -> list[service.Result]:
    """`service.run_batch`, tried once more after a transient failure: a lost connection gets a new
    one from the pool, a deadlock or serialisation failure with another replica usually passes."""
    try:
        return await db.run(service.run_batch, works, now)
    except Exception as exc:
        if not is_transient(exc):
            raise
        log.warning("a batch of %d requests failed (%s); trying it once more", len(works), _brief(exc))
    return await db.run(service.run_batch, works, now)


def _keep_unanswered(batch: list[Queued], retries: trio.MemorySendChannel[list[Request]]) -> None:
    """SAVE_SESSION and APPEND_CONVERSATION of a failed batch: nobody retries them but switchdb."""
    kept = [work for _, _, work in batch if type(work) is Request and work.type in NO_REPLY]
    if not kept:
        return
    try:
        retries.send_nowait(kept)
    except trio.WouldBlock:
        log.warning("dropped %d session writes: the storage has been failing too long", len(kept))


async def _retry_unanswered(db: Store, retries: trio.MemoryReceiveChannel[list[Request]]) -> None:
    """Run the kept session writes again, in order, once the storage works again (or give up after a while)."""
    async with retries:
        async for kept in retries:
            for attempt in range(RETRY_ATTEMPTS):
                await trio.sleep(RETRY_INTERVAL_S)
                try:
                    await db.run(service.run_batch, kept, utc_now())
                except Exception as exc:
                    if not is_transient(exc):
                        log.exception("session writes failed again; dropped")
                        break
                    continue
                log.info("%d session writes stored after %d retries", len(kept), attempt + 1)
                break
            else:
                log.warning("dropped %d session writes: the storage kept failing", len(kept))


_UNAVAILABLE = service.Outcome(ErrorCode.INTERNAL_DB_UNAVAILABLE, message="storage unavailable")


def _brief(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def _take_queued(requests: trio.MemoryReceiveChannel[list[Queued]], batch: list[Queued]) -> None:
    while len(batch) < MAX_BATCH:
        try:
            batch += requests.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel):
            return


def _replies(
    batch: list[Queued],
    outcomes: list[service.Result],
    summaries: trio.MemorySendChannel[tuple[str, str]] | None,
) -> list[list[bytes]]:
    """The reply frames for `batch` (and the logging, and the summaries asked for)."""
    replies = []
    for (identity, request_id, request), outcome in zip(batch, outcomes, strict=True):
        if isinstance(outcome, int):  # a usage batch recorded: the balance after it
            replies.append([identity, request_id, _OK, b"%d" % outcome])
            continue
        if type(request) is not Request:  # a usage batch refused, or recorded for a USD account
            if outcome.status != OK:
                log.debug("%s refused: %s", MessageType.RECORD_USAGE, outcome.message, extra={"code": outcome.status})
            replies.append([identity, *encode_reply(request_id, outcome.status, *outcome.fields)])
        elif request.type not in NO_REPLY:
            status, fields = outcome.status, outcome.fields
            if status == OK:
                replies.append([identity, request_id, _OK, *[field.encode() for field in fields]])
                continue
            log.debug("%s refused: %s", request.type, outcome.message, extra={"code": status})
            replies.append([identity, *encode_reply(request_id, status, *fields)])
        elif outcome.status != OK:
            log.warning("%s dropped: %s", request.type, outcome.message, extra={"code": outcome.status})
        elif outcome.summarise and summaries is not None:
            try:
                summaries.send_nowait((request.args[0], request.args[1]))
            except trio.WouldBlock:
                pass  # the next append asks again
    return replies


async def _mark_keys_used(db: Store, marks: trio.MemoryReceiveChannel[tuple[list[str], str]]) -> None:
    """The last_used_at writes left by reads answered on the event loop, grouped, in the worker thread.

    A key this daemon already marked at this second is not sent again: a busy key costs one
    write a second, not one per request.
    """
    marked: dict[str, str] = {}
    async with marks:
        async for keys, now in marks:
            keys = list(keys)
            while True:
                try:
                    more, now = marks.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                keys += more
            fresh = [key for key in dict.fromkeys(keys) if marked.get(key) != now]
            if not fresh:
                continue
            try:
                await db.run(service.mark_keys_used, fresh, now)
            except Exception:
                log.exception("could not mark %d keys used", len(fresh))
                continue
            if len(marked) > MARKED_KEYS:
                marked.clear()
            marked.update(dict.fromkeys(fresh, now))


def _only_reads(works: list[Request | UsageRow]) -> bool:
    return all(type(work) is Request and work.type in service.READ_ONLY for work in works)


async def _read_pooled(
    db: Store, works: list[Request | UsageRow], now: str
) -> tuple[list[service.Outcome], list[str]] | None:
    """`service.handle_reads` in a worker thread without a transaction; None to run the batch the ordinary way."""
    try:
        return await db.run(service.handle_reads, works, now, False)
    except Exception as exc:
        log.debug("pooled read failed (%s); running the batch the ordinary way", _brief(exc))
    return None


def _read_here(
    read_conn: Connection | None, works: list[Request | UsageRow], now: str
) -> tuple[list[service.Outcome], list[str]] | None:
    """`service.handle_reads` when `works` are all READ_ONLY requests; None to use the worker thread."""
    if read_conn is None or len(works) > READ_HERE_MAX:
        return None
    for work in works:
        if type(work) is not Request or work.type not in service.READ_ONLY:
            return None
    try:
        return service.handle_reads(read_conn, works, now)  # type: ignore[arg-type]
    except DatabaseError as exc:  # busy, say: the worker thread waits for it instead
        log.debug("read on the event loop failed (%s); using the worker thread", exc)
    except Exception:
        log.exception("read on the event loop failed; using the worker thread")
    return None
