"""What the switch itself says to a client: OpenAI-style error events and close codes."""
from __future__ import annotations

import json
import os

from common.errors import ErrorCode

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_UPSTREAM = 1011
CLOSE_REVOKED = 4401  # the key was revoked or expired, or the account suspended, mid-session
CLOSE_NO_CREDITS = 4402
CLOSE_IDLE = 4408

# The close code that ends a session for each fatal error; codes not here end it with 1011.
CLOSE_CODES: dict[ErrorCode, int] = {
    ErrorCode.EXTERNAL_NO_CREDITS: CLOSE_NO_CREDITS,
    ErrorCode.EXTERNAL_INVALID_AUTH: CLOSE_REVOKED,
    ErrorCode.EXTERNAL_IDLE_TIMEOUT: CLOSE_IDLE,
    ErrorCode.EXTERNAL_BUFFER_OVERFLOW: CLOSE_POLICY,
    ErrorCode.INTERNAL_SHUTTING_DOWN: CLOSE_GOING_AWAY,
    ErrorCode.INTERNAL_UPSTREAM_UNAVAILABLE: CLOSE_UPSTREAM,
    ErrorCode.INTERNAL_UPSTREAM_REJECTED: CLOSE_UPSTREAM,
}

_ERROR_TYPES = {
    ErrorCode.EXTERNAL_NO_CREDITS: "insufficient_credits",
    ErrorCode.EXTERNAL_INVALID_AUTH: "authentication_error",
}


def error_event(code: ErrorCode, message: str) -> str:
    """An `error` event in the provider's GA shape, with our code, so SDK clients surface it."""
    if code in _ERROR_TYPES:
        kind = _ERROR_TYPES[code]
    else:
        kind = "invalid_request_error" if code.startswith("EXTERNAL_") else "server_error"
    return json.dumps(
        {
            "type": "error",
            "event_id": "event_rs" + os.urandom(9).hex(),
            "error": {"type": kind, "code": code.value, "message": message, "param": None, "event_id": None},
        },
        separators=(",", ":"),
    )
