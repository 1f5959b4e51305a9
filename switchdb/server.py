"""The switchdb daemon: a ZeroMQ ROUTER in front of the store.

One reader task decodes requests and queues them on a bounded channel (PING and malformed
messages are answered on the spot). One handler task takes everything queued, up to
MAX_BATCH, runs it in the database worker thread as one transaction, then sends the replies:
grouping is what makes the throughput, and the event loop never waits on SQLite.

SIGTERM/SIGINT cancel only the reader; the handler drains the queue, commits and the replies
go out before the socket closes.
"""
from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator

import trio
import zmq

from common.config import Settings
from common.errors import ErrorCode, SwitchError
from common.wire import MAX_MESSAGE_BYTES, NO_REPLY, OK, MessageType, Request, decode_request, encode_reply
from common.zmq_trio import ZmqSocket
from switchdb import service
from switchdb.db import migrate, open_database, utc_now
from switchdb.worker import Database

log = logging.getLogger(__name__)

MAX_BATCH = 256
QUEUE_SIZE = 4096
# Many switchd processes with many requests in flight: the default 1000 would make the ROUTER
# drop replies (it never blocks) under a burst.
HWM = 100_000
# How long replies already sent may take to leave at shutdown.
LINGER_MS = 2000
_NO_REPLY_NAMES = frozenset(t.value.encode() for t in NO_REPLY)

Queued = tuple[bytes, Request]


def bind_router(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
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
    conn = open_database(settings.db_path, settings.db_encryption_key)
    ctx = zmq.Context()
    try:
        migrate(conn)
        db = Database(conn)
        raw = bind_router(ctx, settings.zmq_socket_path)
        endpoint = raw.getsockopt_string(zmq.LAST_ENDPOINT)
        sock = ZmqSocket(raw)
        try:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                await _serve_socket(settings, db, sock, signals, endpoint, task_status)
        finally:
            raw.close(linger=LINGER_MS)
    finally:
        ctx.term()  # waits (at most LINGER_MS) for the last replies to leave
        conn.close()
    log.info("switchdb stopped")


async def _serve_socket(
    settings: Settings,
    db: Database,
    sock: ZmqSocket,
    signals: AsyncIterator[int],
    endpoint: str,
    task_status: trio.TaskStatus[str],
) -> None:
    request_send, request_receive = trio.open_memory_channel[Queued](QUEUE_SIZE)
    summary_send, summary_receive = trio.open_memory_channel[tuple[str, str]](256)
    async with trio.open_nursery() as background:
        if settings.gemini_api_key:
            background.start_soon(
                service.run_summariser, db, settings.gemini_url, settings.gemini_api_key, summary_receive
            )
        else:
            summary_receive.close()
        async with summary_send, trio.open_nursery() as nursery:
            nursery.start_soon(
                _handle_requests, db, sock, request_receive, summary_send if settings.gemini_api_key else None
            )
            with trio.CancelScope() as reading:
                nursery.start_soon(_cancel_on_signal, signals, reading)
                log.info("switchdb listening on %s (database %s)", endpoint, settings.db_path)
                task_status.started(endpoint)
                await _read_requests(sock, request_send)
        # Summaries in progress are dropped: the text they would replace is still stored.
        background.cancel_scope.cancel()


async def _cancel_on_signal(signals: AsyncIterator[int], reading: trio.CancelScope) -> None:
    async for signum in signals:
        log.info("%s: finishing received requests, then exiting", signal.Signals(signum).name)
        reading.cancel()
        return


async def _read_requests(sock: ZmqSocket, requests: trio.MemorySendChannel[Queued]) -> None:
    async with requests:
        while True:
            identity, *frames = await sock.recv()
            try:
                request = decode_request(frames)
            except SwitchError as exc:
                await _refuse(sock, identity, frames, exc)
                continue
            if request.type is MessageType.PING:
                await sock.send([identity, *encode_reply(frames[0], OK)])
            else:
                await requests.send((identity, request))


async def _refuse(sock: ZmqSocket, identity: bytes, frames: list[bytes], exc: SwitchError) -> None:
    if not frames:
        log.warning("dropped a message without a request id")
    elif len(frames) >= 2 and bytes(frames[1]) in _NO_REPLY_NAMES:
        log.warning("dropped malformed %s: %s", frames[1].decode(), exc.message, extra={"code": exc.code})
    else:
        log.warning("refused a malformed request: %s", exc.message, extra={"code": exc.code})
        await sock.send([identity, *encode_reply(bytes(frames[0]), exc.code)])


async def _handle_requests(
    db: Database,
    sock: ZmqSocket,
    requests: trio.MemoryReceiveChannel[Queued],
    summaries: trio.MemorySendChannel[tuple[str, str]] | None,
) -> None:
    async with requests:
        async for first in requests:
            batch = [first]
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(requests.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            try:
                outcomes = await db.run(service.handle_batch, [request for _, request in batch], utc_now())
            except Exception:
                # The commit itself failed (disk full, I/O error): nothing of the batch is stored.
                log.exception("a batch of %d requests could not be committed", len(batch))
                outcomes = [service.Outcome(ErrorCode.INTERNAL_ERROR)] * len(batch)
            for (identity, request), outcome in zip(batch, outcomes):
                if request.type not in NO_REPLY:
                    if outcome.status != OK:
                        log.debug("%s refused: %s", request.type, outcome.message, extra={"code": outcome.status})
                    reply = [identity, *encode_reply(request.request_id, outcome.status, *outcome.fields)]
                    if not sock.send_nowait(reply):  # only at the high-water mark
                        await sock.send(reply)
                elif outcome.status != OK:
                    log.warning("%s dropped: %s", request.type, outcome.message, extra={"code": outcome.status})
                elif outcome.summarise and summaries is not None:
                    try:
                        summaries.send_nowait((request.args[0], request.args[1]))
                    except trio.WouldBlock:
                        pass  # the next append asks again
