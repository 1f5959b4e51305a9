"""A response the provider bills is billed, however the client leaves (close, reset, a frame past the limit).

The client is a raw WebSocket over a plain socket so that each way of leaving is exactly what
it says: a close frame, a TCP reset, or the header of a frame too big to accept.
"""
from __future__ import annotations

import base64
import os
import signal
import socket
import struct
from urllib.parse import urlsplit

import pytest
import trio
from trio_websocket import ConnectionClosed

from switchd.ws_codec import OP_CLOSE, OP_TEXT, close_payload, encode_frame, upgrade_request
from tests.stack import Stack, client_url
from tests.upstream import ScriptedProvider, Upstream, response_done, session_created

AUDIO_DELTA = {"type": "response.output_audio.delta", "response_id": "resp_1", "delta": "AAAA" * 64}


async def open_raw(url: str) -> tuple[trio.SocketStream, bytes]:
    """A client WebSocket by hand: the stream and what came after the 101 head."""
    parts = urlsplit(url)
    stream = await trio.open_tcp_stream(parts.hostname or "", parts.port or 80)
    key = base64.b64encode(os.urandom(16))
    await stream.send_all(upgrade_request(parts.netloc, f"{parts.path}?{parts.query}", key, []))
    data = b""
    while b"\r\n\r\n" not in data:
        data += await stream.receive_some(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    return stream, rest


async def receive_until(stream: trio.SocketStream, data: bytes, marker: bytes, count: int) -> bytes:
    while data.count(marker) < count:
        data += await stream.receive_some(65536)
    return data


async def leave(stream: trio.SocketStream, way: str) -> None:
    if way == "close":
        await stream.send_all(encode_frame(OP_CLOSE, close_payload(1000, "bye"), mask=True))
        await stream.aclose()
    elif way == "reset":
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await stream.aclose()
    else:  # the header of a 20 MB text frame: past the WebSocket layer's limit, answered with 1009
        await stream.send_all(bytes([0x81, 0x80 | 127]) + (20_000_000).to_bytes(8, "big") + os.urandom(4) + b"x" * 100)
        data = b""
        with trio.fail_after(10):
            while (1009).to_bytes(2, "big") not in data:  # the close frame's code
                data += await stream.receive_some(65536)
        await stream.aclose()


async def until_type(up: Upstream, kind: str) -> dict:
    with trio.fail_after(10):
        while (event := await up.receive_json())["type"] != kind:
            pass
    return event


async def billed(stack: Stack, account_id: str, credits: int) -> None:
    with trio.fail_after(15):
        while await stack.credits(account_id) != credits:
            await trio.lowlevel.checkpoint()  # billed once the session hands its usage over


@pytest.mark.parametrize("way", ["close", "reset", "oversize"])
async def test_response_in_progress_is_billed_when_the_client_leaves(
    stack: Stack, provider: ScriptedProvider, way: str
) -> None:
    account_id, key = await stack.account(tokens=100_000)
    async with stack.switchd(provider.url, MAX_PAYLOAD_LENGTH="1000") as sw:
        stream, rest = await open_raw(client_url(sw, key, f"leave-{way}"))
        up = await provider.next()
        await up.send_json(session_created())
        await stream.send_all(encode_frame(OP_TEXT, b'{"type":"response.create"}', mask=True))
        await until_type(up, "response.create")
        await up.send_json({"type": "response.created", "response": {"id": "resp_1", "status": "in_progress",
                                                                     "usage": None}})
        for _ in range(5):
            await up.send_json(AUDIO_DELTA)
        with trio.fail_after(10):
            await receive_until(stream, rest, b"response.output_audio.delta", 5)  # the client has its audio
        await leave(stream, way)
        # The switch asks the provider to stop, and still reads the usage of what it generated.
        await until_type(up, "response.cancel")
        await up.send_json(response_done(100, 233))
        await billed(stack, account_id, 100_000 - 333)
    usage = await stack.cli("usage", "--account", account_id)
    assert usage["total_tokens"] == 333


async def test_response_asked_for_just_before_leaving_is_billed(stack: Stack, provider: ScriptedProvider) -> None:
    account_id, key = await stack.account(tokens=100_000)
    async with stack.switchd(provider.url) as sw:
        stream, rest = await open_raw(client_url(sw, key, "ask-and-go"))
        up = await provider.next()
        await up.send_json(session_created())
        with trio.fail_after(10):
            await receive_until(stream, rest, b"session.created", 1)  # the switch relays: its upstream is open
        await stream.send_all(encode_frame(OP_TEXT, b'{"type": "response.create"}', mask=True))
        await leave(stream, "close")
        await until_type(up, "response.create")
        # The provider had not said response.created yet when the client left: the switch waits for it.
        await until_type(up, "response.cancel")
        await up.send_json({"type": "response.created", "response": {"id": "resp_1", "usage": None}})
        await up.send_json(response_done(10, 20))
        await billed(stack, account_id, 100_000 - 30)


async def test_transcription_in_flight_is_billed_when_the_client_leaves(
    stack: Stack, provider: ScriptedProvider
) -> None:
    account_id, key = await stack.account(tokens=100_000)
    async with stack.switchd(provider.url) as sw:
        stream, rest = await open_raw(client_url(sw, key, "leave-transcribing"))
        up = await provider.next()
        await up.send_json(session_created())
        await up.send_json({"type": "session.updated", "session": {
            "type": "realtime", "audio": {"input": {"transcription": {"model": "gpt-4o-mini-transcribe"},
                                                    "turn_detection": None}}}})
        await up.send_json({"type": "input_audio_buffer.committed", "item_id": "item_1"})
        with trio.fail_after(10):
            await receive_until(stream, rest, b"input_audio_buffer.committed", 1)
        await leave(stream, "reset")
        log = stack.tmp / "switchd.log"
        with trio.fail_after(10):
            while "settling" not in log.read_text():
                await trio.lowlevel.checkpoint()  # the switch has seen the client go
        await up.send_json({"type": "conversation.item.input_audio_transcription.completed", "item_id": "item_1",
                            "content_index": 0, "transcript": "hi",
                            "usage": {"type": "tokens", "total_tokens": 22, "input_tokens": 13, "output_tokens": 9}})
        await billed(stack, account_id, 100_000 - 22)


async def test_client_leaving_with_nothing_in_flight_ends_at_once(stack: Stack, provider: ScriptedProvider) -> None:
    _, key = await stack.account()
    async with stack.switchd(provider.url) as sw:
        stream, _ = await open_raw(client_url(sw, key, "nothing-owed"))
        up = await provider.next()
        await up.send_json(session_created())
        await up.send_json(response_done(1, 1))  # a finished response owes nothing more
        await leave(stream, "close")
        with trio.fail_after(5), pytest.raises(ConnectionClosed):
            while True:  # the switch closes the upstream: the provider reads the end
                await up.ws.get_message()


async def test_shutdown_lets_the_response_under_way_finish_and_bills_it(
    stack: Stack, provider: ScriptedProvider
) -> None:
    account_id, key = await stack.account(tokens=100_000)
    async with stack.switchd(provider.url) as sw:
        stream, rest = await open_raw(client_url(sw, key, "shutdown-mid-response"))
        up = await provider.next()
        await up.send_json({"type": "response.created", "response": {"id": "resp_1", "usage": None}})
        await up.send_json(AUDIO_DELTA)
        with trio.fail_after(10):
            rest = await receive_until(stream, rest, b"response.output_audio.delta", 1)
        sw.terminate(signal.SIGTERM)
        log = stack.tmp / "switchd.log"
        with trio.fail_after(10):
            while "shutting down" not in log.read_text():
                await trio.lowlevel.checkpoint()
        await up.send_json(response_done(50, 70))  # the provider finishes what it was producing
        with trio.fail_after(10):
            rest = await receive_until(stream, rest, b"response.done", 1)  # the client gets it, then 1001
            rest = await receive_until(stream, rest, (1001).to_bytes(2, "big"), 1)
        with trio.fail_after(15):
            assert await sw.proc.wait() == 0
    assert await stack.credits(account_id) == 100_000 - 120
