"""The switch daemon: accept, authenticate, run sessions; on shutdown close them and flush usage.

Three nested nurseries, as in hypercorn's trio runner: the listener (cancelled first, so no new
sessions start), the sessions (told to close with 1001, then given part of the grace), and the
daemon's own services (the usage outbox and /metrics), which outlive the sessions so their
last usage is delivered — or spooled when SHUTDOWN_GRACE runs out.
"""
from __future__ import annotations

import gc
import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import trio

from common.config import Settings
from common.dbclient import open_db_client
from common.errors import ErrorCode, SwitchError
from common.wire import MessageType
from switchd.billing import Outbox
from switchd.handshake import HTTP_STATUS, parse_client_request, redact
from switchd.metrics import Metrics, serve_metrics
from switchd.pump import Pump
from switchd.session import CLEANUP_S, Session, Switch
from switchd.ws import WsConnection, read_head
from switchd.ws_codec import accept_response, check_upgrade_request, reject_response

log = logging.getLogger(__name__)

# Frames over MAX_PAYLOAD_LENGTH get an error event; only frames past this multiple of it
# (or 16 MiB) are cut off by the WebSocket layer with 1009.
HARD_LIMIT_FACTOR = 4
HANDSHAKE_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class Bound:
    port: int
    metrics_port: int


async def wait_for_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s, shutting down", signal.Signals(signum).name)
            return


async def handle(switch: Switch, stream: trio.SocketStream) -> None:
    """One TCP connection: the upgrade, authentication, then the session."""
    metrics, settings = switch.metrics, switch.settings
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT_S):
            head, rest = await read_head(stream, bytearray())
        target, key = check_upgrade_request(head)
    except (ValueError, trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        await _respond(stream, reject_response(426, "a WebSocket upgrade is required"))
        return
    try:
        params = parse_client_request(target, head.headers, head.tokens(b"sec-websocket-protocol"))
        if settings.max_sessions and metrics.sessions_open >= settings.max_sessions:
            raise SwitchError(ErrorCode.EXTERNAL_OVER_CAPACITY, f"{settings.max_sessions} sessions open")
    except SwitchError as exc:
        await _reject(stream, target, exc, metrics)
        return
    metrics.sessions_open += 1  # counted from here so concurrent handshakes respect MAX_SESSIONS
    try:
        previous = switch.sessions.get(params.session_id)
        if previous is not None and previous.client.closed is not None:
            with trio.move_on_after(CLEANUP_S):
                await previous.done.wait()
        account_id, credits, restore = await switch.db.request(
            MessageType.VALIDATE_AND_LOAD, params.key, params.session_id
        )
    except BaseException as exc:
        metrics.sessions_open -= 1  # before answering: the client may retry at once
        if not isinstance(exc, SwitchError):
            raise
        await _reject(stream, target, exc, metrics)
        return
    try:
        if not await _respond(stream, accept_response(key, params.subprotocol), close=False):
            return
        metrics.sessions_total += 1
        log.info("session open %s", redact(target), extra={"account": account_id, "session": params.session_id})
        client = WsConnection(stream, rest, server=True, max_message=_hard_limit(settings))
        await Session(switch, client, params, account_id, int(credits), restore).run()
    finally:
        metrics.sessions_open -= 1


def _hard_limit(settings: Settings) -> int:
    return max(HARD_LIMIT_FACTOR * settings.max_payload_length, 16 * 1024 * 1024)


async def _respond(stream: trio.SocketStream, data: bytes, close: bool = True) -> bool:
    try:
        await stream.send_all(data)
        return True
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return False
    finally:
        if close:
            await trio.aclose_forcefully(stream)


async def _reject(stream: trio.SocketStream, target: str, exc: SwitchError, metrics: Metrics) -> None:
    metrics.sessions_rejected += 1
    status = HTTP_STATUS.get(exc.code, 500)
    if log.isEnabledFor(logging.INFO):  # a storm of rejections must not pay for lines nobody logs
        log.info("handshake rejected %d %s for %s", status, exc.code, redact(target))
    await _respond(stream, reject_response(status, exc.code.value))


async def listen(host: str, port: int, *, reuse_port: bool = False) -> list[trio.SocketListener]:
    """TCP listeners; with `reuse_port`, one socket that shares the port with the other workers."""
    if not reuse_port:
        return await trio.open_tcp_listeners(port, host=host)
    sock = trio.socket.socket(trio.socket.AF_INET6 if ":" in host else trio.socket.AF_INET)
    sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
    sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEPORT, 1)
    await sock.bind((host, port))
    sock.listen(4096)
    return [trio.SocketListener(sock)]


async def serve(
    settings: Settings,
    *,
    reuse_port: bool = False,
    shutdown_trigger: Callable[[], Awaitable[None]] = wait_for_signal,
    task_status: trio.TaskStatus[Bound] = trio.TASK_STATUS_IGNORED,
) -> None:
    metrics = Metrics()
    outbox = Outbox(Path(settings.spool_dir))
    outbox.load_spool()
    grace = settings.shutdown_grace
    async with open_db_client(settings.zmq_socket_path, settings.zmq_timeout_ms) as db:
        db.observe_rtt = metrics.observe_rtt
        switch = Switch(settings, db, metrics, outbox, trio.Event(), Pump(metrics, settings.relay_coalesce_ms / 1000), {})
        async with trio.open_nursery() as services:
            await services.start(outbox.run, db)
            await services.start(switch.pump.run)
            metrics_port = await services.start(serve_metrics, settings.host, settings.metrics_port, metrics, db)
            async with trio.open_nursery() as sessions:
                async with trio.open_nursery() as listener:
                    listeners = await listen(settings.host, settings.port, reuse_port=reuse_port)
                    port = listeners[0].socket.getsockname()[1]
                    await listener.start(partial(trio.serve_listeners, partial(handle, switch), listeners,
                                                 handler_nursery=sessions))
                    log.info("listening on ws://%s:%d", settings.host, port)
                    # What exists now (modules, trio, the settings) lives as long as the process:
                    # frozen, a full collection no longer walks it, which paused every session
                    # for ~24 ms at 150 sessions.
                    gc.collect()
                    gc.freeze()
                    task_status.started(Bound(port, metrics_port))
                    await shutdown_trigger()
                    listener.cancel_scope.cancel()
                deadline = trio.current_time() + grace
                switch.shutdown.set()
                # Sessions close with 1001 and hand their usage to the outbox; past half the grace they are cut.
                sessions.cancel_scope.deadline = trio.current_time() + grace / 2
            with trio.move_on_after(max(0.0, deadline - trio.current_time() - 0.5)):
                await outbox.drained()
            spooled = len(outbox.unacked)
            outbox.spill()
            metrics.usage_batches_spooled += spooled
            services.cancel_scope.cancel()
    log.info("stopped")
