"""The switchd side of the wire: one DEALER per switchdb replica, concurrent requests multiplexed by request id.

`ZMQ_SOCKET_PATH` may name several replicas (`ipc://a,tcp://host:port`). Requests go round-robin
to the replicas that are connected; one that does not answer within the timeout is sent again,
with the same request id, to another replica (safe: RECORD_USAGE is idempotent by batch id,
VALIDATE_AND_LOAD and GET_CREDITS only read), and the silent replica is passed over for a
while. Fire-and-forget messages (SAVE_SESSION, APPEND_CONVERSATION) of one session always go
to the same replica while it is up, so its appends are stored in order.
"""
from __future__ import annotations

import itertools
import logging
import os
import time
import zlib
from collections.abc import AsyncIterator, Sequence
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


def split_endpoints(endpoints: str) -> list[str]:
    """`ZMQ_SOCKET_PATH` as its list of endpoints (comma-separated, blanks ignored)."""
    found = [part.strip() for part in endpoints.split(",") if part.strip()]
    if not found:
        raise SwitchError(ErrorCode.INTERNAL_BAD_CONFIG, "config key ZMQ_SOCKET_PATH names no endpoint")
    return found


class DbClient:
    """Requests to switchdb. Made by `open_db_client`, whose reader tasks route replies."""

    def __init__(self, sock: ZmqSocket | Sequence[ZmqSocket], timeout_s: float, names: Sequence[str] = ()) -> None:
        self._socks = [sock] if isinstance(sock, ZmqSocket) else list(sock)
        self._names = list(names) or [f"replica {i}" for i in range(len(self._socks))]
        self.timeout_s = timeout_s
        self._pending: dict[str, _Pending] = {}
        # Ids unique across processes and restarts so a late reply never lands on a new request.
        self._prefix = f"{os.getpid():x}-{os.urandom(3).hex()}-"
        self._ids = itertools.count()
        self._turn = itertools.count()
        # A replica that let a request time out is tried last until this time (monotonic seconds).
        self._silent_until = [0.0] * len(self._socks)
        # Seconds of each answered round trip, for the metrics histogram; set by the owner.
        self.observe_rtt = lambda seconds: None

    def _order(self, first: int) -> list[int]:
        """Every replica, from `first` on, those recently silent last."""
        count = len(self._socks)
        order = [(first + i) % count for i in range(count)]
        now = time.monotonic()
        return [i for i in order if self._silent_until[i] <= now] + [i for i in order if self._silent_until[i] > now]

    async def _send(self, frames: list[bytes], order: list[int]) -> int:
        """Send to the first replica of `order` that takes it now; else wait for the first one. Its index."""
        for i in order:
            if self._socks[i].send_nowait(frames):
                return i
        await self._socks[order[0]].send(frames)
        return order[0]

    async def request(self, type: MessageType, *args: str, timeout_s: float | None = None) -> tuple[str, ...]:
        """Send and wait for the reply's fields; an error status raises SwitchError with that code.

        A status that names an error but carries fields (EXTERNAL_NO_CREDITS on VALIDATE_AND_LOAD)
        is raised too; its fields are on `SwitchError.fields`. With several replicas, a request
        unanswered after the timeout is sent once more, to another one.
        """
        request_id = self._prefix + str(next(self._ids))
        pending = self._pending[request_id] = _Pending()
        frames = encode_request(request_id, type, *args)
        timeout = self.timeout_s if timeout_s is None else timeout_s
        started = time.perf_counter()
        try:
            order = self._order(next(self._turn) % len(self._socks))
            if len(self._socks) == 1:
                await self._socks[0].send(frames)
                with trio.move_on_after(timeout):
                    await pending.done.wait()
            else:
                for attempt in range(2):
                    sent_to = order[0]
                    with trio.move_on_after(timeout):
                        sent_to = await self._send(frames, order)
                        await pending.done.wait()
                    if pending.done.is_set():
                        break
                    self._silent_until[sent_to] = time.monotonic() + timeout
                    order = [i for i in order if i != sent_to] + [sent_to]
                    if attempt == 0:
                        log.warning("switchdb at %s did not answer %s in time; trying another replica",
                                    self._names[sent_to], type)
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
        """Fire and forget (SAVE_SESSION, APPEND_CONVERSATION); one session's go to one replica, in order."""
        frames = encode_request(self._prefix + str(next(self._ids)), type, *args)
        if len(self._socks) == 1:
            await self._socks[0].send(frames)
            return
        home = zlib.crc32("\0".join(args[:2]).encode()) % len(self._socks)
        order = self._order(home)
        # Wait for the session's replica rather than spill to another when its queue is full:
        # a spilled append could be stored before the ones still queued. Only a replica that
        # takes nothing for the whole timeout is passed over.
        for i in order[:-1]:
            with trio.move_on_after(self.timeout_s):
                await self._socks[i].send(frames)
                return
            self._silent_until[i] = time.monotonic() + self.timeout_s
            log.warning("switchdb at %s took no %s in time; sending to another replica", self._names[i], type)
        await self._socks[order[-1]].send(frames)

    async def _read_replies(
        self, index: int = 0, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        sock = self._socks[index]
        while True:
            frames = await sock.recv()
            self._silent_until[index] = 0.0
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
    """A client of the replica (or the comma-separated replicas) at `endpoint`."""
    ctx = ctx or zmq.Context.instance()
    endpoints = split_endpoints(endpoint)
    socks: list[ZmqSocket] = []
    try:
        for address in endpoints:
            raw = ctx.socket(zmq.DEALER)
            socks.append(ZmqSocket(raw))
            raw.setsockopt(zmq.LINGER, 0)
            raw.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
            # Reconnect quickly when switchdb restarts; requests meanwhile wait in the queue or time out.
            raw.setsockopt(zmq.RECONNECT_IVL, 50)
            raw.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
            if len(endpoints) > 1:
                # Queue nothing for a replica that is down: another one takes the request at once.
                raw.setsockopt(zmq.IMMEDIATE, 1)
            raw.connect(address)
        client = DbClient(socks, timeout_ms / 1000, endpoints)
        async with trio.open_nursery() as nursery:
            for index in range(len(socks)):
                await nursery.start(client._read_replies, index)
            yield client
            nursery.cancel_scope.cancel()
    finally:
        for sock in socks:
            sock.close()
