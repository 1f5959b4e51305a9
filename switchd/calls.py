"""switchd's plain-HTTP paths (issue 17): client secrets, WebRTC calls, and the calls' metering.

`handle_http` answers one request that `switchd.http_api.route` recognised, on a connection
whose head `server.handle` has read. A call's connection task does not end with its 201: it
goes on as the call's `CallSession`, in the sessions nursery like any WebSocket session, so
shutdown, grace and cancellation reach it the same way.

A call's media flows between the browser and the provider; the switch sees the call through
the provider's sideband (`/v1/realtime?call_id=…`, opened with the operator's key) and meters
it as a session: each `response.done` and transcription into the ledger, the session saved
on `session.updated`, the conversation checkpointed. At zero balance, on shutdown and when the
sideband stays silent past IDLE_TIMEOUT, it hangs the call up at the provider (404: already
ended). A call counts among the open sessions against MAX_SESSIONS from its request on.
Its owner is recorded in switchdb (SAVE_CALL) before its 201, so a client's hangup works through
any worker or switchd (CALL_OWNER): one that does not run the call asks the provider, and the
worker running it sees the sideband end and settles the call as for any other end.
"""
from __future__ import annotations

import json
import logging
import secrets as _random
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlencode, urlsplit, urlunsplit

import trio

from common.errors import ErrorCode, SwitchError
from common.merge import deep_merge
from common.pricing import transcription_model_of
from common.replies import Pricing, Validated
from common.wire import MessageType
from switchd import http_api
from switchd import secrets as client_secrets
from switchd.billing import Ledger, open_lease, request_lease, run_batcher
from switchd.handshake import SESSION_ID
from switchd.metering import USAGE_TYPES, upstream_event
from switchd.session import (
    ACCOUNT_CHECK_S, CHECKPOINT_CHARS, CLEANUP_S, UPSTREAM_CONNECT_TIMEOUT_S, UPSTREAM_MAX_MESSAGE, Switch,
)
from switchd.transcript import Conversation
from switchd.wsio import Closed, ConnectError, connect
from switchd.ws_codec import HttpHead, parse_head
from switchd.tls import TlsStream

log = logging.getLogger(__name__)

BODY_TIMEOUT_S = 10.0
PROVIDER_TIMEOUT_S = 20.0
HANGUP_TIMEOUT_S = 10.0
MAX_PROVIDER_RESPONSE = 1024 * 1024
DEFAULT_MODEL = "gpt-realtime"

# The calls this worker runs, by call id: for a client's hangup.
CALLS: dict[str, CallSession] = {}
IDLE = ErrorCode.EXTERNAL_IDLE_TIMEOUT.value  # the reason an idle call ends with, as a WebSocket session's


# --- the provider over HTTP ---------------------------------------------------------------------

def provider_http(upstream_url: str, path: str) -> tuple[str, int, bool, str]:
    """(host, port, tls, request target) of `path` at the provider named by UPSTREAM_URL."""
    parts = urlsplit(upstream_url)
    secure = parts.scheme in ("wss", "https")
    return parts.hostname or "", parts.port or (443 if secure else 80), secure, path


def sideband_url(upstream_url: str, call_id: str) -> str:
    """The provider's realtime URL for a call's sideband: its query is the call id alone."""
    parts = urlsplit(upstream_url)
    return urlunsplit(parts._replace(query=urlencode({"call_id": call_id})))


def default_model(upstream_url: str) -> str:
    return parse_qs(urlsplit(upstream_url).query).get("model", [DEFAULT_MODEL])[0]


async def provider_post(switch: Switch, path: str, content_type: str | None, body: bytes,
                        limit_s: float = PROVIDER_TIMEOUT_S) -> tuple[int, HttpHead, bytes]:
    """POST to the provider with the operator's key: (status, response head, body). Raises SwitchError."""
    settings = switch.settings
    host, port, secure, target = provider_http(settings.upstream_url, path)
    lines = [f"POST {target} HTTP/1.1", f"Host: {host}" if port in (80, 443) else f"Host: {host}:{port}",
             f"Content-Length: {len(body)}", "Connection: close", "Accept: application/sdp, application/json"]
    if settings.openai_api_key:
        lines.append(f"Authorization: Bearer {settings.openai_api_key}")
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    request = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
    stream: trio.abc.Stream | None = None
    try:
        with trio.fail_after(limit_s):
            stream = tcp = await trio.open_tcp_stream(host, port)
            if secure:
                stream = tls = TlsStream(tcp, switch.upstream_tls, server_hostname=host)
                await tls.do_handshake()
            await stream.send_all(request)
            data = b""
            while len(data) <= MAX_PROVIDER_RESPONSE and (chunk := await stream.receive_some(65536)):
                data += chunk
    except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        raise SwitchError(ErrorCode.INTERNAL_UPSTREAM_UNAVAILABLE, f"the provider did not answer: {exc!r}") from None
    finally:
        if stream is not None:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)
    head_bytes, sep, payload = data.partition(b"\r\n\r\n")
    try:
        head = parse_head(head_bytes)
        status = int(head.start.split(" ")[1])
    except (ValueError, IndexError):
        raise SwitchError(ErrorCode.INTERNAL_UPSTREAM_REJECTED, "the provider's answer is not HTTP") from None
    length = head.get(b"content-length")
    if length is not None and length.isdigit():
        payload = payload[: int(length)]
    return status, head, payload


def _provider_error(status: int, body: bytes) -> SwitchError:
    try:
        message = str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        message = f"the provider answered {status}"
    if status == 400:
        return SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, message)
    return SwitchError(ErrorCode.INTERNAL_UPSTREAM_REJECTED, message)


async def hang_up(switch: Switch, call_id: str) -> bool:
    """Ask the provider to end the call, once more on a failure; True when it is ended (2xx or 404)."""
    for _ in range(2):
        try:
            status, _, _ = await provider_post(switch, f"{http_api.CALLS_PATH}/{call_id}/hangup", None, b"",
                                               HANGUP_TIMEOUT_S)
        except SwitchError:
            continue
        if 200 <= status < 300 or status == 404:
            return True
    return False


# --- the HTTP requests ----------------------------------------------------------------------------

async def _read_body(stream: trio.abc.Stream, head: HttpHead, rest: bytearray) -> bytes:
    length = http_api.body_length(head.headers)
    try:
        with trio.fail_after(BODY_TIMEOUT_S):
            while len(rest) < length:
                data = await stream.receive_some(65536)
                if not data:
                    raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, "the body ended early")
                rest += data
    except trio.TooSlowError:
        raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, "the body did not arrive in time") from None
    return bytes(rest[:length])


async def _send(stream: trio.abc.Stream, data: bytes) -> None:
    try:
        await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def serve_http(switch: Switch, stream: trio.abc.Stream, head: HttpHead, rest: bytearray) -> bool:
    """Serve the request if it is for one of the HTTP paths (then True); False leaves it to the upgrade."""
    try:
        target = http_api.route(head.start)
    except SwitchError as exc:  # an HTTP path with the wrong method
        await _send(stream, http_api.error_response(exc))
        return True
    if target is None:
        return False
    await handle_http(switch, stream, head, rest, target)
    return True


async def handle_http(switch: Switch, stream: trio.abc.Stream, head: HttpHead, rest: bytearray,
                      target: http_api.Target) -> None:
    """Answer one request on an HTTP path; a created call then runs here until it ends."""
    call: CallSession | None = None
    try:
        if target.route is http_api.Route.PREFLIGHT:
            response = http_api.preflight_response()
        else:
            key = http_api.bearer_key(head.headers)
            body = await _read_body(stream, head, rest)
            if target.route is http_api.Route.CLIENT_SECRETS:
                response = await mint_secret(switch, key, body)
            elif target.route is http_api.Route.REVOKE_SECRET:
                response = await revoke_secret(switch, key, body)
            elif target.route is http_api.Route.HANGUP:
                response = await client_hangup(switch, key, target.call_id or "")
            else:
                request_target = head.start.split(" ")[1]
                content_type = (head.get(b"content-type") or b"").decode("latin-1")
                call, response = await create_call(switch, key, request_target, content_type, body)
    except SwitchError as exc:
        switch.metrics.sessions_rejected += 1
        log.info("%s refused: %s", target.route, exc.code)
        response = http_api.error_response(exc)
    try:
        await _send(stream, response)
    finally:
        if call is not None:  # even when cancelled meanwhile: it gives its slot back and ends the call
            await call.run()


async def mint_secret(switch: Switch, key: str, body: bytes) -> bytes:
    if client_secrets.is_secret(key):
        raise SwitchError(ErrorCode.EXTERNAL_INVALID_AUTH, "a client secret cannot mint client secrets")
    request = http_api.parse_secret_request(body)
    config = dict(request.session or {})
    value, expires_at, account_id, _ = await switch.db.request(
        MessageType.MINT_SECRET, key, str(request.seconds), json.dumps(config))
    log.info("client secret minted for %d s", request.seconds, extra={"account": account_id})
    session = client_secrets.session_object(config or None, default_model(switch.settings.upstream_url))
    return http_api.json_response(200, {"value": value, "expires_at": int(expires_at), "session": session})


async def revoke_secret(switch: Switch, key: str, body: bytes) -> bytes:
    """The app server revokes a secret it minted, with the key that minted it (404 for any other
    secret); sessions open on it end at their next account check, as for a revoked key."""
    if client_secrets.is_secret(key):
        raise SwitchError(ErrorCode.EXTERNAL_INVALID_AUTH, "a client secret cannot revoke client secrets")
    await switch.db.request(MessageType.REVOKE_SECRET, key, http_api.parse_revoke_request(body))
    log.info("client secret revoked by its key")
    return http_api.json_response(200, {"revoked": True})


async def client_hangup(switch: Switch, key: str, call_id: str) -> bytes:
    """A client's hangup, on whichever worker it lands: switchdb says whether the key's account made
    the call (404 otherwise, as for a call that never was); the worker running it ends it here, any
    other worker asks the provider, and the worker running it then sees its sideband end."""
    (account_id,) = await switch.db.request(MessageType.CALL_OWNER, key, call_id)
    call = CALLS.get(call_id)
    if call is not None and not call.ended.is_set():
        await hang_up(switch, call_id)
        call.end("client hangup")
        return http_api.empty_response(200)
    status, _, body = await provider_post(switch, f"{http_api.CALLS_PATH}/{call_id}/hangup", None, b"",
                                          HANGUP_TIMEOUT_S)
    if status == 404:  # it has ended
        raise SwitchError(ErrorCode.EXTERNAL_NOT_FOUND, "No session found for the provided call_id")
    if not 200 <= status < 300:
        raise _provider_error(status, body)
    log.info("call %s hung up for its client (its worker settles it)", call_id, extra={"account": account_id})
    return http_api.empty_response(200)


def call_session_config(restore: str, requested: Mapping[str, Any] | None, secret_config: Mapping[str, Any] | None,
                        model: str) -> dict[str, Any]:
    """The session the provider is given for a new call. Pure.

    The restored session (for a secret: already under the secret's config), then what the
    client's multipart `session` asks, within the secret's locks; the model goes with a
    realtime session (the secret's, else the client's, else the switch's default).
    """
    session: dict[str, Any] = {"type": "realtime"}
    if restore:
        stored = json.loads(restore).get("session")
        if isinstance(stored, dict):
            session.update(stored)
    if requested:
        wanted = dict(requested)
        if secret_config is not None:
            wanted = client_secrets.enforce({"type": "session.update", "session": wanted},
                                            client_secrets.Locks.from_config(secret_config))[0]["session"]
        model = str(wanted.pop("model", model))
        session = deep_merge(session, wanted)
    if secret_config is not None:
        if secret_config.get("type") == "transcription":
            session["type"] = "transcription"
        model = client_secrets.upstream_model(secret_config) or model
    if session.get("type") == "realtime":
        session["model"] = model
    else:
        session.pop("model", None)
    return session


def _session_id(request_target: str) -> str:
    query = dict(parse_qsl(urlsplit(request_target).query, keep_blank_values=True))
    session_id = query.get("rs_sessid") or "call-" + _random.token_hex(8)
    if not SESSION_ID.fullmatch(session_id):
        raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, "rs_sessid must be 1-128 characters of A-Za-z0-9._:-")
    return session_id


def multipart_body(sdp: str, session: Mapping[str, Any]) -> tuple[str, bytes]:
    boundary = "rs" + _random.token_hex(12)
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"sdp\"\r\nContent-Type: application/sdp\r\n\r\n"
            f"{sdp}\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"session\"\r\n"
            f"Content-Type: application/json\r\n\r\n{json.dumps(session)}\r\n--{boundary}--\r\n")
    return f"multipart/form-data; boundary={boundary}", body.encode()


async def create_call(switch: Switch, key: str, request_target: str, content_type: str, body: bytes
                      ) -> tuple[CallSession, bytes]:
    """Authenticate, check credits, hand the offer to the provider; the call to run and the 201."""
    request = http_api.parse_call_request(content_type, body)
    session_id = _session_id(request_target)
    if switch.shutdown.is_set():
        raise SwitchError(ErrorCode.INTERNAL_SHUTTING_DOWN, "the switch is shutting down")
    switch.take_slot()  # before the provider is asked for anything
    try:
        account = Validated.decode(await switch.db.request(MessageType.VALIDATE_AND_LOAD, key, session_id))
        account, lease_key = await open_lease(switch.db, account)  # as a WebSocket session: none to be had is 402
        try:
            return await _start_call(switch, key, request, session_id, account, lease_key)
        except BaseException:
            with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_S):
                try:  # no call, nothing spent: the lease goes back now rather than when it expires
                    await request_lease(switch.db, account.account_id, lease_key, 0, 0)
                except SwitchError:
                    pass
            raise
    except BaseException:
        switch.metrics.sessions_open -= 1
        raise


async def _start_call(switch: Switch, key: str, request: http_api.CallRequest, session_id: str, account: Validated,
                      lease_key: str) -> tuple[CallSession, bytes]:
    secret_config = None
    if client_secrets.is_secret(key):
        (config_json,) = await switch.db.request(MessageType.SECRET_CONFIG, key)
        secret_config = json.loads(config_json) if config_json else {}
    session = call_session_config(account.restore, request.session, secret_config,
                                  default_model(switch.settings.upstream_url))
    multipart_type, payload = multipart_body(request.sdp, session)
    status, head, answer = await provider_post(switch, http_api.CALLS_PATH, multipart_type, payload)
    if status != 201:
        raise _provider_error(status, answer)
    call_id = http_api.call_id_from_location((head.get(b"location") or b"").decode("latin-1"))
    try:
        response = http_api.sdp_response(answer.decode("utf-8", "replace"), call_id)
    except ValueError:
        raise SwitchError(ErrorCode.INTERNAL_UPSTREAM_REJECTED, "the provider's call id is malformed") from None
    try:  # its owner, for a hangup through any worker: recorded before the client learns the call id
        await switch.db.request(MessageType.SAVE_CALL, call_id, account.account_id, session_id)
    except BaseException:
        with trio.CancelScope(shield=True):  # a call nobody could hang up or meter must not go on
            await hang_up(switch, call_id)
        raise
    model = session.get("model") or transcription_model_of(session) or default_model(switch.settings.upstream_url)
    call = CallSession(switch, call_id, key, account.account_id, session_id, str(model), account.balance,
                       str(session.get("type", "realtime")), account.pricing, lease_key)
    CALLS[call_id] = call
    log.info("call %s created", call_id, extra={"account": account.account_id, "session": session_id})
    return call, response


# --- a call, metered through its sideband ---------------------------------------------------------

class CallSession:
    """One WebRTC call as a session of its own: the sideband read, metered and remembered."""

    def __init__(self, switch: Switch, call_id: str, key: str, account_id: str, session_id: str, model: str,
                 balance: int, kind: str = "realtime", pricing: Pricing | None = None, lease_key: str = "") -> None:
        self.switch, self.call_id, self.key, self.kind = switch, call_id, key, kind
        self.account_id, self.session_id = account_id, session_id
        self.ledger = Ledger(account_id, session_id, model, balance, journal=switch.outbox.journal, pricing=pricing,
                             lease_key=lease_key)
        self.conversation = Conversation()
        self.ended = trio.Event()
        self.reason = ""
        self.log_extra = {"account": account_id, "session": session_id}
        self.last_event_at = trio.current_time()

    def end(self, reason: str) -> None:
        if not self.ended.is_set():
            self.reason = reason
            self.ended.set()

    async def run(self) -> None:
        started = time.monotonic()
        hang_up_now = False
        self.switch.metrics.sessions_total += 1  # counted open since `Switch.take_slot`
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_sideband, nursery.cancel_scope)
                nursery.start_soon(run_batcher, self.ledger, self.switch.db)
                nursery.start_soon(self._watch, nursery.cancel_scope)
                nursery.start_soon(self._watch_account)
        except* SwitchError as group:
            leaf: BaseException = group
            while isinstance(leaf, BaseExceptionGroup):
                leaf = leaf.exceptions[0]
            assert isinstance(leaf, SwitchError)
            exc = leaf
            self.reason = exc.code.value
            hang_up_now = True
            if exc.code == ErrorCode.EXTERNAL_NO_CREDITS:
                self.switch.metrics.credit_cutoffs += 1
        except* Exception:
            log.exception("call failed", extra=self.log_extra)
            self.reason, hang_up_now = ErrorCode.INTERNAL_ERROR.value, True
        finally:
            self.ended.set()
            with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_S + HANGUP_TIMEOUT_S):
                await self._cleanup()  # first: the usage hand-off never blocks
                # Not when the provider or the client ended it; "": cancelled (the grace is over).
                if hang_up_now or self.reason in ("shutdown", IDLE, ""):
                    await hang_up(self.switch, self.call_id)
            self.switch.metrics.sessions_open -= 1
            CALLS.pop(self.call_id, None)
            log.info("call %s ended (%s) after %.1f s", self.call_id, self.reason or "provider",
                     time.monotonic() - started, extra=self.log_extra)

    async def _cleanup(self) -> None:
        for batch in (self.ledger.inflight, self.ledger.take_batch()):
            if batch is not None:
                self.switch.outbox.submit(batch)
        self.ledger.inflight = None
        text = self.conversation.close()
        if text:
            await self.switch.db.send(MessageType.APPEND_CONVERSATION, self.account_id, self.session_id, text)

    async def _watch(self, done: trio.CancelScope) -> None:
        """The end of the call from outside the sideband: a hangup, shutdown, or a silent sideband."""
        idle = self.switch.settings.idle_timeout
        async with trio.open_nursery() as nursery:
            async def on_shutdown() -> None:
                await self.switch.shutdown.wait()
                self.end("shutdown")

            async def on_idle() -> None:
                while True:  # last_event_at moves on with every sideband event
                    deadline = self.last_event_at + idle
                    if deadline <= trio.current_time():
                        break
                    await trio.sleep_until(deadline)
                # The provider gives the switch no way to tell the browser why (nothing sent on the
                # sideband reaches its data channel but the provider's own events): the call simply
                # ends for it; the log says why.
                log.warning("call %s idle: no sideband event for %g s (IDLE_TIMEOUT); hanging up", self.call_id,
                            idle, extra=self.log_extra)
                self.end(IDLE)

            nursery.start_soon(on_shutdown)
            nursery.start_soon(on_idle)
            await self.ended.wait()
            nursery.cancel_scope.cancel()
        done.cancel()

    async def _watch_account(self) -> None:
        """As a WebSocket session: a revoked or expired key (a secret: revoked, or its key), or a
        suspended account, ends the call. A secret's own expiry does not: it only limits new calls."""
        secret = client_secrets.is_secret(self.key)
        while True:
            await trio.sleep(ACCOUNT_CHECK_S)
            try:
                if secret:
                    await self.switch.db.request(MessageType.CHECK_SECRET, self.key)
                else:
                    await self.switch.db.request(MessageType.VALIDATE_AND_LOAD, self.key, self.session_id)
            except SwitchError as exc:
                if exc.code == ErrorCode.EXTERNAL_INVALID_AUTH:
                    raise SwitchError(ErrorCode.EXTERNAL_INVALID_AUTH,
                                      "The key was revoked or has expired, or the account is suspended.") from None

    async def _read_sideband(self, done: trio.CancelScope) -> None:
        settings = self.switch.settings
        headers = [(b"Authorization", f"Bearer {settings.openai_api_key}".encode())] if settings.openai_api_key else []
        try:
            up = await connect(sideband_url(settings.upstream_url, self.call_id), headers,
                               max_message=UPSTREAM_MAX_MESSAGE, connect_timeout=UPSTREAM_CONNECT_TIMEOUT_S,
                               ssl_context=self.switch.upstream_tls)
        except ConnectError as exc:
            # Without the sideband the call cannot be metered: it must not go on.
            raise SwitchError(ErrorCode.INTERNAL_UPSTREAM_UNAVAILABLE, f"sideband: {exc}") from None
        try:
            # No session.created on a sideband: an empty update brings session.updated, which is
            # saved as the call's session and names the model the provider bills.
            await up.send_text(json.dumps({"type": "session.update", "session": {"type": self.kind}}))
            while True:
                try:
                    messages = await up.receive()
                except Closed:
                    self.end("provider closed the sideband")
                    done.cancel()
                    return
                self.last_event_at = trio.current_time()
                for message in messages:
                    if message.text:
                        await self._observe(message.payload.decode("utf-8", "replace"))
                await self._checkpoint()
        finally:
            with trio.CancelScope(shield=True):
                await up.aclose(1000, "", wait=0)

    async def _observe(self, text: str) -> None:
        event = upstream_event(text)
        if event is None:
            return
        kind = event["type"]
        if kind in USAGE_TYPES:
            self.switch.metrics.tokens_metered += self.ledger.add(event)
            if self.ledger.credits <= 0 and not await self.ledger.refill():
                raise SwitchError(ErrorCode.EXTERNAL_NO_CREDITS, "the account has no credits left")
        elif kind == "session.updated":
            session = event.get("session")
            if isinstance(session, Mapping):
                self.ledger.transcription_model = transcription_model_of(session) or ""
                if isinstance(session.get("model"), str):
                    self.ledger.model = session["model"]
            await self.switch.db.send(MessageType.SAVE_SESSION, self.account_id, self.session_id, text)
        self.conversation.observe(event)

    async def _checkpoint(self) -> None:
        if len(self.conversation) >= CHECKPOINT_CHARS:
            await self.switch.db.send(
                MessageType.APPEND_CONVERSATION, self.account_id, self.session_id, self.conversation.take())
