"""One client session: a nursery whose tasks relay, meter and remember until the first one ends.

Tasks: the client reader, the upstream connection (connect, restore, read, reconnect), the
usage batcher, and watchers of the client's leaving, of shutdown and of idleness. A task that
ends the session for good either cancels the nursery (provider ended the session, client gone
and nothing more owed) or raises SwitchError, whose code picks the close code and the error
event the client gets. A response or transcription the provider is still producing is billed
whether anyone reads it or not, so a client's leaving and a shutdown first wait (SETTLE_S) for
its usage. Cleanup runs shielded under a deadline: usage goes to the outbox, the conversation
to switchdb, then the sockets close.
"""
from __future__ import annotations

import logging
import ssl
import time
from urllib.parse import parse_qs, urlsplit
from collections.abc import Mapping

import attrs
import trio

from common import fastjson
from common.config import Settings
from common.dbclient import DbClient
from common.errors import ErrorCode, SwitchError
from common.pricing import transcription_model_of
from common.replies import Validated
from common.wire import MessageType
from switchd.billing import Ledger, Outbox, run_batcher
from switchd.events import CLOSE_CODES, CLOSE_GOING_AWAY, CLOSE_NORMAL, CLOSE_UPSTREAM, error_event
from switchd.handshake import ClientParams, upstream_url
from switchd.inflight import InFlight
from switchd.metering import AUDIO_DELTA_PREFIX, CLIENT_AUDIO_PREFIX, USAGE_TYPES, upstream_event
from switchd.metrics import Metrics
from switchd.secrets import Locks, is_secret, locked_frame
from switchd.transcript import Conversation
from switchd.upstream import HEALTHY_AFTER_S, MAX_TRIES, CloseAction, backoff, close_action
from switchd.websocket import Message
from switchd.wsio import Closed, ConnectError, WsConnection, connect

log = logging.getLogger(__name__)

AUDIO_DELTA = AUDIO_DELTA_PREFIX.encode()
CLIENT_AUDIO = CLIENT_AUDIO_PREFIX.encode()
RESPONSE_CREATE = b'"response.create"'
RESPONSE_CANCEL = '{"type":"response.cancel"}'

MAX_PENDING_FRAMES = 10_000
CHECKPOINT_CHARS = 200
UPSTREAM_MAX_MESSAGE = 32 * 1024 * 1024  # the provider's audio events reach 15 MiB
UPSTREAM_CONNECT_TIMEOUT_S = 10.0
CLEANUP_S = 3.0
# How long a session whose client left keeps reading the provider for the usage still owed.
SETTLE_S = 10.0
# How often an open session asks switchdb whether its key and account are still good.
ACCOUNT_CHECK_S = 5.0


@attrs.frozen
class Switch:
    """What every session of one daemon shares; built once in `serve`."""

    settings: Settings
    db: DbClient
    metrics: Metrics
    outbox: Outbox
    shutdown: trio.Event
    upstream_tls: ssl.SSLContext  # the provider's certificate is checked against this
    # The latest session of each session id, until its cleanup is done: a client that closed and
    # reconnects at once waits for its last conversation flush before its restore is loaded.
    sessions: dict[str, Session]

    def take_slot(self) -> None:
        """Count a new session (WebSocket or call) open, within MAX_SESSIONS; its owner gives the
        slot back when it ends. Counted at admission, before anything is awaited, so that
        concurrent handshakes respect the cap. Over it: EXTERNAL_OVER_CAPACITY (503)."""
        limit, metrics = self.settings.max_sessions, self.metrics
        if limit and metrics.sessions_open >= limit:
            raise SwitchError(ErrorCode.EXTERNAL_OVER_CAPACITY, f"{limit} sessions open; try again later")
        metrics.sessions_open += 1


class Session:
    def __init__(
        self, switch: Switch, client: WsConnection, params: ClientParams, account: Validated, lease_key: str = "",
        locks: Locks | None = None,
    ) -> None:
        self.switch = switch
        self.client = client
        self.params = params
        self.account_id = account_id = account.account_id
        self.restore = account.restore  # the stored session.update, sent first on every upstream connect
        self.locks = locks  # a client secret's: what the client's session.update cannot change
        self.url = upstream_url(switch.settings.upstream_url, params.model, params.intent)
        if params.intent is not None and locks is None:
            self.restore = ""  # a remembered conversation has no place in a transcription-only session
        self.ledger = Ledger(account_id, params.session_id, params.model or _model_of(self.url), account.balance,
                             journal=switch.outbox.journal, pricing=account.pricing, lease_key=lease_key,
                             metrics=switch.metrics)
        self.conversation = Conversation()
        self.up: WsConnection | None = None  # the open upstream, once restored and drained
        self.pending: list[bytes] = []  # client frames (as masked bytes) waiting for an upstream
        self.pending_requests = 0  # response.create among them
        self.log_extra = {"account": account_id, "session": params.session_id}
        self.done = trio.Event()  # set once cleanup has handed everything over
        self.inflight = InFlight()
        self.client_gone = trio.Event()
        self._inflight_changed = trio.Event()

    async def run(self) -> None:
        code, reason, event = CLOSE_NORMAL, "", None
        started = time.monotonic()
        self.switch.sessions[self.params.session_id] = self
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_client)
                nursery.start_soon(self._settle_after_client, nursery.cancel_scope)
                nursery.start_soon(self._run_upstream, nursery.cancel_scope)
                nursery.start_soon(run_batcher, self.ledger, self.switch.db)
                nursery.start_soon(self._watch_shutdown)
                nursery.start_soon(self._watch_idle)
                nursery.start_soon(self._watch_account)
            if self.switch.shutdown.is_set():  # whatever ended it while the switch stops: reconnect elsewhere
                code = CLOSE_GOING_AWAY
        except* SwitchError as group:
            exc = _first(group)
            code = CLOSE_CODES.get(exc.code, CLOSE_UPSTREAM)
            reason = exc.message if exc.code == ErrorCode.INTERNAL_UPSTREAM_REJECTED else exc.code.value
            # On a provider fault the client has the provider's own error event already.
            if exc.code not in (ErrorCode.INTERNAL_SHUTTING_DOWN, ErrorCode.INTERNAL_UPSTREAM_REJECTED):
                event = error_event(exc.code, exc.message)
            if exc.code == ErrorCode.EXTERNAL_NO_CREDITS:
                self.switch.metrics.credit_cutoffs += 1
            log.info("session ending: %s", exc.code, extra=self.log_extra)
        except* Exception:
            # A bug must end only its own session, never the daemon.
            log.exception("session failed", extra=self.log_extra)
            code, reason = CLOSE_UPSTREAM, ErrorCode.INTERNAL_ERROR.value
            event = error_event(ErrorCode.INTERNAL_ERROR, "The switch had an internal error.")
        finally:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(CLEANUP_S):
                    await self._cleanup(code, reason, event)
            self.done.set()
            if self.switch.sessions.get(self.params.session_id) is self:
                del self.switch.sessions[self.params.session_id]
            log.info(
                "session closed with %d after %.1f s", code, time.monotonic() - started, extra=self.log_extra
            )

    async def _cleanup(self, code: int, reason: str, event: str | None) -> None:
        # Hand-offs first: they cannot block, so nothing is lost if the deadline hits while closing.
        for batch in (self.ledger.inflight, self.ledger.take_batch()):
            if batch is not None:
                self.switch.outbox.submit(batch)
        self.ledger.inflight = None
        text = self.conversation.close()
        if text:
            await self.switch.db.send(MessageType.APPEND_CONVERSATION, self.account_id, self.params.session_id, text)
        if event is not None:
            await self._to_client_text(event)
        await self.client.aclose(code, reason)

    async def _watch_shutdown(self) -> None:
        await self.switch.shutdown.wait()
        await self._settled()  # the client still gets the response under way, and it is billed
        raise SwitchError(ErrorCode.INTERNAL_SHUTTING_DOWN, "the switch is shutting down")

    async def _watch_idle(self) -> None:
        idle = self.switch.settings.idle_timeout
        # The deadline moves with every client frame: a loop, not one sleep.
        while (deadline := self.client.last_data_at + idle) > trio.current_time():  # noqa: ASYNC110
            await trio.sleep_until(deadline)
        raise SwitchError(ErrorCode.EXTERNAL_IDLE_TIMEOUT, f"no client frame for {idle:g} s")

    async def _watch_account(self) -> None:
        """End the session when its key is revoked or expires, or its account is suspended."""
        while True:
            await trio.sleep(ACCOUNT_CHECK_S)
            try:
                if is_secret(self.params.key):  # its expiry limits new sessions only
                    await self.switch.db.request(MessageType.CHECK_SECRET, self.params.key)
                else:
                    await self.switch.db.request(MessageType.VALIDATE_AND_LOAD, self.params.key, self.params.session_id)
            except SwitchError as exc:
                if exc.code == ErrorCode.EXTERNAL_INVALID_AUTH:
                    await self._settled()  # what the provider is producing now is still billed
                    raise SwitchError(
                        ErrorCode.EXTERNAL_INVALID_AUTH,
                        "The key was revoked or has expired, or the account is suspended.",
                    ) from None
                # A dry account is the ledger's to cut after the response; an outage is not the key's fault.

    async def _read_client(self) -> None:
        client, metrics = self.client, self.switch.metrics
        limit = self.switch.settings.max_payload_length
        while True:
            try:
                messages = await client.receive()
            except Closed:
                self.client_gone.set()
                return
            frames, requests = [], 0
            for message in messages:
                if not message.text:
                    await self._to_client_text(error_event(
                        ErrorCode.EXTERNAL_BINARY_FRAME,
                        "Expected a text WebSocket message; binary frames are not supported.",
                    ))
                    continue
                if message.size > limit:
                    await self._to_client_text(error_event(
                        ErrorCode.EXTERNAL_PAYLOAD_TOO_LARGE,
                        f"Frame of {message.size} bytes exceeds the {limit}-byte limit.",
                    ))
                    continue
                requests += self._is_response_request(message)
                metrics.bytes_in += message.size
                frame = message.frame  # still masked with the client's key: valid as it stands
                if self.locks is not None and (locked := locked_frame(message, self.locks)) is not None:
                    frame, overridden = locked
                    log.info("kept the client secret's %s", ", ".join(overridden), extra=self.log_extra)
                frames.append(frame)
            metrics.frames_in += len(frames)
            if frames:
                await self._to_upstream(frames, requests)

    async def _to_upstream(self, frames: list[bytes], requests: int) -> None:
        """Relay to the provider; the responses asked for are owed once the provider has the request."""
        up = self.up
        if up is not None:
            try:
                await up.send(b"".join(frames))  # one write for everything one read brought
                self.inflight.requested(requests)
                return
            except Closed:
                pass  # the upstream task reconnects; these frames wait with the others
        if len(self.pending) + len(frames) > MAX_PENDING_FRAMES:
            raise SwitchError(
                ErrorCode.EXTERNAL_BUFFER_OVERFLOW, f"more than {MAX_PENDING_FRAMES} frames waiting for the provider"
            )
        self.pending.extend(frames)
        self.pending_requests += requests

    async def _run_upstream(self, done: trio.CancelScope) -> None:
        settings = self.switch.settings
        headers = [(b"Authorization", f"Bearer {settings.openai_api_key}".encode())] if settings.openai_api_key else []
        tries, reconnecting = 0, False
        while True:
            opened_at = None
            try:
                up = await connect(self.url, headers, max_message=UPSTREAM_MAX_MESSAGE,
                                   connect_timeout=UPSTREAM_CONNECT_TIMEOUT_S, ssl_context=self.switch.upstream_tls)
                try:
                    opened_at = trio.current_time()
                    if reconnecting:
                        await self._refresh_restore()
                    if self.restore:
                        await up.send_text(self.restore)
                    if self.pending:
                        await up.send(b"".join(self.pending))
                        self.pending.clear()
                        self.inflight.requested(self.pending_requests)
                        self.pending_requests = 0
                    self.up = up
                    await self._read_upstream(up, reconnecting)
                finally:
                    self.up = None
                    with trio.CancelScope(shield=True):
                        await up.aclose(1000, "", wait=0)
            except Closed as exc:
                if self.client_gone.is_set():
                    done.cancel()  # what was in flight went with this connection: nothing more will come
                    return
                code, reason = exc.code, exc.reason
            except ConnectError as exc:
                if exc.permanent:
                    log.error("provider refused: %s", exc, extra=self.log_extra)
                    raise SwitchError(ErrorCode.INTERNAL_UPSTREAM_UNAVAILABLE, str(exc)) from None
                code, reason = None, str(exc)
            action = close_action(code)
            if action is CloseAction.END or self.client_gone.is_set():
                done.cancel()
                return
            if action is CloseAction.FATAL:
                raise SwitchError(ErrorCode.INTERNAL_UPSTREAM_REJECTED, reason or f"provider closed with {code}")
            if opened_at is not None and trio.current_time() - opened_at >= HEALTHY_AFTER_S:
                tries = 0
            tries += 1
            if tries > MAX_TRIES:
                raise SwitchError(
                    ErrorCode.INTERNAL_UPSTREAM_UNAVAILABLE, f"provider unavailable after {MAX_TRIES} tries"
                )
            self.switch.metrics.upstream_reconnects += 1
            log.warning("upstream lost (%s); reconnect %d/%d", reason or code, tries, MAX_TRIES, extra=self.log_extra)
            reconnecting = True
            await trio.sleep(backoff(tries))

    async def _refresh_restore(self) -> None:
        """Before re-sending the session, get it back from switchdb with the conversation so far."""
        db = self.switch.db
        text = self.conversation.take()
        if text:
            await db.send(MessageType.APPEND_CONVERSATION, self.account_id, self.params.session_id, text)
        try:
            fields = await db.request(MessageType.VALIDATE_AND_LOAD, self.params.key, self.params.session_id)
            account = Validated.decode(fields)
        except SwitchError as exc:
            # A session outlives the client secret that opened it: restored as it was at connect.
            secret = self.locks is not None and exc.code == ErrorCode.EXTERNAL_INVALID_AUTH
            if exc.code != ErrorCode.INTERNAL_DB_UNAVAILABLE and not secret:
                raise
            log.warning("switchdb unavailable; restoring the session as it was at connect", extra=self.log_extra)
            return
        if self.params.intent is None or self.locks is not None:
            self.restore = account.restore

    async def _checkpoint(self) -> None:
        if len(self.conversation) >= CHECKPOINT_CHARS:
            await self.switch.db.send(
                MessageType.APPEND_CONVERSATION, self.account_id, self.params.session_id, self.conversation.take()
            )

    async def _read_upstream(self, up: WsConnection, reconnected: bool) -> None:
        metrics, ledger = self.switch.metrics, self.ledger
        while True:
            messages = await up.receive()
            frames = []
            for message in messages:
                metrics.bytes_out += message.size
                # Unmasked from the provider, so valid for the client as they stand.
                if not message.text or message.startswith(AUDIO_DELTA):
                    frames.append(message.frame)
                    continue
                try:
                    text = message.payload.decode()
                except UnicodeDecodeError:
                    text = ""  # not ours to judge: relayed as it came
                event = upstream_event(text) if text else None
                if event is None:
                    frames.append(message.frame)
                    continue
                self.inflight.observe(event)
                usage = event["type"] in USAGE_TYPES
                if usage:  # journaled before the client can see it: what the client has seen is billed
                    metrics.tokens_metered += ledger.add(event)
                if await self._act(event, text, reconnected):
                    frames.append(message.frame)
                if usage and ledger.credits <= 0 and not await ledger.refill():
                    await self._to_client(frames)
                    raise SwitchError(ErrorCode.EXTERNAL_NO_CREDITS, "the account has no credits left")
                self.conversation.observe(event)
                self._inflight_changed.set()
                self._inflight_changed = trio.Event()
            metrics.frames_out += len(messages)
            await self._to_client(frames)
            await self._checkpoint()

    async def _to_client(self, frames: list[bytes]) -> None:
        """Relay to the client while it is there; once it has gone, the session still reads the provider."""
        if not frames or self.client_gone.is_set():
            return
        try:
            await self.client.send(b"".join(frames))
        except Closed:
            self.client_gone.set()

    async def _to_client_text(self, text: str) -> None:
        if self.client_gone.is_set():
            return
        try:
            await self.client.send_text(text)
        except Closed:
            self.client_gone.set()

    @staticmethod
    def _is_response_request(message: Message) -> bool:
        """A client's response.create: the provider bills that response even if the client leaves now."""
        if message.startswith(CLIENT_AUDIO):
            return False  # audio, the bulk of what clients send: never read past its first bytes
        payload = message.payload
        if RESPONSE_CREATE not in payload:
            return False
        try:
            event = fastjson.loads(payload.decode())
        except (ValueError, RecursionError):  # not ours to judge: the provider answers it
            return False
        return type(event) is dict and event.get("type") == "response.create"

    async def _settle_after_client(self, done: trio.CancelScope) -> None:
        """Once the client has gone, end the session when the provider has reported what it will bill.

        A response in progress is cancelled (it stops sooner, and the provider still reports its usage
        in response.done); transcriptions of committed audio are awaited. Bounded by SETTLE_S.
        """
        await self.client_gone.wait()
        if not self.inflight.settled:
            log.info("client left with a response or transcription in flight; settling", extra=self.log_extra)
            up = self.up
            if up is not None and (self.inflight.responses or self.inflight.expected):
                try:
                    await up.send_text(RESPONSE_CANCEL)
                except Closed:
                    pass
            await self._settled()
        done.cancel()

    async def _settled(self) -> None:
        """Until the provider has reported everything in flight, or SETTLE_S."""
        with trio.move_on_after(SETTLE_S):
            while not self.inflight.settled:
                await self._inflight_changed.wait()

    async def _act(self, event: Mapping[str, object], frame: str, reconnected: bool) -> bool:
        """Act on a session event; False for the events a resumed client must not see."""
        kind = event["type"]
        session = event.get("session")
        if kind in ("session.updated", "session.created") and isinstance(session, Mapping):
            # Transcription is billed at its own model's rates.
            self.ledger.transcription_model = transcription_model_of(session) or ""
        if kind == "session.updated":
            await self.switch.db.send(MessageType.SAVE_SESSION, self.account_id, self.params.session_id, frame)
        elif kind == "session.created":
            if isinstance(session, Mapping) and isinstance(session.get("model"), str):
                self.ledger.model = session["model"]  # the provider's own name for what it bills
            return not reconnected  # a resumed client already has its session
        elif kind == "error":
            error = event.get("error")
            # The provider's session cap is handled by reconnecting; the client carries on.
            return not (isinstance(error, Mapping) and error.get("code") == "session_expired")
        return True


def _model_of(url: str) -> str:
    return parse_qs(urlsplit(url).query).get("model", ["gpt-realtime"])[0]


def _first(group: BaseExceptionGroup[SwitchError]) -> SwitchError:
    leaf: BaseException = group
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    assert isinstance(leaf, SwitchError)
    return leaf
