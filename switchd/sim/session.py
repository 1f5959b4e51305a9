"""One simulated connection's state: session config, conversation, input audio buffer with
server VAD, and the active response.

Synchronous and I/O-free: each client frame becomes a `Reaction` (events to send now, maybe a
response to stream); server.py owns the socket and the pacing. Both of its tasks touch a
Session only between awaits, so no locking is needed.
"""
from __future__ import annotations

import base64
import copy
import json
import zlib
from collections.abc import Mapping
from typing import Any

import attrs
import trio

from switchd.sim import events as ev
from switchd.sim.events import BYTES_PER_MS, ClientError, Event, ResponseRef, Tokens

VAD_FRAME_BYTES = 20 * BYTES_PER_MS  # VAD decides per 20 ms, so one big append can hold a whole turn
MIN_COMMIT_BYTES = 100 * BYTES_PER_MS  # the provider refuses to commit less than 100 ms


@attrs.frozen
class Step:
    """One delta of a response: `at` seconds of playback after its start; text, or an audio chunk."""
    at: float
    text: str | None


def plan_steps(text: str, audio: bool) -> list[Step]:
    """Audio: one 100 ms chunk per step, each transcript word sent just before the chunk it is spoken in.
    Text: word deltas at generation speed."""
    words = ev.split_deltas(text)
    if not audio:
        return [Step(i * ev.TEXT_DELTA_SECONDS, word) for i, word in enumerate(words)]
    chunks = ev.agent_audio_ms(text) // ev.OUTPUT_CHUNK_MS
    steps: list[Step] = []
    next_word = 0
    for chunk in range(chunks):
        at = chunk * ev.OUTPUT_CHUNK_MS / 1000
        while next_word < len(words) and next_word * chunks // len(words) <= chunk:
            steps.append(Step(at, words[next_word]))
            next_word += 1
        steps.append(Step(at, None))
    return steps


@attrs.define(eq=False)
class ResponseJob:
    """A response handed to the responder task; `cancel_scope` lets the reader stop it mid-stream."""
    ref: ResponseRef
    text: str
    steps: list[Step]
    prompt: Tokens
    cached: Tokens
    in_conversation: bool
    cancel_scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    cancel_reason: str | None = None
    sent_text: str = ""
    sent_audio_ms: int = 0

    def cancel(self, reason: str) -> None:
        if self.cancel_reason is None:
            self.cancel_reason = reason
            self.cancel_scope.cancel()

    def step_event(self, step: Step) -> Event:
        """The event for `step`, counted as sent (cancelled responses bill what was sent)."""
        if step.text is None:
            self.sent_audio_ms += ev.OUTPUT_CHUNK_MS
            return ev.audio_delta(self.ref, ev.tone_chunk_b64())
        self.sent_text += step.text
        return ev.transcript_delta(self.ref, step.text) if self.ref.audio else ev.text_delta(self.ref, step.text)


@attrs.define
class Reaction:
    events: list[Event] = attrs.Factory(list)
    response: ResponseJob | None = None
    close: tuple[int, str] | None = None


@attrs.define
class _Speech:
    item_id: str
    start: int  # buffer position (bytes) where the turn's audio starts, prefix padding included
    silence: int = 0  # bytes of silence since the last speech frame


def _number(config: Mapping[str, Any], key: str, default: float) -> float:
    value = config.get(key)
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else default


_ITEM_STRINGS = {"message": ("role",), "function_call": ("name", "arguments"),
                 "function_call_output": ("call_id", "output")}
_CONTENT_TYPES = {"user": ("input_text", "input_audio", "input_image"), "system": ("input_text",),
                  "assistant": ("output_text", "output_audio")}


def _choice(value: object, allowed: tuple[str, ...], param: str) -> str:
    """`value`, when it is one of `allowed`; else the provider's invalid_value error."""
    if not isinstance(value, str) or value not in allowed:
        supported = ", ".join(f"'{a}'" for a in allowed)
        raise ClientError("invalid_value", f"Invalid value: '{value}'. Supported values are: {supported}.", param)
    return value


def _validate_item(item: Mapping[str, Any]) -> None:
    kind = _choice(item.get("type"), tuple(_ITEM_STRINGS), "item.type")
    for key in ("id", "call_id", *_ITEM_STRINGS[kind]):
        if key not in item:
            if key in _ITEM_STRINGS[kind]:
                raise ClientError("missing_required_parameter", f"Missing required parameter: 'item.{key}'.",
                                  f"item.{key}")
        elif not isinstance(item[key], str):
            raise ClientError("invalid_type", f"Invalid type for 'item.{key}': expected a string.", f"item.{key}")
    if kind != "message":
        return
    _choice(item["role"], tuple(_CONTENT_TYPES), "item.role")
    content = item.get("content")
    if not isinstance(content, list):
        raise ClientError("missing_required_parameter", "Missing required parameter: 'item.content'.", "item.content")
    for i, part in enumerate(content):
        if not isinstance(part, dict):
            raise ClientError("invalid_type", f"Invalid type for 'item.content[{i}]': expected an object.",
                              f"item.content[{i}]")
        _choice(part.get("type"), _CONTENT_TYPES[item["role"]], f"item.content[{i}].type")
        for key in ("text", "transcript", "audio"):
            if part.get(key) is not None and not isinstance(part[key], str):
                raise ClientError("invalid_type", f"Invalid type for 'item.content[{i}].{key}': expected a string.",
                                  f"item.content[{i}].{key}")


def normalise_item(item: Mapping[str, Any]) -> tuple[Event, Tokens]:
    """A client item as the server stores and echoes it (audio bytes dropped), and its prompt tokens."""
    _validate_item(item)
    kind = item["type"]
    stored: Event = {"id": item.get("id") or ev.new_id("item_"), "type": kind, "status": "completed"}
    stored.update({k: copy.deepcopy(v) for k, v in item.items() if k not in ("id", "type", "status", "object")})
    tokens = Tokens()
    if kind == "function_call_output":
        tokens += Tokens(text=ev.text_tokens(str(item.get("output", ""))))
    elif kind == "function_call":
        tokens += Tokens(text=ev.text_tokens(str(item.get("arguments", ""))))
    content = stored.get("content")
    for part in content if isinstance(content, list) else ():
        if part["type"] == "input_audio":
            audio = part.pop("audio", None)
            try:
                raw = len(base64.b64decode(audio, validate=True)) if audio else 0
            except ValueError:  # binascii.Error, or non-ASCII text
                raise ClientError("invalid_value", "Invalid 'audio'. Expected base64-encoded audio.",
                                  "item.content.audio") from None
            part.setdefault("transcript", None)
            tokens += Tokens(audio=ev.input_audio_tokens(raw // BYTES_PER_MS))
        else:
            text = part.get("text") or part.get("transcript") or ""
            tokens += Tokens(text=ev.text_tokens(str(text)))
    return stored, tokens


class Session:
    def __init__(self, model: str, *, now: float, max_session_seconds: float) -> None:
        self.config = ev.default_session(model, int(now + max_session_seconds))
        self.conversation_id = ev.new_id("conv_")
        self.items: dict[str, Event] = {}  # the conversation, in order
        self.item_tokens: dict[str, Tokens] = {}  # what each item adds to every later prompt
        self.active: ResponseJob | None = None
        self.audio_emitted = False  # the voice is locked once the assistant has spoken
        self._last_prompt: tuple[str, Tokens] | None = None  # for prompt-cache hits
        self._responses = 0
        # The input audio buffer, as byte offsets into all audio appended this session.
        self._pos = 0
        self._buffer_start = 0
        self._speech: _Speech | None = None

    def created_event(self) -> Event:
        return ev.event("session.created", session=self.config)

    def handle(self, frame: str | bytes) -> Reaction:
        reaction = Reaction()
        client_event_id: str | None = None
        try:
            if isinstance(frame, bytes):
                raise ClientError(
                    "invalid_event", "Expected a text WebSocket message; binary frames are not supported."
                )
            try:
                msg = json.loads(frame)
            except (ValueError, RecursionError):
                raise ClientError("invalid_json", "We could not parse the JSON body of your request. Expected a "
                                  "JSON object with a 'type' field.") from None
            if not isinstance(msg, dict):
                raise ClientError("invalid_event", "The event must be a JSON object.")
            if isinstance(msg.get("event_id"), str):
                client_event_id = msg["event_id"]
            self._dispatch(msg, reaction)
        except ClientError as exc:
            reaction.events.append(ev.error_event(exc.code, exc.message, param=exc.param,
                                                  client_event_id=client_event_id))
        return reaction

    def _dispatch(self, msg: dict[str, Any], r: Reaction) -> None:
        match msg.get("type"):
            case None:
                raise ClientError("invalid_event", "The 'type' field is missing.")
            case "session.update":
                if "session" not in msg:
                    raise ClientError("missing_required_parameter", "Missing required parameter: 'session'.", "session")
                update = ev.validate_session_update(msg["session"], self.config, self.audio_emitted)
                self.config = ev.merge_session(self.config, update)
                r.events.append(ev.event("session.updated", session=self.config))
            case "input_audio_buffer.append" | "session.input_audio_buffer.append":
                self._append(self._decode_audio(msg), r)
            case "input_audio_buffer.commit":
                self._manual_commit(r)
            case "input_audio_buffer.clear":
                self._buffer_start, self._speech = self._pos, None
                r.events.append(ev.event("input_audio_buffer.cleared"))
            case "conversation.item.create":
                item = msg.get("item")
                if not isinstance(item, dict):
                    raise ClientError("missing_required_parameter", "Missing required parameter: 'item'.", "item")
                stored, tokens = normalise_item(item)
                if stored["id"] in self.items:
                    raise ClientError("invalid_value", f"Item with id '{stored['id']}' already exists.", "item.id")
                self._add_item(stored, tokens, r)
            case "conversation.item.retrieve":
                r.events.append(ev.event("conversation.item.retrieved", item=copy.deepcopy(self._item(msg))))
            case "conversation.item.delete":
                item_id = self._item(msg)["id"]
                del self.items[item_id], self.item_tokens[item_id]
                r.events.append(ev.event("conversation.item.deleted", item_id=item_id))
            case "conversation.item.truncate":
                self._truncate(msg, r)
            case "response.create":
                params = ev.validate_response_params(msg.get("response") or {})
                if self.active is not None:
                    raise ClientError(
                        "conversation_already_has_active_response",
                        f"Conversation already has an active response in progress: {self.active.ref.response_id}. "
                        "Wait until the response is finished before creating a new one.")
                r.response = self._new_response(params)
            case "response.cancel":
                wanted = msg.get("response_id")
                if self.active is None or (wanted and wanted != self.active.ref.response_id):
                    raise ClientError("response_cancel_not_active", "Cancellation failed: no active response found.")
                self.active.cancel("client_cancelled")
            case "session.close":
                r.close = (1000, "")
            case other:
                supported = ", ".join(f"'{t}'" for t in ev.CLIENT_EVENT_TYPES)
                raise ClientError(
                    "invalid_value", f"Invalid value: '{other}'. Supported values are: {supported}.", "type"
                )

    # --- input audio ---------------------------------------------------------------------

    @staticmethod
    def _decode_audio(msg: Mapping[str, Any]) -> bytes:
        audio = msg.get("audio")
        if not isinstance(audio, str):
            raise ClientError("missing_required_parameter", "Missing required parameter: 'audio'.", "audio")
        try:
            return base64.b64decode(audio, validate=True)
        except ValueError:  # binascii.Error, or non-ASCII text
            raise ClientError("invalid_value", "Invalid 'audio'. Expected base64-encoded audio.", "audio") from None

    def _append(self, pcm: bytes, r: Reaction) -> None:
        vad = self.config["audio"]["input"].get("turn_detection")
        if not isinstance(vad, dict):  # turn detection off: the client commits by hand
            self._pos += len(pcm)
            return
        threshold = ev.speech_threshold(_number(vad, "threshold", 0.5))
        prefix = int(_number(vad, "prefix_padding_ms", 300)) * BYTES_PER_MS
        silence_needed = int(_number(vad, "silence_duration_ms", 500)) * BYTES_PER_MS
        for offset in range(0, len(pcm), VAD_FRAME_BYTES):
            frame = pcm[offset:offset + VAD_FRAME_BYTES]
            start = self._pos
            self._pos += len(frame)
            loud = ev.pcm16_rms(frame) > threshold
            if self._speech is None:
                if loud:
                    self._speech = _Speech(ev.new_id("item_"), max(self._buffer_start, start - prefix))
                    r.events.append(ev.event("input_audio_buffer.speech_started",
                                             audio_start_ms=self._speech.start // BYTES_PER_MS,
                                             item_id=self._speech.item_id))
                    if self.active is not None and vad.get("interrupt_response", True):
                        self.active.cancel("turn_detected")  # barge-in
                continue
            self._speech.silence = 0 if loud else self._speech.silence + len(frame)
            if self._speech.silence >= silence_needed:
                speech, self._speech = self._speech, None
                r.events.append(ev.event("input_audio_buffer.speech_stopped",
                                         audio_end_ms=self._pos // BYTES_PER_MS, item_id=speech.item_id))
                self._commit(speech.start, self._pos, speech.item_id, r)
                if vad.get("create_response", True) and self.active is None:
                    r.response = self._new_response({})

    def _manual_commit(self, r: Reaction) -> None:
        size = self._pos - self._buffer_start
        if size < MIN_COMMIT_BYTES:
            raise ClientError("input_audio_buffer_commit_empty",
                              "Error committing input audio buffer: buffer too small. Expected at least 100ms of "
                              f"audio, but buffer only has {size / BYTES_PER_MS:.2f}ms of audio.")
        item_id = self._speech.item_id if self._speech else ev.new_id("item_")
        self._speech = None
        self._commit(self._buffer_start, self._pos, item_id, r)

    def _commit(self, start: int, end: int, item_id: str, r: Reaction) -> None:
        audio_ms = (end - start) // BYTES_PER_MS
        self._buffer_start = end
        r.events.append(ev.event("input_audio_buffer.committed", previous_item_id=self._last_item_id(),
                                 item_id=item_id))
        item: Event = {"id": item_id, "type": "message", "status": "completed", "role": "user",
                       "content": [{"type": "input_audio", "transcript": None}]}
        self._add_item(item, Tokens(audio=ev.input_audio_tokens(audio_ms)), r)
        if not self.config["audio"]["input"].get("transcription"):
            return
        transcript = ev.user_transcript(audio_ms)
        for delta in ev.split_deltas(transcript, 3):
            r.events.append(ev.event("conversation.item.input_audio_transcription.delta", item_id=item_id,
                                     content_index=0, delta=delta, obfuscation=ev.obfuscation()))
        r.events.append(ev.event("conversation.item.input_audio_transcription.completed", item_id=item_id,
                                 content_index=0, transcript=transcript,
                                 usage=ev.transcription_usage(audio_ms, transcript)))
        self.items[item_id] = {**item, "content": [{"type": "input_audio", "transcript": transcript}]}

    # --- conversation --------------------------------------------------------------------

    def _last_item_id(self) -> str | None:
        return next(reversed(self.items), None)

    def _add_item(self, item: Event, tokens: Tokens, r: Reaction) -> None:
        previous = self._last_item_id()
        self.items[item["id"]] = item
        self.item_tokens[item["id"]] = tokens
        for type_ in ("conversation.item.added", "conversation.item.done"):
            r.events.append(ev.event(type_, previous_item_id=previous, item=copy.deepcopy(item)))

    def _item(self, msg: Mapping[str, Any]) -> Event:
        item_id = msg.get("item_id")
        if not isinstance(item_id, str) or item_id not in self.items:
            raise ClientError("invalid_value", f"Conversation item not found: '{item_id}'.", "item_id")
        return self.items[item_id]

    def _truncate(self, msg: Mapping[str, Any], r: Reaction) -> None:
        item = self._item(msg)
        end_ms = msg.get("audio_end_ms")
        if not isinstance(end_ms, int) or isinstance(end_ms, bool) or end_ms < 0:
            raise ClientError(
                "invalid_value", "Invalid 'audio_end_ms': expected a non-negative integer.", "audio_end_ms"
            )
        # The model forgets the audio the user never heard.
        tokens = self.item_tokens[item["id"]]
        self.item_tokens[item["id"]] = Tokens(tokens.text, min(tokens.audio, ev.output_audio_tokens(end_ms)))
        r.events.append(ev.event("conversation.item.truncated", item_id=item["id"],
                                 content_index=msg.get("content_index", 0), audio_end_ms=end_ms))

    def _last_user_text(self) -> str:
        for item in reversed(self.items.values()):
            if item.get("role") == "user":
                for part in item.get("content") or ():
                    if isinstance(part, dict):
                        return str(part.get("text") or part.get("transcript") or "")
        return ""

    # --- responses ---------------------------------------------------------------------

    def _new_response(self, params: Mapping[str, Any]) -> ResponseJob:
        cfg = self.config
        modalities = tuple(params.get("output_modalities") or cfg["output_modalities"])
        instructions = str(params.get("instructions", cfg["instructions"]) or "")
        audio = params.get("audio")
        audio_out = audio.get("output") if isinstance(audio, dict) else None
        audio_out = audio_out if isinstance(audio_out, dict) else {}
        in_conversation = params.get("conversation", "auto") == "auto"
        prompt = Tokens(text=ev.text_tokens(instructions))
        cached = Tokens()
        if in_conversation:
            prompt = sum(self.item_tokens.values(), prompt)
            if self._last_prompt and self._last_prompt[0] == instructions:
                cached = ev.cached_prefix(self._last_prompt[1], prompt)
            self._last_prompt = (instructions, prompt)
        self._responses += 1
        text = ev.agent_reply(zlib.crc32(f"{self._responses}:{self._last_user_text()}".encode()))
        ref = ResponseRef(
            response_id=ev.new_id("resp_"),
            item_id=ev.new_id("item_"),
            conversation_id=self.conversation_id if in_conversation else None,
            output_modalities=modalities,
            voice=audio_out.get("voice") or cfg["audio"]["output"]["voice"],
            audio_format=audio_out.get("format") or cfg["audio"]["output"]["format"],
            max_output_tokens=params.get("max_output_tokens", cfg["max_output_tokens"]),
            metadata=copy.deepcopy(params.get("metadata")),
        )
        self.audio_emitted = self.audio_emitted or ref.audio
        self.active = ResponseJob(ref, text, plan_steps(text, ref.audio), prompt, cached, in_conversation)
        return self.active

    def finish_response(self, job: ResponseJob) -> list[Event]:
        """The closing events of `job` (completed, or cancelled with what was sent so far)."""
        output = Tokens(ev.text_tokens(job.sent_text), ev.output_audio_tokens(job.sent_audio_ms))
        usage = ev.response_usage(job.prompt, job.cached, output)
        status = "cancelled" if job.cancel_reason else "completed"
        details = {"type": "cancelled", "reason": job.cancel_reason} if job.cancel_reason else None
        if job.in_conversation:
            self.items[job.ref.item_id] = ev.assistant_item(
                job.ref, "completed" if status == "completed" else "incomplete", job.sent_text)
            self.item_tokens[job.ref.item_id] = output
        if self.active is job:
            self.active = None
        return [*ev.response_end_events(job.ref, job.sent_text, status=status, status_details=details, usage=usage),
                ev.rate_limits_updated(usage["total_tokens"])]
