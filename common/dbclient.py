"""The switchd side of the wire: one DEALER, concurrent requests multiplexed by request id."""
from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
import zmq

from common.errors import ErrorCode, SwitchError
from common.wire import MAX_MESSAGE_BYTES, OK, MessageType, decode_reply, encode_request
from common.zmq_trio import ZmqSocket

log = logging.getLogger(__name__)


class _Pending:
    __slots__ = ("done", "status", "fields")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.status = ""
        self.fields: tuple[str, ...] = ()


class DbClient:
    """Requests to switchdb. Made by `open_db_client`, whose reader task routes replies."""

    def __init__(self, sock: ZmqSocket, timeout_s: float) -> None:
        self._sock = sock
        self.timeout_s = timeout_s
        self._pending: dict[str, _Pending] = {}
        # Ids unique across processes and restarts so a late reply never lands on a new request.
        self._prefix = f"{os.getpid():x}-{os.urandom(3).hex()}-"
        self._ids = itertools.count()
        # Seconds of each answered round trip, for the metrics histogram; set by the owner.
        self.observe_rtt = lambda seconds: None

    async def request(self, type: MessageType, *args: str, timeout_s: float | None = None) -> tuple[str, ...]:
        """Send and wait for the reply's fields; an error status raises SwitchError with that code.

        A status that names an error but carries fields (EXTERNAL_NO_CREDITS on VALIDATE_AND_LOAD)
        is raised too; its fields are on `SwitchError.fields`.
        """
        request_id = self._prefix + str(next(self._ids))
        pending = self._pending[request_id] = _Pending()
        started = time.perf_counter()
        try:
            await self._sock.send(encode_request(request_id, type, *args))
            with trio.move_on_after(self.timeout_s if timeout_s is None else timeout_s):
                await pending.done.wait()
        finally:
            del self._pending[request_id]
        if not pending.done.is_set():
            raise SwitchError(ErrorCode.INTERNAL_DB_UNAVAILABLE, f"switchdb did not answer {type}")
        self.observe_rtt(time.perf_counter() - started)
        if pending.status != OK:
            try:
                code = ErrorCode(pending.status)
            except ValueError:
                code = ErrorCode.INTERNAL_ERROR
            error = SwitchError(code, f"switchdb refused {type}")
            error.fields = pending.fields  # type: ignore[attr-defined]
            raise error
        return pending.fields

    async def send(self, type: MessageType, *args: str) -> None:
        """Fire and forget (SAVE_SESSION, APPEND_CONVERSATION)."""
        await self._sock.send(encode_request(self._prefix + str(next(self._ids)), type, *args))

    async def _read_replies(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            frames = await self._sock.recv()
            try:
                reply = decode_reply(frames)
            except SwitchError as exc:
                log.warning("dropping malformed reply from switchdb: %s", exc.message)
                continue
            pending = self._pending.get(reply.request_id)
            if pending is None:
                continue  # its request already timed out
            pending.status, pending.fields = reply.status, reply.fields
            pending.done.set()


@asynccontextmanager
async def open_db_client(endpoint: str, timeout_ms: int, ctx: zmq.Context | None = None) -> AsyncIterator[DbClient]:
    ctx = ctx or zmq.Context.instance()
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
    # Reconnect quickly when switchdb restarts; requests meanwhile wait in the queue or time out.
    raw.setsockopt(zmq.RECONNECT_IVL, 50)
    raw.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
    raw.connect(endpoint)
    sock = ZmqSocket(raw)
    client = DbClient(sock, timeout_ms / 1000)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(client._read_replies)
            yield client
            nursery.cancel_scope.cancel()
    finally:
        sock.close()
