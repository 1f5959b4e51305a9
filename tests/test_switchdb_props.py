"""Properties of the pure session functions: cleaning, context injection, truncation."""
from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from switchdb.sessions import (
    MARKER,
    MAX_CONTEXT_CHARS,
    OMITTED,
    REFUSED_FIELDS,
    clean_session,
    restored_session,
    truncate_conversation,
)

keys = st.sampled_from(sorted(REFUSED_FIELDS) + ["type", "voice", "instructions", "audio", "tools", "x"]) | st.text(
    max_size=8
)
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5), max_leaves=30
)
instructions = st.lists(st.sampled_from(["Be brief.", MARKER, "user:hi\n", "\n", "é", "Here is"]), max_size=8).map(
    "".join
)
sessions = st.dictionaries(keys, json_values, max_size=8).flatmap(
    lambda d: st.one_of(st.just(d), instructions.map(lambda text: {**d, "instructions": text}))
)


def no_nulls(value: Any) -> bool:
    if isinstance(value, dict):
        return all(v is not None and no_nulls(v) for v in value.values())
    if isinstance(value, list):
        return all(no_nulls(v) for v in value if v is not None)  # list items are not fields
    return True


@given(sessions, st.dictionaries(st.text(max_size=5), json_values, max_size=3))
def test_cleaning_never_keeps_refused_fields_nulls_or_context(session: dict[str, Any], extra: dict[str, Any]) -> None:
    update = clean_session({**extra, "type": "session.updated", "session": session})
    assert set(update) == {"type", "session"} and update["type"] == "session.update"
    cleaned = update["session"]
    assert not REFUSED_FIELDS & set(cleaned)
    assert no_nulls(cleaned)
    if isinstance(cleaned.get("instructions"), str):
        assert MARKER not in cleaned["instructions"]
        assert session["instructions"].startswith(cleaned["instructions"])
    for key, value in session.items():
        if key not in REFUSED_FIELDS and value is not None and key != "instructions":
            assert key in cleaned
    json.dumps(update)  # still serialisable


@given(st.text(alphabet="ab\nxé", max_size=300), st.integers(min_value=1, max_value=120))
def test_truncation_keeps_the_newest_text_from_a_line_start(text: str, limit: int) -> None:
    out = truncate_conversation(text, limit)
    if len(text) <= limit:
        assert out == text
        return
    assert out.startswith(OMITTED)
    tail = out[len(OMITTED) :]
    assert len(tail) <= limit
    assert text.endswith(tail)
    start = len(text) - len(tail)
    if "\n" in text[len(text) - limit - 1 : -1]:
        assert text[start - 1] == "\n"  # begins at a line start
        # and no later line start was skipped: it is the longest such tail
        assert "\n" not in text[len(text) - limit - 1 : start - 1]
    else:
        assert len(tail) == limit


@settings(max_examples=50)
@given(st.lists(st.integers(min_value=0, max_value=40_000), min_size=1, max_size=40), st.booleans())
def test_truncation_at_the_real_limit(line_lengths: list[int], final_newline: bool) -> None:
    text = "\n".join(f"{i % 10}" * n for i, n in enumerate(line_lengths)) + ("\n" if final_newline else "")
    out = truncate_conversation(text)
    tail = out[len(OMITTED) :] if len(text) > MAX_CONTEXT_CHARS else out
    assert len(tail) <= MAX_CONTEXT_CHARS
    assert text.endswith(tail)
    if len(text) > MAX_CONTEXT_CHARS and "\n" in text[-MAX_CONTEXT_CHARS - 1 : -1]:
        assert text[len(text) - len(tail) - 1] == "\n"


@settings(max_examples=60)
@given(st.one_of(st.none(), sessions.map(lambda s: json.dumps(clean_session({"session": s})))), instructions,
       st.integers(min_value=1, max_value=4))
def test_restore_then_save_round_trips_carry_the_context_once(stored: str | None, conversation: str, times: int) -> None:
    for _ in range(times):
        restored = restored_session(stored, conversation)
        if not restored:
            assert not stored and not conversation
            return
        update = json.loads(restored)
        if conversation:
            text = update["session"]["instructions"]
            assert text.endswith(MARKER + truncate_conversation(conversation))
            if MARKER not in conversation:
                assert text.count(MARKER) == 1
        stored = json.dumps(clean_session({"type": "session.updated", "session": update["session"]}))
        kept = json.loads(stored)["session"].get("instructions")
        assert not isinstance(kept, str) or MARKER not in kept
