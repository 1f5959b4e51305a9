"""The switch daemon: accept, authenticate, run sessions; on shutdown close them and flush usage.

Three nested nurseries, as in hypercorn's trio runner: the listener (cancelled first, so no new
sessions start), the sessions (told to close with 1001, then given part of the grace), and the
daemon's own services (the usage outbox and /metrics), which outlive the sessions so their
last usage is delivered — or spooled when SHUTDOWN_GRACE runs out. The signals are watched for
the whole run: a second SIGTERM/SIGINT during the shutdown ends the grace at once (sessions cut,
their usage spooled), it never kills the process with usage in memory.
"""
from __future__ import annotations

import gc
import logging
import math
import signal
import ssl
from functools import partial
from pathlib import Path

import attrs
import trio

from common.config import Settings
from common.dbclient import open_db_client
from common.errors import ErrorCode, SwitchError
from common.replies import Validated
from switchd.billing import open_lease
from common.wire import MessageType
from switchd.accept import ResourceAlarm, can_open_socket, serve_accepting
from switchd.billing import Outbox
from switchd import calls
from switchd import secrets as client_secrets
from switchd.handshake import HTTP_STATUS, check_request_head, parse_client_request, redact
from switchd.metrics import Metrics, serve_metrics
from switchd.session import CLEANUP_S, Session, Switch
from switchd.tls import TlsStream
from switchd.wsio import WsConnection, client_ssl_context, read_head
from switchd.ws_codec import accept_response, check_upgrade_request, reject_response

log = logging.getLogger(__name__)

# Frames over MAX_PAYLOAD_LENGTH get an error event; only frames past this multiple of it
# (or 16 MiB) are cut off by the WebSocket layer with 1009.
HARD_LIMIT_FACTOR = 4
HANDSHAKE_TIMEOUT_S = 10.0


@attrs.frozen
class Bound:
    port: int
    metrics_port: int
    scheme: str = "ws"  # wss when switchd terminates TLS itself


class Stop:
    """SIGTERM/SIGINT, watched for the whole run: the first asks for a graceful shutdown, any
    later one for the end of the grace now. No signal ever kills the process outright."""

    def __init__(self) -> None:
        self.requested = trio.Event()
        self.hurried = trio.Event()

    async def watch_signals(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # What the receiver puts back when it closes, at the very end of the shutdown: a late signal
        # then finds nothing left to save and must not turn a clean exit into a kill.
        ignore_stop_signals()
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            task_status.started()
            async for signum in signals:
                self.signal(signal.Signals(signum).name)

    def signal(self, name: str) -> None:
        if not self.requested.is_set():
            log.info("received %s, shutting down", name)
            self.requested.set()
        elif not self.hurried.is_set():
            log.warning("received %s again: ending the grace now (sessions cut, undelivered usage kept on disk)", name)
            self.hurried.set()


@attrs.frozen
class Alarms:
    """Resource failures, counted and logged once per interval (switchd/accept.py)."""

    accept: ResourceAlarm
    upstream_socket: ResourceAlarm


def new_alarms() -> Alarms:
    return Alarms(ResourceAlarm("accepting a client"), ResourceAlarm("no socket for an upstream: refusing sessions"))


async def handle(
    switch: Switch, stream: trio.abc.Stream, alarms: Alarms | None = None, tls: ssl.SSLContext | None = None
) -> None:
    """One connection (TCP, or TLS over it with `tls`): the upgrade, authentication, then the session."""
    metrics, settings = switch.metrics, switch.settings
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT_S):  # the TLS handshake too
            if tls is not None and isinstance(stream, trio.SocketStream):
                stream = secure = TlsStream(stream, tls, server_side=True)
                await secure.do_handshake()
            head, rest = await read_head(stream, bytearray())
    except (ValueError, trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        await _respond(stream, reject_response(426, "a WebSocket upgrade is required"))
        return
    if await calls.serve_http(switch, stream, head, rest):  # client secrets and WebRTC calls (issue 17)
        return
    try:
        check_request_head(head.start, head.headers)
    except SwitchError as exc:
        await _reject(stream, head.start.split(" ")[1] if head.start.count(" ") >= 2 else "", exc, metrics)
        return
    try:
        target, key = check_upgrade_request(head)
    except ValueError:
        await _respond(stream, reject_response(426, "a WebSocket upgrade is required"))
        return
    try:
        params = parse_client_request(target, head.headers, head.tokens(b"sec-websocket-protocol"))
        if alarms is not None:
            # At the descriptor limit a session could never reach its provider: say so now, cleanly.
            if (error := can_open_socket()) is not None:
                alarms.upstream_socket.failed(error)
                raise SwitchError(ErrorCode.EXTERNAL_OVER_CAPACITY, "no file descriptor left for an upstream")
        switch.take_slot()
    except SwitchError as exc:
        await _reject(stream, target, exc, metrics)
        return
    try:
        previous = switch.sessions.get(params.session_id)
        if previous is not None and previous.client.closed is not None:
            with trio.move_on_after(CLEANUP_S):
                await previous.done.wait()
        account = Validated.decode(
            await switch.db.request(MessageType.VALIDATE_AND_LOAD, params.key, params.session_id)
        )
        account, lease_key = await open_lease(switch.db, account)  # none to be had: 402
        locks = None
        if client_secrets.is_secret(params.key):  # its model in the URL; its locks on session.update
            (config,) = await switch.db.request(MessageType.SECRET_CONFIG, params.key)
            params, locks = client_secrets.secret_params(params, config, calls.default_model(settings.upstream_url))
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
        log.info("session open %s", redact(target), extra={"account": account.account_id, "session": params.session_id})
        client = WsConnection(stream, bytes(rest), server=True, max_message=_hard_limit(settings))
        await Session(switch, client, params, account, lease_key, locks).run()
    finally:
        metrics.sessions_open -= 1


def _hard_limit(settings: Settings) -> int:
    return max(HARD_LIMIT_FACTOR * settings.max_payload_length, 16 * 1024 * 1024)


async def _respond(stream: trio.abc.Stream, data: bytes, close: bool = True) -> bool:
    try:
        await stream.send_all(data)
        return True
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        return False
    finally:
        if close:
            await trio.aclose_forcefully(stream)


async def _reject(stream: trio.abc.Stream, target: str, exc: SwitchError, metrics: Metrics) -> None:
    metrics.sessions_rejected += 1
    status = HTTP_STATUS.get(exc.code, 500)
    if log.isEnabledFor(logging.INFO):  # a storm of rejections must not pay for lines nobody logs
        log.info("handshake rejected %d %s for %s", status, exc.code, redact(target))
    await _respond(stream, reject_response(status, exc.code.value))


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The server context for wss:// when TLS_CERT_FILE and TLS_KEY_FILE are set; a bad file stops the start."""
    if not settings.tls_cert_file or not settings.tls_key_file:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.set_alpn_protocols(["http/1.1"])  # WebSocket upgrades are HTTP/1.1; never agree to h2
    try:
        context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise SwitchError(ErrorCode.INTERNAL_BAD_CONFIG,
                          f"TLS_CERT_FILE/TLS_KEY_FILE cannot be loaded: {exc}") from None
    return context


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
    stop: Stop | None = None,
    task_status: trio.TaskStatus[Bound] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until `stop` is requested (by default: SIGTERM/SIGINT)."""
    context = tls_context(settings)  # before anything starts: a bad certificate is a config error
    metrics = Metrics()
    outbox = Outbox(Path(settings.spool_dir), settings.journal_fsync)
    outbox.load_spool()  # this process's usage journal, and what dead ones left unacknowledged
    grace = settings.shutdown_grace
    alarms = new_alarms()
    async with open_db_client(settings.zmq_socket_path, settings.zmq_timeout_ms) as db:
        db.observe_rtt = metrics.observe_rtt
        switch = Switch(settings, db, metrics, outbox, trio.Event(), client_ssl_context(settings.upstream_ca_file), {})
        async with trio.open_nursery() as services:
            if stop is None:
                stop = Stop()
                await services.start(stop.watch_signals)
            await services.start(alarms.upstream_socket.run)
            await services.start(outbox.run, db)
            metrics_port = await services.start(
                serve_metrics, settings.metrics_host, settings.metrics_port, metrics, db
            )
            drain = trio.CancelScope()
            deadline = math.inf  # set once stopping; a second signal may cut the sessions before that
            async with trio.open_nursery() as sessions:
                services.start_soon(_hurry, stop, sessions.cancel_scope, drain)
                async with trio.open_nursery() as listener:
                    tcp = await listen(settings.host, settings.port, reuse_port=reuse_port)
                    port = tcp[0].socket.getsockname()[1]
                    scheme = "ws" if context is None else "wss"
                    await listener.start(partial(serve_accepting, partial(handle, switch, alarms=alarms, tls=context),
                                                 tcp, alarms.accept, handler_nursery=sessions))
                    log.info("listening on %s://%s:%d", scheme, settings.host, port)
                    # What exists now (modules, trio, the settings) lives as long as the process:
                    # frozen, a full collection no longer walks it, which paused every session
                    # for ~24 ms at 150 sessions.
                    gc.collect()
                    gc.freeze()
                    task_status.started(Bound(port, metrics_port, scheme))
                    await stop.requested.wait()
                    listener.cancel_scope.cancel()
                deadline = trio.current_time() + grace
                switch.shutdown.set()
                # Sessions close with 1001 and hand their usage to the outbox; past half the grace they are cut.
                sessions.cancel_scope.deadline = trio.current_time() + grace / 2
            with drain:
                drain.deadline = deadline - 0.5
                await outbox.drained()
            metrics.usage_batches_spooled += outbox.close()  # left journaled for the next start
            services.cancel_scope.cancel()
    log.info("stopped")


def ignore_stop_signals() -> None:
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)


async def _hurry(stop: Stop, sessions: trio.CancelScope, drain: trio.CancelScope) -> None:
    """A second signal: cut the sessions now (their cleanup hands usage over) and spool the rest."""
    await stop.hurried.wait()
    sessions.cancel()
    drain.cancel()
