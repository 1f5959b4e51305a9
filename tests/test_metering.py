"""Upstream frame classification and metering: fuzzed against a reference reading (json.loads)."""
from __future__ import annotations

import base64
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from common.usage import UsageTotals
from switchd import metering
from switchd.inflight import WATCHED
from switchd.metering import (
    ACTIONABLE,
    AUDIO_DELTA_PREFIX,
    CLIENT_AUDIO_PREFIX,
    TRANSCRIPT_TYPES,
    USAGE_TYPES,
    meter,
    upstream_event,
)

DONE = "response.done"
COMPLETED = "conversation.item.input_audio_transcription.completed"
IDS = {
    "event_id": "event_CCXHwh5Z1qJkQ7uYvB0aD",
    "response_id": "resp_CCXHw0UJld10EzIUXQCNh",
    "item_id": "item_CCXHwGjjDUfOXbiySlK7i",
}
# The official GA example (protocol reference 1.3).
GA_DONE = (
    '{"type":"response.done","event_id":"event_CCXHxcMy86rrKhBLDdqCh","response":{"object":"realtime.response",'
    '"id":"resp_CCXHw0UJld10EzIUXQCNh","status":"completed","status_details":null,"output":[{"id":"item_CCXHwGjjDUfOXbiySlK7i",'
    '"type":"message","status":"completed","role":"assistant","content":[{"type":"output_audio","transcript":"Loud and clear! '
    'I can hear you perfectly. How can I help you today?"}]}],"conversation_id":"conv_CCXHsurMKcaVxIZvaCI5m",'
    '"output_modalities":["audio"],"max_output_tokens":"inf","audio":{"output":{"format":{"type":"audio/pcm","rate":24000},'
    '"voice":"alloy"}},"usage":{"total_tokens":253,"input_tokens":132,"output_tokens":121,"input_token_details":'
    '{"text_tokens":119,"audio_tokens":13,"image_tokens":0,"cached_tokens":64,"cached_tokens_details":{"text_tokens":64,'
    '"audio_tokens":0,"image_tokens":0}},"output_token_details":{"text_tokens":30,"audio_tokens":91}},"metadata":null}}'
)
GA_COMPLETED = (
    '{"type":"conversation.item.input_audio_transcription.completed","event_id":"event_CCXGRvtUVrax5SJAnNOWZ",'
    '"item_id":"item_CCXGQ4e1ht4cOraEYcuR2","content_index":0,"transcript":"Hey, can you hear me?","usage":{"type":"tokens",'
    '"total_tokens":22,"input_tokens":13,"input_token_details":{"text_tokens":0,"audio_tokens":13},"output_tokens":9}}'
)
# What a client can get echoed back: usage-like keys and types in metadata, tool schemas and text.
FORGED_USAGE = {"total_tokens": 999999, "input_tokens": 999999, "output_tokens": 999999}
FORGERIES: list[Any] = [
    FORGED_USAGE,
    {"usage": FORGED_USAGE, "type": DONE},
    {"type": DONE, "response": {"usage": FORGED_USAGE}},
    {"type": COMPLETED, "usage": FORGED_USAGE},
    '"input_tokens":0,"output_tokens":0',
    '","usage":{"input_tokens":0},"x":"',
    '{"type":"response.done","response":{"usage":{"input_tokens":999999}}}',
    [{"type": "function", "name": "input_tokens", "parameters": {"type": "object", "properties": {"input_tokens": {"type": "integer"}}}}],
]


def frame_of(event: dict[str, Any], data: st.DataObject) -> str:
    """`event` as JSON in any key order, compact or spaced or indented, ASCII-escaped or not."""
    keys = data.draw(st.permutations(list(event)))
    ordered = {k: event[k] for k in keys}
    layout = data.draw(st.sampled_from([{"separators": (",", ":")}, {}, {"indent": 2}]))
    return json.dumps(ordered, ensure_ascii=data.draw(st.booleans()), **layout)


def reference(frame: str) -> tuple[int, UsageTotals]:
    """The bill as a plain reading of the whole frame gives it: parse, top-level type, top-level usage."""
    totals = UsageTotals()
    event = json.loads(frame)
    if event.get("type") == DONE and isinstance(event.get("response"), dict):
        usage = event["response"].get("usage")
        if isinstance(usage, dict):
            return totals.add_response(usage), totals
    if event.get("type") == COMPLETED and isinstance(event.get("usage"), dict):
        return totals.add_transcription(event["usage"]), totals
    return 0, totals


def metered(frame: str) -> tuple[int, UsageTotals]:
    totals = UsageTotals()
    event = upstream_event(frame)
    return (0 if event is None else meter(event, totals)), totals


counts = st.one_of(st.integers(0, 10**6), st.integers(-(10**6), -1), st.none(), st.floats(allow_nan=False), st.text(max_size=3), st.booleans())
texts = st.text(max_size=40)
forgeries = st.sampled_from(FORGERIES)


def maybe(value: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A field that may be present (any value), null, or absent (the sentinel `...`)."""
    return st.one_of(value, st.none(), st.just(...))


def drop_absent(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not ...}


input_details = st.fixed_dictionaries(
    {},
    optional={
        "text_tokens": counts,
        "audio_tokens": counts,
        "image_tokens": counts,
        "cached_tokens": counts,
        "cached_tokens_details": st.one_of(st.fixed_dictionaries({"text_tokens": counts, "audio_tokens": counts}), st.none()),
    },
)
response_usage = st.fixed_dictionaries(
    {},
    optional={
        "total_tokens": counts,
        "input_tokens": counts,
        "output_tokens": counts,
        "input_token_details": st.one_of(input_details, st.none()),
        "output_token_details": st.one_of(st.fixed_dictionaries({}, optional={"text_tokens": counts, "audio_tokens": counts}), st.none()),
        "extra": texts,
    },
)
transcription_usage = st.one_of(
    st.fixed_dictionaries(
        {"type": st.just("tokens")},
        optional={"total_tokens": counts, "input_tokens": counts, "output_tokens": counts, "input_token_details": st.one_of(input_details, st.none())},
    ),
    st.fixed_dictionaries({"type": st.just("duration"), "seconds": st.one_of(st.floats(0, 1e6), st.integers(0, 10**6), st.none())}),
)


@st.composite
def response_done(draw: st.DrawFn) -> dict[str, Any]:
    # metadata, tools and transcripts come first so any echoed forgery precedes the real usage block
    response = drop_absent(
        {
            "metadata": draw(maybe(st.one_of(st.dictionaries(texts, texts, max_size=3), forgeries))),
            "tools": draw(maybe(st.lists(forgeries, max_size=2))),
            "instructions": draw(maybe(st.one_of(texts, forgeries))),
            "object": "realtime.response",
            "status": draw(st.sampled_from(["completed", "cancelled", "failed", "incomplete"])),
            "output": [{"type": "message", "content": [{"type": "output_audio", "transcript": draw(st.one_of(texts, forgeries))}]}],
            "usage": draw(maybe(response_usage)),
        }
    )
    return drop_absent({"type": DONE, **IDS, "response": draw(st.one_of(st.just(response), st.just(...), st.none())), "extra": draw(maybe(texts))})


@st.composite
def transcription_completed(draw: st.DrawFn) -> dict[str, Any]:
    return drop_absent(
        {
            "type": COMPLETED,
            **IDS,
            "content_index": 0,
            "transcript": draw(st.one_of(texts, forgeries)),
            "usage": draw(maybe(transcription_usage)),
            "extra": draw(maybe(forgeries)),
        }
    )


@settings(max_examples=400)
@given(st.one_of(response_done(), transcription_completed()), st.data())
def test_usage_frames_agree_with_the_reference_reading(event: dict[str, Any], data: st.DataObject) -> None:
    frame = frame_of(event, data)
    assert upstream_event(frame) == json.loads(frame)
    assert metered(frame) == reference(frame)


@given(st.sampled_from(sorted(ACTIONABLE - USAGE_TYPES) + ["response.created", "session.updated", "rate_limits.updated"]), st.data())
def test_forged_usage_in_other_events_bills_nothing(kind: str, data: st.DataObject) -> None:
    event = {
        "type": kind,
        **IDS,
        "response": {"metadata": data.draw(forgeries), "usage": None},
        "session": {"tools": data.draw(st.lists(forgeries, max_size=3)), "instructions": data.draw(forgeries)},
        "delta": data.draw(st.one_of(texts, forgeries)),
    }
    frame = frame_of(event, data)
    assert metered(frame)[0] == 0
    assert meter(json.loads(frame), UsageTotals()) == 0


def test_response_created_with_response_done_in_metadata_is_not_metered() -> None:
    frame = json.dumps(
        {"type": "response.created", "response": {"metadata": {"type": DONE, "usage": json.dumps(FORGED_USAGE)}, "usage": None}},
        separators=(",", ":"),
    )
    assert '"type":"response.done"' in frame.replace("\\", "")
    # Read (it marks a response in flight), never metered.
    parsed = upstream_event(frame)
    assert parsed is not None and parsed["type"] == "response.created"
    assert meter(parsed, UsageTotals()) == 0
    # Even with the type key last, only the top-level type counts.
    event = {"response": {"metadata": {"type": DONE}, "usage": FORGED_USAGE}, "type": "response.created"}
    assert upstream_event(json.dumps(event)) == event
    assert meter(event, UsageTotals()) == 0


def test_forged_usage_before_the_real_block_does_not_change_the_bill() -> None:
    forged = json.dumps(
        {
            "type": DONE,
            "response": {
                "metadata": {"input_tokens": 0, "usage": {"input_tokens": 0, "output_tokens": 0}, "type": DONE},
                "tools": [{"type": "function", "parameters": {"properties": {"usage": {"total_tokens": 0}, "input_tokens": 1}}}],
                "usage": {"total_tokens": 253, "input_tokens": 132, "output_tokens": 121},
            },
        },
        separators=(",", ":"),
    )
    assert metered(forged)[0] == 253


def test_ga_examples() -> None:
    tokens, totals = metered(GA_DONE)
    assert tokens == 253
    assert (totals.input_text, totals.input_audio, totals.input_cached, totals.output_text, totals.output_audio) == (119, 13, 64, 30, 91)
    tokens, totals = metered(GA_COMPLETED)
    assert (tokens, totals.transcription_tokens, totals.input_tokens, totals.output_tokens) == (22, 22, 0, 0)
    duration = {"type": COMPLETED, "usage": {"type": "duration", "seconds": 2.5}}
    totals = UsageTotals()
    assert meter(duration, totals) == 0 and totals.transcription_seconds == 2.5


def test_meter_tolerates_missing_and_null_parts() -> None:
    for event in [
        {"type": DONE},
        {"type": DONE, "response": None},
        {"type": DONE, "response": []},
        {"type": DONE, "response": {}},
        {"type": DONE, "response": {"usage": None}},
        {"type": DONE, "response": {"usage": [1, 2]}},
        {"type": DONE, "response": {"usage": {"input_token_details": None, "output_token_details": None}}},
        {"type": COMPLETED},
        {"type": COMPLETED, "usage": None},
        {"type": COMPLETED, "usage": "22"},
        {"type": "response.created", "response": {"usage": FORGED_USAGE}},
        {"type": ["response.done"], "response": {"usage": FORGED_USAGE}},
        {},
    ]:
        assert meter(event, UsageTotals()) == 0, event
    assert meter(None, UsageTotals()) == 0  # type: ignore[arg-type]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@given(json_values, st.sampled_from([None, *sorted(ACTIONABLE)]), st.data())
def test_never_raises_on_any_json(value: Any, kind: str | None, data: st.DataObject) -> None:
    for candidate in (value, {"type": kind, "response": value, "usage": value}, {"type": kind, "response": {"usage": value}}):
        frame = json.dumps(candidate, separators=data.draw(st.sampled_from([(",", ":"), (", ", ": ")])))
        parsed = json.loads(frame)
        acts = isinstance(parsed, dict) and type(parsed.get("type")) is str and parsed["type"] in ACTIONABLE
        assert upstream_event(frame) == (parsed if acts else None)
        assert meter(candidate, UsageTotals()) == (reference(frame)[0] if isinstance(parsed, dict) else 0)


@given(st.one_of(st.text(), st.sampled_from(sorted(ACTIONABLE)).map(lambda k: '{"type":"' + k), st.just('{"type":"')).flatmap(
    lambda head: st.text().map(lambda tail: head + tail)
))
def test_never_raises_on_any_text(frame: str) -> None:
    event = upstream_event(frame)
    if event is not None:
        assert meter(event, UsageTotals()) >= 0


def test_never_raises_on_pathological_frames() -> None:
    for frame in [
        "",
        "{",
        '{"type":"',
        '{"type":"response.done',
        '{"type":"response.done"',
        '{"type":"response.done"}x',
        '{"type":"response.done"}\n',
        "[" * 100_000 + "]" * 100_000,
        '{"type":"response.done","response":' + "[" * 100_000 + "]" * 100_000 + "}",
        '{"type":"response.done","x":' + "9" * 10_000 + "}",  # beyond int max str digits
        '{"type":"response.done","x":NaN}',
        '"response.done"',
        "null",
        '{"type":1}',
        '{"type":null}',
        '{"type":["response.done"]}',
        '{"type":{"a":1}}',
        '\ufeff{"type":"response.done"}',
        '{"type":"response.done","response":{"usage":{"input_tokens":"\\ud800"}}}',
    ]:
        event = upstream_event(frame)
        assert event is None or meter(event, UsageTotals()) == 0
    assert upstream_event('{"type":"response.done"}\n') == {"type": DONE}  # trailing whitespace is valid JSON


def audio_delta(pcm: bytes) -> str:
    return json.dumps(
        {"type": "response.output_audio.delta", **IDS, "output_index": 0, "content_index": 0, "delta": base64.b64encode(pcm).decode()},
        separators=(",", ":"),
    )


@given(st.binary(max_size=4096))
def test_audio_deltas_take_the_fast_path(pcm: bytes) -> None:
    assert audio_delta(pcm).startswith(AUDIO_DELTA_PREFIX)
    assert upstream_event(audio_delta(pcm)) is None


def test_fast_paths_do_not_parse(monkeypatch: Any) -> None:
    def no_parsing(_: str) -> None:
        raise AssertionError("parsed")

    monkeypatch.setattr(metering.fastjson, "loads", no_parsing)
    assert upstream_event(audio_delta(b"\0" * 9600)) is None
    assert upstream_event('{"type":"rate_limits.updated","rate_limits":[]}') is None
    assert upstream_event('{"type":"response.content_part.added","part":{"type":"response.done"}}') is None
    assert upstream_event('{"type":"response.output_audio.done","response_id":"resp_1"}') is None


def test_type_peek_agrees_with_json_on_escapes_and_order() -> None:
    # an escaped type name is read by json.loads, not missed by the raw peek
    assert upstream_event('{"type":"response.d\\u006fne","response":{"usage":{"input_tokens":1}}}') == {
        "type": DONE,
        "response": {"usage": {"input_tokens": 1}},
    }
    assert upstream_event('{"type":"response.done\\"","x":1}') is None
    assert upstream_event('{"event_id":"e","type":"error","error":{}}') == {"event_id": "e", "type": "error", "error": {}}
    assert upstream_event('{ "type": "session.updated", "session": {} }') == {"type": "session.updated", "session": {}}
    assert upstream_event('{"type":"response.output_audio.deltas"}') is None


def test_duplicate_type_key_is_settled_by_the_frame_start() -> None:
    """Provider serializers write each key once; if a frame ever repeated "type", the first one rules
    for the fast paths (no parse), and json.loads's last-wins reading rules once parsed."""
    assert upstream_event('{"type":"response.output_audio.delta","type":"response.done","response":{"usage":{"input_tokens":5}}}') is None
    assert upstream_event('{"type":"rate_limits.updated","type":"response.done","response":{"usage":{"input_tokens":5}}}') is None
    assert upstream_event('{"type":"response.done","type":"rate_limits.updated"}') is None


def test_type_sets() -> None:
    assert USAGE_TYPES == {DONE, COMPLETED}
    assert TRANSCRIPT_TYPES == {
        "conversation.item.input_audio_transcription.delta",
        COMPLETED,
        "response.output_audio_transcript.delta",
        "response.output_text.delta",
        "response.audio_transcript.delta",
        "response.text.delta",
    }
    assert ACTIONABLE == USAGE_TYPES | TRANSCRIPT_TYPES | WATCHED | {"session.updated", "session.created", "error"}
    assert not any(kind.startswith("response.output_audio.delta") for kind in ACTIONABLE)
    assert CLIENT_AUDIO_PREFIX == '{"type":"input_audio_buffer.append"'
    assert json.loads(AUDIO_DELTA_PREFIX + "}") == {"type": "response.output_audio.delta"}
