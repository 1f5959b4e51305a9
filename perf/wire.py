"""Pre-built WebSocket frames for the lean load engine (perf.engine): patch a few digits, write.

The engine's per-message work must stay far below switchd's, so nothing is encoded per message.
A client frame is masked with the all-zero key (mask bit set, key 0x00000000: valid per
RFC 6455 §5.3, and XOR with zero leaves the payload as plain text), so the sequence number is
patched in place in a template and the very same bytes go out. switchd forwards a client's frame
as it arrived, so the peer reads our plain-text payload too. Every id has a fixed width, so
frame lengths, and so headers, never change.
"""
from __future__ import annotations

import base64
import random

from switchd.ws_codec import OP_CLOSE, OP_TEXT, close_payload

ZERO_KEY = b"\0\0\0\0"
BYTES_PER_MS = 48  # PCM16 mono at 24 kHz
# The event_id of every append: "lg" + 6-digit client index + "_" + 8-digit sequence number.
MARK = b'"event_id":"lg'
ID_LEN = 15
APPEND_PREFIX = b'{"type":"input_audio_buffer.append"'
_APPEND = '{"type":"input_audio_buffer.append","event_id":"lg%06d_%08d","audio":"%s"}'


def head(length: int, *, masked: bool, opcode: int = OP_TEXT) -> bytes:
    """A final frame's header; masked ones carry the zero key."""
    bit = 0x80 if masked else 0
    if length < 126:
        out = bytes([0x80 | opcode, bit | length])
    elif length < 65536:
        out = bytes([0x80 | opcode, bit | 126]) + length.to_bytes(2, "big")
    else:
        out = bytes([0x80 | opcode, bit | 127]) + length.to_bytes(8, "big")
    return out + ZERO_KEY if masked else out


def client_frame(payload: bytes, opcode: int = OP_TEXT) -> bytes:
    return head(len(payload), masked=True, opcode=opcode) + payload


def server_frame(payload: bytes, opcode: int = OP_TEXT) -> bytes:
    return head(len(payload), masked=False, opcode=opcode) + payload


def close_frame(code: int, *, masked: bool) -> bytes:
    payload = close_payload(code, "")
    return client_frame(payload, OP_CLOSE) if masked else server_frame(payload, OP_CLOSE)


def audio_b64(frame_ms: int, frame_bytes: int | None) -> str:
    """Base64 audio for one append: `frame_ms` of PCM16, or sized so the append's payload is ~`frame_bytes`."""
    if frame_bytes is not None:
        overhead = len(_APPEND % (0, 0, ""))
        raw = max(4, (frame_bytes - overhead) // 4 * 4) // 4 * 3
    else:
        raw = frame_ms * BYTES_PER_MS
    return base64.b64encode(random.Random(5).randbytes(raw)).decode()


class AppendTemplate:
    """One client's append frame; `frame(seq)` patches the sequence number in place and returns the buffer."""

    __slots__ = ("buf", "_seq_at")

    def __init__(self, client: int, audio: str) -> None:
        self.buf = bytearray(client_frame((_APPEND % (client, 0, audio)).encode()))
        self._seq_at = self.buf.index(MARK) + len(MARK) + 7

    def frame(self, seq: int) -> bytearray:
        at = self._seq_at
        self.buf[at : at + 8] = b"%08d" % seq
        return self.buf  # the caller copies it if the kernel does not take it whole


class DeltaTemplate:
    """The peer's audio delta answering one append: the append's id copied in place, the audio pre-built."""

    __slots__ = ("buf", "_id_at")

    def __init__(self, head_format: str, audio: str) -> None:
        self.buf = bytearray(server_frame((head_format % ("lg000000_00000000", audio)).encode()))
        self._id_at = self.buf.index(MARK) + len(MARK)

    def frame(self, append_id: bytes) -> bytes:
        at = self._id_at
        self.buf[at : at + ID_LEN] = append_id
        return bytes(self.buf)
