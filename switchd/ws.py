"""WebSocket connections over Trio streams for the relay: messages come back as their own bytes.

`receive()` returns a data message as (opcode, frame bytes, header size) so the relay can
forward it untouched or read its payload; pings are answered here, a close is answered and
raised as `Closed`. Writes from several tasks (relay, error events, pongs) take turns on a lock.
A connection given a `Lane` lets the pump (switchd/pump.py) carry its plain frames, from its own
thread, while its reader waits for the next frame that is not plain; every write to such a
connection then takes the pump's lock too.
"""
from __future__ import annotations

import base64
import os
import ssl
from contextlib import AbstractContextManager, nullcontext
from urllib.parse import urlsplit

import trio

from switchd.pump import MAX_OBSERVED, Lane
from switchd.ws_codec import (
    CONTROL,
    MAX_HEAD,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    HttpHead,
    ProtocolError,
    check_upgrade_response,
    close_payload,
    encode_frame,
    parse_close,
    parse_head,
    parse_header,
    unmask,
    upgrade_request,
)

RECEIVE_BYTES = 64 * 1024  # an 8 KB audio frame in one read
_NO_LOCK = nullcontext()
_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class Closed(Exception):
    """The connection is closed: by a close frame (its code and reason) or lost (1006)."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


class ConnectError(Exception):
    """The upstream could not be reached or refused the upgrade."""


async def read_head(stream: trio.abc.Stream, buffer: bytearray) -> tuple[HttpHead, bytearray]:
    """Read an HTTP head; returns it and the bytes that came after it."""
    while (end := buffer.find(b"\r\n\r\n")) < 0:
        if len(buffer) > MAX_HEAD:
            raise ValueError("HTTP head too large")
        data = await stream.receive_some(RECEIVE_BYTES)
        if not data:
            raise ValueError("connection closed during the handshake")
        buffer += data
    return parse_head(bytes(buffer[:end])), bytearray(buffer[end + 4 :])


class WsConnection:
    def __init__(self, stream: trio.abc.Stream, buffer: bytes, *, server: bool, max_message: int) -> None:
        self.stream = stream
        self.server = server  # a server receives masked frames and sends unmasked ones
        self.max_message = max_message
        self.closed: Closed | None = None
        # Plain TCP (not TLS): read and write the socket's fd directly, the relay's fast path.
        self.fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else -1
        self._lane: Lane | None = None  # set: the pump carries plain frames to lane.dest
        # Taken for every write: the pump's lock once the pump's thread may write here too (a lane).
        self._write_lock: AbstractContextManager[object] = _NO_LOCK
        self.observed: list[bytes] = []  # payloads the pump forwarded for the reader to read (lane.observe)
        self.last_data_at = trio.current_time()  # when the last data frame arrived
        self._data = bytes(buffer)  # received bytes; frames are slices of it (the whole of it, mostly)
        self._pos = 0
        self._drained = False  # the last read left nothing in the socket
        self._lost = False  # the pump found the peer gone
        self._lock = trio.StrictFIFOLock()  # held while a frame is part-written
        self._owed = b""  # the rest of a frame the pump part-wrote: it goes out before anything else
        self._close_sent = False

    async def _fill(self) -> None:
        """Read more bytes from the peer. Yields to the scheduler once, whether data was waiting or not."""
        if self._lost:
            raise Closed(1006, "connection lost")
        lane = self.lane
        if lane is not None and lane.dest is not None:
            await lane.pump.carry(self, lane)
            self._drained = False  # the pump reads once per wake: more may be waiting
            if lane.dest is not None and lane.dest._owed:
                await lane.dest.send_raw(b"")  # the frame the pump could only part-write
            return
        if self.fd < 0:
            data = await self.stream.receive_some(RECEIVE_BYTES)
        elif self._drained:
            # The last read emptied the socket: trying again first would only cost an EAGAIN.
            await trio.lowlevel.wait_readable(self.fd)
            data = os.read(self.fd, RECEIVE_BYTES)
        else:
            try:
                data = os.read(self.fd, RECEIVE_BYTES)
            except BlockingIOError:
                self._drained = True
                return await self._fill()
            await trio.lowlevel.checkpoint()  # a peer that floods us must not starve other sessions
        if not data:
            raise Closed(1006, "connection lost")
        self._drained = len(data) < RECEIVE_BYTES
        rest = self._data[self._pos :] if self._pos < len(self._data) else b""
        self._data, self._pos = (rest + data if rest else data), 0

    async def receive(self) -> tuple[int, bytes, int]:
        """The next data message: (opcode, its frame's bytes, the frame header's size)."""
        if self.closed is not None:
            raise self.closed
        parts: list[bytes] | None = None  # payloads of a fragmented message
        first = OP_CONT
        try:
            while True:
                data, pos = self._data, self._pos
                header = (
                    parse_header(data, pos, expect_masked=self.server, max_length=self.max_message)
                    if len(data) - pos >= 2 else None
                )
                if header is None or len(data) - pos < header.size + header.length:
                    await self._fill()
                    continue
                end = pos + header.size + header.length
                frame = data[pos:end]  # the same object when the read held exactly this frame
                if end == len(data):
                    self._data, self._pos = b"", 0
                else:
                    self._pos = end
                if header.opcode in CONTROL:
                    await self._control(header.opcode, self._payload(frame, header.size, header.masked))
                    continue
                if parts is None:
                    if header.opcode == OP_CONT:
                        raise ProtocolError(1002, "continuation without a message")
                    if header.fin:
                        self.last_data_at = trio.current_time()
                        return header.opcode, frame, header.size
                    parts, first = [], header.opcode
                elif header.opcode != OP_CONT:
                    raise ProtocolError(1002, "a new message inside a fragmented one")
                parts.append(self._payload(frame, header.size, header.masked))
                if sum(map(len, parts)) > self.max_message:
                    raise ProtocolError(1009, "message over the size limit")
                if header.fin:
                    # Rare (neither browsers nor the provider fragment): made whole as one frame,
                    # masked as its next hop expects.
                    whole = encode_frame(first, b"".join(parts), mask=self.server)
                    self.last_data_at = trio.current_time()
                    return first, whole, len(whole) - sum(map(len, parts))
        except ProtocolError as exc:
            await self._send_close(exc.code, str(exc))
            self.closed = Closed(exc.code, str(exc))
        except Closed as exc:
            self.closed = exc
        except _STREAM_ERRORS:
            self.closed = Closed(1006, "connection lost")
        raise self.closed

    @staticmethod
    def _payload(frame: bytes, size: int, masked: bool) -> bytes:
        return unmask(frame[size:], frame[size - 4 : size]) if masked else frame[size:]

    async def _control(self, opcode: int, payload: bytes) -> None:
        if opcode == OP_PING:
            await self.send_raw(encode_frame(OP_PONG, payload, mask=not self.server))
        elif opcode == OP_CLOSE:
            code, reason = parse_close(payload)
            await self._send_close(1000 if code == 1005 else code, "")
            raise Closed(code, reason)

    @property
    def lane(self) -> Lane | None:
        return self._lane

    @lane.setter
    def lane(self, lane: Lane | None) -> None:
        # A connection given a lane may be written to by the pump's thread from then on (as the
        # other direction's destination): every write takes the pump's lock, so none interleave.
        if lane is not None:
            self._write_lock = lane.pump.lock
        self._lane = lane

    def _write(self, data: bytes) -> int:
        """What of `data` the socket took at once (0 when full); with the write lock held."""
        if self.fd < 0:
            raise trio.ClosedResourceError("closed")
        try:
            return os.write(self.fd, data)
        except BlockingIOError:
            return 0

    async def send_raw(self, frame: bytes) -> None:
        """Send frame bytes as they are (already masked as this side must send them)."""
        if self._close_sent:
            raise self.closed or Closed(1006, "closing")
        try:
            if self.fd < 0:  # TLS: nothing else writes to it
                async with self._lock:
                    await self.stream.send_all(frame)
                return
            if not self._lock.locked():
                with self._write_lock:
                    if not self._owed:
                        # Fast path: the kernel takes the whole frame at once; no scheduling needed,
                        # since every receive yields.
                        sent = self._write(frame)
                        if sent == len(frame):
                            return
                        if sent:
                            self._owed, frame = frame[sent:], b""
            async with self._lock:
                await self._flush_owed()
                while frame:  # nothing of it has gone yet: cancellable
                    with self._write_lock:
                        sent = self._write(frame)
                        if sent:
                            self._owed, frame = frame[sent:], b""
                    if frame:
                        await trio.lowlevel.wait_writable(self.fd)
                await self._flush_owed()
        except _STREAM_ERRORS:
            self.closed = self.closed or Closed(1006, "connection lost")
            raise self.closed from None

    async def _flush_owed(self) -> None:
        """The rest of a part-written frame, before anything else.

        Shielded: half a frame would corrupt the stream."""
        with trio.CancelScope(shield=True):
            while True:
                with self._write_lock:
                    if not self._owed:
                        return
                    self._owed = self._owed[self._write(self._owed):]
                    if not self._owed:
                        return
                await trio.lowlevel.wait_writable(self.fd)

    def forward_plain(self, lane: Lane, now: float) -> tuple[bool, int, int]:
        """The pump's step: read what the socket holds, write its complete plain frames on to lane.dest.

        Runs in the pump's thread with its lock held, while this connection's reader is parked.
        Returns (hand back to the reader?, frames forwarded, their payload bytes). Everything up to
        the first frame that is not plain goes out in one write; that frame stays first in the
        buffer. The checks are a subset of parse_header's: anything they do not pass is left for it.
        """
        try:
            data = os.read(self.fd, RECEIVE_BYTES)
        except BlockingIOError:
            return False, 0, 0
        except OSError:
            data = b""
        if not data:
            self._lost = True
            return True, 0, 0
        buf = self._data[self._pos :] + data if self._pos < len(self._data) else data
        end, pos, frames, size = len(buf), 0, 0, 0
        dest = lane.dest
        if dest is None or dest.fd < 0 or dest._owed or dest._close_sent or dest._lock.locked():
            self._data, self._pos = buf, 0
            return True, 0, 0
        mask, limit, prefix, observe = (4 if self.server else 0), lane.max_payload, lane.prefix, lane.observe
        observed = self.observed
        kept = len(observed)
        plain = True
        while end - pos >= 2:
            b1 = buf[pos + 1]
            # FIN + text, no reserved bits, masked exactly when it must be.
            if buf[pos] != 0x81 or (b1 >> 7) * 4 != mask:
                plain = False
                break
            length, head = b1 & 0x7F, 2 + mask
            if length == 126:
                if end - pos < 4:
                    break
                length, head = (buf[pos + 2] << 8) | buf[pos + 3], 4 + mask
            elif length == 127:  # 64 KiB and more: rare, the reader's
                plain = False
                break
            stop = pos + head + length
            if stop > end:
                break
            if length > limit:
                plain = False
                break
            if prefix and not buf.startswith(prefix, pos + head, stop):
                if not observe or len(observed) >= MAX_OBSERVED or not buf.startswith(observe, pos + head, stop):
                    plain = False
                    break
                observed.append(buf[pos + head : stop])
            frames += 1
            size += length
            pos = stop
        if pos:
            chunk = buf if pos == end else buf[:pos]
            try:
                sent = os.write(dest.fd, chunk)
            except OSError:  # full (EAGAIN) or gone: the reader sends these frames itself
                sent, pos, frames, size, plain = 0, 0, 0, 0, False
                del observed[kept:]  # and reads them as it does
            if 0 < sent < pos:
                dest._owed = chunk[sent:]
                plain = False
            if frames:
                self.last_data_at = now
        self._data, self._pos = (b"", 0) if pos == end else (buf, pos)
        return not plain, frames, size

    async def send_text(self, text: str) -> None:
        await self.send_raw(encode_frame(OP_TEXT, text.encode(), mask=not self.server))

    async def _send_close(self, code: int, reason: str) -> None:
        if self._close_sent:
            return
        try:
            await self.send_raw(encode_frame(OP_CLOSE, close_payload(code, reason), mask=not self.server))
        except Closed:
            pass
        self._close_sent = True

    async def aclose(self, code: int = 1000, reason: str = "", wait: float = 1.0) -> None:
        """The closing handshake: send our close, give the peer `wait` seconds to answer, drop TCP."""
        self.lane = None  # what is still to come is the close handshake: the reader's own business
        await self._send_close(code, reason)
        if self.closed is None:
            with trio.move_on_after(wait):
                try:
                    while True:
                        await self.receive()
                except Closed:
                    pass
        self.closed = self.closed or Closed(code, reason)
        with self._write_lock:
            self.fd = -1  # the number may be reused at once: nothing may write to it any more
        with trio.move_on_after(wait):
            await self.stream.aclose()


async def connect(url: str, headers: list[tuple[bytes, bytes]], *, max_message: int, timeout: float) -> WsConnection:
    """Open a client WebSocket (ws:// or wss://); raises ConnectError."""
    parts = urlsplit(url)
    secure = parts.scheme == "wss"
    host = parts.hostname or ""
    port = parts.port or (443 if secure else 80)
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    key = base64.b64encode(os.urandom(16))
    stream: trio.abc.Stream | None = None
    try:
        with trio.fail_after(timeout):
            stream = await trio.open_tcp_stream(host, port)
            if secure:
                stream = trio.SSLStream(stream, ssl.create_default_context(), server_hostname=host, https_compatible=True)
                await stream.do_handshake()
            host_header = host if parts.port is None else f"{host}:{port}"
            await stream.send_all(upgrade_request(host_header, resource, key, headers))
            head, rest = await read_head(stream, bytearray())
            check_upgrade_response(head, key)
    except (trio.TooSlowError, ValueError, *_STREAM_ERRORS) as exc:
        if stream is not None:
            await trio.aclose_forcefully(stream)
        raise ConnectError(f"{type(exc).__name__}: {exc}") from None
    return WsConnection(stream, bytes(rest), server=False, max_message=max_message)
