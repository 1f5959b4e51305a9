"""What the provider will bill that has not been reported yet: responses and transcriptions in flight.

The provider bills a response once it is created and a transcription once audio is committed,
whoever is still listening. A session whose client leaves while either is under way must keep
reading the provider until their usage arrives, or the operator pays for what the account
never does. This object only watches events; the session decides what to wait for. Pure.
"""
from __future__ import annotations

from collections.abc import Mapping

import attrs

from switchd.transcript import USER_COMPLETED

RESPONSE_CREATED = "response.created"
RESPONSE_DONE = "response.done"
COMMITTED = "input_audio_buffer.committed"
TRANSCRIPTION_FAILED = "conversation.item.input_audio_transcription.failed"
SESSION_EVENTS = frozenset({"session.created", "session.updated"})
# The upstream events that change what is in flight (the session parses them for this).
WATCHED: frozenset[str] = frozenset({RESPONSE_CREATED, RESPONSE_DONE, COMMITTED, USER_COMPLETED, TRANSCRIPTION_FAILED})
# Bounds memory against a provider that never closes what it opens; past it, the oldest is forgotten.
MAX_TRACKED = 64


@attrs.define
class InFlight:
    responses: dict[str, None] = attrs.Factory(dict)  # created, not done (insertion-ordered)
    transcriptions: dict[str, None] = attrs.Factory(dict)  # committed audio whose transcript is due
    # Responses asked for (a client's response.create, a commit under server turn detection)
    # whose response.created has not arrived yet.
    expected: int = 0
    transcribe: bool = False  # the session transcribes its input
    vad_responds: bool = False  # server turn detection creates a response at each commit

    @property
    def settled(self) -> bool:
        return not (self.responses or self.transcriptions or self.expected)

    def requested(self, count: int = 1) -> None:
        """The provider has `count` more response.create from the client."""
        self.expected = min(self.expected + count, MAX_TRACKED)

    def observe(self, event: Mapping[str, object]) -> None:
        """Feed a parsed upstream event. Never raises."""
        kind = event.get("type")
        if kind == RESPONSE_CREATED:
            self.expected = max(0, self.expected - 1)
            _add(self.responses, _id(event.get("response")))
        elif kind == RESPONSE_DONE:
            response = event.get("response")
            self.responses.pop(_id(response), None)
        elif kind == COMMITTED:
            if self.transcribe:
                _add(self.transcriptions, _str(event.get("item_id")))
            if self.vad_responds:
                self.expected = min(self.expected + 1, MAX_TRACKED)
        elif kind in (USER_COMPLETED, TRANSCRIPTION_FAILED):
            self.transcriptions.pop(_str(event.get("item_id")), None)
        elif kind in SESSION_EVENTS:
            self._configure(event.get("session"))

    def _configure(self, session: object) -> None:
        if not isinstance(session, Mapping):
            return
        audio = session.get("audio")
        audio_in = audio.get("input") if isinstance(audio, Mapping) else None
        if isinstance(audio_in, Mapping):  # GA shape
            transcription, turns = audio_in.get("transcription"), audio_in.get("turn_detection")
        else:  # beta shape
            transcription, turns = session.get("input_audio_transcription"), session.get("turn_detection")
        self.transcribe = isinstance(transcription, Mapping)
        self.vad_responds = isinstance(turns, Mapping) and turns.get("create_response") is not False


def _id(response: object) -> str:
    return _str(response.get("id")) if isinstance(response, Mapping) else ""


def _str(value: object) -> str:
    return value if isinstance(value, str) else ""


def _add(tracked: dict[str, None], key: str) -> None:
    tracked[key] = None
    if len(tracked) > MAX_TRACKED:
        del tracked[next(iter(tracked))]
