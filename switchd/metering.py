"""Which upstream frames switchd acts on, and the tokens their usage reports deduct (SPEC 5.4, 5.5).

`upstream_event` runs on every upstream text frame, so it decides from the frame's first bytes
whenever it can and parses only the few event types switchd acts on.

Why peeking at the first bytes is sound. Upstream frames are written by the provider's JSON
serializer, which emits the event's own `type` first (GA frames are compact and start with
`{"type":"`, protocol reference 3.2) and writes each key once. Client-controlled text (response
metadata, tool schemas, instructions, transcripts) only ever appears later in the frame, as a
nested value or inside a JSON string, so it cannot put bytes at offset 0. The type read there is
therefore the type json.loads would return; the one way they could differ is a duplicate
top-level "type" key (json.loads keeps the last), which a serializer never writes and a client
cannot inject at the top level. A frame laid out any other way (other key order, whitespace) is
simply parsed.

Metering reads usage only from the parsed top-level structure, never by searching the frame's
text: the provider echoes client-chosen metadata and tool schemas unescaped before the usage
block, so a byte scan for `"input_tokens":` or `"type":"response.done"` would let a client forge
or lower its bill (protocol reference 3.3).
"""
from __future__ import annotations

from collections.abc import Mapping

from common import fastjson
from common.usage import UsageTotals
from switchd.inflight import WATCHED
from switchd.transcript import AGENT_DELTAS, USER_COMPLETED, USER_DELTA

AUDIO_DELTA_PREFIX: str = '{"type":"response.output_audio.delta"'  # upstream audio fast path
CLIENT_AUDIO_PREFIX: str = '{"type":"input_audio_buffer.append"'  # client audio fast path

RESPONSE_DONE = "response.done"
USAGE_TYPES: frozenset[str] = frozenset({RESPONSE_DONE, USER_COMPLETED})
TRANSCRIPT_TYPES: frozenset[str] = frozenset({USER_DELTA, USER_COMPLETED, *AGENT_DELTAS})
ACTIONABLE: frozenset[str] = USAGE_TYPES | TRANSCRIPT_TYPES | WATCHED | {"session.updated", "session.created", "error"}

_TYPE_FIRST = '{"type":"'
_TYPE_AT = len(_TYPE_FIRST)


def upstream_event(frame: str) -> dict | None:
    """The parsed event when switchd must act on this upstream frame, else None. Never raises."""
    # The closing quote in the prefix makes this match exactly one type, which is not actionable.
    if frame.startswith(AUDIO_DELTA_PREFIX):
        return None
    if frame.startswith(_TYPE_FIRST):
        # With no closing quote the slice is junk, but such a frame is not JSON either: None is right.
        kind = frame[_TYPE_AT : frame.find('"', _TYPE_AT)]
        # An escape (`\u002e`) hides the real name from this raw read; let json.loads decide then.
        if kind not in ACTIONABLE and "\\" not in kind:
            return None
    try:
        event = fastjson.loads(frame)
    except (ValueError, RecursionError):  # invalid JSON, absurd nesting
        return None
    if type(event) is not dict:
        return None
    parsed = event.get("type")
    # The parsed type is what counts (it also settles a duplicate "type" key the peek saw first).
    return event if type(parsed) is str and parsed in ACTIONABLE else None


def meter(event: Mapping, totals: UsageTotals) -> int:
    """Add the event's usage to totals; return the tokens to deduct (0 when none/absent/null/malformed). Never raises.

    response.done → event["response"]["usage"] via add_response; transcription .completed →
    event["usage"] via add_transcription.
    """
    if not isinstance(event, Mapping):
        return 0
    kind = event.get("type")
    if kind == RESPONSE_DONE:
        response = event.get("response")
        usage = response.get("usage") if isinstance(response, Mapping) else None
        if isinstance(usage, Mapping):
            return totals.add_response(usage)
    elif kind == USER_COMPLETED:
        usage = event.get("usage")
        if isinstance(usage, Mapping):
            return totals.add_transcription(usage)
    return 0
