"""The simulator's WebRTC calls (a real aiortc browser and provider), sidebands, hangup, and
transcription sessions."""
from __future__ import annotations

import base64
import json
import math
from array import array
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, WebSocketConnection, open_websocket_url

from switchd.sim import SimOptions, serve
from switchd.sim import events as ev
from tests.webrtc import browser

KEY = "sk-test"


@asynccontextmanager
async def sim(**options: Any) -> AsyncIterator[int]:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(partial(serve, "127.0.0.1", 0, options=SimOptions(fast=True, **options)))
        yield port
        nursery.cancel_scope.cancel()


async def post(port: int, path: str, body: bytes = b"", key: str = KEY, content_type: str = "application/sdp"
               ) -> tuple[int, bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all((f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                               f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body)
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), payload


@asynccontextmanager
async def sideband(port: int, call_id: str, key: str = KEY) -> AsyncIterator[WebSocketConnection]:
    async with open_websocket_url(f"ws://127.0.0.1:{port}/v1/realtime?call_id={call_id}",
                                  extra_headers=[("Authorization", f"Bearer {key}")]) as ws:
        yield ws


async def until(ws: WebSocketConnection, type_: str) -> dict[str, Any]:
    while (event := json.loads(await ws.get_message()))["type"] != type_:
        pass
    return event


def speech(ms: int, amplitude: int) -> str:
    samples = array("h", (round(amplitude * math.sin(2 * math.pi * 300 * i / 24000)) for i in range(24 * ms)))
    return base64.b64encode(samples.tobytes()).decode()


async def test_a_call_connects_its_data_channel_and_sideband_carry_the_session() -> None:
    with trio.fail_after(60):
        async with sim() as port, browser(f"http://127.0.0.1:{port}/v1/realtime/calls", KEY) as peer:
            answered = await peer.until("answered")
            assert answered["status"] == 201 and answered["location"].startswith("/v1/realtime/calls/rtc_")
            call_id = answered["location"].rsplit("/", 1)[1]
            await peer.until("open")
            created = (await peer.until("event", "session.created"))["event"]
            assert created["session"]["model"] == ev.DEFAULT_MODEL
            with pytest.raises(ConnectionRejected) as refused:  # never with a client secret
                async with sideband(port, call_id, "ek_abc"):
                    pass
            assert refused.value.status_code == 404
            async with sideband(port, call_id):
                pass  # a sideband that leaves first: the call and the simulator go on
            async with sideband(port, call_id) as side:
                # A client event on the data channel; its response on both, usage included.
                await peer.send({"type": "response.create", "response": {"output_modalities": ["text"]}})
                done = (await peer.until("event", "response.done"))["event"]
                assert done["response"]["usage"]["output_tokens"] > 0
                side_done = await until(side, "response.done")
                assert side_done["response"]["id"] == done["response"]["id"]
                assert side_done["response"]["usage"] == done["response"]["usage"]
                # The sideband configures the session too; the browser sees the result.
                await side.send_message(json.dumps({"type": "session.update", "session": {
                    "type": "realtime", "instructions": "From the server."}}))
                assert (await until(side, "session.updated"))["session"]["instructions"] == "From the server."
                assert (await peer.until("event", "session.updated"))["event"]["session"]["instructions"] == \
                    "From the server."
                # Hangup ends it for the browser and the sideband; a second hangup finds no call.
                assert await post(port, f"/v1/realtime/calls/{call_id}/hangup") == (200, b"")
                await peer.until("closed")
                with pytest.raises(ConnectionClosed):
                    while True:
                        await side.get_message()
            status, body = await post(port, f"/v1/realtime/calls/{call_id}/hangup")
            assert status == 404 and json.loads(body)["error"]["code"] == "call_id_not_found"


async def test_multipart_session_config_and_the_browser_leaving() -> None:
    session = {"type": "realtime", "model": "gpt-realtime-2.1-mini", "instructions": "Sell shoes."}
    with trio.fail_after(60):
        async with sim() as port:
            async with browser(f"http://127.0.0.1:{port}/v1/realtime/calls", KEY, session) as peer:
                call_id = (await peer.until("answered"))["location"].rsplit("/", 1)[1]
                created = (await peer.until("event", "session.created"))["event"]["session"]
                assert created["model"] == "gpt-realtime-2.1-mini" and created["instructions"] == "Sell shoes."
                async with sideband(port, call_id) as side:
                    await peer.command(op="close")
                    await peer.until("closed")
                    with pytest.raises(ConnectionClosed):  # the provider ends the call when the browser leaves
                        while True:
                            await side.get_message()
            assert (await post(port, f"/v1/realtime/calls/{call_id}/hangup"))[0] == 404


async def test_refusals() -> None:
    async with sim() as port:
        status, body = await post(port, "/v1/realtime/calls", b"not sdp")
        assert status == 400 and json.loads(body)["error"]["message"]
        assert (await post(port, "/v1/realtime/calls", b"v=0\r\nm=audio 9 X 0\r\n", key="sk-invalid"))[0] == 401
        status, body = await post(port, "/v1/realtime/calls", b"v=0\r\nm=audio 9 X 0\r\n")
        assert status == 400 and "cannot be answered" in json.loads(body)["error"]["message"]
        assert (await post(port, "/v1/realtime/calls/rtc_nothing/hangup"))[0] == 404
        for key in (KEY, "ek_123"):  # no such call; and a client secret never opens a sideband
            with pytest.raises(ConnectionRejected) as info:
                async with sideband(port, "rtc_nothing", key):
                    pass
            assert info.value.status_code == 404
            assert json.loads(info.value.body or b"")["error"]["code"] == "call_id_not_found"


@pytest.mark.parametrize("model, usage_type", [("gpt-4o-mini-transcribe", "tokens"), ("whisper-1", "duration")])
async def test_transcription_sessions(model: str, usage_type: str) -> None:
    async with sim() as port, open_websocket_url(f"ws://127.0.0.1:{port}/v1/realtime?intent=transcription") as ws:
        created = await until(ws, "session.created")
        assert created["session"]["type"] == "transcription" and "model" not in created["session"]
        await ws.send_message(json.dumps({"type": "session.update", "session": {
            "type": "transcription", "audio": {"input": {"transcription": {"model": model}}}}}))
        await until(ws, "session.updated")
        await ws.send_message(json.dumps({"type": "response.create"}))
        assert (await until(ws, "error"))["error"]["param"] == "type"
        for chunk in [speech(100, 8000)] * 10 + [speech(100, 0)] * 8:
            await ws.send_message(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))
        completed = await until(ws, "conversation.item.input_audio_transcription.completed")
        usage = completed["usage"]
        assert usage["type"] == usage_type
        if usage_type == "duration":
            assert 1.0 <= usage["seconds"] <= 1.8
        else:
            assert usage["input_token_details"]["audio_tokens"] > 0


async def test_a_transcription_call() -> None:
    session = {"type": "transcription", "audio": {"input": {"transcription": {"model": "whisper-1"}}}}
    with trio.fail_after(60):
        async with sim() as port, browser(f"http://127.0.0.1:{port}/v1/realtime/calls", KEY, session) as peer:
            call_id = (await peer.until("answered"))["location"].rsplit("/", 1)[1]
            created = (await peer.until("event", "session.created"))["event"]["session"]
            assert created["type"] == "transcription"
            assert created["audio"]["input"]["transcription"]["model"] == "whisper-1"
            async with sideband(port, call_id) as side:
                await side.send_message(json.dumps({"type": "response.create"}))
                assert (await until(side, "error"))["error"]["param"] == "type"  # no responses here
