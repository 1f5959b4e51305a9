"""The sans-I/O WebSocket connection, as pure functions: bytes in, events and reply bytes out."""
from __future__ import annotations

import base64
import os
import struct
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import switchd.websocket as websocket
from switchd.websocket import (
    CloseReceived,
    Connection,
    ConnectionLost,
    Event,
    LocalProtocolError,
    Message,
    ProtocolFailed,
    State,
)
from switchd.ws_codec import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    ProtocolError,
    accept_response,
    check_upgrade_request,
    check_upgrade_response,
    close_payload,
    encode_frame,
    parse_head,
    read_close,
    unmask,
    upgrade_request,
    valid_close_code,
)

MAX = 4096
keys = st.binary(min_size=4, max_size=4)


def frame(opcode: int, payload: bytes = b"", *, key: bytes | None = None, fin: bool = True, rsv: int = 0) -> bytes:
    """A frame built by hand (so tests choose the mask key and can break the rules)."""
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    bit = 0x80 if key is not None else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 65536:
        head += bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", n)
    if key is None:
        return head + payload
    return head + key + unmask(payload, key)


def close_frame(code: int | None, reason: bytes = b"", *, key: bytes | None = None) -> bytes:
    body = b"" if code is None else struct.pack("!H", code) + reason
    return frame(OP_CLOSE, body, key=key)


def peer_key(server: bool) -> bytes | None:
    """What the peer masks with: a client masks, a server does not."""
    return b"\x11\x22\x33\x44" if server else None


def feed(conn: Connection, data: bytes, cuts: list[int] | None = None) -> list[Event]:
    events: list[Event] = []
    last = 0
    for cut in sorted({c for c in cuts or () if 0 < c < len(data)}) + [len(data)]:
        if cut > last:  # b"" would mean the end of the stream
            conn.receive_data(data[last:cut])
        events += drain(conn)
        last = cut
    return events


def drain(conn: Connection) -> list[Event]:
    events = conn.events()
    while conn.has_more:
        events += conn.events()
    return events


def replies(conn: Connection) -> list[Event]:
    """What the connection sent back, as its peer reads it."""
    peer = Connection(server=not conn.server, max_message=MAX)
    peer.receive_data(conn.data_to_send())
    return drain(peer)


def read_frames(data: bytes, masked: bool) -> list[tuple[int, bytes]]:
    """(opcode, payload) of each frame in `data`, read by the plainest code there is."""
    out, pos = [], 0
    while pos < len(data):
        opcode, length = data[pos] & 0x0F, data[pos + 1] & 0x7F
        pos += 2
        if length >= 126:
            width = 2 if length == 126 else 8
            length, pos = int.from_bytes(data[pos : pos + width], "big"), pos + width
        key, pos = (data[pos : pos + 4], pos + 4) if masked else (b"", pos)
        body = data[pos : pos + length]
        out.append((opcode, unmask(body, key) if masked else body))
        pos += length
    return out


def summary(events: list[Event]) -> list[object]:
    """Events as comparable values (a re-encoded message's mask key is random)."""
    return [(e.text, e.payload, e.masked) if isinstance(e, Message) else e for e in events]


# --- messages ---------------------------------------------------------------------------


@st.composite
def conversations(draw: st.DrawFn, server: bool) -> tuple[bytes, list[tuple[bool, bytes]], list[bytes]]:
    """A peer's byte stream: messages (some fragmented, pings in between); what it means; the pings."""
    stream, messages, pings = b"", [], []
    for _ in range(draw(st.integers(0, 6))):
        text = draw(st.booleans())
        payload = draw(st.binary(max_size=300))
        parts = draw(st.lists(st.integers(0, len(payload)), max_size=4))
        bounds = [0, *sorted(parts), len(payload)]
        pieces = [payload[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
        for i, piece in enumerate(pieces):
            key = draw(keys) if server else None
            opcode = (OP_TEXT if text else OP_BINARY) if i == 0 else OP_CONT
            stream += frame(opcode, piece, key=key, fin=i == len(pieces) - 1)
            if draw(st.integers(0, 4)) == 0:
                ping = draw(st.binary(max_size=125))
                pings.append(ping)
                stream += frame(OP_PING, ping, key=draw(keys) if server else None)
        messages.append((text, payload))
    return stream, messages, pings


@given(st.data(), st.booleans(), st.one_of(st.none(), st.integers(3000, 4999)), st.binary(max_size=20))
def test_any_split_of_the_stream_gives_the_same_events_and_replies(
    data: st.DataObject, server: bool, close_code: int | None, after_close: bytes
) -> None:
    stream, messages, pings = data.draw(conversations(server))
    if close_code is not None:  # the peer ends it; whatever follows its close is never read
        stream += close_frame(close_code, b"bye", key=peer_key(server)) + after_close
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20))
    whole, split = Connection(server=server, max_message=MAX), Connection(server=server, max_message=MAX)
    got = feed(split, stream, cuts)
    assert summary(got) == summary(feed(whole, stream))
    assert [(m.text, m.payload) for m in got if isinstance(m, Message)] == messages
    # Pongs carry the pings' payloads, in order, masked iff we are the client; a close is echoed last.
    expected = [(OP_PONG, p) for p in pings]
    if close_code is None:
        assert len(got) == len(messages) and split.state is State.OPEN
    else:
        assert got[len(messages):] == [CloseReceived(close_code, "bye")] and split.state is State.CLOSED
        expected.append((OP_CLOSE, close_payload(close_code, "")))
    assert read_frames(split.data_to_send(), not server) == expected


@given(st.binary(max_size=70_000), keys, st.booleans(), st.binary(max_size=8))
def test_a_single_frame_message_keeps_its_bytes(payload: bytes, key: bytes, server: bool, prefix: bytes) -> None:
    raw = frame(OP_TEXT, payload, key=key if server else None)
    conn = Connection(server=server, max_message=1 << 17)
    [message] = feed(conn, raw)
    assert isinstance(message, Message)
    assert message.frame == raw  # forwarded untouched: still masked with the client's key
    assert message.payload == payload and message.size == len(payload) and message.text
    assert message.startswith(prefix) == payload.startswith(prefix)
    assert message.startswith(payload[:5])


@given(st.lists(st.binary(max_size=200), min_size=2, max_size=6), st.booleans(), st.booleans())
def test_a_fragmented_message_becomes_one_frame_masked_for_the_other_hop(
    parts: list[bytes], server: bool, text: bool
) -> None:
    key = peer_key(server)
    raw = b"".join(
        frame((OP_TEXT if text else OP_BINARY) if i == 0 else OP_CONT, p, key=key, fin=i == len(parts) - 1)
        + frame(OP_PING, b"hi", key=key)
        for i, p in enumerate(parts)
    )
    conn = Connection(server=server, max_message=MAX)
    [message] = feed(conn, raw)
    assert isinstance(message, Message)
    assert message.payload == b"".join(parts) and message.text == text
    # A client's message goes on to the provider, which wants it masked; a provider's to a client, unmasked.
    assert message.masked == server
    other_hop = Connection(server=server, max_message=MAX)  # the next hop reads it as we did
    [again] = feed(other_hop, message.frame)
    assert isinstance(again, Message) and again.payload == message.payload and again.text == text
    assert [e for e in replies(conn)] == []  # pongs are no events


def test_pings_are_answered_with_their_payload_and_pongs_ignored() -> None:
    conn = Connection(server=True, max_message=MAX)
    assert feed(conn, frame(OP_PING, b"abc", key=b"kkkk") + frame(OP_PONG, b"x", key=b"kkkk")) == []
    reply = conn.data_to_send()
    assert reply == frame(OP_PONG, b"abc")  # a server's frames are unmasked
    assert conn.data_to_send() == b""


def test_messages_before_an_error_are_delivered_and_nothing_after() -> None:
    key = b"abcd"
    raw = frame(OP_TEXT, b"one", key=key) + frame(OP_TEXT, b"x", key=None) + frame(OP_TEXT, b"two", key=key)
    conn = Connection(server=True, max_message=MAX)
    events = feed(conn, raw)
    assert summary(events) == [(True, b"one", True), ProtocolFailed(1002, events[1].reason)]  # type: ignore[union-attr]
    assert conn.state is State.CLOSED
    conn.receive_data(frame(OP_TEXT, b"three", key=key))
    assert drain(conn) == []


# --- ordering and fragmentation errors -----------------------------------------------------


@given(st.booleans(), st.sampled_from([OP_TEXT, OP_BINARY]))
def test_a_new_message_inside_a_fragmented_one_fails_with_1002(server: bool, opcode: int) -> None:
    key = peer_key(server)
    raw = frame(OP_TEXT, b"a", key=key, fin=False) + frame(opcode, b"b", key=key) + frame(OP_CONT, b"c", key=key)
    conn = Connection(server=server, max_message=MAX)
    events = feed(conn, raw)
    assert len(events) == 1 and isinstance(events[0], ProtocolFailed) and events[0].code == 1002
    assert [(e.code) for e in replies(conn) if isinstance(e, CloseReceived)] == [1002]


def test_a_continuation_without_a_message_fails_with_1002() -> None:
    conn = Connection(server=False, max_message=MAX)
    [event] = feed(conn, frame(OP_CONT, b"x"))
    assert isinstance(event, ProtocolFailed) and event.code == 1002


def test_complete_frames_after_an_open_fragmented_message_wait_for_it() -> None:
    # Only control frames may come between fragments; the message comes out whole, first.
    raw = (frame(OP_TEXT, b"first-", fin=False) + frame(OP_PING, b"")
           + frame(OP_CONT, b"half") + frame(OP_TEXT, b"second"))
    conn = Connection(server=False, max_message=MAX)
    events = feed(conn, raw, [3, 9, 14])
    assert [e.payload for e in events if isinstance(e, Message)] == [b"first-half", b"second"]


def lines_run(fn: Callable[[], object]) -> int:
    """How many lines of switchd/websocket.py `fn` runs: the connection's work, counted."""
    count = 0
    path = websocket.__file__

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal count
        if frame.f_code.co_filename != path:
            return None
        if event == "line":
            count += 1
        return tracer

    sys.settrace(tracer)
    try:
        fn()
    finally:
        sys.settrace(None)
    return count


def test_empty_continuations_cost_the_same_each() -> None:
    key = b"\x01\x02\x03\x04"

    def flood(n: int) -> Callable[[], object]:
        raw = frame(OP_TEXT, b"a", key=key, fin=False) + frame(OP_CONT, b"", key=key, fin=False) * n
        raw += frame(OP_CONT, b"z", key=key)
        conn = Connection(server=True, max_message=MAX)

        def run() -> None:
            events = feed(conn, raw, list(range(0, len(raw), 4096)))
            assert summary(events) == [(True, b"az", True)]
            assert conn.buffered == 0

        return run

    small, big = lines_run(flood(2_000)), lines_run(flood(20_000))
    assert big < 11 * small  # ten times the frames, ten times the work: linear, not quadratic


# --- limits and memory -------------------------------------------------------------------


@given(st.booleans())
def test_a_frame_over_the_limit_fails_with_1009_from_its_header_alone(server: bool) -> None:
    conn = Connection(server=server, max_message=MAX)
    head = frame(OP_TEXT, b"x" * (MAX + 1), key=peer_key(server))[:14]
    [event] = feed(conn, head)
    assert isinstance(event, ProtocolFailed) and event.code == 1009
    assert conn.buffered == 0


@given(st.lists(st.integers(0, MAX), min_size=1, max_size=8), st.booleans())
def test_fragments_count_toward_one_running_total(sizes: list[int], server: bool) -> None:
    key = peer_key(server)
    raw = frame(OP_BINARY, b"", key=key, fin=False)
    raw += b"".join(frame(OP_CONT, b"y" * n, key=key, fin=False) for n in sizes) + frame(OP_CONT, b"", key=key)
    conn = Connection(server=server, max_message=MAX)
    events = feed(conn, raw)
    if sum(sizes) <= MAX:
        assert summary(events) == [(False, b"y" * sum(sizes), server)]
    else:
        assert len(events) == 1 and isinstance(events[0], ProtocolFailed) and events[0].code == 1009


def test_a_big_frame_is_joined_once_when_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    parses = 0
    real = Connection._parse

    def counting(self: Connection) -> None:
        nonlocal parses
        parses += 1
        real(self)

    monkeypatch.setattr(Connection, "_parse", counting)
    limit, chunk = 4 << 20, 64 * 1024
    payload = bytes(range(256)) * (limit // 256)
    raw = frame(OP_TEXT, payload, key=b"\x00\x00\x00\x00")
    conn = Connection(server=True, max_message=limit)
    events: list[Event] = []
    for start in range(0, len(raw), chunk):
        conn.receive_data(raw[start : start + chunk])
        # Held bytes stay within the stated bound: the message limit, a header, one chunk.
        assert conn.buffered <= limit + 14 + chunk
        events += drain(conn)
    assert len(events) == 1 and isinstance(events[0], Message) and events[0].frame == raw
    assert parses == 2  # when it began and when it was whole, not once per chunk


# --- the close handshake ------------------------------------------------------------------


@given(st.integers(1000, 4999).filter(valid_close_code), st.text(max_size=40), st.booleans())
def test_a_valid_close_is_echoed(code: int, reason: str, server: bool) -> None:
    conn = Connection(server=server, max_message=MAX)
    [event] = feed(conn, close_frame(code, reason.encode(), key=peer_key(server)))
    assert event == CloseReceived(code, reason)
    assert conn.state is State.CLOSED
    assert replies(conn) == [CloseReceived(code, "")]
    with pytest.raises(LocalProtocolError):
        conn.send_text(b"late")
    assert conn.send_close(1000) == b""


def test_a_close_without_a_code_is_answered_with_1000() -> None:
    conn = Connection(server=True, max_message=MAX)
    assert feed(conn, close_frame(None, key=b"abcd")) == [CloseReceived(1005, "")]
    assert replies(conn) == [CloseReceived(1000, "")]


@given(st.one_of(st.integers(0, 999), st.sampled_from([1004, 1005, 1006, 1015]), st.integers(1016, 2999),
                 st.integers(5000, 65535)), st.booleans())
def test_codes_no_peer_may_send_are_never_echoed(code: int, server: bool) -> None:
    conn = Connection(server=server, max_message=MAX)
    [event] = feed(conn, close_frame(code, key=peer_key(server)))
    assert isinstance(event, ProtocolFailed) and event.code == 1002
    assert [e.code for e in replies(conn)] == [1002]  # type: ignore[union-attr]


@pytest.mark.parametrize("body", [b"\x03", b"\x03\xe8\xff\xfe", b"\x03\xe8\xc3"])
def test_a_malformed_close_is_answered_with_1002(body: bytes) -> None:
    conn = Connection(server=False, max_message=MAX)
    [event] = feed(conn, frame(OP_CLOSE, body))
    assert isinstance(event, ProtocolFailed) and event.code == 1002
    assert [e.code for e in replies(conn)] == [1002]  # type: ignore[union-attr]


def test_read_close_names_what_is_wrong() -> None:
    assert read_close(b"") == (1005, "")
    assert read_close(b"\x0f\xa0ok") == (4000, "ok")
    for body in (b"\x03", b"\x03\xe7", b"\x03\xe8\x80"):
        with pytest.raises(ProtocolError) as exc:
            read_close(body)
        assert exc.value.code == 1002


@given(st.booleans(), st.lists(st.binary(max_size=20), max_size=3))
def test_our_close_then_theirs_ends_without_a_second_reply(server: bool, late: list[bytes]) -> None:
    conn = Connection(server=server, max_message=MAX)
    ours = conn.send_close(4000, "bye")
    assert conn.state is State.CLOSE_SENT
    assert conn.send_close(1000) == b""
    with pytest.raises(LocalProtocolError):
        conn.send_text(b"x")
    peer = Connection(server=not server, max_message=MAX)
    assert feed(peer, ours) == [CloseReceived(4000, "bye")]
    key = peer_key(server)
    # Messages the peer sent before it saw our close still arrive; its close ends it, unanswered.
    raw = b"".join(frame(OP_TEXT, m, key=key) for m in late) + close_frame(4000, key=key)
    events = feed(conn, raw)
    assert [e.payload for e in events if isinstance(e, Message)] == late
    assert events[-1] == CloseReceived(4000, "")
    assert conn.data_to_send() == b"" and conn.state is State.CLOSED


def test_the_end_of_the_stream_is_a_lost_connection() -> None:
    conn = Connection(server=True, max_message=MAX)
    assert feed(conn, frame(OP_TEXT, b"hal", key=b"abcd")[:5]) == []
    conn.receive_data(b"")
    assert drain(conn) == [ConnectionLost()] and ConnectionLost().code == 1006
    assert conn.state is State.CLOSED and conn.data_to_send() == b""


# --- the frame rules ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        frame(OP_PING, b"x", fin=False),  # control frames are never fragmented
        frame(OP_PING, b"x" * 126),  # and short
        frame(OP_CLOSE, b"\x03\xe8" + b"x" * 124),
        frame(OP_TEXT, b"x", rsv=4),  # no extension was negotiated
        frame(OP_TEXT, b"x", rsv=1),
        frame(OP_TEXT, b"x", key=b"abcd"),  # a server must not mask
        bytes([0x83, 0x00]),  # reserved opcodes
        bytes([0x8B, 0x00]),
    ],
)
def test_frame_rule_violations_fail_with_1002(raw: bytes) -> None:
    conn = Connection(server=False, max_message=MAX)
    [event] = feed(conn, raw)
    assert isinstance(event, ProtocolFailed) and event.code == 1002
    assert [e.code for e in replies(conn)] == [1002]  # type: ignore[union-attr]


def test_a_client_must_mask() -> None:
    conn = Connection(server=True, max_message=MAX)
    [event] = feed(conn, frame(OP_TEXT, b"x"))
    assert isinstance(event, ProtocolFailed) and event.code == 1002


def test_what_we_send_is_masked_iff_we_are_the_client() -> None:
    for server in (True, False):
        conn = Connection(server=server, max_message=MAX)
        peer = Connection(server=not server, max_message=MAX)
        [message] = feed(peer, conn.send_text("héllo".encode()))
        assert isinstance(message, Message) and message.payload == "héllo".encode()
        assert message.masked == (not server)


@given(st.binary(max_size=400), st.lists(st.integers(0, 400), max_size=8), st.booleans())
def test_adversarial_bytes_end_only_by_the_documented_path(data: bytes, cuts: list[int], server: bool) -> None:
    conn = Connection(server=server, max_message=200)
    events = feed(conn, data, cuts)
    ends = [i for i, e in enumerate(events) if not isinstance(e, Message)]
    assert ends in ([], [len(events) - 1])  # messages, then at most one end, last
    for e in events:
        if isinstance(e, Message):
            assert e.size <= 200 and e.masked == server
    if ends and isinstance(events[-1], ProtocolFailed):
        assert events[-1].code in (1002, 1009)
        assert conn.state is State.CLOSED
        assert [e.code for e in replies(conn)] == [events[-1].code]  # type: ignore[union-attr]
    assert conn.buffered <= 200 + 14 + len(data)


def test_a_read_of_many_frames_is_parsed_a_batch_at_a_time() -> None:
    n = websocket.BATCH_FRAMES * 2 + 5
    conn = Connection(server=False, max_message=MAX)
    conn.receive_data(frame(OP_TEXT, b"m") * n)
    conn.receive_data(b"")  # the end comes after every frame that came before it
    sizes = []
    while True:
        events = conn.events()
        sizes.append(len(events))
        if not conn.has_more:
            break
    assert sizes == [websocket.BATCH_FRAMES, websocket.BATCH_FRAMES, 6]
    assert events[-1] == ConnectionLost()


# --- the codec: encoding, masking, close payloads, the upgrade --------------------------------


@given(st.sampled_from([OP_TEXT, OP_BINARY]), st.binary(max_size=70_000), st.booleans())
def test_encoded_frames_read_back(opcode: int, payload: bytes, mask: bool) -> None:
    raw = encode_frame(opcode, payload, mask=mask)
    assert read_frames(raw, mask) == [(opcode, payload)]
    [message] = feed(Connection(server=mask, max_message=1 << 17), raw)
    assert isinstance(message, Message) and message.payload == payload and message.frame == raw


@given(st.binary(max_size=2000), keys)
def test_unmask_is_an_involution(payload: bytes, key: bytes) -> None:
    assert unmask(unmask(payload, key), key) == payload
    assert unmask(payload, key) == bytes(b ^ key[i % 4] for i, b in enumerate(payload))


@given(st.integers(1000, 4999).filter(valid_close_code), st.text(max_size=200))
def test_close_payloads_are_short_valid_and_read_back(code: int, reason: str) -> None:
    data = close_payload(code, reason)
    assert len(data) <= 125  # a control frame's payload
    got_code, got_reason = read_close(data)
    assert got_code == code and reason.startswith(got_reason)


@given(st.binary(max_size=300))
def test_head_parser_only_raises_value_error(data: bytes) -> None:
    try:
        check_upgrade_request(parse_head(data))
    except ValueError:
        pass


def test_upgrade_request_and_response_checks() -> None:
    key = base64.b64encode(os.urandom(16))
    head = parse_head(b"GET /v1/realtime?x=1 HTTP/1.1\r\nHost: h\r\nUpgrade: WebSocket\r\n"
                      b"Connection: keep-alive, Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                      b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Protocol: realtime, x")
    assert check_upgrade_request(head) == ("/v1/realtime?x=1", key)
    assert head.tokens(b"sec-websocket-protocol") == ["realtime", "x"]
    with pytest.raises(ValueError):
        check_upgrade_request(parse_head(b"GET / HTTP/1.1\r\nHost: h"))
    request = parse_head(upgrade_request("h:1", "/r", key, [(b"Authorization", b"Bearer k")])[:-4])
    assert check_upgrade_request(request) == ("/r", key) and request.get(b"authorization") == b"Bearer k"
    check_upgrade_response(parse_head(accept_response(key, None)[:-4]), key)
    with pytest.raises(ValueError, match="upgrade refused with 401 Unauthorized"):
        check_upgrade_response(parse_head(b"HTTP/1.1 401 Unauthorized"), key)
    with pytest.raises(ValueError, match="Sec-WebSocket-Accept"):
        check_upgrade_response(parse_head(b"HTTP/1.1 101 OK\r\nSec-WebSocket-Accept: bogus"), key)
