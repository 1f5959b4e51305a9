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


ARGUMENTS: dict[MessageType, tuple[str, ...]] = {
    MessageType.VALIDATE_AND_LOAD: ("api_key", "session_id"),
    MessageType.GET_CREDITS: ("account_id",),
    MessageType.RECORD_USAGE: ("batch_id", "account_id", "session_id", "provider", "model", "usage_json"),
    MessageType.SAVE_SESSION: ("account_id", "session_id", "session_updated_json"),
    MessageType.APPEND_CONVERSATION: ("account_id", "session_id", "text"),
    MessageType.PING: (),
}
NO_REPLY = frozenset({MessageType.SAVE_SESSION, MessageType.APPEND_CONVERSATION})


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
    if sum(len(f) for f in frames) > MAX_MESSAGE_BYTES:
        raise SwitchError(ErrorCode.INTERNAL_MALFORMED_MESSAGE, "message too large")
    try:
        return [bytes(f).decode("utf-8") for f in frames]
    except UnicodeDecodeError:
        raise SwitchError(ErrorCode.INTERNAL_MALFORMED_MESSAGE, "frame is not valid UTF-8") from None


def encode_request(request_id: str, type: MessageType, *args: str) -> list[bytes]:
    return [request_id.encode(), type.value.encode(), *(a.encode() for a in args)]


def decode_request(frames: Sequence[bytes]) -> Request:
    """Read a request (without the ROUTER identity frame); raises SwitchError when malformed."""
    texts = _texts(frames)
    if len(texts) < 2:
        raise SwitchError(ErrorCode.INTERNAL_MALFORMED_MESSAGE, "a request needs an id and a type")
    request_id, name, args = texts[0], texts[1], tuple(texts[2:])
    try:
        type = MessageType(name)
    except ValueError:
        raise SwitchError(ErrorCode.INTERNAL_UNKNOWN_TYPE, "unknown message type") from None
    if len(args) != len(ARGUMENTS[type]):
        raise SwitchError(
            ErrorCode.INTERNAL_MALFORMED_MESSAGE, f"{type} takes {len(ARGUMENTS[type])} arguments, got {len(args)}"
        )
    return Request(request_id, type, args)


def encode_reply(request_id: bytes | str, status: str, *fields: str) -> list[bytes]:
    rid = request_id if isinstance(request_id, bytes) else request_id.encode()
    return [rid, status.encode(), *(f.encode() for f in fields)]


def decode_reply(frames: Sequence[bytes]) -> Reply:
    texts = _texts(frames)
    if len(texts) < 2:
        raise SwitchError(ErrorCode.INTERNAL_MALFORMED_MESSAGE, "a reply needs an id and a status")
    return Reply(texts[0], texts[1], tuple(texts[2:]))
