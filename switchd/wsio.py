"""WebSocket connections over any Trio stream (TCP or TLS alike), around switchd.websocket.

`receive()` returns the complete messages of one read (of one batch, when a read holds more
than websocket.BATCH_FRAMES frames), in order, as frame bytes a relay can forward as they
stand; it answers pings and closes itself and raises `Closed` at the end. Received bytes held
per connection stay under max_message + 14 + RECEIVE_BYTES (see switchd.websocket).
Writes from several tasks (relay, error events, pongs, the close) take turns on a FIFO lock,
so frames never interleave. A write cancelled before it starts writes nothing; one cancelled
while the peer was not taking it (back-pressure) may have sent part of a frame, so it leaves
the connection lost (1006, the stream closed) rather than let another frame follow. It is not
shielded instead: a cancel scope per write costs about as much as the write's own scheduling,
and a write that can be cancelled mid-way is one the peer was not reading anyway.
"""
from __future__ import annotations

import base64
import math
import os
import ssl
from urllib.parse import urlsplit

import trio

from switchd.sendnow import send_now
from switchd.tls import TlsStream
from switchd.websocket import Connection, Message, State
from switchd.ws_codec import MAX_HEAD, HttpHead, check_upgrade_response, parse_head, upgrade_request

RECEIVE_BYTES = 256 * 1024  # many frames, or a big audio event, per read
_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class Closed(Exception):
    """The connection is closed: by a close frame (its code and reason) or lost (1006)."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


class ConnectError(Exception):
    """The upstream could not be reached, failed TLS, or refused the upgrade.

    `permanent`: trying again cannot help (a certificate that fails verification, a TLS
    handshake the server rejects, a 4xx answer other than 408 and 429): a configuration
    problem to report, not a provider outage to wait out."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


async def read_head(stream: trio.abc.Stream, buffer: bytearray) -> tuple[HttpHead, bytearray]:
    """Read an HTTP head; returns it and the bytes that came after it. Raises ValueError."""
    start = 0
    while (end := buffer.find(b"\r\n\r\n", start)) < 0:
        if len(buffer) > MAX_HEAD:
            raise ValueError("HTTP head too large")
        start = max(0, len(buffer) - 3)
        data = await stream.receive_some(RECEIVE_BYTES)
        if not data:
            raise ValueError("connection closed during the handshake")
        buffer += data
    return parse_head(bytes(buffer[:end])), bytearray(buffer[end + 4 :])


class WsConnection:
    def __init__(self, stream: trio.abc.Stream, buffer: bytes | bytearray, *, server: bool, max_message: int) -> None:
        self.stream = stream
        self.server = server
        self.closed: Closed | None = None
        self.last_data_at = trio.current_time()  # when the last data message arrived
        self._ws = Connection(server=server, max_message=max_message)
        self._lock = trio.StrictFIFOLock()
        # Plain TCP: the socket written to at once (switchd.sendnow); TLS does the same inside.
        self._fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else -1
        self._lost: Closed | None = None  # set once a write failed: the stream is unusable
        self._inbox: list[Message] = []  # parsed, not yet returned
        if buffer:
            self._ws.receive_data(bytes(buffer))

    @property
    def state(self) -> State:
        return self._ws.state

    async def receive(self) -> list[Message]:
        """The complete messages of the next read (at least one), in order; raises Closed.

        A read holding many frames is parsed a batch at a time (websocket.BATCH_FRAMES), with a
        checkpoint before each batch: a peer flooding us with tiny frames cannot starve the others."""
        ws = self._ws
        if ws.has_more:
            await trio.sleep(0)  # noqa: ASYNC115 (a plain yield, the public way)
        while True:
            ended = False
            for event in ws.events():
                if isinstance(event, Message):
                    self._inbox.append(event)
                else:
                    self.closed, ended = self.closed or Closed(event.code, event.reason), True
            reply = ws.data_to_send()
            if reply:  # if this is cancelled, the messages wait in the inbox for the next call
                try:
                    await self._write(reply)
                except Closed as exc:
                    self.closed = self.closed or exc
            if ended:
                await self._close_stream()  # the close handshake is over, or failed
            if self._inbox:
                messages, self._inbox = self._inbox, []
                self.last_data_at = trio.current_time()
                return messages  # an end that came with them is raised by the next call
            if self.closed is not None:
                raise self.closed
            if ws.has_more:
                await trio.sleep(0)  # noqa: ASYNC115
                continue
            try:
                data = await self.stream.receive_some(RECEIVE_BYTES)  # a checkpoint too
            except _STREAM_ERRORS:
                data = b""
            ws.receive_data(data)

    async def send(self, data: bytes) -> None:
        """Send frame bytes as they stand (one frame or several joined), already masked as this side must."""
        if self._ws.state is not State.OPEN:
            raise self.closed or Closed(1006, "closing")
        await self._write(data)

    async def send_text(self, text: str) -> None:
        if self._ws.state is not State.OPEN:
            raise self.closed or Closed(1006, "closing")
        await self._write(self._ws.send_text(text.encode()))

    async def _write(self, data: bytes) -> None:
        # Taken at once when free: acquire() would yield to the scheduler even then.
        try:
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            await self._lock.acquire()  # cancellable: nothing is written yet
        try:
            if self._lost is not None:
                raise self._lost
            if trio.current_effective_deadline() == -math.inf:
                await trio.sleep(0)  # noqa: ASYNC115 (already cancelled: raise before writing anything)
            try:
                await send_now(self._fd, self.stream, data)
            except _STREAM_ERRORS:
                self._lost = Closed(1006, "connection lost")
            except trio.Cancelled:
                # The peer was not taking it all and part may have gone: nothing else may follow on
                # this stream (and a cancelled TLS write leaves the stream broken anyway).
                self._lost = Closed(1006, "a write was cancelled part-way")
                self.closed = self.closed or self._lost
                await self._close_stream()
                raise
            if self._lost is not None:
                self.closed = self.closed or self._lost
                await self._close_stream()
                raise self._lost
        finally:
            self._lock.release()

    async def _close_stream(self) -> None:
        self._fd = -1  # the kernel may give the number to another socket at once
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(self.stream)

    async def aclose(self, code: int = 1000, reason: str = "", wait: float = 1.0) -> None:
        """The closing handshake: send our close, give the peer `wait` seconds to answer, close the stream."""
        frame = self._ws.send_close(code, reason)
        if frame:
            try:
                await self._write(frame)
            except Closed:
                pass
        if self.closed is None:
            with trio.move_on_after(wait):
                try:
                    while True:
                        await self.receive()
                except Closed:
                    pass
        self.closed = self.closed or Closed(code, reason)
        self._fd = -1
        with trio.move_on_after(wait) as scope:
            await self.stream.aclose()
        if scope.cancelled_caught:
            await self._close_stream()


def client_ssl_context(ca_file: str | None = None) -> ssl.SSLContext:
    """Verifies against the system trust store, and `ca_file` (a PEM bundle) too when given."""
    context = ssl.create_default_context()
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    return context


_TLS_CUT = (ssl.SSLEOFError, ssl.SSLSyscallError, ssl.SSLZeroReturnError)  # the connection went, not TLS


def _failure(exc: trio.BrokenResourceError) -> tuple[str, bool]:
    """What broke a stream, and whether it was TLS itself refusing (permanent)."""
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {cause.verify_message}", True
    return str(cause or exc) or "connection lost", isinstance(cause, ssl.SSLError) and not isinstance(cause, _TLS_CUT)


async def connect(
    url: str, headers: list[tuple[bytes, bytes]], *, max_message: int, connect_timeout: float,
    ssl_context: ssl.SSLContext | None = None,
) -> WsConnection:
    """Open a client WebSocket to a ws:// or wss:// URL; raises ConnectError naming the cause.

    wss:// verifies the server against `ssl_context` (client_ssl_context() when None)."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss"):
        raise ConnectError(f"not a WebSocket URL: {parts.scheme}://", permanent=True)
    secure = parts.scheme == "wss"
    host = parts.hostname or ""
    port = parts.port or (443 if secure else 80)
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    key = base64.b64encode(os.urandom(16))
    stream: trio.abc.Stream | None = None
    step = "connect"
    try:
        with trio.fail_after(connect_timeout):
            stream = tcp = await trio.open_tcp_stream(host, port)
            if secure:
                step = "TLS handshake"
                tls = TlsStream(tcp, ssl_context or client_ssl_context(), server_hostname=host)
                stream = tls
                await tls.do_handshake()
            step = "upgrade"
            host_header = host if parts.port is None else f"{host}:{port}"
            await stream.send_all(upgrade_request(host_header, resource, key, headers))
            head, rest = await read_head(stream, bytearray())
            status = head.start.split(" ", 2)[1] if head.start.count(" ") else ""
            try:
                check_upgrade_response(head, key)
            except ValueError as exc:
                await _abort(stream)
                refused = status.isdigit() and 400 <= int(status) < 500 and int(status) not in (408, 429)
                raise ConnectError(f"upgrade with {host}:{port} failed: {exc}", permanent=refused) from None
    except trio.TooSlowError:
        await _abort(stream)
        raise ConnectError(f"{step} to {host}:{port} timed out after {connect_timeout:g} s") from None
    except trio.BrokenResourceError as exc:
        await _abort(stream)
        cause, permanent = _failure(exc)
        raise ConnectError(f"{step} with {host}:{port} failed: {cause}", permanent=permanent) from None
    except (ValueError, trio.ClosedResourceError, OSError) as exc:
        await _abort(stream)
        raise ConnectError(f"{step} with {host}:{port} failed: {exc}") from None
    return WsConnection(stream, bytes(rest), server=False, max_message=max_message)


async def _abort(stream: trio.abc.Stream | None) -> None:
    if stream is not None:
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(stream)
