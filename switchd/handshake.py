"""Reading a client's upgrade request: where the key is, which session, which model. Pure."""
from __future__ import annotations

import re
from collections.abc import Sequence
from urllib.parse import parse_qsl, unquote_plus, urlencode, urlsplit, urlunsplit

import attrs

from common.errors import ErrorCode, SwitchError
from common.logs import escape_controls

SESSION_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
KEY = re.compile(r"[\x21-\x7e]{1,256}")
KEY_SUBPROTOCOL = "openai-insecure-api-key."
APIS = ("OPENAI",)

# What each handshake rejection answers with.
HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.EXTERNAL_MISSING_PARAMS: 400,
    ErrorCode.EXTERNAL_BAD_PARAMS: 400,
    ErrorCode.EXTERNAL_INVALID_AUTH: 401,
    ErrorCode.EXTERNAL_NO_CREDITS: 402,
    ErrorCode.INTERNAL_DB_UNAVAILABLE: 503,
    ErrorCode.EXTERNAL_OVER_CAPACITY: 503,
}

# A parameter name: what follows a separator (or the start) up to `=`. Not consumed with its
# value, so a name inside another parameter's value is still found.
_NAME = re.compile(r"(?:^|(?<=[?#&;/=]))([^?#&;/=]*)=")
# A hidden value runs to the next & or ; so that a key holding `?`, `#`, `=` or `/` is hidden whole.
_VALUE_END = re.compile(r"[&;\s]|$")


@attrs.frozen
class ClientParams:
    key: str
    session_id: str
    api: str
    model: str | None
    subprotocol: str | None  # what to answer; never the key-bearing entry
    intent: str | None = None  # "transcription": a transcription-only session (no model)

    def __repr__(self) -> str:
        return f"ClientParams(session_id={self.session_id!r}, api={self.api!r}, model={self.model!r})"


def parse_client_request(
    path: str, headers: Sequence[tuple[bytes, bytes]], subprotocols: Sequence[str]
) -> ClientParams:
    """Find the key (rs_key, then `Authorization: Bearer`, then the browser subprotocol) and the session."""
    query = dict(parse_qsl(urlsplit(path).query, keep_blank_values=True))
    key = query.get("rs_key") or None
    if key is None:
        for name, value in headers:
            if name.lower() == b"authorization" and value[:7].lower() == b"bearer ":
                key = value[7:].strip().decode("latin-1") or None
                break
    if key is None:
        key = next((p[len(KEY_SUBPROTOCOL) :] for p in subprotocols if p.startswith(KEY_SUBPROTOCOL)), None) or None
    session_id = query.get("rs_sessid")
    if key is None or not session_id:
        raise SwitchError(ErrorCode.EXTERNAL_MISSING_PARAMS, "rs_key and rs_sessid are required")
    if not KEY.fullmatch(key):
        raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, "malformed key")
    if not SESSION_ID.fullmatch(session_id):
        raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, "rs_sessid must be 1-128 characters of A-Za-z0-9._:-")
    api = query.get("rs_api", "OPENAI")
    if api not in APIS:
        raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, f"rs_api must be one of {', '.join(APIS)}")
    model = query.get("model") or None
    intent = query.get("intent") or None
    if intent not in (None, "transcription"):
        raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, "intent must be 'transcription'")
    subprotocol = "realtime" if "realtime" in subprotocols else None
    return ClientParams(key, session_id, api, None if intent else model, subprotocol, intent)


def check_request_head(start: str, headers: Sequence[tuple[bytes, bytes]]) -> None:
    """Refuse what a WebSocket upgrade never needs and request smuggling relies on (400)."""
    if "\x00" in start or any(b"\x00" in name or b"\x00" in value for name, value in headers):
        raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, "NUL byte in the request head")
    if not start.endswith(" HTTP/1.1"):
        raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, "HTTP/1.1 is required")
    names = {name.lower() for name, _ in headers}
    if b"transfer-encoding" in names:
        # With a Content-Length too it is the classic smuggling shape; alone, a body an upgrade has no use for.
        raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, "Transfer-Encoding on an upgrade request")
    lengths = [value.strip() for name, value in headers if name.lower() == b"content-length"]
    if any(length != b"0" for length in lengths):
        # Body bytes would be read as the client's first WebSocket frames.
        raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, "a body on an upgrade request")


def redact(target: str) -> str:
    """The request target for a log line: every rs_key value hidden, wherever it appears (query,
    fragment, path, percent-encoded name), and control characters escaped."""
    shown: list[str] = []
    pos = 0
    for match in _NAME.finditer(target):
        if match.start() < pos or unquote_plus(match.group(1)).strip().lower() != "rs_key":
            continue
        end = _VALUE_END.search(target, match.end())
        shown += [target[pos : match.end()], "%2A%2A%2A"]
        pos = end.start() if end else len(target)
    shown.append(target[pos:])
    return escape_controls("".join(shown))


def upstream_url(base: str, model: str | None, intent: str | None = None) -> str:
    """The provider URL with the client's model (or its transcription intent, which has no model) passed through."""
    if model is None and intent is None:
        return base
    parts = urlsplit(base)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in ("model", "intent")]
    added = ("intent", intent) if intent is not None else ("model", model)
    return urlunsplit(parts._replace(query=urlencode([*query, added])))
