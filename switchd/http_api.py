"""The plain-HTTP paths switchd answers beside its WebSocket upgrade (issue 17). Pure.

`POST /v1/realtime/client_secrets` (JSON), `POST /v1/realtime/calls` (a raw `application/sdp`
offer, or `multipart/form-data` with `sdp` and `session` parts) and
`POST /v1/realtime/calls/{id}/hangup`, shaped as OpenAI's so the official SDKs work unchanged.
Every refusal is a SwitchError; `error_response` turns it into the JSON error object OpenAI
answers with (`{"error": {"message", "type", "code", "param"}}`), `code` being the switch's own
ErrorCode. Browsers call these from other origins, so preflights are answered and every
response allows any origin: the credential is the bearer key, never a cookie.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Any

import attrs

from common.errors import ErrorCode, SwitchError

SECRETS_PATH = "/v1/realtime/client_secrets"
# The secret goes in the body, never in the path: paths land in proxies' access logs.
REVOKE_PATH = SECRETS_PATH + "/revoke"
CALLS_PATH = "/v1/realtime/calls"
_HANGUP = re.compile(r"/v1/realtime/calls/(rtc_[A-Za-z0-9_-]{1,128})/hangup")
CALL_ID = re.compile(r"rtc_[A-Za-z0-9_-]{1,128}")

MAX_BODY = 1024 * 1024  # a session config with long instructions and many tools fits
MAX_SDP = 128 * 1024  # an offer with every candidate is a few KiB
MAX_PARTS = 8
DEFAULT_SECONDS, MIN_SECONDS, MAX_SECONDS = 600, 10, 7200
SESSION_TYPES = ("realtime", "transcription")

STATUS: dict[ErrorCode, int] = {
    ErrorCode.EXTERNAL_MISSING_PARAMS: 400,
    ErrorCode.EXTERNAL_BAD_PARAMS: 400,
    ErrorCode.EXTERNAL_BINARY_FRAME: 400,
    ErrorCode.EXTERNAL_INVALID_AUTH: 401,
    ErrorCode.EXTERNAL_NO_CREDITS: 402,
    ErrorCode.EXTERNAL_NOT_FOUND: 404,
    ErrorCode.EXTERNAL_CONFLICT: 409,
    ErrorCode.EXTERNAL_PAYLOAD_TOO_LARGE: 413,
    ErrorCode.INTERNAL_UPSTREAM_REJECTED: 502,
    ErrorCode.INTERNAL_UPSTREAM_UNAVAILABLE: 502,
    ErrorCode.INTERNAL_DB_UNAVAILABLE: 503,
    ErrorCode.EXTERNAL_OVER_CAPACITY: 503,
    ErrorCode.INTERNAL_SHUTTING_DOWN: 503,
}
# OpenAI's error `type` for each status: what the SDKs switch on.
_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 402: "insufficient_quota",
          404: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error"}
_REASONS = {200: "OK", 201: "Created", 204: "No Content", 400: "Bad Request", 401: "Unauthorized",
            402: "Payment Required", 404: "Not Found", 405: "Method Not Allowed", 409: "Conflict",
            413: "Payload Too Large", 500: "Internal Server Error", 502: "Bad Gateway",
            503: "Service Unavailable"}
_CORS = (b"Access-Control-Allow-Origin: *\r\nAccess-Control-Expose-Headers: Location\r\n")


class Route(StrEnum):
    CLIENT_SECRETS = "client_secrets"
    REVOKE_SECRET = "revoke_secret"
    CALLS = "calls"
    HANGUP = "hangup"
    PREFLIGHT = "preflight"


@attrs.frozen
class Target:
    route: Route
    call_id: str | None = None


@attrs.frozen
class SecretRequest:
    seconds: int
    session: Mapping[str, Any] | None


@attrs.frozen
class CallRequest:
    sdp: str
    session: Mapping[str, Any] | None


def route(start: str) -> Target | None:
    """Which HTTP path a request line names; None for anything else (the WebSocket path judges it)."""
    parts = start.split(" ")
    if len(parts) != 3:
        return None
    method, target, _ = parts
    path = target.split("?", 1)[0]
    if path == SECRETS_PATH:
        found = Target(Route.CLIENT_SECRETS)
    elif path == REVOKE_PATH:
        found = Target(Route.REVOKE_SECRET)
    elif path == CALLS_PATH:
        found = Target(Route.CALLS)
    elif (match := _HANGUP.fullmatch(path)) is not None:
        found = Target(Route.HANGUP, match.group(1))
    else:
        return None
    if method == "OPTIONS":
        return Target(Route.PREFLIGHT)
    if method != "POST":
        raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, f"{method} is not allowed here; use POST")
    return found


def body_length(headers: Sequence[tuple[bytes, bytes]]) -> int:
    """The body's length from one Content-Length (names lower-cased); chunked bodies are refused."""
    if any(name == b"transfer-encoding" for name, _ in headers):
        raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, "Transfer-Encoding is not supported; send Content-Length")
    lengths = {value.strip() for name, value in headers if name == b"content-length"}
    if not lengths:
        return 0
    if len(lengths) > 1:
        raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, "conflicting Content-Length headers")
    (text,) = lengths
    if not text.isdigit() or len(text) > 12:
        raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, "malformed Content-Length")
    length = int(text)
    if length > MAX_BODY:
        raise SwitchError(ErrorCode.EXTERNAL_PAYLOAD_TOO_LARGE, f"the body exceeds {MAX_BODY} bytes")
    return length


def bearer_key(headers: Sequence[tuple[bytes, bytes]]) -> str:
    """The key of `Authorization: Bearer KEY`; EXTERNAL_INVALID_AUTH when there is none."""
    for name, value in headers:
        if name == b"authorization" and value[:7].lower() == b"bearer ":
            key = value[7:].strip()
            if 0 < len(key) <= 256 and all(0x21 <= b <= 0x7E for b in key):
                return key.decode("ascii")
            break
    raise SwitchError(ErrorCode.EXTERNAL_INVALID_AUTH,
                      "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'.")


def _json(data: bytes, what: str) -> object:
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, f"{what} is not valid JSON") from None


def check_session(value: object, param: str = "session") -> dict[str, Any]:
    """A session config (realtime or transcription) in the shape OpenAI requires; the provider judges the rest."""
    if not isinstance(value, dict):
        raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, f"'{param}' must be an object")
    kind = value.get("type")
    if kind not in SESSION_TYPES:
        raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, f"'{param}.type' must be 'realtime' or 'transcription'")
    for key in ("model", "instructions"):
        if key in value and not isinstance(value[key], str):
            raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, f"'{param}.{key}' must be a string")
    if kind == "transcription" and "model" in value:
        raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS,
                          f"a transcription session has no '{param}.model'; set audio.input.transcription.model")
    audio = value.get("audio")
    if audio is not None:
        if not isinstance(audio, dict) or not all(isinstance(v, dict) for v in audio.values()):
            raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, f"'{param}.audio' must be an object of objects")
        transcription = audio.get("input", {}).get("transcription")
        if transcription is not None and not (
            isinstance(transcription, dict) and isinstance(transcription.get("model", ""), str)
        ):
            raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, f"'{param}.audio.input.transcription' is malformed")
    max_output = value.get("max_output_tokens")
    if max_output is not None and max_output != "inf" and not (
        type(max_output) is int and 1 <= max_output <= 4096
    ):
        raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, f"'{param}.max_output_tokens' must be 1-4096 or 'inf'")
    return value


def parse_secret_request(body: bytes) -> SecretRequest:
    """A client_secrets body: `{expires_after: {anchor, seconds}, session}`, both optional."""
    request = _json(body, "the request body") if body.strip() else {}
    if not isinstance(request, dict):
        raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, "the request body must be a JSON object")
    unknown = set(request) - {"expires_after", "session"}
    if unknown:
        raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, f"Unknown parameter: '{sorted(unknown)[0]}'")
    seconds = DEFAULT_SECONDS
    expires = request.get("expires_after")
    if expires is not None:
        if not isinstance(expires, dict) or set(expires) - {"anchor", "seconds"}:
            raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, "'expires_after' must be {anchor, seconds}")
        if expires.get("anchor", "created_at") != "created_at":
            raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, "'expires_after.anchor' must be 'created_at'")
        seconds = expires.get("seconds", DEFAULT_SECONDS)
        if type(seconds) is not int or not MIN_SECONDS <= seconds <= MAX_SECONDS:
            raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS,
                              f"'expires_after.seconds' must be an integer from {MIN_SECONDS} to {MAX_SECONDS}")
    session = request.get("session")
    return SecretRequest(seconds, None if session is None else check_session(session))


def parse_revoke_request(body: bytes) -> str:
    """A revoke body, `{"value": "ek_…"}`: the secret to revoke."""
    request = _json(body, "the request body")
    if not isinstance(request, dict) or set(request) != {"value"}:
        raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, "the request body must be {\"value\": \"ek_…\"}")
    value = request["value"]
    if not isinstance(value, str) or not value.startswith("ek_") or not 3 < len(value) <= 256:
        raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, "'value' must be a client secret (ek_…)")
    return value


def check_sdp(data: bytes) -> str:
    """An SDP offer as text: ASCII/UTF-8, `v=0` first, at least one media section."""
    if len(data) > MAX_SDP:
        raise SwitchError(ErrorCode.EXTERNAL_PAYLOAD_TOO_LARGE, f"the SDP offer exceeds {MAX_SDP} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, "the SDP offer is not UTF-8") from None
    lines = text.replace("\r\n", "\n").split("\n")
    if lines[0].strip() != "v=0" or not any(line.startswith("m=") for line in lines):
        raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, "the body is not an SDP offer (v=0 and an m= line)")
    if "\x00" in text:
        raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, "NUL byte in the SDP offer")
    return text


def _params(header: str) -> tuple[str, dict[str, str]]:
    """A header value's main token (lower-cased) and its `;name=value` parameters (quotes removed)."""
    main, *rest = header.split(";")
    params: dict[str, str] = {}
    for item in rest:
        name, sep, value = item.partition("=")
        if sep:
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            params[name.strip().lower()] = value
    return main.strip().lower(), params


def parse_multipart(content_type: str, body: bytes) -> dict[str, tuple[str, bytes]]:
    """`multipart/form-data` parts by name: (their content type, their bytes). Strict and bounded."""
    _, params = _params(content_type)
    boundary = params.get("boundary", "")
    if not 1 <= len(boundary) <= 70 or any(not 0x20 <= ord(c) <= 0x7E for c in boundary):
        raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, "multipart body without a valid boundary")
    delimiter = b"--" + boundary.encode("ascii")
    chunks = body.split(delimiter)
    if len(chunks) < 3 or not chunks[-1].startswith(b"--"):
        raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, "multipart body is not closed by its boundary")
    if len(chunks) - 2 > MAX_PARTS:
        raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, f"more than {MAX_PARTS} multipart parts")
    parts: dict[str, tuple[str, bytes]] = {}
    for chunk in chunks[1:-1]:
        if not chunk.startswith(b"\r\n") or not chunk.endswith(b"\r\n"):
            raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, "malformed multipart part")
        head, sep, data = chunk[2:-2].partition(b"\r\n\r\n")
        if not sep:
            raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, "multipart part without headers")
        name, ctype = None, "text/plain"
        for line in head.split(b"\r\n"):
            key, colon, value = line.partition(b":")
            if not colon:
                raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, "malformed multipart part header")
            text = value.decode("latin-1").strip()
            if key.strip().lower() == b"content-disposition":
                kind, disposition = _params(text)
                if kind != "form-data" or "name" not in disposition:
                    raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, "multipart part without a form-data name")
                name = disposition["name"]
            elif key.strip().lower() == b"content-type":
                ctype = _params(text)[0]
        if name is None:
            raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, "multipart part without a name")
        if name in parts:
            raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, f"multipart part '{name}' given twice")
        parts[name] = (ctype, data)
    return parts


def parse_call_request(content_type: str, body: bytes) -> CallRequest:
    """A calls body: a raw SDP offer, or multipart `sdp` (+ optional `session`, a realtime config)."""
    kind = _params(content_type)[0]
    if kind == "application/sdp":
        return CallRequest(check_sdp(body), None)
    if kind != "multipart/form-data":
        raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS,
                          "Content-Type must be application/sdp or multipart/form-data")
    parts = parse_multipart(content_type, body)
    unknown = set(parts) - {"sdp", "session"}
    if unknown:
        raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, f"Unknown parameter: '{sorted(unknown)[0]}'")
    if "sdp" not in parts:
        raise SwitchError(ErrorCode.EXTERNAL_MISSING_PARAMS, "Missing required parameter: 'sdp'")
    session = None
    if "session" in parts:
        raw = _json(parts["session"][1], "the 'session' part")
        session = check_session(raw)
        # The docs strip the id a session object carries; never let it reach the provider.
        session = {k: v for k, v in session.items() if k not in ("id", "object", "expires_at")}
    return CallRequest(check_sdp(parts["sdp"][1]), session)


# --- responses ----------------------------------------------------------------------------------

def _response(status: int, content_type: str | None, body: bytes, extra: bytes = b"") -> bytes:
    head = f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n".encode()
    if content_type is not None:
        head += f"Content-Type: {content_type}\r\n".encode()
    return (head + f"Content-Length: {len(body)}\r\n".encode() + _CORS + extra
            + b"Cache-Control: no-store\r\nConnection: close\r\n\r\n" + body)


def status_of(exc: SwitchError) -> int:
    return STATUS.get(exc.code, 500)


def error_body(exc: SwitchError) -> dict[str, Any]:
    status = status_of(exc)
    return {"error": {"message": exc.message, "type": _TYPES.get(status, "server_error"),
                      "code": exc.code.value, "param": None}}


def error_response(exc: SwitchError) -> bytes:
    return json_response(status_of(exc), error_body(exc))


def json_response(status: int, value: object) -> bytes:
    return _response(status, "application/json", json.dumps(value, separators=(",", ":")).encode())


def sdp_response(sdp: str, call_id: str) -> bytes:
    """201 with the SDP answer; `Location` names the call, relative, as the provider's does."""
    if not CALL_ID.fullmatch(call_id):
        raise ValueError("not a call id")
    return _response(201, "application/sdp", sdp.encode(), f"Location: {CALLS_PATH}/{call_id}\r\n".encode())


def empty_response(status: int = 200) -> bytes:
    return _response(status, None, b"")


def preflight_response() -> bytes:
    return _response(204, None, b"", b"Access-Control-Allow-Methods: POST, OPTIONS\r\n"
                     b"Access-Control-Allow-Headers: Authorization, Content-Type, OpenAI-Beta\r\n"
                     b"Access-Control-Max-Age: 600\r\n")


def call_id_from_location(location: str) -> str:
    """The call id in a provider's `Location` (its last `rtc_` segment); a provider fault without one."""
    for segment in reversed(location.split("?", 1)[0].split("/")):
        if CALL_ID.fullmatch(segment):
            return segment
    raise SwitchError(ErrorCode.INTERNAL_UPSTREAM_REJECTED, "the provider's answer named no call")
