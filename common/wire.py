"""The switchd ⇄ switchdb wire protocol (SPEC section 8) as pure functions.

Multipart ZeroMQ messages, one UTF-8 frame per field, so no payload can break the framing.
Request: [request_id, TYPE, arg...]; reply: [request_id, "OK" | ERROR_CODE, field...].
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from common.errors import ErrorCode, SwitchError

OK = "OK"
# The largest message either side accepts; a stored session with 32k characters of context
# is far below it.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024


class MessageType(StrEnum):
    VALIDATE_AND_LOAD = "VALIDATE_AND_LOAD"
    GET_CREDITS = "GET_CREDITS"
    RECORD_USAGE = "RECORD_USAGE"
    SAVE_SESSION = "SAVE_SESSION"
    APPEND_CONVERSATION = "APPEND_CONVERSATION"
    PING = "PING"
    # Client secrets (issue 17): mint one for a key; read a usable one's session config.
    MINT_SECRET = "MINT_SECRET"
    SECRET_CONFIG = "SECRET_CONFIG"
    CHECK_SECRET = "CHECK_SECRET"  # a started session's secret: usable but for its expiry
    # A session's lease on its account's balance (issue 16): set it, get what is granted.
    LEASE = "LEASE"
    # A WebRTC call's owner, recorded when it starts, so any worker can hang it up for it alone.
    SAVE_CALL = "SAVE_CALL"
    CALL_OWNER = "CALL_OWNER"
    # A client secret revoked by the app server holding the key that minted it.
    REVOKE_SECRET = "REVOKE_SECRET"


ARGUMENTS: dict[MessageType, tuple[str, ...]] = {
    MessageType.VALIDATE_AND_LOAD: ("api_key", "session_id"),
    MessageType.GET_CREDITS: ("account_id",),
    MessageType.RECORD_USAGE: ("batch_id", "account_id", "session_id", "provider", "model", "usage_json"),
    MessageType.SAVE_SESSION: ("account_id", "session_id", "session_updated_json"),
    MessageType.APPEND_CONVERSATION: ("account_id", "session_id", "text"),
    MessageType.PING: (),
    MessageType.MINT_SECRET: ("api_key", "seconds", "session_json"),
    MessageType.SECRET_CONFIG: ("secret",),
    MessageType.CHECK_SECRET: ("secret",),
    MessageType.LEASE: ("account_id", "lease_key", "held", "wanted"),
    MessageType.SAVE_CALL: ("call_id", "account_id", "session_id"),
    MessageType.CALL_OWNER: ("api_key", "call_id"),
    MessageType.REVOKE_SECRET: ("api_key", "secret"),
}
NO_REPLY = frozenset({MessageType.SAVE_SESSION, MessageType.APPEND_CONVERSATION})
# Looked up per message: a dict is several times cheaper than calling the enum.
_TYPES: dict[str, tuple[MessageType, int]] = {t.value: (t, len(ARGUMENTS[t])) for t in MessageType}


@dataclass(frozen=True, slots=True)
class Request:
    request_id: str
    type: MessageType
    args: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Reply:
    request_id: str
    status: str  # "OK" or an ErrorCode value
    fields: tuple[str, ...]


def _texts(frames: Sequence[bytes]) -> list[str]:
    if sum(map(len, frames)) > MAX_MESSAGE_BYTES:
        raise SwitchError(ErrorCode.INTERNAL_MALFORMED_MESSAGE, "message too large")
    try:
        try:
            return [f.decode() for f in frames]
        except AttributeError:  # buffers and zmq.Frame, not bytes
            return [bytes(f).decode() for f in frames]
    except UnicodeDecodeError:
        raise SwitchError(ErrorCode.INTERNAL_MALFORMED_MESSAGE, "frame is not valid UTF-8") from None


def encode_request(request_id: str, type: MessageType, *args: str) -> list[bytes]:
    return [request_id.encode(), type.value.encode(), *[a.encode() for a in args]]


def decode_request(frames: Sequence[bytes]) -> Request:
    """Read a request (without the ROUTER identity frame); raises SwitchError when malformed."""
    texts = _texts(frames)
    if len(texts) < 2:
        raise SwitchError(ErrorCode.INTERNAL_MALFORMED_MESSAGE, "a request needs an id and a type")
    found = _TYPES.get(texts[1])
    if found is None:
        raise SwitchError(ErrorCode.INTERNAL_UNKNOWN_TYPE, "unknown message type")
    type, arity = found
    args = tuple(texts[2:])
    if len(args) != arity:
        raise SwitchError(ErrorCode.INTERNAL_MALFORMED_MESSAGE, f"{type} takes {arity} arguments, got {len(args)}")
    return Request(texts[0], type, args)


def encode_reply(request_id: bytes | str, status: str, *fields: str) -> list[bytes]:
    rid = request_id if isinstance(request_id, bytes) else request_id.encode()
    return [rid, status.encode(), *[f.encode() for f in fields]]


def decode_reply(frames: Sequence[bytes]) -> Reply:
    texts = _texts(frames)
    if len(texts) < 2:
        raise SwitchError(ErrorCode.INTERNAL_MALFORMED_MESSAGE, "a reply needs an id and a status")
    return Reply(texts[0], texts[1], tuple(texts[2:]))
