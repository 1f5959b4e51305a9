"""switchd-sim: the OpenAI Realtime (GA) look-alike, over real WebSockets and as pure functions.

Every event a test receives is also checked against the official SDK's GA server-event types
(`openai.types.realtime`), and for the wire conventions the switch relies on (compact JSON,
`{"type":"...","event_id":"event_...` first).
"""
from __future__ import annotations

import base64
import json
import math
import re
import time
from array import array
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, get_args

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from openai.types.realtime.realtime_server_event import RealtimeServerEvent
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from switchd.sim import SimOptions, serve
from switchd.sim import events as ev
from switchd.sim.session import Session, plan_steps
from tests.daemons import base_env, daemon

ID = r"[A-Za-z0-9]{21}"
PATH = "/v1/realtime?model=gpt-realtime"
SDK_EVENTS = {get_args(cls.model_fields["type"].annotation)[0]: cls
              for cls in get_args(get_args(RealtimeServerEvent)[0])}
INSTRUCTION_TOKENS = math.ceil(len(ev.DEFAULT_INSTRUCTIONS) / 4)


# --- helpers ----------------------------------------------------------------------------------

@asynccontextmanager
async def sim(**options: Any) -> AsyncIterator[str]:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(partial(serve, "127.0.0.1", 0, options=SimOptions(**options)))
        yield f"ws://127.0.0.1:{port}"
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def connect(url: str, path: str = PATH, **kwargs: Any) -> AsyncIterator[WebSocketConnection]:
    async with open_websocket_url(url + path, **kwargs) as ws:
        yield ws


def check_frame(frame: str | bytes) -> dict[str, Any]:
    assert isinstance(frame, str), "every server frame is text"
    event = json.loads(frame)
    assert re.match(r'\{"type":"[a-z_.]+","event_id":"event_' + ID + '"', frame), frame[:80]
    assert frame == json.dumps(event, separators=(",", ":"), ensure_ascii=False)  # compact, raw UTF-8
    SDK_EVENTS[event["type"]].model_validate(event)
    return event


async def recv(ws: WebSocketConnection) -> dict[str, Any]:
    return check_frame(await ws.get_message())


async def recv_until(ws: WebSocketConnection, type_: str) -> list[dict[str, Any]]:
    events = [await recv(ws)]
    while events[-1]["type"] != type_:
        events.append(await recv(ws))
    return events


async def send(ws: WebSocketConnection, **event: Any) -> None:
    await ws.send_message(json.dumps(event))  # default separators, like Python clients send


def pcm(ms: int, amplitude: int) -> bytes:
    samples = array("h", (round(amplitude * math.sin(2 * math.pi * 300 * i / 24000)) for i in range(24 * ms)))
    return samples.tobytes()


async def speak(ws: WebSocketConnection, *segments: tuple[int, int]) -> None:
    """(ms, amplitude) segments, as 100 ms appends."""
    for ms, amplitude in segments:
        chunk = base64.b64encode(pcm(100, amplitude)).decode()
        for _ in range(ms // 100):
            await send(ws, type="input_audio_buffer.append", audio=chunk)


def collapse(types: Sequence[str]) -> list[str]:
    """Runs of the same delta type become one entry, so sequences compare independent of length."""
    out: list[str] = []
    for t in types:
        if not (out and out[-1] == t and t.endswith(".delta")):
            out.append(t)
    return out


def tokens(text: str) -> int:
    return math.ceil(len(text) / 4)


async def user_text(ws: WebSocketConnection, text: str) -> None:
    await send(ws, type="conversation.item.create",
               item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]})
    assert [e["type"] for e in await recv_until(ws, "conversation.item.done")] == [
        "conversation.item.added", "conversation.item.done"]


async def closed(ws: WebSocketConnection) -> ConnectionClosed:
    with pytest.raises(ConnectionClosed) as info:
        await ws.get_message()
    return info.value


# --- over the wire --------------------------------------------------------------------------------

async def test_session_created_looks_like_the_provider() -> None:
    with trio.fail_after(10):
        async with sim(fast=True) as url, connect(url, "/v1/realtime?model=gpt-realtime-mini",
                                                   subprotocols=["realtime"]) as ws:
            assert ws.subprotocol == "realtime"
            frame = await ws.get_message()
            created = check_frame(frame)
            assert created["type"] == "session.created"
            assert 1000 < len(frame.encode()) < 1500  # the real one is ~1.25 KB
            session = created["session"]
            assert list(session)[:4] == ["type", "object", "id", "model"]
            assert re.fullmatch("sess_" + ID, session["id"])
            assert (session["type"], session["object"], session["model"]) == (
                "realtime", "realtime.session", "gpt-realtime-mini")
            assert abs(session["expires_at"] - (time.time() + 3600)) < 60
            assert session["output_modalities"] == ["audio"]
            assert session["max_output_tokens"] == "inf" and session["tools"] == []
            assert session["tracing"] is None and session["include"] is None
            audio = session["audio"]
            assert audio["input"]["format"] == audio["output"]["format"] == {"type": "audio/pcm", "rate": 24000}
            assert audio["input"]["transcription"]["model"] == "gpt-4o-mini-transcribe"
            assert audio["input"]["turn_detection"]["type"] == "server_vad"
            assert audio["input"]["turn_detection"]["silence_duration_ms"] == 500
            assert audio["output"]["voice"] == "marin"
        async with sim(fast=True) as url, connect(url, "/") as ws:  # any path; default model
            assert ws.subprotocol is None
            assert (await recv(ws))["session"]["model"] == "gpt-realtime"


async def test_session_update_deep_merges_and_keeps_server_fields() -> None:
    with trio.fail_after(10):
        async with sim(fast=True) as url, connect(url) as ws:
            before = (await recv(ws))["session"]
            tool = {"type": "function", "name": "get_weather", "description": "Weather",
                    "parameters": {"type": "object", "properties": {"input_tokens": {"type": "integer"}}}}
            await send(ws, type="session.update", session={
                "type": "realtime", "model": "gpt-other", "instructions": "Be brief.", "tools": [tool],
                "audio": {"input": {"turn_detection": {"silence_duration_ms": 300}}}})
            updated = await recv(ws)
            assert updated["type"] == "session.updated"
            after = updated["session"]
            for key in ("id", "object", "expires_at", "model", "type"):
                assert after[key] == before[key]
            assert after["instructions"] == "Be brief." and after["tools"] == [tool]
            vad = after["audio"]["input"]["turn_detection"]
            assert vad == {**before["audio"]["input"]["turn_detection"], "silence_duration_ms": 300}
            assert after["audio"]["output"] == before["audio"]["output"]


@pytest.mark.parametrize("session, param, code", [
    ({"turn_detection": {"type": "server_vad"}}, "session.turn_detection", "unknown_parameter"),
    ({"input_audio_transcription": {"model": "whisper-1"}}, "session.input_audio_transcription", "unknown_parameter"),
    ({"modalities": ["audio", "text"]}, "session.modalities", "unknown_parameter"),
    ({"voice": "alloy"}, "session.voice", "unknown_parameter"),
    ({"temperature": 0.8}, "session.temperature", "unknown_parameter"),
    ({"audio": {"input": {"input_audio_noise_reduction": None}}}, "session.audio.input.input_audio_noise_reduction",
     "unknown_parameter"),
    ({"instructions": "x"}, "session.type", "missing_required_parameter"),
])
async def test_beta_session_fields_are_rejected_whole_and_non_fatal(
    session: dict[str, Any], param: str, code: str
) -> None:
    with trio.fail_after(10):
        async with sim(fast=True) as url, connect(url) as ws:
            await recv(ws)
            body = session if code != "unknown_parameter" else {"type": "realtime", "instructions": "new", **session}
            await send(ws, type="session.update", event_id="evt_client_1", session=body)
            error = await recv(ws)
            assert error["type"] == "error"
            assert error["error"]["code"] == code and error["error"]["param"] == param
            assert error["error"]["event_id"] == "evt_client_1"
            await send(ws, type="session.update", session={"type": "realtime"})
            still = await recv(ws)  # the session lives on, and the rejected update was not applied
            assert still["session"]["instructions"] == ev.DEFAULT_INSTRUCTIONS


async def test_spoken_turn_emits_the_whole_sequence_with_usage() -> None:
    with trio.fail_after(15):
        async with sim(fast=True) as url, connect(url) as ws:
            await recv(ws)
            await speak(ws, (500, 0), (1000, 3000), (1000, 0))
            frames: list[str] = []
            while not frames or json.loads(frames[-1])["type"] != "rate_limits.updated":
                frames.append(await ws.get_message())
            events = [check_frame(f) for f in frames]
            types = collapse([e["type"] for e in events])
            assert types[:10] == [
                "input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                "input_audio_buffer.committed", "conversation.item.added", "conversation.item.done",
                "conversation.item.input_audio_transcription.delta",
                "conversation.item.input_audio_transcription.completed",
                "response.created", "response.output_item.added", "response.content_part.added"]
            # Transcript words interleaved with the audio chunks they are spoken in.
            assert set(types[10:-6]) == {"response.output_audio_transcript.delta", "response.output_audio.delta"}
            assert types[10] == "response.output_audio_transcript.delta"
            assert types[-6:] == [
                "response.output_audio.done", "response.output_audio_transcript.done",
                "response.content_part.done", "response.output_item.done", "response.done", "rate_limits.updated"]
            by_type: dict[str, list[dict[str, Any]]] = {}
            for e in events:
                by_type.setdefault(e["type"], []).append(e)
            one = {t: es[0] for t, es in by_type.items()}

            # VAD: prefix padding (300 ms) before speech, silence_duration_ms (500) after it.
            user_item = one["input_audio_buffer.speech_started"]["item_id"]
            assert one["input_audio_buffer.speech_started"]["audio_start_ms"] == 200
            assert one["input_audio_buffer.speech_stopped"]["audio_end_ms"] == 2000
            assert one["input_audio_buffer.committed"]["item_id"] == user_item
            assert one["conversation.item.done"]["item"]["role"] == "user"

            # Input transcription: 1,800 ms of committed audio -> 18 audio tokens, billed to the ASR model.
            completed = one["conversation.item.input_audio_transcription.completed"]
            transcript = completed["transcript"]
            assert "".join(d["delta"] for d in by_type["conversation.item.input_audio_transcription.delta"]) == transcript
            assert completed["usage"] == {
                "type": "tokens", "total_tokens": 18 + tokens(transcript), "input_tokens": 18,
                "input_token_details": {"text_tokens": 0, "audio_tokens": 18}, "output_tokens": tokens(transcript)}
            assert list(completed["usage"]) == ["type", "total_tokens", "input_tokens", "input_token_details",
                                                "output_tokens"]

            # The response: 100 ms audible chunks, transcript deltas that add up.
            deltas = by_type["response.output_audio.delta"]
            for delta in deltas:
                assert len(delta["delta"]) == 6400
                raw = base64.b64decode(delta["delta"])
                assert len(raw) == 4800 and ev.pcm16_rms(raw) > 100
            agent_text = "".join(d["delta"] for d in by_type["response.output_audio_transcript.delta"])
            assert one["response.output_audio_transcript.done"]["transcript"] == agent_text
            created, done = one["response.created"]["response"], one["response.done"]["response"]
            assert created["status"] == "in_progress" and created["usage"] is None
            assert done["id"] == created["id"] and done["status"] == "completed"
            assert done["output"][0]["content"] == [{"type": "output_audio", "transcript": agent_text}]
            assert 800 < len(frames[-2].encode()) < 1400  # response.done is ~0.9-1.3 KB like the real one
            usage = done["usage"]
            assert usage == {
                "total_tokens": INSTRUCTION_TOKENS + 18 + tokens(agent_text) + 2 * len(deltas),
                "input_tokens": INSTRUCTION_TOKENS + 18,
                "output_tokens": tokens(agent_text) + 2 * len(deltas),
                "input_token_details": {
                    "text_tokens": INSTRUCTION_TOKENS, "audio_tokens": 18, "image_tokens": 0, "cached_tokens": 0,
                    "cached_tokens_details": {"text_tokens": 0, "audio_tokens": 0, "image_tokens": 0}},
                "output_token_details": {"text_tokens": tokens(agent_text), "audio_tokens": 2 * len(deltas)}}
            assert list(usage) == ["total_tokens", "input_tokens", "output_tokens", "input_token_details",
                                   "output_token_details"]
            limits = one["rate_limits.updated"]["rate_limits"][0]
            assert limits["limit"] - limits["remaining"] == usage["total_tokens"]

            # The trailing 500 ms of silence produced nothing: the next event answers our clear.
            await send(ws, type="input_audio_buffer.clear")
            assert (await recv(ws))["type"] == "input_audio_buffer.cleared"


async def test_later_turns_rebill_the_conversation_with_a_cached_prefix() -> None:
    with trio.fail_after(10):
        async with sim(fast=True) as url, connect(url) as ws:
            await recv(ws)
            usages, replies = [], []
            for text in ("What's the weather in Zürich?", 'Say "hello" in 日本語, please.'):
                await user_text(ws, text)
                await send(ws, type="response.create")
                done = (await recv_until(ws, "response.done"))[-1]["response"]
                usages.append(done["usage"])
                replies.append(done["output"][0]["content"][0]["transcript"])
                await recv_until(ws, "rate_limits.updated")
            first, second = usages
            assert first["input_token_details"]["text_tokens"] == INSTRUCTION_TOKENS + tokens(
                "What's the weather in Zürich?")
            assert first["input_token_details"]["cached_tokens"] == 0
            # The second prompt holds the first user text, the agent's first reply (text and audio) and the new text.
            prompt_text = first["input_token_details"]["text_tokens"] + first["output_token_details"]["text_tokens"] \
                + tokens('Say "hello" in 日本語, please.')
            assert second["input_token_details"]["text_tokens"] == prompt_text
            assert second["input_token_details"]["audio_tokens"] == first["output_token_details"]["audio_tokens"]
            cached = second["input_token_details"]["cached_tokens_details"]
            assert cached["text_tokens"] == first["input_token_details"]["text_tokens"] // 64 * 64 > 0
            assert second["input_token_details"]["cached_tokens"] == cached["text_tokens"] + cached["audio_tokens"]


async def test_text_modality_uses_output_text_events() -> None:
    with trio.fail_after(10):
        async with sim(fast=True) as url, connect(url) as ws:
            await recv(ws)
            await send(ws, type="session.update", session={"type": "realtime", "output_modalities": ["text"]})
            await recv(ws)
            await user_text(ws, "Hello")
            await send(ws, type="response.create")
            events = await recv_until(ws, "rate_limits.updated")
            assert collapse([e["type"] for e in events]) == [
                "response.created", "response.output_item.added", "response.content_part.added",
                "response.output_text.delta", "response.output_text.done", "response.content_part.done",
                "response.output_item.done", "response.done", "rate_limits.updated"]
            text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
            assert all(e.get("obfuscation") for e in events if e["type"] == "response.output_text.delta")
            done = events[-2]["response"]
            assert done["output_modalities"] == ["text"]
            assert done["output"][0]["content"] == [{"type": "output_text", "text": text}]
            assert done["usage"]["output_token_details"] == {"text_tokens": tokens(text), "audio_tokens": 0}


async def test_response_create_echoes_metadata_before_usage() -> None:
    forged = {"type": "response.done", "input_tokens": "999999", "note": 'a "quote" and ünïcode'}
    with trio.fail_after(10):
        async with sim(fast=True) as url, connect(url) as ws:
            await recv(ws)
            await user_text(ws, "This item is not part of an out-of-band response.")
            await send(ws, type="response.create", response={
                "conversation": "none", "instructions": "Summarise.", "metadata": forged})
            created_frame = await ws.get_message()
            frames = [created_frame]
            while json.loads(frames[-1])["type"] != "response.done":
                frames.append(await ws.get_message())
            for frame in (created_frame, frames[-1]):
                event = check_frame(frame)
                assert event["response"]["metadata"] == forged
                assert list(event["response"])[-2:] == ["metadata", "usage"]
                assert frame.index('"metadata":') < frame.index('"usage":')
            done = json.loads(frames[-1])["response"]
            assert done["conversation_id"] is None  # out of band: no conversation, only the instructions
            assert done["usage"]["input_tokens"] == tokens("Summarise.")
            assert json.loads(created_frame)["response"]["metadata"] == forged


async def test_response_cancel_stops_a_realtime_response() -> None:
    with trio.fail_after(10):
        async with sim() as url, connect(url) as ws:  # real-time pacing
            await recv(ws)
            await user_text(ws, "Tell me a long story.")
            await send(ws, type="response.create")
            await send(ws, type="response.create")
            events = await recv_until(ws, "error")
            assert events[-1]["error"]["code"] == "conversation_already_has_active_response"
            times = []
            while len(times) < 3:
                event = await recv(ws)
                if event["type"] == "response.output_audio.delta":
                    times.append(trio.current_time())
            assert times[2] - times[0] >= 0.18  # 100 ms chunks at playback speed
            await send(ws, type="response.cancel")
            events = await recv_until(ws, "response.done")
            audio_sent = 3 + sum(e["type"] == "response.output_audio.delta" for e in events)
            done = events[-1]["response"]
            assert done["status"] == "cancelled"
            assert done["status_details"] == {"type": "cancelled", "reason": "client_cancelled"}
            assert done["output"][0]["status"] == "incomplete"
            assert done["usage"]["output_token_details"]["audio_tokens"] == 2 * audio_sent
            assert (await recv(ws))["type"] == "rate_limits.updated"
            await send(ws, type="response.cancel")
            assert (await recv(ws))["error"]["code"] == "response_cancel_not_active"


async def test_speech_during_a_response_interrupts_it() -> None:
    with trio.fail_after(10):
        async with sim() as url, connect(url) as ws:
            await recv(ws)
            await user_text(ws, "Hi")
            await send(ws, type="response.create")
            await recv_until(ws, "response.output_audio.delta")
            await speak(ws, (100, 3000))
            events = await recv_until(ws, "response.done")
            assert "input_audio_buffer.speech_started" in [e["type"] for e in events]
            assert events[-1]["response"]["status_details"] == {"type": "cancelled", "reason": "turn_detected"}


async def test_manual_commit_without_turn_detection() -> None:
    with trio.fail_after(10):
        async with sim(fast=True) as url, connect(url) as ws:
            await recv(ws)
            await send(ws, type="session.update",
                       session={"type": "realtime", "audio": {"input": {"turn_detection": None}}})
            await recv(ws)
            await send(ws, type="input_audio_buffer.commit")
            assert (await recv(ws))["error"]["code"] == "input_audio_buffer_commit_empty"
            await speak(ws, (1000, 3000))  # no VAD: no events
            await send(ws, type="input_audio_buffer.commit")
            events = await recv_until(ws, "conversation.item.input_audio_transcription.completed")
            assert collapse([e["type"] for e in events]) == [
                "input_audio_buffer.committed", "conversation.item.added", "conversation.item.done",
                "conversation.item.input_audio_transcription.delta",
                "conversation.item.input_audio_transcription.completed"]
            assert events[-1]["usage"]["input_tokens"] == 10
            await send(ws, type="response.create")  # a commit alone creates no response
            assert (await recv(ws))["type"] == "response.created"


async def test_conversation_item_retrieve_truncate_delete() -> None:
    with trio.fail_after(10):
        async with sim(fast=True) as url, connect(url) as ws:
            await recv(ws)
            await send(ws, type="conversation.item.create", item={
                "id": "item_mine", "type": "message", "role": "user",
                "content": [{"type": "input_audio", "audio": base64.b64encode(pcm(500, 3000)).decode()}]})
            added = await recv(ws)
            assert added["item"]["content"] == [{"type": "input_audio", "transcript": None}]  # audio not echoed
            await recv(ws)
            await send(ws, type="conversation.item.retrieve", item_id="item_mine")
            assert (await recv(ws))["item"]["id"] == "item_mine"
            await send(ws, type="conversation.item.truncate", item_id="item_mine", content_index=0, audio_end_ms=200)
            assert (await recv(ws))["type"] == "conversation.item.truncated"
            await send(ws, type="conversation.item.delete", item_id="item_mine")
            assert (await recv(ws))["type"] == "conversation.item.deleted"
            await send(ws, type="conversation.item.retrieve", item_id="item_mine")
            assert (await recv(ws))["error"]["param"] == "item_id"


async def test_malformed_input_gets_error_events_and_the_session_goes_on() -> None:
    with trio.fail_after(10):
        async with sim(fast=True) as url, connect(url) as ws:
            await recv(ws)
            await ws.send_message(b"\x00\x01binary")
            frame = await ws.get_message()
            error = check_frame(frame)
            assert list(error) == ["type", "event_id", "error"]
            assert error["error"] == {
                "type": "invalid_request_error", "code": "invalid_event",
                "message": "Expected a text WebSocket message; binary frames are not supported.",
                "param": None, "event_id": None}
            await ws.send_message("{not json")
            assert (await recv(ws))["error"]["code"] == "invalid_json"
            await ws.send_message("[1, 2]")
            assert (await recv(ws))["error"]["code"] == "invalid_event"
            await send(ws, event_id="evt_x")
            assert (await recv(ws))["error"]["message"] == "The 'type' field is missing."
            await send(ws, type="transcription_session.update", event_id="evt_7")
            error = (await recv(ws))["error"]
            assert (error["code"], error["param"], error["event_id"]) == ("invalid_value", "type", "evt_7")
            assert "'response.cancel'" in error["message"]
            await send(ws, type="response.cancel")
            assert (await recv(ws))["error"]["code"] == "response_cancel_not_active"
            await send(ws, type="input_audio_buffer.append", audio="***")
            assert (await recv(ws))["error"]["code"] == "invalid_value"
            await send(ws, type="response.create", response={"modalities": ["text"]})
            assert (await recv(ws))["error"]["param"] == "response.modalities"
            await send(ws, type="session.update", session={"type": "realtime"})
            assert (await recv(ws))["type"] == "session.updated"


@pytest.mark.parametrize("path, kwargs, code, error_code", [
    (PATH, {"extra_headers": [(b"Authorization", b"Bearer sk-invalid-0123456789")]}, 3000, "invalid_api_key"),
    (PATH, {"subprotocols": ["realtime", "openai-insecure-api-key.sk-invalid-abc123456"]}, 3000, "invalid_api_key"),
    ("/v1/realtime?model=invalid-model", {}, 4000, "invalid_model"),
    (PATH, {"extra_headers": [(b"OpenAI-Beta", b"realtime=v1")]}, 4000, "beta_api_shape_disabled"),
    (PATH, {"subprotocols": ["realtime", "openai-beta.realtime-v1"]}, 4000, "beta_api_shape_disabled"),
])
async def test_fault_handshakes_upgrade_then_error_then_close(
    path: str, kwargs: dict[str, Any], code: int, error_code: str
) -> None:
    with trio.fail_after(10):
        async with sim(fast=True) as url, connect(url, path, **kwargs) as ws:
            error = await recv(ws)
            assert error["type"] == "error" and error["error"]["code"] == error_code
            assert "0123456789" not in error["error"]["message"]  # keys are masked
            reason = (await closed(ws)).reason
            assert (reason.code, reason.reason) == (code, f"invalid_request_error.{error_code}")


async def test_good_key_and_no_key_are_accepted() -> None:
    with trio.fail_after(10):
        async with sim(fast=True) as url:
            async with connect(url, extra_headers=[(b"Authorization", b"Bearer sk-test")]) as ws:
                assert (await recv(ws))["type"] == "session.created"
            async with connect(url) as ws:
                assert (await recv(ws))["type"] == "session.created"


async def test_max_session_seconds_expires_the_session_like_the_provider() -> None:
    with trio.fail_after(10):
        async with sim(fast=True, max_session_seconds=0.3) as url, connect(url) as ws:
            await recv(ws)
            error = await recv(ws)
            assert error["error"] == {"type": "invalid_request_error", "code": "session_expired",
                                      "message": "Your session hit the maximum duration of 60 minutes.",
                                      "param": None, "event_id": None}
            reason = (await closed(ws)).reason
            assert (reason.code, reason.reason) == (1001, "Your session hit the maximum duration of 60 minutes.")


async def test_echo_mode_sends_frames_back_verbatim() -> None:
    with trio.fail_after(10):
        async with sim(echo=True) as url, connect(url, extra_headers=[(b"OpenAI-Beta", b"realtime=v1")]) as ws:
            for frame in ('{"type": "input_audio_buffer.append", "audio": "AAAA"}', "not json", "ünï\"code"):
                await ws.send_message(frame)
                assert await ws.get_message() == frame  # and no session.created came first
            await ws.send_message(b"\x00\xff")
            assert await ws.get_message() == b"\x00\xff"


async def test_hundreds_of_concurrent_sessions() -> None:
    sessions, all_open = 300, trio.Event()
    opened = 0

    async def one(url: str, respond: bool) -> None:
        nonlocal opened
        async with connect(url) as ws:
            await recv(ws)
            opened += 1
            if opened == sessions:
                all_open.set()
            await all_open.wait()  # every session is open at once
            await send(ws, type="input_audio_buffer.clear")
            assert (await recv(ws))["type"] == "input_audio_buffer.cleared"
            if respond:
                await user_text(ws, "Hi")
                await send(ws, type="response.create")
                await recv_until(ws, "rate_limits.updated")

    with trio.fail_after(30):
        async with sim(fast=True) as url, trio.open_nursery() as nursery:
            for i in range(sessions):
                nursery.start_soon(one, url, i % 10 == 0)


async def test_cli_runs_as_a_daemon(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with daemon(["switchd-sim", "--port", "0", "--fast"], base_env(), tmp_path / "sim.log") as d:
            assert d.ready_line.startswith("switchd-sim listening ws://127.0.0.1:")
            async with connect(d.address) as ws:
                assert (await recv(ws))["session"]["model"] == "gpt-realtime"
                await user_text(ws, "Hi")


# --- pure functions ------------------------------------------------------------------------------

def test_ids_and_envelopes() -> None:
    for prefix in ("event_", "sess_", "conv_", "resp_", "item_"):
        assert re.fullmatch(prefix + ID, ev.new_id(prefix))
    event = ev.event("x.y", b=1, a="ü")
    assert list(event) == ["type", "event_id", "b", "a"]
    assert ev.encode(event) == '{"type":"x.y","event_id":"%s","b":1,"a":"ü"}' % event["event_id"]


def test_token_rules() -> None:
    assert ev.input_audio_tokens(1000) == 10 and ev.input_audio_tokens(1800) == 18
    assert ev.output_audio_tokens(1000) == 20 and ev.output_audio_tokens(100) == 2
    assert ev.text_tokens("") == 0 and ev.text_tokens("abcde") == 2
    assert ev.cached_prefix(ev.Tokens(130, 70), ev.Tokens(200, 20)) == ev.Tokens(128, 0)


@given(st.integers(0, 10**6), st.integers(0, 10**6), st.integers(0, 10**6), st.integers(0, 10**6),
       st.integers(0, 10**6), st.integers(0, 10**6))
def test_response_usage_adds_up(it: int, ia: int, ct: int, ca: int, ot: int, oa: int) -> None:
    prompt, output = ev.Tokens(it, ia), ev.Tokens(ot, oa)
    cached = ev.cached_prefix(ev.Tokens(ct, ca), prompt)
    usage = ev.response_usage(prompt, cached, output)
    details = usage["input_token_details"]
    assert usage["input_tokens"] == details["text_tokens"] + details["audio_tokens"] + details["image_tokens"]
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert usage["output_tokens"] == sum(usage["output_token_details"].values())
    assert details["cached_tokens"] == sum(details["cached_tokens_details"].values()) <= usage["input_tokens"]
    assert list(details) == ["text_tokens", "audio_tokens", "image_tokens", "cached_tokens", "cached_tokens_details"]


@given(st.recursive(st.none() | st.integers() | st.text(), lambda c: st.dictionaries(st.text(), c), max_leaves=10),
       st.recursive(st.none() | st.integers() | st.text(), lambda c: st.dictionaries(st.text(), c), max_leaves=10))
def test_deep_merge(base: Any, update: Any) -> None:
    if not (isinstance(base, dict) and isinstance(update, dict)):
        return
    merged = ev.deep_merge(base, update)
    assert ev.deep_merge(base, {}) == base and ev.deep_merge(merged, update) == merged
    for key, value in update.items():
        if not isinstance(value, dict) or not isinstance(base.get(key), dict):
            assert merged[key] == value
    assert set(merged) == set(base) | set(update)


def test_session_update_validation() -> None:
    current = ev.default_session("gpt-realtime", 0)
    with pytest.raises(ev.ClientError) as info:
        ev.validate_session_update({"type": "realtime", "audio": {"output": {"voice": "alloy"}}}, current, True)
    assert info.value.code == "cannot_update_voice"
    ev.validate_session_update({"type": "realtime", "audio": {"output": {"voice": "marin"}}}, current, True)
    ev.validate_session_update({"type": "realtime", "audio": {"output": {"voice": "alloy"}}}, current, False)
    with pytest.raises(ev.ClientError) as info:
        ev.validate_session_update("text", current, False)
    assert info.value.code == "invalid_type"


def test_handshake_faults() -> None:
    assert ev.handshake_fault({}, PATH, ()) is None
    assert ev.handshake_fault({"authorization": "Bearer sk-live"}, PATH, ("realtime",)) is None
    fault = ev.handshake_fault({"authorization": "Bearer sk-invalid-key-1234"}, "/?model=invalid-x", ())
    assert fault is not None and fault.close_code == 3000  # the key is checked first
    fault = ev.handshake_fault({"openai-beta": "realtime=v1"}, "/?model=invalid-x", ())
    assert fault is not None and fault.event["error"]["code"] == "invalid_model"
    assert ev.query_model("/v1/realtime") == ev.query_model("/?model=") == "gpt-realtime"


def test_fake_speech_is_deterministic_and_exercises_json() -> None:
    assert ev.user_transcript(1800) == ev.user_transcript(1800)
    assert ev.agent_reply(7) == ev.agent_reply(7) != ev.agent_reply(8)
    texts = [ev.agent_reply(seed) for seed in range(50)]
    assert all(60 <= len(t) <= 200 for t in texts)
    assert any(not t.isascii() for t in texts) and any('"' in t for t in texts) and any("\\" in t for t in texts)
    assert len(ev.user_transcript(3000).split()) == 9


@given(st.text(), st.integers(1, 10))
def test_split_deltas_join_back(text: str, parts: int) -> None:
    assert "".join(ev.split_deltas(text)) == text
    pieces = ev.split_deltas(text, parts)
    assert "".join(pieces) == text and len(pieces) <= max(parts, 1)


def test_audio_helpers() -> None:
    chunk = base64.b64decode(ev.tone_chunk_b64())
    assert len(ev.tone_chunk_b64()) == 6400 and len(chunk) == 4800
    assert 600 < ev.pcm16_rms(chunk) < 800 and ev.pcm16_rms(chunk) > ev.speech_threshold(1.0)
    assert ev.pcm16_rms(bytes(960)) == 0 and ev.pcm16_rms(b"") == 0 and ev.pcm16_rms(b"\x01") == 0
    assert ev.agent_audio_ms("x") == 100 and ev.agent_audio_ms("x" * 50) == 3000


def test_plan_steps() -> None:
    text = ev.agent_reply(3)
    steps = plan_steps(text, audio=True)
    assert sum(s.text is None for s in steps) == ev.agent_audio_ms(text) // 100
    assert "".join(s.text for s in steps if s.text is not None) == text
    assert [s.at for s in steps] == sorted(s.at for s in steps)
    assert all(s.text is not None for s in plan_steps(text, audio=False))


def test_one_append_can_hold_a_whole_turn() -> None:
    session = Session("gpt-realtime", now=0, max_session_seconds=60)
    audio = base64.b64encode(pcm(200, 0) + pcm(600, 3000) + pcm(600, 0)).decode()
    reaction = session.handle(json.dumps({"type": "input_audio_buffer.append", "audio": audio}))
    types = [e["type"] for e in reaction.events]
    assert types[:3] == ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                         "input_audio_buffer.committed"]
    assert reaction.events[0]["audio_start_ms"] == 0  # prefix padding stops at the buffer start
    assert reaction.events[1]["audio_end_ms"] == 1300
    assert reaction.response is not None and session.active is reaction.response
    events = session.finish_response(reaction.response)  # nothing sent: usage covers the prompt only
    assert events[-2]["response"]["usage"]["output_tokens"] == 0 and session.active is None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["type", "audio", "input", "output", "voice", "turn_detection", "role", "content",
                         "text", "metadata", "conversation", "output_modalities", "instructions", "x"]),
        inner, max_size=4),
    max_leaves=12)


def objects(**fields: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({}, optional={k: v | json_values for k, v in fields.items()})


audio_b64 = st.binary(max_size=4800).map(lambda b: base64.b64encode(b).decode())
session_like = objects(
    type=st.just("realtime"), instructions=st.text(max_size=20), output_modalities=st.sampled_from([["audio"], ["text"]]),
    audio=objects(input=objects(format=json_values, transcription=json_values, turn_detection=objects(
        type=st.just("server_vad"), threshold=json_values, silence_duration_ms=json_values,
        prefix_padding_ms=json_values, create_response=json_values, interrupt_response=json_values)),
        output=objects(format=json_values, voice=st.sampled_from(["marin", "alloy"]), speed=json_values)))
item_like = objects(
    type=st.sampled_from(["message", "function_call", "function_call_output"]),
    role=st.sampled_from(["user", "assistant", "system"]), id=st.text(max_size=5), output=json_values,
    content=st.lists(objects(type=st.sampled_from(["input_text", "input_audio", "output_text"]),
                             text=st.text(max_size=10), audio=audio_b64), max_size=2))
response_like = objects(
    conversation=st.sampled_from(["auto", "none"]), output_modalities=st.sampled_from([["audio"], ["text"]]),
    instructions=st.text(max_size=20), metadata=st.dictionaries(st.text(max_size=5), st.text(max_size=5)),
    audio=objects(output=objects(voice=st.text(max_size=5), format=json_values)), max_output_tokens=json_values)
client_events = st.fixed_dictionaries({"type": st.sampled_from(ev.CLIENT_EVENT_TYPES)}, optional={
    "session": session_like, "response": response_like, "item": item_like, "audio": audio_b64 | json_values,
    "item_id": json_values, "audio_end_ms": json_values, "response_id": json_values, "event_id": json_values,
})


@given(st.lists(client_events, max_size=8))
def test_any_client_event_gets_events_never_an_exception(messages: list[dict[str, Any]]) -> None:
    """Wire conventions only: the sim stays lenient about (and echoes) junk in fields it never reads."""
    def check_frame(frame: str) -> None:
        assert re.match(r'\{"type":"[a-z_.]+","event_id":"event_' + ID + '"', frame)

    session = Session("gpt-realtime", now=0, max_session_seconds=60)
    for message in messages:
        reaction = session.handle(json.dumps(message))
        for event in reaction.events:
            check_frame(ev.encode(event))
        if reaction.response is not None:
            for event in ev.response_start_events(reaction.response.ref):
                check_frame(ev.encode(event))
            for step in reaction.response.steps:
                check_frame(ev.encode(reaction.response.step_event(step)))
            for event in session.finish_response(reaction.response):
                check_frame(ev.encode(event))
