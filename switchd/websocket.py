"""One WebSocket connection (RFC 6455) as a sans-I/O object: bytes in, messages out, no sockets.

The I/O layer feeds what it reads to `receive_data` and takes `events()`: complete data
messages in the order they were sent, then at most one end (the peer's close, a protocol
failure, or the connection lost). Pings are answered and closes replied to here: the bytes to
write for them wait in `data_to_send()`.

A message keeps its frame's bytes as they arrived, so a relay can forward it untouched: a
client's masked frame is valid for the upstream, a provider's unmasked frame is valid for a
client. A fragmented message (rare: neither browsers nor the provider fragment) is made into
one frame, masked exactly when this side is a server, i.e. as the other hop expects it.

Memory: the connection holds at most `max_message + 14` received bytes (the fragments of an
open message plus the partial frame that continues it, header included) plus what was given to
`receive_data` since the last `events()` (one read, for switchd.wsio). A frame or message that
would go over `max_message` fails with 1009 from its header, before any of its payload is kept.
Received chunks are joined once, when the frame they complete is whole: a big frame costs its
size, not its size times its reads. Work is bounded too: `events()` parses at most BATCH_FRAMES
frames, and an open fragmented message costs the same per fragment however many came before.
"""
from __future__ import annotations

import enum
from functools import cached_property

import attrs

from switchd.ws_codec import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    ProtocolError,
    close_payload,
    encode_frame,
    read_close,
    unmask,
)


class State(enum.Enum):
    OPEN = "open"
    CLOSE_SENT = "close sent"  # ours went out, the peer's is still to come
    CLOSED = "closed"  # both ways, or failed: nothing more is read or may be sent


class LocalProtocolError(Exception):
    """We were asked to send a message on a connection that is closing or closed."""


@attrs.frozen
class Message:
    """A complete data message: `frame` is its bytes as one frame, ready for the other hop.

    Its kind and masking are read back from the frame's first bytes, not stored: one of these
    is built per frame, so it stays small."""

    frame: bytes
    offset: int  # where the payload starts in `frame`

    @property
    def text(self) -> bool:
        """A text message; else binary."""
        return self.frame[0] & 0x0F == OP_TEXT

    @property
    def masked(self) -> bool:
        return self.frame[1] >= 0x80

    @property
    def size(self) -> int:
        return len(self.frame) - self.offset

    @cached_property
    def payload(self) -> bytes:
        off = self.offset
        if self.masked:
            return unmask(self.frame[off:], self.frame[off - 4 : off])
        return self.frame[off:]

    def startswith(self, prefix: bytes) -> bool:
        """Does the payload start with `prefix`? Reads only that much of it."""
        off, n = self.offset, len(prefix)
        if not self.masked:
            return self.frame.startswith(prefix, off)
        if len(self.frame) - off < n:
            return False
        return unmask(self.frame[off : off + n], self.frame[off - 4 : off]) == prefix


@attrs.frozen
class CloseReceived:
    """The peer closed (1005 when its close had no code); our reply, if owed, is in data_to_send()."""

    code: int
    reason: str


@attrs.frozen
class ProtocolFailed:
    """The peer broke the protocol; our close with `code` is in data_to_send()."""

    code: int
    reason: str


@attrs.frozen
class ConnectionLost:
    """The stream ended without a close frame."""

    code: int = 1006
    reason: str = "connection lost"


Event = Message | CloseReceived | ProtocolFailed | ConnectionLost

BATCH_FRAMES = 1024  # frames parsed per events() call


class Connection:
    def __init__(self, *, server: bool, max_message: int) -> None:
        self.server = server  # a server receives masked frames and sends unmasked ones
        self.max_message = max_message
        self.state = State.OPEN
        self._data = b""  # unparsed bytes from _pos on, starting at a frame's first byte
        self._pos = 0
        self._chunks: list[bytes] = []  # received after _data, not joined yet
        self._held = 0  # unparsed bytes: the rest of _data and the chunks
        self._need = 0  # bytes to hold before parsing can make progress (a frame's whole size)
        self._more = False  # the last parse stopped at BATCH_FRAMES: complete frames may be waiting
        self._eof = False  # the stream ended: once what came before is parsed, the connection is lost
        self._ended = False  # nothing more from the peer is read
        self._frag_opcode = 0  # opcode of the open fragmented message; 0: none open
        self._frag_parts: list[bytes] = []  # its payloads so far, unmasked
        self._frag_size = 0
        self._events: list[Event] = []
        self._outgoing: list[bytes] = []

    @property
    def buffered(self) -> int:
        """Received bytes held: the unparsed ones and an open fragmented message's payload so far."""
        return self._held + self._frag_size

    @property
    def has_more(self) -> bool:
        """Another events() may give more without more data: the last one stopped at BATCH_FRAMES.

        The I/O layer lets other tasks run in between, so a peer sending many tiny frames costs
        the others one batch's worth of work at a time, not one read's worth."""
        return self._more

    def receive_data(self, data: bytes | bytearray) -> None:
        """Bytes read from the peer; b"" when the stream ended. Parsed by the next events()."""
        if self._ended or self._eof:
            return
        if not data:
            self._eof = True
            return
        self._chunks.append(data if type(data) is bytes else bytes(data))
        self._held += len(data)

    def events(self) -> list[Event]:
        """What is complete, in order: the messages of up to BATCH_FRAMES frames, then any end."""
        if not self._ended:
            if self._held >= self._need:
                self._parse()
            if self._eof and not self._more and not self._ended:
                self._end(ConnectionLost())
        events, self._events = self._events, []
        return events

    def data_to_send(self) -> bytes:
        """The pongs and closes this connection owes the peer, to be written before anything else."""
        if not self._outgoing:
            return b""
        data = b"".join(self._outgoing)
        self._outgoing.clear()
        return data

    def send_text(self, payload: bytes) -> bytes:
        if self.state is not State.OPEN:
            raise LocalProtocolError(f"cannot send a message: the connection is {self.state.value}")
        return encode_frame(OP_TEXT, payload, mask=not self.server)

    def send_close(self, code: int, reason: str = "") -> bytes:
        """Our close frame; b"" once a close went out (ours or our reply to the peer's)."""
        if self.state is not State.OPEN:
            return b""
        self.state = State.CLOSE_SENT
        return encode_frame(OP_CLOSE, close_payload(code, reason), mask=not self.server)

    def _end(self, event: CloseReceived | ProtocolFailed | ConnectionLost) -> None:
        self._events.append(event)
        self.state = State.CLOSED
        self._ended = True
        self._data, self._pos, self._chunks, self._held, self._frag_parts = b"", 0, [], 0, []
        self._more = False

    def _parse(self) -> None:
        data, pos, chunks = self._data, self._pos, self._chunks
        if chunks:
            if pos < len(data):
                data = b"".join([memoryview(data)[pos:], *chunks])
            else:
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            pos = 0
            self._chunks = []
        end = len(data)
        need = 0
        budget = BATCH_FRAMES
        self._more = False
        server, limit, events = self.server, self.max_message, self._events
        try:
            # Headers are read inline: this loop runs for every frame, and a function call plus a
            # tuple per frame would be much of its cost.
            while end - pos >= 2:
                if not budget:
                    self._more = True
                    break
                budget -= 1
                b0, b1 = data[pos], data[pos + 1]
                opcode, length = b0 & 0x0F, b1 & 0x7F
                if b0 & 0x70:
                    raise ProtocolError(1002, "reserved bits set without an extension")
                if (b1 >> 7) != server:
                    raise ProtocolError(1002, "client frames must be masked, server frames must not")
                size = 6 if server else 2
                if length >= 126:
                    if length == 126:
                        if end - pos < 4:
                            break
                        length = data[pos + 2] << 8 | data[pos + 3]
                        size += 2
                    else:
                        if end - pos < 10:
                            break
                        length = int.from_bytes(data[pos + 2 : pos + 10], "big")
                        size += 8
                if opcode >= OP_CLOSE:
                    if opcode > OP_PONG:
                        raise ProtocolError(1002, f"unknown opcode {opcode}")
                    if length > 125 or not b0 & 0x80:
                        raise ProtocolError(1002, "control frames must be short and unfragmented")
                elif opcode == OP_CONT:
                    # Judged from the header, before its payload is kept: the memory bound holds.
                    if not self._frag_opcode:
                        raise ProtocolError(1002, "a continuation frame with no message to continue")
                    if self._frag_size + length > limit:
                        raise ProtocolError(1009, f"message over the {limit}-byte limit")
                elif opcode > OP_BINARY:
                    raise ProtocolError(1002, f"unknown opcode {opcode}")
                elif self._frag_opcode:
                    raise ProtocolError(1002, "a new message inside a fragmented one")
                elif length > limit:
                    raise ProtocolError(1009, f"message of {length} bytes over the {limit}-byte limit")
                stop = pos + size + length
                if stop > end:
                    need = stop - pos
                    break
                if b0 & 0x80 and opcode and opcode < OP_CLOSE:  # a whole message in one frame: most are
                    events.append(Message(data if stop == end and not pos else data[pos:stop], size))
                    pos = stop
                    continue
                body = data[pos + size : stop]
                if server and length:
                    body = unmask(body, data[pos + size - 4 : pos + size])
                pos = stop
                if opcode >= OP_CLOSE:
                    if self._control(opcode, body):
                        return
                    continue
                if length:
                    self._frag_parts.append(body)
                    self._frag_size += length
                if opcode:
                    self._frag_opcode = opcode
                if b0 & 0x80:
                    events.append(self._whole())
        except ProtocolError as exc:
            if self.state is State.OPEN:
                self._outgoing.append(encode_frame(OP_CLOSE, close_payload(exc.code, str(exc)), mask=not server))
            self._end(ProtocolFailed(exc.code, str(exc)))
            return
        self._held = end - pos
        self._need = need
        if pos >= end:
            data, pos = b"", 0
        elif pos and not self._more:
            data, pos = data[pos:], 0  # a partial frame: keep only it while the rest comes
        self._data, self._pos = data, pos

    def _whole(self) -> Message:
        payload = b"".join(self._frag_parts)
        frame = encode_frame(self._frag_opcode, payload, mask=self.server)
        message = Message(frame, len(frame) - len(payload))
        self._frag_opcode, self._frag_parts, self._frag_size = 0, [], 0
        return message

    def _control(self, opcode: int, payload: bytes) -> bool:
        """Act on a control frame; True when it ended the connection."""
        if opcode == OP_PING:
            if self.state is State.OPEN:
                self._outgoing.append(encode_frame(OP_PONG, payload, mask=not self.server))
            return False
        if opcode == OP_PONG:
            return False
        code, reason = read_close(payload)
        if self.state is State.OPEN:
            self._outgoing.append(
                encode_frame(OP_CLOSE, close_payload(1000 if code == 1005 else code, ""), mask=not self.server)
            )
        self._end(CloseReceived(code, reason))
        return True
