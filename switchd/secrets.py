"""Client secrets on switchd's side: what a secret's session config locks, and its answer. Pure.

A secret (`ek_…`, minted and stored hashed by switchdb) fixes a session config chosen by the
app's server. A browser holding it may still send `session.update`, but never past what the
secret fixed:

- always locked: `type` (realtime or transcription), `model`, and the transcription model
  (`audio.input.transcription.model`) when the secret names one: these pick the price;
- locked when the secret sets them: `instructions`, `prompt`, `tools`, `tool_choice` (the app's
  own prompt and tools, which the page's user must not rewrite);
- a ceiling: `max_output_tokens`; a client may lower it, never raise it.

A locked field the client changes is removed from its update (a partial update without it
keeps the current value) or, for `type`, the ceiling and the transcription model, set back to the
secret's value; everything else passes untouched.
"""
from __future__ import annotations

import json
import secrets as _random
import time
from collections.abc import Mapping
from typing import Any

import attrs

from switchd.handshake import ClientParams
from switchd.metering import CLIENT_AUDIO_PREFIX
from switchd.websocket import Message
from switchd.ws_codec import OP_TEXT, encode_frame

SECRET_PREFIX = "ek_"
# Fields kept as the secret set them, when it set them.
FIXED_WHEN_SET = ("instructions", "prompt", "tools", "tool_choice")
_UPDATE = '"session.update"'
_AUDIO = CLIENT_AUDIO_PREFIX.encode()


def is_secret(key: str) -> bool:
    return key.startswith(SECRET_PREFIX)


def _transcription_model(config: Mapping[str, Any]) -> str | None:
    audio = config.get("audio")
    inp = audio.get("input") if isinstance(audio, Mapping) else None
    transcription = inp.get("transcription") if isinstance(inp, Mapping) else None
    model = transcription.get("model") if isinstance(transcription, Mapping) else None
    return model if isinstance(model, str) else None


@attrs.frozen
class Locks:
    type: str = "realtime"
    model: str | None = None
    transcription_model: str | None = None
    max_output_tokens: int | None = None  # None: no ceiling ("inf")
    fixed: Mapping[str, Any] = attrs.field(factory=dict)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Locks:
        ceiling = config.get("max_output_tokens")
        return cls(
            type=str(config.get("type", "realtime")),
            model=config["model"] if isinstance(config.get("model"), str) else None,
            transcription_model=_transcription_model(config),
            max_output_tokens=ceiling if type(ceiling) is int else None,
            fixed={k: config[k] for k in FIXED_WHEN_SET if k in config},
        )

    @classmethod
    def from_json(cls, text: str) -> Locks:
        """The locks of a stored config (switchdb validated it at minting); none for ""."""
        config = json.loads(text) if text else {}
        return cls.from_config(config if isinstance(config, dict) else {})


def enforce(update: Mapping[str, Any], locks: Locks) -> tuple[dict[str, Any], tuple[str, ...]]:
    """A client's session.update event made to respect `locks`: (event to forward, paths overridden)."""
    event = dict(update)
    session = event.get("session")
    if not isinstance(session, Mapping):
        return event, ()  # the provider answers a malformed update with its own error
    session = dict(session)
    changed: list[str] = []
    if "type" in session and session["type"] != locks.type:
        session["type"] = locks.type
        changed.append("session.type")
    if "model" in session and session["model"] != locks.model:
        del session["model"]  # the model is the one the session was opened with
        changed.append("session.model")
    for key, value in locks.fixed.items():
        if key in session and session[key] != value:
            del session[key]
            changed.append(f"session.{key}")
    if locks.max_output_tokens is not None and "max_output_tokens" in session:
        wanted = session["max_output_tokens"]
        if not (type(wanted) is int and 1 <= wanted <= locks.max_output_tokens):
            session["max_output_tokens"] = locks.max_output_tokens
            changed.append("session.max_output_tokens")
    if locks.transcription_model is not None:
        audio = session.get("audio")
        inp = audio.get("input") if isinstance(audio, Mapping) else None
        transcription = inp.get("transcription") if isinstance(inp, Mapping) else None
        if isinstance(transcription, Mapping) and transcription.get("model") != locks.transcription_model:
            assert isinstance(audio, Mapping) and isinstance(inp, Mapping)
            transcription = {**transcription, "model": locks.transcription_model}
            session["audio"] = {**audio, "input": {**inp, "transcription": transcription}}
            changed.append("session.audio.input.transcription.model")
    if not changed:
        return dict(update), ()
    event["session"] = session
    return event, tuple(changed)


def enforce_frame(text: str, locks: Locks) -> tuple[str, tuple[str, ...]] | None:
    """For a client text frame: None when it passes as it is, else (frame to forward, paths overridden).

    Never raises: a frame that is not a JSON session.update is the provider's to judge.
    """
    if _UPDATE not in text:
        return None
    try:
        event = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(event, dict) or event.get("type") != "session.update":
        return None
    forwarded, changed = enforce(event, locks)
    if not changed:
        return None
    return json.dumps(forwarded, separators=(",", ":")), changed


def locked_frame(message: Message, locks: Locks) -> tuple[bytes, tuple[str, ...]] | None:
    """For a client's relayed message: None to relay it as it came, else (the masked frame to
    relay instead, the paths overridden). Audio and other events are not parsed."""
    if not message.text or message.startswith(_AUDIO) or _UPDATE.encode() not in message.payload:
        return None
    try:
        text = message.payload.decode()
    except UnicodeDecodeError:
        return None
    enforced = enforce_frame(text, locks)
    if enforced is None:
        return None
    return encode_frame(OP_TEXT, enforced[0].encode(), mask=True), enforced[1]


def upstream_model(config: Mapping[str, Any]) -> str | None:
    """The `model` for the provider's URL: the secret's, for a realtime session; None for transcription."""
    model = config.get("model")
    return model if config.get("type", "realtime") == "realtime" and isinstance(model, str) else None


def secret_params(params: ClientParams, config_json: str, default_model: str) -> tuple[ClientParams, Locks]:
    """A secret's WebSocket session: the model in the provider's URL is the one the secret fixed
    (the switch's default when it fixed none, as its mint answer said), whatever `?model=` asks;
    and the locks for the client's session.update frames."""
    config = json.loads(config_json) if config_json else {}
    config = config if isinstance(config, dict) else {}
    if config.get("type") == "transcription":
        return attrs.evolve(params, model=None, intent="transcription"), Locks.from_config(config)
    model = upstream_model(config) or default_model
    return attrs.evolve(params, model=model, intent=None), Locks.from_config({"model": model, **config})


def session_object(config: Mapping[str, Any] | None, default_model: str) -> dict[str, Any]:
    """The `session` of a client_secrets answer: the effective config as OpenAI's object shapes it."""
    config = dict(config or {"type": "realtime"})
    kind = config.pop("type", "realtime")
    head: dict[str, Any] = {"type": kind, "object": "realtime.session", "id": "sess_" + _random.token_hex(12)}
    if kind == "realtime":
        head["model"] = config.pop("model", default_model)
    return {**head, **config, "expires_at": 0}


def expires_at(seconds: int, now: float | None = None) -> int:
    return int(now if now is not None else time.time()) + seconds
