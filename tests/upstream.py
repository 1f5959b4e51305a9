"""A scripted provider for end-to-end tests: each upstream connection is handed to the test.

It stands in for OpenAI itself (not for any daemon of ours), so a test can script exactly what
the provider says and does: send events, read what switchd sent, close with any code.
"""
from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket


@dataclass
class Upstream:
    ws: WebSocketConnection
    path: str
    headers: dict[str, str]
    released: trio.Event = field(default_factory=trio.Event)

    async def receive_json(self) -> dict:
        return json.loads(await self.ws.get_message())

    async def send_json(self, event: dict) -> None:
        await self.ws.send_message(json.dumps(event, separators=(",", ":")))

    async def close(self, code: int, reason: str = "") -> None:
        await self.ws.aclose(code, reason)
        self.released.set()


@dataclass
class ScriptedProvider:
    url: str
    connections: trio.MemoryReceiveChannel[Upstream]

    async def next(self, timeout: float = 15) -> Upstream:
        with trio.fail_after(timeout):
            return await self.connections.receive()


@asynccontextmanager
async def scripted_provider(ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[ScriptedProvider]:
    """On ws://, or on wss:// with `ssl_context` (a certificate for 127.0.0.1)."""
    send, receive = trio.open_memory_channel[Upstream](100)

    async def handler(request: WebSocketRequest) -> None:
        headers = {k.decode().lower(): v.decode() for k, v in request.headers}
        ws = await request.accept(subprotocol="realtime" if "realtime" in request.proposed_subprotocols else None)
        up = Upstream(ws, request.path, headers)
        await send.send(up)
        try:
            await up.released.wait()
        except ConnectionClosed:
            pass

    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, ssl_context)
        scheme = "wss" if ssl_context else "ws"
        yield ScriptedProvider(f"{scheme}://127.0.0.1:{server.port}/v1/realtime?model=gpt-realtime", receive)
        nursery.cancel_scope.cancel()


def session_created(model: str = "gpt-realtime") -> dict:
    return {
        "type": "session.created",
        "event_id": "event_created",
        "session": {"id": "sess_test", "object": "realtime.session", "type": "realtime", "model": model,
                    "expires_at": 1, "instructions": "default", "tracing": None},
    }


def response_done(input_audio: int, output_audio: int, metadata: dict | None = None) -> dict:
    return {
        "type": "response.done",
        "event_id": "event_done",
        "response": {
            "object": "realtime.response", "id": "resp_1", "status": "completed", "metadata": metadata,
            "usage": {
                "total_tokens": input_audio + output_audio, "input_tokens": input_audio, "output_tokens": output_audio,
                "input_token_details": {"text_tokens": 0, "audio_tokens": input_audio, "image_tokens": 0, "cached_tokens": 0},
                "output_token_details": {"text_tokens": 0, "audio_tokens": output_audio},
            },
        },
    }
