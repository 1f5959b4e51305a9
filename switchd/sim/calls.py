"""The simulator's WebRTC calls, as the provider has them (issue 17).

`POST /v1/realtime/calls` (raw SDP, or multipart `sdp` + `session`) answers a real WebRTC offer
with a real answer (aiortc, in `switchd.sim.rtcpeer`'s process) and a `Location` naming the
call. The call runs a simulated session: its events go to the browser on the `oai-events`
data channel (audio deltas excepted: audio is on the media track) and to every sideband
WebSocket attached with `/v1/realtime?call_id=…`; client events come from either.
`POST /v1/realtime/calls/{id}/hangup` ends it (404 `call_id_not_found` once it has ended), as
does the browser leaving or the session cap. The listener also answers these plain-HTTP paths
beside the WebSocket upgrades it hands to trio-websocket.
"""
from __future__ import annotations

import json
import logging
import secrets
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any
from urllib.parse import parse_qs, urlsplit

import trio
from trio_websocket import ConnectionClosed, Endpoint, WebSocketConnection, WebSocketRequest, wrap_server_stream

from common.errors import ErrorCode, SwitchError
from switchd import http_api
from switchd.sim import events as ev
from switchd.sim.session import ResponseJob, Session
from switchd.sim.transcription import TranscriptionSession
from switchd.wsio import read_head

log = logging.getLogger(__name__)

ANSWER_TIMEOUT_S = 15.0
HEAD_TIMEOUT_S = 10.0
SEND_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 5.0
INBOX = 1024
AUDIO_DELTA = "response.output_audio.delta"


class _Replay(trio.abc.Stream):
    """A stream whose first bytes were already read (the request head): they are read again first."""

    def __init__(self, stream: trio.abc.Stream, data: bytes) -> None:
        self.stream, self.data = stream, data

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.data:
            data, self.data = self.data, b""
            return data
        return bytes(await self.stream.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.stream.aclose()


class RtcPeer:
    """The aiortc process, started with the first call; commands and events as JSON lines."""

    def __init__(self) -> None:
        self.process: trio.Process | None = None
        self.answers: dict[str, trio.MemorySendChannel[dict[str, Any]]] = {}
        self.calls: dict[str, Call] = {}
        self._lock = trio.Lock()
        self._start_lock = trio.Lock()

    async def ensure_started(self, nursery: trio.Nursery) -> None:
        async with self._start_lock:
            if self.process is None:
                await nursery.start(self._run)

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self.process = await nursery.start(partial(
                trio.run_process, [sys.executable, "-m", "switchd.sim.rtcpeer"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, check=False))
            task_status.started()
            await self._read()

    async def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        buffer = b""
        while data := await self.process.stdout.receive_some(1 << 16):
            buffer += data
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                self._dispatch(json.loads(line))
        log.error("the WebRTC peer process ended")

    def _dispatch(self, message: dict[str, Any]) -> None:
        op, call_id = message["op"], message["call"]
        if op in ("answer", "error"):
            waiter = self.answers.pop(call_id, None)
            if waiter is not None:
                waiter.send_nowait(message)
            return
        call = self.calls.get(call_id)
        if call is None:
            return
        if op == "open":
            call.channel_open()
        elif op == "message":
            call.receive(message["text"])
        elif op == "closed":
            call.end()

    async def command(self, **message: Any) -> None:
        if self.process is None or self.process.stdin is None:
            return
        async with self._lock:
            with trio.CancelScope(shield=True):  # a line cut short would garble the next one
                await self.process.stdin.send_all(json.dumps(message, separators=(",", ":")).encode() + b"\n")

    async def answer(self, call_id: str, sdp: str) -> str:
        send, receive = trio.open_memory_channel[dict[str, Any]](1)
        self.answers[call_id] = send
        try:
            await self.command(op="offer", call=call_id, sdp=sdp)
            with trio.fail_after(ANSWER_TIMEOUT_S):
                reply = await receive.receive()
        finally:
            self.answers.pop(call_id, None)
        if reply["op"] == "error":
            raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, f"the SDP offer cannot be answered: {reply['message']}")
        return str(reply["sdp"])


class Call:
    def __init__(self, call_id: str, session: Session, peer: RtcPeer) -> None:
        self.id, self.session, self.peer = call_id, session, peer
        self.sidebands: set[WebSocketConnection] = set()
        self.inbox_send, self.inbox = trio.open_memory_channel[str](INBOX)
        self.ended = trio.Event()
        self._open = trio.Event()

    def channel_open(self) -> None:
        self._open.set()

    def receive(self, text: str) -> None:
        try:
            self.inbox_send.send_nowait(text)
        except trio.WouldBlock:
            log.warning("call %s: client events dropped, the session is not keeping up", self.id)

    def end(self) -> None:
        self.ended.set()

    async def run(self, *, fast: bool, max_seconds: float) -> None:
        self.peer.calls[self.id] = self
        try:
            with trio.move_on_after(max_seconds):
                async with trio.open_nursery() as nursery:
                    jobs_in, jobs_out = trio.open_memory_channel[ResponseJob](0)
                    nursery.start_soon(self._greet)
                    nursery.start_soon(self._read, jobs_in, nursery.cancel_scope)
                    nursery.start_soon(self._respond, jobs_out, fast)
                    await self.ended.wait()
                    nursery.cancel_scope.cancel()
        finally:
            self.ended.set()
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await self.peer.command(op="hangup", call=self.id)
                for ws in list(self.sidebands):
                    await ws.aclose(1000, "call ended")
            self.peer.calls.pop(self.id, None)
            log.info("call %s ended", self.id)

    async def _greet(self) -> None:
        await self._open.wait()
        await self._broadcast(self.session.created_event(), sideband=False)

    async def _read(self, jobs: trio.MemorySendChannel[ResponseJob], scope: trio.CancelScope) -> None:
        async with jobs:
            async for text in self.inbox:
                reaction = self.session.handle(text)
                for event in reaction.events:
                    await self._broadcast(event)
                if reaction.response is not None:
                    await jobs.send(reaction.response)
                if reaction.close is not None:
                    self.ended.set()

    async def _respond(self, jobs: trio.MemoryReceiveChannel[ResponseJob], fast: bool) -> None:
        async with jobs:
            async for job in jobs:
                for event in ev.response_start_events(job.ref):
                    await self._broadcast(event)
                start = trio.current_time()
                with job.cancel_scope:
                    for step in job.steps:
                        await trio.sleep_until(start if fast else start + step.at)
                        await self._broadcast(job.step_event(step))
                for event in self.session.finish_response(job):
                    await self._broadcast(event)

    async def _broadcast(self, event: ev.Event, sideband: bool = True) -> None:
        if event["type"] == AUDIO_DELTA:
            return  # the model's audio is on the media track
        text = ev.encode(event)
        if self._open.is_set():
            await self.peer.command(op="send", call=self.id, text=text)
        if not sideband:
            return
        for ws in list(self.sidebands):
            try:
                with trio.CancelScope(shield=True), trio.fail_after(SEND_TIMEOUT_S):
                    await ws.send_message(text)
            except (ConnectionClosed, trio.TooSlowError):
                self.sidebands.discard(ws)

    async def attach(self, ws: WebSocketConnection) -> None:
        """A sideband: the call's server events out, client events in, until either ends."""
        self.sidebands.add(ws)
        try:
            async with trio.open_nursery() as nursery:
                async def watch_end() -> None:
                    await self.ended.wait()
                    nursery.cancel_scope.cancel()

                async def read() -> None:
                    try:
                        while True:
                            message = await ws.get_message()
                            if isinstance(message, str):
                                self.receive(message)
                    except ConnectionClosed:
                        nursery.cancel_scope.cancel()

                nursery.start_soon(watch_end)
                nursery.start_soon(read)
        finally:
            self.sidebands.discard(ws)


# --- the listener -----------------------------------------------------------------------------

class Calls:
    """Every call of one simulator, and what answering one needs."""

    def __init__(self, nursery: trio.Nursery, fast: bool, max_seconds: float) -> None:
        self.nursery, self.fast, self.max_seconds = nursery, fast, max_seconds
        self.peer = RtcPeer()

    def find(self, call_id: str) -> Call | None:
        call = self.peer.calls.get(call_id)
        return call if call is not None and not call.ended.is_set() else None

    async def create(self, request: http_api.CallRequest) -> tuple[str, str]:
        """(call id, SDP answer) of a new call, running from now on."""
        config = dict(request.session or {"type": "realtime"})
        now = time.time()
        session: Session
        if config.get("type") == "transcription":
            session = TranscriptionSession(now=now, max_session_seconds=self.max_seconds)
            session.configure(config)
        else:
            session = Session(str(config.pop("model", ev.DEFAULT_MODEL)), now=now, max_session_seconds=self.max_seconds)
            update = ev.validate_session_update(config, session.config, audio_emitted=False)
            session.config = ev.merge_session(session.config, update)
        await self.peer.ensure_started(self.nursery)
        call_id = "rtc_u1_" + secrets.token_hex(16)
        answer = await self.peer.answer(call_id, request.sdp)
        call = Call(call_id, session, self.peer)
        self.peer.calls[call_id] = call
        self.nursery.start_soon(partial(call.run, fast=self.fast, max_seconds=self.max_seconds))
        return call_id, answer


def sideband_call(target: str) -> str | None:
    values = parse_qs(urlsplit(target).query).get("call_id")
    return values[0] if values else None


def _error(status: int, code: str, message: str) -> bytes:
    return http_api.json_response(status, {"error": {"message": message, "type": "invalid_request_error",
                                                     "code": code, "param": None}})


async def _answer_http(calls: Calls, stream: trio.abc.Stream, head: Any, rest: bytearray) -> bytes:
    try:
        target = http_api.route(head.start)
        if target is None:
            return _error(404, "not_found", "Unknown path.")
        if target.route is http_api.Route.PREFLIGHT:
            return http_api.preflight_response()
        # Like its WebSocket handshake, the simulator takes a request without a key.
        key = ev.api_key({"authorization": (head.get(b"authorization") or b"").decode("latin-1")}, ()) or ""
        if key.startswith("sk-invalid"):
            return _error(401, "invalid_api_key", "Incorrect API key provided.")
        length = http_api.body_length(head.headers)
        while len(rest) < length:
            data = await stream.receive_some(1 << 16)
            if not data:
                return _error(400, "invalid_request_error", "The body ended early.")
            rest += data
        body = bytes(rest[:length])
        if target.route is http_api.Route.HANGUP:
            call = calls.find(target.call_id or "")
            if call is None:
                return _error(404, "call_id_not_found", "No session found for the provided call_id")
            call.end()
            return http_api.empty_response(200)
        if target.route is http_api.Route.CALLS:
            request = http_api.parse_call_request((head.get(b"content-type") or b"").decode("latin-1"), body)
            try:
                call_id, answer = await calls.create(request)
            except ev.ClientError as exc:
                return _error(400, exc.code, exc.message)
            return http_api.sdp_response(answer, call_id)
        return _error(404, "not_found", "The simulator does not mint client secrets.")
    except SwitchError as exc:
        return _error(http_api.status_of(exc), "invalid_request_error", exc.message)


async def _connection(
    handler: Callable[[WebSocketRequest], Awaitable[None]], calls: Calls, max_message_size: int,
    ssl_context: Any, stream: trio.abc.Stream,
) -> None:
    if ssl_context is not None:
        stream = trio.SSLStream(stream, ssl_context, server_side=True)
    try:
        with trio.fail_after(HEAD_TIMEOUT_S):
            head, rest = await read_head(stream, bytearray())
        if not head.start.startswith(("POST ", "OPTIONS ")):
            raw = bytes(_head_bytes(head)) + bytes(rest)
            async with trio.open_nursery() as nursery:
                request = await wrap_server_stream(nursery, _Replay(stream, raw), max_message_size=max_message_size)
                try:
                    await handler(request)
                finally:
                    # As serve_websocket does: closing also ends the connection's reader task.
                    with trio.move_on_after(CLOSE_TIMEOUT_S):
                        await request._connection.aclose()
            return
        response = await _answer_http(calls, stream, head, rest)
        await stream.send_all(response)
    except (ValueError, trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    except Exception:
        # As in server._handle: one connection's failure must not stop the simulator.
        log.exception("simulated connection failed")
    finally:
        await trio.aclose_forcefully(stream)


def _head_bytes(head: Any) -> bytes:
    lines = [head.start.encode("latin-1")] + [name + b": " + value for name, value in head.headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


class _Server:
    """What `trio_websocket.serve_websocket` hands to `task_status`, as much as the simulator reads."""

    def __init__(self, listeners: list[Endpoint]) -> None:
        self.listeners = listeners


async def serve_with_calls(
    handler: Callable[[WebSocketRequest], Awaitable[None]], host: str, port: int, ssl_context: Any, *,
    max_message_size: int, fast: bool = False, max_seconds: float = 3600.0,
    task_status: trio.TaskStatus[_Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """`serve_websocket`'s stand-in: the same WebSocket handler, plus the calls' HTTP paths."""
    async with trio.open_nursery() as nursery:
        calls = Calls(nursery, fast, max_seconds)
        CALLS.append(calls)
        try:
            listeners = await trio.open_tcp_listeners(port, host=host)
            bound = listeners[0].socket.getsockname()[1]
            nursery.start_soon(partial(trio.serve_listeners, partial(_connection, handler, calls, max_message_size,
                                                                     ssl_context), listeners))
            task_status.started(_Server([Endpoint(host, bound, ssl_context is not None)]))
            await trio.sleep_forever()
        finally:
            CALLS.remove(calls)


# The running simulators' calls, for the sidebands to find theirs (a process usually runs one).
CALLS: list[Calls] = []


async def serve_sideband(request: WebSocketRequest) -> bool:
    """Serve the request as the sideband of the call its URL names; False when it is no sideband.

    Like the provider: an unknown or ended call, or a client secret instead of a standard key,
    gets 404 `call_id_not_found` at the handshake.
    """
    call_id = sideband_call(request.path)
    if call_id is None:
        return False
    headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in request.headers}
    key = ev.api_key(headers, request.proposed_subprotocols) or ""
    call = next((c for calls in CALLS if (c := calls.find(call_id)) is not None), None)
    if call is None or key.startswith("ek_"):
        body = json.dumps({"error": {"message": "No session found for the provided call_id",
                                     "type": "invalid_request_error", "code": "call_id_not_found"}})
        await request.reject(404, extra_headers=[(b"Content-Type", b"application/json")], body=body.encode())
        return True
    try:
        ws = await request.accept()
    except ConnectionClosed:
        return True
    await call.attach(ws)
    return True
