"""RFC 6455 pieces as pure functions with no I/O: frame encoding and masking, close payloads,
and the HTTP/1.1 upgrade. Received frames are parsed by switchd.websocket.Connection.

No extension is ever negotiated, so a frame's RSV bits must be clear.
"""
from __future__ import annotations

import base64
import hashlib
import os
import struct

import attrs

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_HEAD = 16 * 1024

_U16 = struct.Struct("!H")
_U64 = struct.Struct("!Q")


class ProtocolError(Exception):
    """The peer broke RFC 6455; `code` is the close code to answer with."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def unmask(payload: bytes, key: bytes) -> bytes:
    """XOR with the 4-byte key; one big-integer XOR instead of a Python loop per byte."""
    n = len(payload)
    if not n:
        return b""
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(stream, "little")).to_bytes(n, "little")


def encode_frame(opcode: int, payload: bytes, *, mask: bool, fin: bool = True) -> bytes:
    n = len(payload)
    head = bytearray([(0x80 if fin else 0) | opcode])
    bit = 0x80 if mask else 0
    if n < 126:
        head.append(bit | n)
    elif n < 65536:
        head.append(bit | 126)
        head += _U16.pack(n)
    else:
        head.append(bit | 127)
        head += _U64.pack(n)
    if mask:
        key = os.urandom(4)
        return bytes(head) + key + unmask(payload, key)
    return bytes(head) + payload


def close_payload(code: int, reason: str) -> bytes:
    data = reason.encode()[:123]
    while True:  # never cut a UTF-8 sequence in half
        try:
            data.decode()
            break
        except UnicodeDecodeError:
            data = data[:-1]
    return _U16.pack(code) + data


def parse_close(payload: bytes) -> tuple[int, str]:
    """(code, reason) of a close payload, taken as it is (a benchmark's reading); see read_close."""
    if len(payload) < 2:
        return 1005, ""
    return _U16.unpack_from(payload)[0], payload[2:].decode(errors="replace")


def valid_close_code(code: int) -> bool:
    """May a peer send this code in a close frame (RFC 6455 §7.4.1 and the IANA registry)?

    1004 is reserved; 1005, 1006 and 1015 only ever stand for "no code", "lost" and "TLS failed"
    locally; 1016-2999 are for future standards, 5000 and up do not exist.
    """
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def read_close(payload: bytes) -> tuple[int, str]:
    """(code, reason) of a received close frame's payload; 1005 when it has none.

    Raises ProtocolError(1002) for what RFC 6455 says must fail the connection: a 1-byte
    payload, a code no peer may send, a reason that is not UTF-8.
    """
    if not payload:
        return 1005, ""
    if len(payload) == 1:
        raise ProtocolError(1002, "close frame with a 1-byte payload")
    (code,) = _U16.unpack_from(payload)
    if not valid_close_code(code):
        raise ProtocolError(1002, f"close code {code} may not be sent")
    try:
        reason = payload[2:].decode()
    except UnicodeDecodeError:
        raise ProtocolError(1002, "close reason is not UTF-8") from None
    return code, reason


# --- the HTTP/1.1 upgrade ---------------------------------------------------------------


@attrs.frozen
class HttpHead:
    start: str  # request line or status line
    headers: tuple[tuple[bytes, bytes], ...]  # names lower-cased

    def get(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k == name), None)

    def tokens(self, name: bytes) -> list[str]:
        """A comma-separated header's items, across repeated headers."""
        return [t.strip().decode("latin-1") for k, v in self.headers if k == name for t in v.split(b",") if t.strip()]


def parse_head(data: bytes) -> HttpHead:
    """An HTTP/1.1 request or response head (without the blank line); raises ValueError."""
    lines = data.split(b"\r\n")
    if not lines or not lines[0]:
        raise ValueError("empty head")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            raise ValueError("malformed header line")
        headers.append((name.lower(), value.strip()))
    return HttpHead(lines[0].decode("latin-1"), tuple(headers))


def accept_key(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


def check_upgrade_request(head: HttpHead) -> tuple[str, bytes]:
    """(request target, Sec-WebSocket-Key) of a valid upgrade request; raises ValueError."""
    parts = head.start.split(" ")
    if len(parts) != 3 or parts[0] != "GET" or not parts[2].startswith("HTTP/1."):
        raise ValueError("not a GET request")
    if "websocket" not in (t.lower() for t in head.tokens(b"upgrade")):
        raise ValueError("not a WebSocket upgrade")
    if "upgrade" not in (t.lower() for t in head.tokens(b"connection")):
        raise ValueError("not a WebSocket upgrade")
    if head.get(b"sec-websocket-version") != b"13":
        raise ValueError("unsupported WebSocket version")
    key = head.get(b"sec-websocket-key")
    if not key or len(base64.b64decode(key + b"==", validate=False)) < 16:
        raise ValueError("missing Sec-WebSocket-Key")
    return parts[1], key


def accept_response(key: bytes, subprotocol: str | None) -> bytes:
    lines = [
        b"HTTP/1.1 101 Switching Protocols",
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Accept: " + accept_key(key),
    ]
    if subprotocol:
        lines.append(b"Sec-WebSocket-Protocol: " + subprotocol.encode())
    return b"\r\n".join(lines) + b"\r\n\r\n"


_REASONS = {400: "Bad Request", 401: "Unauthorized", 402: "Payment Required", 426: "Upgrade Required",
            500: "Internal Server Error", 503: "Service Unavailable"}


def reject_response(status: int, body: str) -> bytes:
    data = body.encode()
    return (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    ).encode() + data


def upgrade_request(host: str, resource: str, key: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    lines = [
        f"GET {resource} HTTP/1.1".encode(),
        b"Host: " + host.encode(),
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Key: " + key,
        b"Sec-WebSocket-Version: 13",
        *(name + b": " + value for name, value in headers),
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def check_upgrade_response(head: HttpHead, key: bytes) -> None:
    """Raises ValueError unless the head is a 101 that answers our key."""
    parts = head.start.split(" ", 2)
    if len(parts) < 2 or parts[1] != "101":
        raise ValueError(f"upgrade refused with {' '.join(parts[1:]) or repr(head.start)}")
    if head.get(b"sec-websocket-accept") != accept_key(key):
        raise ValueError("wrong Sec-WebSocket-Accept")
    if head.get(b"sec-websocket-extensions"):
        raise ValueError("an extension we did not offer")
