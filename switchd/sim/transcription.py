"""A simulated transcription-only session (`?intent=transcription`, or a call whose config is one).

The same input audio buffer and server VAD as a realtime session, but no responses: each
committed turn is transcribed, and its `…transcription.completed` carries the usage variant
the model is billed by: `tokens` (gpt-4o(-mini)-transcribe) or `duration` (seconds of audio).
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs, urlsplit

from switchd.sim import events as ev
from switchd.sim.events import BYTES_PER_MS, ClientError
from switchd.sim.session import Reaction, ResponseJob, Session

# Billed per minute of audio, so their usage is a duration.
DURATION_MODELS = frozenset({"whisper-1", "gpt-realtime-whisper", "gpt-live-transcribe", "gpt-transcribe"})
_INPUT_KEYS = frozenset({"format", "transcription", "noise_reduction", "turn_detection"})
COMPLETED = "conversation.item.input_audio_transcription.completed"


def is_transcription(target: str) -> bool:
    return parse_qs(urlsplit(target).query).get("intent") == ["transcription"]


def new_session(target: str, *, now: float, max_session_seconds: float) -> Session:
    """The session a WebSocket connection to `target` opens: transcription-only with that intent."""
    if is_transcription(target):
        return TranscriptionSession(now=now, max_session_seconds=max_session_seconds)
    return Session(ev.query_model(target), now=now, max_session_seconds=max_session_seconds)


def default_config(expires_at: int) -> dict[str, Any]:
    return {
        "type": "transcription",
        "object": "realtime.transcription_session",
        "id": ev.new_id("sess_"),
        "audio": {"input": {
            "format": {"type": "audio/pcm", "rate": ev.SAMPLE_RATE},
            "transcription": {"model": ev.DEFAULT_TRANSCRIPTION_MODEL, "language": None, "prompt": ""},
            "noise_reduction": None,
            "turn_detection": {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                               "silence_duration_ms": 500, "create_response": False, "interrupt_response": False},
        }},
        "include": None,
        "expires_at": expires_at,
    }


def check_update(update: object) -> Mapping[str, Any]:
    if not isinstance(update, Mapping):
        raise ClientError("invalid_type", "Invalid type for 'session': expected an object.", "session")
    if update.get("type") != "transcription":
        raise ClientError("invalid_value", "Invalid value: session.type. This session only accepts "
                          "'transcription'.", "session.type")
    for key in update:
        if key not in ("type", "audio", "include"):
            raise ClientError("unknown_parameter", f"Unknown parameter: 'session.{key}'.", f"session.{key}")
    audio = update.get("audio", {})
    inp = audio.get("input", {}) if isinstance(audio, Mapping) else None
    if not isinstance(inp, Mapping) or set(audio) - {"input"}:
        raise ClientError("invalid_value", "'session.audio' takes only 'input'.", "session.audio")
    for key in inp:
        if key not in _INPUT_KEYS:
            raise ClientError("unknown_parameter", f"Unknown parameter: 'session.audio.input.{key}'.",
                              f"session.audio.input.{key}")
    transcription = inp.get("transcription")
    if transcription is not None and not (isinstance(transcription, Mapping)
                                          and isinstance(transcription.get("model", ""), str)):
        raise ClientError("invalid_type", "Invalid 'session.audio.input.transcription'.",
                          "session.audio.input.transcription")
    return update


class TranscriptionSession(Session):
    def __init__(self, *, now: float, max_session_seconds: float) -> None:
        super().__init__(ev.DEFAULT_MODEL, now=now, max_session_seconds=max_session_seconds)
        self.config = default_config(int(now + max_session_seconds))

    def configure(self, update: Mapping[str, Any]) -> None:
        """Apply a config given at creation (a call's session), as the first session.update would."""
        check_update(update)
        self.config = _merge(self.config, update)
        vad = self.config["audio"]["input"].get("turn_detection")
        if isinstance(vad, dict):
            vad["create_response"] = False  # nothing to respond with: turns are only transcribed

    def _dispatch(self, msg: dict[str, Any], r: Reaction) -> None:
        kind = msg.get("type")
        if kind == "session.update":
            if "session" not in msg:
                raise ClientError("missing_required_parameter", "Missing required parameter: 'session'.", "session")
            self.configure(check_update(msg["session"]))
            r.events.append(ev.event("session.updated", session=copy.deepcopy(self.config)))
        elif kind in ("response.create", "response.cancel", "conversation.item.create"):
            raise ClientError("invalid_value", f"'{kind}' is not supported in a transcription session.", "type")
        else:
            super()._dispatch(msg, r)

    def _new_response(self, params: Mapping[str, Any]) -> ResponseJob:
        raise AssertionError("a transcription session never creates a response")

    def _commit(self, start: int, end: int, item_id: str, r: Reaction) -> None:
        before = len(r.events)
        super()._commit(start, end, item_id, r)
        model = self.config["audio"]["input"].get("transcription", {}).get("model")
        if model not in DURATION_MODELS:
            return
        for event in r.events[before:]:
            if event["type"] == COMPLETED:
                event["usage"] = {"type": "duration", "seconds": round((end - start) / BYTES_PER_MS / 1000, 3)}


def _merge(current: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    fixed = {key: current[key] for key in ("type", "object", "id", "expires_at")}
    merged = ev.deep_merge(current, update)
    merged.update(fixed)
    return merged
