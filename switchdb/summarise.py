"""The summariser LLM client: one Gemini `generateContent` call, blocking (run it in a thread).

Errors never carry the conversation or the response body: both may hold what users said.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.request

from common.errors import ErrorCode, SwitchError

TARGET_CHARS = 24_000
TIMEOUT_S = 120.0

PROMPT = (
    "Below is the transcript of a conversation between a user and a voice assistant, one turn per line, "
    "each line starting with 'user:' or 'agent:'. The conversation will continue and the assistant will only "
    f"see what you write. Rewrite it to at most about {TARGET_CHARS} characters: summarise the older part "
    "(keep names, facts, numbers, decisions, promises and open questions), and keep the most recent turns "
    "verbatim as 'user:'/'agent:' lines. Answer with the rewritten transcript only, in the conversation's "
    "language.\n\nTranscript:\n"
)


def request_body(conversation: str) -> bytes:
    return json.dumps(
        {
            "contents": [{"role": "user", "parts": [{"text": PROMPT + conversation}]}],
            "generationConfig": {"temperature": 0.2},
        }
    ).encode()


def parse_response(body: bytes) -> str:
    """The text of the first candidate; raises SwitchError when there is none."""
    try:
        text = json.loads(body)["candidates"][0]["content"]["parts"][0]["text"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise SwitchError(ErrorCode.INTERNAL_ERROR, "summariser answer has no candidate text") from None
    if not isinstance(text, str) or not text.strip():
        raise SwitchError(ErrorCode.INTERNAL_ERROR, "summariser answer is empty")
    return text.strip()


def summarise(url: str, api_key: str, conversation: str, timeout_s: float = TIMEOUT_S) -> str:
    request = urllib.request.Request(
        url,
        data=request_body(conversation),
        headers={"Content-Type": "application/json", "x-goog-api-key": api_key},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        raise SwitchError(ErrorCode.INTERNAL_ERROR, f"summariser answered HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise SwitchError(ErrorCode.INTERNAL_ERROR, f"summariser unreachable: {reason}") from None
    return parse_response(body)
