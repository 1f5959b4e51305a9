"""Reading a client's upgrade request: where the key is, which session, which model. Pure."""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from common.errors import ErrorCode, SwitchError

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


@dataclass(frozen=True, slots=True)
class ClientParams:
    key: str
    session_id: str
    api: str
    model: str | None
    subprotocol: str | None  # what to answer; never the key-bearing entry

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
    return ClientParams(key, session_id, api, model, "realtime" if "realtime" in subprotocols else None)


def redact(path: str) -> str:
    """The request path with the rs_key value hidden, for logs."""
    parts = urlsplit(path)
    query = [(k, "***" if k == "rs_key" else v) for k, v in parse_qsl(parts.query, keep_blank_values=True)]
    return urlunsplit(parts._replace(query=urlencode(query)))


def upstream_url(base: str, model: str | None) -> str:
    """The provider URL with the client's model passed through."""
    if model is None:
        return base
    parts = urlsplit(base)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "model"]
    return urlunsplit(parts._replace(query=urlencode([*query, ("model", model)])))
