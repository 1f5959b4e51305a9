"""The simulator's WebSocket server.

Each connection is one nursery with two sibling tasks: the reader (client frames -> Session ->
events, VAD included) and the responder (streams responses handed over a memory channel, paced).
The first task to end ends the connection; the provider's session cap is a deadline around both.
"""
from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from functools import partial

import attrs
import trio
from trio_websocket import ConnectionClosed, Endpoint, WebSocketConnection, WebSocketRequest

from switchd.sim import events as ev
from switchd.sim import calls
from switchd.sim.session import ResponseJob, Session
from switchd.sim.transcription import new_session

logger = logging.getLogger(__name__)

MAX_EVENT_BYTES = 16 * 1024 * 1024  # the provider takes appends of up to 15 MiB
SEND_TIMEOUT = 10.0  # a client that stops reading for this long loses its session
CLOSE_TIMEOUT = 5.0  # how long a close waits for the client's close frame


@attrs.frozen
class SimOptions:
    fast: bool = False  # send responses as fast as possible instead of at playback speed
    echo: bool = False  # send every client frame back verbatim and do nothing else
    max_session_seconds: float = 3600.0  # the provider's cap is 60 minutes


def tls_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A server context for `wss://`: the certificate chain (PEM, leaf first) and its private key.

    Missing or mismatched files raise OSError / ssl.SSLError here, before the server binds."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return context


async def serve(
    host: str, port: int, *, options: SimOptions, ssl_context: ssl.SSLContext | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve until cancelled (`wss://` with `ssl_context`, else `ws://`); `task_status.started()`
    gets the bound port (useful with port 0)."""
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            partial(calls.serve_with_calls, partial(_handle, options=options), host, port, ssl_context,
                    max_message_size=MAX_EVENT_BYTES, fast=options.fast, max_seconds=options.max_session_seconds))
        endpoint = server.listeners[0]
        bound = endpoint.port if isinstance(endpoint, Endpoint) else port
        logger.info("listening on %s:%d (tls=%s fast=%s echo=%s max_session_seconds=%s)",
                    host, bound, ssl_context is not None, options.fast, options.echo, options.max_session_seconds)
        task_status.started(bound)


async def _handle(request: WebSocketRequest, *, options: SimOptions) -> None:
    if await calls.serve_sideband(request):  # /v1/realtime?call_id=…: a WebRTC call's sideband
        return
    offered = request.proposed_subprotocols
    try:
        # Like the provider: always upgrade, judge the request afterwards.
        ws = await request.accept(subprotocol="realtime" if "realtime" in offered else None)
    except ConnectionClosed:
        return
    try:
        if options.echo:
            await _echo(ws)
            return
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in request.headers}
        fault = ev.handshake_fault(headers, request.path, offered)
        if fault is not None:
            logger.info("refusing session: %s", fault.close_reason)
            await _send(ws, fault.event)
            await _close(ws, fault.close_code, fault.close_reason)
            return
        session = new_session(request.path, now=time.time(),
                              max_session_seconds=options.max_session_seconds)
        logger.debug("session %s opened", session.config["id"])
        await _run_session(ws, session, options)
        logger.debug("session %s ended", session.config["id"])
    except ConnectionClosed:
        pass  # the client left
    except Exception:
        # trio-websocket would let a handler's exception stop the whole server; one session's must not.
        logger.exception("simulated session failed")


async def _send(ws: WebSocketConnection, event: ev.Event) -> None:
    """Write one event whole: a frame cut short by cancellation would corrupt the stream, so the
    write is shielded (cancellation lands between frames), yet bounded for clients that stop reading."""
    frame = ev.encode(event)
    with trio.CancelScope(shield=True), trio.fail_after(SEND_TIMEOUT):
        await ws.send_message(frame)


async def _close(ws: WebSocketConnection, code: int, reason: str) -> None:
    # aclose() waits for the client's close frame with no limit of its own.
    with trio.move_on_after(CLOSE_TIMEOUT):
        await ws.aclose(code, reason)


async def _echo(ws: WebSocketConnection) -> None:
    while True:
        message = await ws.get_message()
        with trio.CancelScope(shield=True), trio.fail_after(SEND_TIMEOUT):
            await ws.send_message(message)


async def _run_session(ws: WebSocketConnection, session: Session, options: SimOptions) -> None:
    await _send(ws, session.created_event())
    with trio.move_on_after(options.max_session_seconds) as cap:
        async with trio.open_nursery() as nursery:
            jobs_in, jobs_out = trio.open_memory_channel[ResponseJob](0)
            nursery.start_soon(_ends_session, nursery.cancel_scope, partial(_read, ws, session, jobs_in))
            nursery.start_soon(_ends_session, nursery.cancel_scope,
                               partial(_respond, ws, session, jobs_out, options.fast))
    if cap.cancelled_caught:
        logger.info("session %s hit its maximum duration", session.config["id"])
        await _send(ws, ev.error_event("session_expired", ev.SESSION_CAP_MESSAGE))
        await _close(ws, 1001, ev.SESSION_CAP_MESSAGE)


async def _ends_session(scope: trio.CancelScope, task: Callable[[], Awaitable[None]]) -> None:
    """Run one of the session's tasks; whichever ends first (client gone, closed) ends its sibling."""
    try:
        await task()
    except ConnectionClosed:
        pass
    finally:
        scope.cancel()


async def _read(ws: WebSocketConnection, session: Session, jobs: trio.MemorySendChannel[ResponseJob]) -> None:
    async with jobs:
        while True:
            reaction = session.handle(await ws.get_message())
            for event in reaction.events:
                await _send(ws, event)
            if reaction.response is not None:
                await jobs.send(reaction.response)
            if reaction.close is not None:
                await _close(ws, *reaction.close)
                return


async def _respond(
    ws: WebSocketConnection, session: Session, jobs: trio.MemoryReceiveChannel[ResponseJob], fast: bool
) -> None:
    async with jobs:
        async for job in jobs:
            for event in ev.response_start_events(job.ref):
                await _send(ws, event)
            start = trio.current_time()
            with job.cancel_scope:  # response.cancel or a barge-in stops the stream here
                for step in job.steps:
                    # Real time: each delta when it would play. Fast: no wait, but still a
                    # checkpoint, so a cancel can land between deltas.
                    await trio.sleep_until(start if fast else start + step.at)
                    await _send(ws, job.step_event(step))
            for event in session.finish_response(job):
                await _send(ws, event)
