"""The relay's WebSocket layer: the codec fuzzed as pure functions, the connection over real sockets."""
from __future__ import annotations

import base64
import os

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from switchd.ws import Closed, WsConnection, connect
from switchd.ws_codec import (
    OP_BINARY,
    OP_CONT,
    OP_PING,
    OP_TEXT,
    ProtocolError,
    accept_key,
    check_upgrade_request,
    check_upgrade_response,
    close_payload,
    encode_frame,
    parse_close,
    parse_head,
    parse_header,
    unmask,
)

MAX = 1 << 20


@given(st.sampled_from([OP_TEXT, OP_BINARY, OP_CONT]), st.binary(max_size=70_000), st.booleans(), st.booleans())
def test_frames_round_trip(opcode: int, payload: bytes, mask: bool, fin: bool) -> None:
    frame = encode_frame(opcode, payload, mask=mask, fin=fin)
    header = parse_header(frame, 0, expect_masked=mask, max_length=MAX)
    assert header is not None and (header.fin, header.opcode, header.length) == (fin, opcode, len(payload))
    assert header.size + header.length == len(frame)
    body = frame[header.size :]
    assert (unmask(body, frame[header.size - 4 : header.size]) if mask else body) == payload
    # Any cut short of the whole header is "incomplete", never an error or a wrong answer.
    for cut in range(header.size):
        assert parse_header(frame[:cut], 0, expect_masked=mask, max_length=MAX) is None


@given(st.binary(max_size=64), st.booleans())
def test_header_parser_only_raises_protocol_errors(data: bytes, masked: bool) -> None:
    try:
        header = parse_header(data, 0, expect_masked=masked, max_length=1000)
    except ProtocolError as exc:
        assert exc.code in (1002, 1009)
    else:
        assert header is None or (header.length <= 1000 and header.masked == masked)


@given(st.binary(max_size=2000), st.binary(min_size=4, max_size=4))
def test_unmask_is_an_involution(payload: bytes, key: bytes) -> None:
    assert unmask(unmask(payload, key), key) == payload
    assert unmask(payload, key) == bytes(b ^ key[i % 4] for i, b in enumerate(payload))


@given(st.integers(1000, 4999), st.text(max_size=200))
def test_close_payload_is_short_and_valid_utf8(code: int, reason: str) -> None:
    data = close_payload(code, reason)
    assert len(data) <= 125
    got_code, got_reason = parse_close(data)
    assert got_code == code and reason.startswith(got_reason)


def test_protocol_violations_are_named() -> None:
    with pytest.raises(ProtocolError) as exc:
        parse_header(encode_frame(OP_TEXT, b"x", mask=False), 0, expect_masked=True, max_length=MAX)
    assert exc.value.code == 1002  # a client must mask
    with pytest.raises(ProtocolError):
        parse_header(bytes([0xC1, 0x80, 0, 0, 0, 0]), 0, expect_masked=True, max_length=MAX)  # RSV1
    with pytest.raises(ProtocolError):
        parse_header(encode_frame(OP_PING, b"x" * 126, mask=True), 0, expect_masked=True, max_length=MAX)
    with pytest.raises(ProtocolError) as exc:
        parse_header(encode_frame(OP_TEXT, b"x" * 2000, mask=True), 0, expect_masked=True, max_length=1000)
    assert exc.value.code == 1009


@given(st.binary(max_size=300))
def test_head_parser_only_raises_value_error(data: bytes) -> None:
    try:
        head = parse_head(data)
        check_upgrade_request(head)
    except ValueError:
        pass


def test_upgrade_request_and_response_checks() -> None:
    key = base64.b64encode(os.urandom(16))
    head = parse_head(b"GET /v1/realtime?x=1 HTTP/1.1\r\nHost: h\r\nUpgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\n"
                      b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Protocol: realtime, x")
    assert check_upgrade_request(head) == ("/v1/realtime?x=1", key)
    assert head.tokens(b"sec-websocket-protocol") == ["realtime", "x"]
    with pytest.raises(ValueError):
        check_upgrade_request(parse_head(b"GET / HTTP/1.1\r\nHost: h"))
    ok = parse_head(b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: " + accept_key(key))
    check_upgrade_response(ok, key)
    with pytest.raises(ValueError, match="401"):
        check_upgrade_response(parse_head(b"HTTP/1.1 401 Unauthorized"), key)
    with pytest.raises(ValueError):
        check_upgrade_response(parse_head(b"HTTP/1.1 101 OK\r\nSec-WebSocket-Accept: bogus"), key)


async def pair() -> tuple[WsConnection, WsConnection]:
    """A server and a client connection over a real loopback TCP socket."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    client_stream = await trio.open_tcp_stream("127.0.0.1", listeners[0].socket.getsockname()[1])
    server_stream = await listeners[0].accept()
    await listeners[0].aclose()
    return (WsConnection(server_stream, bytearray(), server=True, max_message=MAX),
            WsConnection(client_stream, bytearray(), server=False, max_message=MAX))


async def test_pings_are_answered_and_fragments_reassembled() -> None:
    server, client = await pair()
    with trio.fail_after(5):
        await client.send_raw(encode_frame(OP_PING, b"hb", mask=True))
        await client.send_raw(encode_frame(OP_TEXT, b'{"type":', mask=True, fin=False))
        await client.send_raw(encode_frame(OP_PING, b"mid", mask=True))  # control frames may interleave
        await client.send_raw(encode_frame(OP_CONT, b'"x"}', mask=True))
        opcode, frame, header = await server.receive()
        assert opcode == OP_TEXT
        assert unmask(frame[header:], frame[header - 4 : header]) == b'{"type":"x"}'  # one masked frame again
        # The client sees two pongs, then the server's data.
        await server.send_text("done")
        async with trio.open_nursery():
            opcode, frame, header = await client.receive()
        assert frame[header:] == b"done"


async def test_close_handshake_echoes_and_raises_closed() -> None:
    server, client = await pair()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.aclose, 4402, "EXTERNAL_NO_CREDITS")
            with pytest.raises(Closed) as exc:
                await server.receive()
        assert (exc.value.code, exc.value.reason) == (4402, "EXTERNAL_NO_CREDITS")
        with pytest.raises(Closed):
            await server.send_text("too late")


async def test_violations_close_with_the_right_code() -> None:
    server, client = await pair()
    with trio.fail_after(5):
        await client.stream.send_all(encode_frame(OP_TEXT, b"unmasked", mask=False))
        with pytest.raises(Closed) as exc:
            await server.receive()
        assert exc.value.code == 1002
        with pytest.raises(Closed) as exc:
            await client.receive()  # the server said why
        assert exc.value.code == 1002


async def test_lost_connection_is_1006() -> None:
    server, client = await pair()
    await client.stream.aclose()
    with trio.fail_after(5), pytest.raises(Closed) as exc:
        await server.receive()
    assert exc.value.code == 1006


async def test_connect_refusals_are_connect_errors() -> None:
    from switchd.ws import ConnectError

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def answer_http(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, answer_http, listeners)
        with trio.fail_after(5), pytest.raises(ConnectError, match="403"):
            await connect(f"ws://127.0.0.1:{port}/v1/realtime", [], max_message=MAX, timeout=5)
        nursery.cancel_scope.cancel()
