"""What is in flight when a client leaves: pure tests of switchd.inflight."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from switchd.inflight import MAX_TRACKED, InFlight


def created(rid: str) -> dict:
    return {"type": "response.created", "response": {"id": rid}}


def done(rid: str) -> dict:
    return {"type": "response.done", "response": {"id": rid, "usage": {}}}


def test_a_response_is_in_flight_from_created_to_done() -> None:
    f = InFlight()
    assert f.settled
    f.observe(created("r1"))
    assert not f.settled
    f.observe(done("r1"))
    assert f.settled


def test_a_requested_response_is_owed_until_created_then_done() -> None:
    f = InFlight()
    f.requested()
    assert not f.settled
    f.observe(created("r1"))
    assert f.responses and not f.expected
    f.observe(done("r1"))
    assert f.settled


def test_committed_audio_owes_a_transcription_only_when_the_session_transcribes() -> None:
    f = InFlight()
    f.observe({"type": "input_audio_buffer.committed", "item_id": "i1"})
    assert f.settled
    f.observe({"type": "session.updated", "session": {"audio": {"input": {"transcription": {"model": "m"},
                                                                          "turn_detection": None}}}})
    f.observe({"type": "input_audio_buffer.committed", "item_id": "i2"})
    assert f.transcriptions == {"i2": None} and not f.expected
    f.observe({"type": "conversation.item.input_audio_transcription.failed", "item_id": "i2"})
    assert f.settled


def test_server_turn_detection_owes_a_response_per_commit_beta_shape_too() -> None:
    f = InFlight()
    f.observe({"type": "session.created", "session": {"turn_detection": {"type": "server_vad"},
                                                      "input_audio_transcription": {"model": "whisper-1"}}})
    f.observe({"type": "input_audio_buffer.committed", "item_id": "i1"})
    assert f.expected == 1 and "i1" in f.transcriptions
    f.observe({"type": "conversation.item.input_audio_transcription.completed", "item_id": "i1", "usage": {}})
    f.observe(created("r"))
    f.observe(done("r"))
    assert f.settled
    f.observe({"type": "session.updated", "session": {"turn_detection": {"type": "server_vad",
                                                                         "create_response": False}}})
    f.observe({"type": "input_audio_buffer.committed", "item_id": "i2"})
    assert f.settled  # no transcription, no automatic response


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)
kinds = st.sampled_from(["response.created", "response.done", "input_audio_buffer.committed",
                         "conversation.item.input_audio_transcription.completed",
                         "conversation.item.input_audio_transcription.failed",
                         "session.created", "session.updated", "error", "x"])


@settings(deadline=None)  # a loaded machine is not a failure
@given(st.lists(st.tuples(kinds, st.dictionaries(st.sampled_from(["response", "item_id", "session"]), json_values)),
                max_size=300), st.integers(0, 100))
def test_any_event_stream_never_raises_and_stays_bounded(events, requests) -> None:
    f = InFlight()
    for _ in range(requests):
        f.requested()
    for kind, body in events:
        f.observe({**body, "type": kind})
    assert len(f.responses) <= MAX_TRACKED and len(f.transcriptions) <= MAX_TRACKED
    assert 0 <= f.expected <= MAX_TRACKED


@given(st.lists(st.text(min_size=1, max_size=6), unique=True, max_size=40))
def test_every_response_done_settles_what_was_created(ids) -> None:
    f = InFlight()
    for rid in ids:
        f.observe(created(rid))
    for rid in reversed(ids):
        f.observe(done(rid))
    assert f.settled
