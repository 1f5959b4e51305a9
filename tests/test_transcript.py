"""Conversation text: fuzzed end to end from real JSON frames through upstream_event."""
from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from switchd import transcript
from switchd.metering import TRANSCRIPT_TYPES, upstream_event
from switchd.transcript import AGENT_DELTAS, USER_COMPLETED, USER_DELTA, Conversation

AGENT_KINDS = sorted(AGENT_DELTAS)
# Quotes, backslashes, separators, newlines, non-ASCII and astral characters (surrogate pairs in JSON).
texts = st.text(alphabet=st.one_of(st.sampled_from('"\\|:\n\t/é中😀🎉\u2028\x00'), st.characters(codec="utf-8")), max_size=12)
ids = st.sampled_from(["item_A", "item_B", "item_C"])

# An op is (kind, item_id or agent event type, text).
ops = st.one_of(
    st.tuples(st.just("delta"), ids, texts),
    st.tuples(st.just("completed"), ids, texts),
    st.tuples(st.just("agent"), st.sampled_from(AGENT_KINDS), texts),
    st.tuples(st.just("noise"), st.sampled_from(["response.done", "session.updated", "error", "rate_limits.updated"]), texts),
)


def event_of(op: tuple[str, str, str]) -> dict[str, Any]:
    kind, key, text = op
    if kind == "delta":
        return {"type": USER_DELTA, "event_id": "event_1", "item_id": key, "content_index": 0, "delta": text, "obfuscation": "aLxx"}
    if kind == "completed":
        return {"type": USER_COMPLETED, "item_id": key, "transcript": text, "usage": {"type": "tokens", "total_tokens": 3}}
    if kind == "agent":
        return {"type": key, "response_id": "resp_1", "item_id": "item_R", "delta": text}
    return {"type": key, "delta": text, "transcript": text, "response": {"output": [{"transcript": text}]}}


def expected(script: list[tuple[str, str, str]]) -> str:
    """The conversation as a plain reading of the script: turns of non-empty text, merged per speaker."""
    turns: list[list[str]] = []
    streamed: set[str] = set()
    for kind, key, text in script:
        if kind == "completed" and key in streamed:  # any completed ends its item
            streamed.discard(key)
            continue
        if kind == "noise" or not text:
            continue
        if kind == "delta":
            streamed.add(key)
        speaker = "agent" if kind == "agent" else "user"
        if turns and turns[-1][0] == speaker:
            turns[-1][1] += text
        else:
            turns.append([speaker, text])
    return "".join(f"{speaker}:{text}\n" for speaker, text in turns)


# How the provider might write a frame: compact (the fast path), spaced, indented; ASCII-escaped or not.
layouts = st.sampled_from(
    [{"separators": (",", ":"), "ensure_ascii": a} for a in (True, False)] + [{"ensure_ascii": a} for a in (True, False)] + [{"indent": 1}]
)


@settings(max_examples=250)
@given(st.lists(st.tuples(ops, layouts, st.booleans()), max_size=25))
def test_transcript_from_real_frames(script: list[tuple[tuple[str, str, str], dict[str, Any], bool]]) -> None:
    conversation, out = Conversation(), []
    for op, layout, flush in script:
        event = event_of(op)
        parsed = upstream_event(json.dumps(event, **layout))
        if event["type"] in TRANSCRIPT_TYPES:
            assert parsed == event
        if parsed is not None:
            conversation.observe(parsed)
        if flush:
            pending = len(conversation)
            out.append(conversation.take())
            assert len(out[-1]) == pending
            assert len(conversation) == 0
    out.append(conversation.close())
    assert "".join(out) == expected([op for op, _, _ in script])
    assert len(conversation) == 0 and conversation.close() == ""


def observed(*events: dict[str, Any]) -> Conversation:
    conversation = Conversation()
    for event in events:
        conversation.observe(event)
    return conversation


def user(text: Any, item: Any = "item_1") -> dict[str, Any]:
    return {"type": USER_DELTA, "item_id": item, "delta": text}


def done(text: Any, item: Any = "item_1") -> dict[str, Any]:
    return {"type": USER_COMPLETED, "item_id": item, "transcript": text}


def agent(text: Any, kind: str = "response.output_audio_transcript.delta") -> dict[str, Any]:
    return {"type": kind, "delta": text}


def test_lines_per_speaker() -> None:
    conversation = observed(user("Hey, "), user("there"), done("Hey, there"), agent("Hi! "), agent("How can I help?"), done("Bye", "item_2"))
    assert conversation.close() == "user:Hey, there\nagent:Hi! How can I help?\nuser:Bye\n"


def test_completed_only_is_used_and_completed_after_deltas_is_not_repeated() -> None:
    assert observed(done("whisper text")).close() == "user:whisper text\n"
    assert observed(user("a"), user("b"), done("ab")).close() == "user:ab\n"
    # interleaved items: each completed is matched to its own deltas
    assert observed(user("x", "i1"), done("only", "i2"), done("x", "i1")).close() == "user:xonly\n"


def test_empty_deltas_do_not_hide_the_completed_transcript() -> None:
    assert observed(user(""), done("said")).close() == "user:said\n"


def test_agent_beta_and_text_names() -> None:
    conversation = observed(*(agent(k[9:13], k) for k in sorted(AGENT_DELTAS)))
    assert conversation.close() == "agent:" + "".join(k[9:13] for k in sorted(AGENT_DELTAS)) + "\n"


def test_ignores_malformed_and_other_events() -> None:
    conversation = observed(
        user(None),
        user(5),
        user(["a"]),
        agent({"a": 1}),
        done(None),
        {"type": USER_DELTA},
        {"type": USER_COMPLETED, "item_id": ["unhashable"], "transcript": 3},
        {"type": "response.output_audio_transcript.done", "transcript": "dup"},
        {"type": "response.done", "response": {"output": [{"transcript": "dup"}]}},
        {"type": None, "delta": "x"},
        {"delta": "x"},
        {},
    )
    conversation.observe(None)  # type: ignore[arg-type]
    conversation.observe([1, 2])  # type: ignore[arg-type]
    assert len(conversation) == 0 and conversation.take() == "" and conversation.close() == ""


def test_unhashable_or_missing_item_ids_still_record_text() -> None:
    assert observed(user("a", None), done("b", ["x"])).close() == "user:ab\n"


def test_take_cuts_anywhere_and_close_ends_the_line() -> None:
    conversation = observed(user("hello"))
    assert len(conversation) == len("user:hello")
    assert conversation.take() == "user:hello"
    conversation.observe(user(" world"))
    assert conversation.take() == " world"
    assert conversation.take() == ""
    conversation.observe(agent("ok"))
    assert conversation.take() == "\nagent:ok"
    assert conversation.close() == "\n"
    assert conversation.close() == ""
    # after close the next text starts a fresh line, with no leading newline
    conversation.observe(agent("again"))
    assert conversation.close() == "agent:again\n"


def test_text_is_kept_exactly() -> None:
    text = 'He said "hi" \\ | a\\nb\nnext 中文 😀 \u2028'
    frame = json.dumps({"type": "response.output_text.delta", "delta": text})
    assert "\\ud83d\\ude00" in frame
    event = upstream_event(frame)
    assert event is not None
    assert observed(event).close() == f"agent:{text}\n"


def test_surrogate_pair_split_across_deltas_and_flushes() -> None:
    halves = [upstream_event(json.dumps(user(h))) for h in ("a\ud83d", "\ude00b")]  # ensure_ascii writes \ud83d, \ude00
    conversation = Conversation()
    conversation.observe(halves[0])  # type: ignore[arg-type]
    first = conversation.take()  # the high half is held back for its pair
    conversation.observe(halves[1])  # type: ignore[arg-type]
    text = first + conversation.close()
    assert text == "user:a😀b\n"
    text.encode("utf-8")


def test_lone_surrogates_become_replacement_characters() -> None:
    conversation = observed(user("\ud800x"), agent("\udc00"), user("end\ud83d"))
    text = conversation.take() + conversation.close()
    assert text == "user:\ufffdx\nagent:\ufffd\nuser:end\ufffd\n"
    text.encode("utf-8")


def test_streaming_items_are_forgotten() -> None:
    conversation = observed(*(user("x", f"item_{i}") for i in range(1000)))
    assert len(conversation._streaming) <= transcript._MAX_STREAMING_ITEMS
    for i in range(1000):
        conversation.observe(done("x", f"item_{i}"))
    assert len(conversation._streaming) == 0
    conversation.observe(user("y", "item_0"))
    conversation.observe(done("y", "item_0"))
    assert conversation._streaming == {}
