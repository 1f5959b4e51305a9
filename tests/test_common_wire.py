"""The wire codec, the usage shape and the config loader: pure functions, fuzzed."""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.config import load_settings, read_env_file
from common.errors import ErrorCode, SwitchError
from common.usage import UsageTotals
from common.wire import (
    ARGUMENTS,
    MAX_MESSAGE_BYTES,
    MessageType,
    Request,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
)

texts = st.text(alphabet=st.characters(codec="utf-8"))  # every unicode scalar value, NUL and | included


@given(st.sampled_from(list(MessageType)), texts, st.data())
def test_request_round_trips_any_text(type: MessageType, request_id: str, data: st.DataObject) -> None:
    args = tuple(data.draw(texts) for _ in ARGUMENTS[type])
    request = decode_request(encode_request(request_id, type, *args))
    assert (request.request_id, request.type, request.args) == (request_id, type, args)


@given(texts, st.sampled_from(["OK", *ErrorCode]), st.lists(texts, max_size=5))
def test_reply_round_trips_any_text(request_id: str, status: str, fields: list[str]) -> None:
    reply = decode_reply(encode_reply(request_id, status, *fields))
    assert (reply.request_id, reply.status, reply.fields) == (request_id, status, tuple(fields))


@given(st.lists(st.binary(max_size=64), max_size=8))
def test_decode_request_never_crashes_on_garbage(frames: list[bytes]) -> None:
    try:
        decode_request(frames)
    except SwitchError as exc:
        assert exc.code in (ErrorCode.INTERNAL_MALFORMED_MESSAGE, ErrorCode.INTERNAL_UNKNOWN_TYPE)


def test_decode_request_errors_name_the_problem() -> None:
    with pytest.raises(SwitchError) as exc:
        decode_request([b"1", b"NOPE"])
    assert exc.value.code == ErrorCode.INTERNAL_UNKNOWN_TYPE
    with pytest.raises(SwitchError) as exc:
        decode_request([b"1", b"GET_CREDITS"])
    assert exc.value.code == ErrorCode.INTERNAL_MALFORMED_MESSAGE
    with pytest.raises(SwitchError) as exc:
        decode_request([b"1", b"GET_CREDITS", b"\xff\xfe"])
    assert "UTF-8" in exc.value.message
    with pytest.raises(SwitchError) as exc:
        decode_request([b"1", b"GET_CREDITS", b"x" * (MAX_MESSAGE_BYTES + 1)])
    assert "too large" in exc.value.message


counts = st.integers(min_value=0, max_value=10**12)


@given(st.lists(st.tuples(counts, counts, counts, counts, counts, counts), max_size=20), st.lists(counts, max_size=5))
def test_usage_totals_survive_the_wire(responses: list[tuple[int, ...]], transcriptions: list[int]) -> None:
    totals = UsageTotals()
    deducted = 0
    for it, ia, ot, oa, cached, image in responses:
        deducted += totals.add_response(
            {
                "input_tokens": it + ia + image,
                "output_tokens": ot + oa,
                "input_token_details": {"text_tokens": it, "audio_tokens": ia, "image_tokens": image, "cached_tokens": cached},
                "output_token_details": {"text_tokens": ot, "audio_tokens": oa},
            }
        )
    for t in transcriptions:
        deducted += totals.add_transcription({"type": "tokens", "total_tokens": t, "input_tokens": t})
    assert deducted == totals.tokens
    again = UsageTotals.from_json(totals.to_json())
    assert again == totals


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | texts,
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(texts, c, max_size=4), max_leaves=12))
def test_usage_blocks_of_any_shape_never_raise_or_credit(block: object) -> None:
    totals = UsageTotals()
    if isinstance(block, dict):
        assert totals.add_response(block) >= 0
        assert totals.add_transcription(block) >= 0
    assert totals.tokens >= 0


@pytest.mark.parametrize(
    "bad",
    [
        "not json",
        "[]",
        '{"input_tokens": -1}',
        '{"input_tokens": 1.5}',
        '{"input_tokens": "3"}',
        '{"input_tokens": true}',
        '{"input_token_details": {"audio_tokens": -4}}',
        '{"input_token_details": 7}',
        '{"transcription_tokens": 2.0}',
        '{"transcription_seconds": -1}',
        '{"transcription_seconds": 1' + "0" * 400 + '}',  # an int beyond any float
        '{"total_tokens": -5}',
    ],
)
def test_usage_json_is_strict(bad: str) -> None:
    with pytest.raises(SwitchError) as exc:
        UsageTotals.from_json(bad)
    assert exc.value.code == ErrorCode.INTERNAL_BAD_USAGE


def test_duration_transcription_deducts_nothing() -> None:
    totals = UsageTotals()
    assert totals.add_transcription({"type": "duration", "seconds": 2.5}) == 0
    assert totals.transcription_seconds == 2.5 and totals.tokens == 0
    assert json.loads(totals.to_json())["transcription_seconds"] == 2.5


def test_missing_required_key_names_it(tmp_path: Path) -> None:
    with pytest.raises(SwitchError) as exc:
        load_settings("switchdb", {"ZMQ_SOCKET_PATH": "ipc://x"}, tmp_path / ".env")
    assert exc.value.code == ErrorCode.INTERNAL_ENV_KEY_NOT_FOUND and "DB_PATH" in exc.value.message
    with pytest.raises(SwitchError) as exc:
        load_settings("switchd", {"ZMQ_SOCKET_PATH": "ipc://x"}, tmp_path / ".env")
    assert "OPENAI_API_KEY" in exc.value.message
    # A local simulator upstream needs no provider key.
    s = load_settings("switchd", {"ZMQ_SOCKET_PATH": "ipc://x", "UPSTREAM_URL": "ws://127.0.0.1:9/v1/realtime"}, tmp_path / ".env")
    assert s.openai_api_key is None


def test_env_file_loads_first_and_real_env_wins(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text('# comment\nexport DB_PATH="/from/file.db"\nZMQ_SOCKET_PATH=ipc://file\nPORT=4000\n')
    assert read_env_file(env_file)["DB_PATH"] == "/from/file.db"
    s = load_settings("switchdb", {"ZMQ_SOCKET_PATH": "ipc://real"}, env_file)
    assert (s.db_path, s.zmq_socket_path, s.port) == ("/from/file.db", "ipc://real", 4000)


def test_bad_numbers_and_secrets_in_repr(tmp_path: Path) -> None:
    with pytest.raises(SwitchError) as exc:
        load_settings("switchdb", {"ZMQ_SOCKET_PATH": "x", "DB_PATH": "y", "ZMQ_TIMEOUT_MS": "soon"}, tmp_path / ".env")
    assert exc.value.code == ErrorCode.INTERNAL_BAD_CONFIG and "ZMQ_TIMEOUT_MS" in exc.value.message
    for bad in ("-1", "0.5"):
        with pytest.raises(SwitchError) as exc:
            load_settings("switchd", {"ZMQ_SOCKET_PATH": "x", "OPENAI_API_KEY": "k", "WORKERS": bad}, tmp_path / ".env")
        assert exc.value.code == ErrorCode.INTERNAL_BAD_CONFIG and "WORKERS" in exc.value.message
    s = load_settings("switchd", {"ZMQ_SOCKET_PATH": "x", "OPENAI_API_KEY": "sk-secret-123"}, tmp_path / ".env")
    assert "sk-secret-123" not in repr(s)


def test_non_finite_duration_is_ignored() -> None:
    totals = UsageTotals()
    totals.add_transcription(json.loads('{"type":"duration","seconds":Infinity}'))
    totals.add_transcription({"type": "duration", "seconds": 10**400})  # float() of it would raise
    assert totals.transcription_seconds == 0 and UsageTotals.from_json(totals.to_json()) == totals


def _from_json_reference(text: str) -> UsageTotals:
    """UsageTotals.from_json as first written (json.loads, then each count checked in turn)."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        raise SwitchError(ErrorCode.INTERNAL_BAD_USAGE, "usage_json is not JSON") from None
    if not isinstance(data, dict):
        raise SwitchError(ErrorCode.INTERNAL_BAD_USAGE, "usage_json must be an object")

    def count(obj: dict, key: str) -> int:
        value = obj.get(key, 0)
        if type(value) is not int or value < 0:
            raise SwitchError(ErrorCode.INTERNAL_BAD_USAGE, f"usage count {key} must be a non-negative integer")
        return value

    def details(key: str) -> dict:
        value = data.get(key, {})
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise SwitchError(ErrorCode.INTERNAL_BAD_USAGE, f"usage {key} must be an object")
        return value

    inp, out = details("input_token_details"), details("output_token_details")
    seconds = data.get("transcription_seconds", 0)
    try:
        seconds = float(seconds) if type(seconds) in (int, float) else -1.0
    except OverflowError:  # an int beyond any float
        seconds = -1.0
    if not 0 <= seconds < math.inf:
        raise SwitchError(ErrorCode.INTERNAL_BAD_USAGE, "usage transcription_seconds must be a non-negative number")
    totals = UsageTotals(
        input_tokens=count(data, "input_tokens"), output_tokens=count(data, "output_tokens"),
        input_text=count(inp, "text_tokens"), input_audio=count(inp, "audio_tokens"),
        input_image=count(inp, "image_tokens"), input_cached=count(inp, "cached_tokens"),
        output_text=count(out, "text_tokens"), output_audio=count(out, "audio_tokens"),
        transcription_tokens=count(data, "transcription_tokens"), transcription_seconds=float(seconds),
        reports=count(data, "reports"),
    )
    count(data, "total_tokens")
    return totals


def _outcome(fn: Callable[[str], UsageTotals], text: str) -> object:
    try:
        return fn(text)
    except SwitchError as exc:
        return (exc.code, exc.message)


_counts = st.one_of(st.integers(min_value=-3, max_value=2**70), st.floats(allow_nan=True), st.booleans(), st.none(),
                    st.text(max_size=3))
_usage_objects = st.fixed_dictionaries({}, optional={
    "input_tokens": _counts, "output_tokens": _counts, "total_tokens": _counts, "transcription_tokens": _counts,
    "reports": _counts, "transcription_seconds": _counts,
    "input_token_details": st.one_of(st.none(), _counts, st.fixed_dictionaries({}, optional={
        k: _counts for k in ("text_tokens", "audio_tokens", "image_tokens", "cached_tokens")})),
    "output_token_details": st.one_of(st.none(), _counts, st.fixed_dictionaries({}, optional={
        k: _counts for k in ("text_tokens", "audio_tokens")})),
})


@given(_usage_objects, st.sampled_from(["", " ", "\n", "\ufeff", "x", "{}"]), st.booleans())
def test_usage_json_reading_matches_plain_json_loads(obj: dict, affix: str, before: bool) -> None:
    # from_json skips json.loads' wrappers when it can: same totals, same refusals, whatever the text.
    text = json.dumps(obj)
    for candidate in (text, affix + text if before else text + affix):
        assert _outcome(UsageTotals.from_json, candidate) == _outcome(_from_json_reference, candidate)


@given(st.text(max_size=40))
def test_usage_json_reading_matches_on_any_text(text: str) -> None:
    assert _outcome(UsageTotals.from_json, text) == _outcome(_from_json_reference, text)


def test_decode_request_takes_buffers_too() -> None:
    frames = encode_request("r1", MessageType.GET_CREDITS, "acct_é")
    assert decode_request([memoryview(f) for f in frames]) == decode_request(frames) == Request(
        "r1", MessageType.GET_CREDITS, ("acct_é",))


@given(st.one_of(st.text(), st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | texts,
                                         lambda c: st.lists(c, max_size=4) | st.dictionaries(texts, c, max_size=4),
                                         max_leaves=10).map(json.dumps)),
       st.sampled_from(["", " ", "\n"]))
def test_fastjson_is_json_loads(text: str, pad: str) -> None:
    from common import fastjson

    text = pad + text + pad
    try:
        expected = json.loads(text)
    except ValueError:
        with pytest.raises(ValueError):
            fastjson.loads(text)
    else:
        assert fastjson.loads(text) == expected
