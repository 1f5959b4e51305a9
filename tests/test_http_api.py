"""switchd.http_api: request routing, bodies of client_secrets and calls, and the responses. Pure."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import ErrorCode, SwitchError
from switchd import http_api as api
from switchd.ws_codec import parse_head

OFFER = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 96\r\n"


def multipart(parts: list[tuple[str, str, bytes]], boundary: str = "XyZ") -> tuple[str, bytes]:
    body = b""
    for name, ctype, data in parts:
        body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n"
                 f"Content-Type: {ctype}\r\n\r\n").encode() + data + b"\r\n"
    return f"multipart/form-data; boundary={boundary}", body + f"--{boundary}--\r\n".encode()


def refused(code: ErrorCode, fn, *args) -> str:
    with pytest.raises(SwitchError) as info:
        fn(*args)
    assert info.value.code == code, info.value
    return info.value.message


# --- routing --------------------------------------------------------------------------------------

def test_routes() -> None:
    assert api.route("POST /v1/realtime/client_secrets HTTP/1.1") == api.Target(api.Route.CLIENT_SECRETS)
    assert api.route("POST /v1/realtime/calls?x=1 HTTP/1.1") == api.Target(api.Route.CALLS)
    assert api.route("POST /v1/realtime/calls/rtc_u1_abc/hangup HTTP/1.1") == api.Target(api.Route.HANGUP, "rtc_u1_abc")
    assert api.route("OPTIONS /v1/realtime/calls HTTP/1.1") == api.Target(api.Route.PREFLIGHT)
    assert api.route("POST /v1/realtime/client_secrets/revoke HTTP/1.1") == api.Target(api.Route.REVOKE_SECRET)
    # Not ours: the WebSocket path judges them.
    assert api.route("GET /v1/realtime?rs_sessid=a HTTP/1.1") is None
    assert api.route("POST /v1/realtime/calls/../x/hangup HTTP/1.1") is None
    assert api.route("garbage") is None
    refused(ErrorCode.EXTERNAL_BAD_PARAMS, api.route, "GET /v1/realtime/client_secrets HTTP/1.1")


def test_body_length_and_bearer() -> None:
    assert api.body_length([(b"content-length", b"12")]) == 12
    assert api.body_length([]) == 0
    refused(ErrorCode.EXTERNAL_BAD_PARAMS, api.body_length, [(b"transfer-encoding", b"chunked")])
    refused(ErrorCode.EXTERNAL_BAD_PARAMS, api.body_length, [(b"content-length", b"1"), (b"content-length", b"2")])
    refused(ErrorCode.EXTERNAL_BAD_PARAMS, api.body_length, [(b"content-length", b"-1")])
    too_long = [(b"content-length", str(api.MAX_BODY + 1).encode())]
    refused(ErrorCode.EXTERNAL_PAYLOAD_TOO_LARGE, api.body_length, too_long)
    assert api.bearer_key([(b"authorization", b"Bearer ek_abc")]) == "ek_abc"
    refused(ErrorCode.EXTERNAL_INVALID_AUTH, api.bearer_key, [])
    refused(ErrorCode.EXTERNAL_INVALID_AUTH, api.bearer_key, [(b"authorization", b"Basic abc")])
    refused(ErrorCode.EXTERNAL_INVALID_AUTH, api.bearer_key, [(b"authorization", b"Bearer a b")])


# --- client_secrets bodies -----------------------------------------------------------------------

def test_secret_request_defaults_and_bounds() -> None:
    assert api.parse_secret_request(b"") == api.SecretRequest(600, None)
    assert api.parse_secret_request(b"{}") == api.SecretRequest(600, None)
    body = {"expires_after": {"anchor": "created_at", "seconds": 10},
            "session": {"type": "realtime", "model": "gpt-realtime", "instructions": "Be brief."}}
    parsed = api.parse_secret_request(json.dumps(body).encode())
    assert parsed.seconds == 10 and parsed.session == body["session"]
    assert api.parse_secret_request(b'{"expires_after":{"seconds":7200}}').seconds == 7200
    for bad in (b'{"expires_after":{"seconds":9}}', b'{"expires_after":{"seconds":7201}}',
                b'{"expires_after":{"seconds":60.5}}', b'{"expires_after":{"seconds":true}}',
                b'{"expires_after":{"anchor":"now","seconds":60}}', b'{"expires_after":{"x":1}}',
                b'{"session":{"model":"gpt-realtime"}}', b'{"session":{"type":"other"}}',
                b'{"session":{"type":"transcription","model":"x"}}', b'{"session":"x"}',
                b'{"session":{"type":"realtime","max_output_tokens":0}}',
                b'{"session":{"type":"realtime","audio":{"input":5}}}',
                b'{"other":1}', b"[]", b"{", b"\xff\xfe"):
        refused(ErrorCode.EXTERNAL_BAD_PARAMS, api.parse_secret_request, bad)


def test_transcription_secret() -> None:
    session = {"type": "transcription", "audio": {"input": {"transcription": {"model": "gpt-4o-mini-transcribe"}}}}
    assert api.parse_secret_request(json.dumps({"session": session}).encode()).session == session


# --- calls bodies --------------------------------------------------------------------------------

def test_raw_sdp_offer() -> None:
    assert api.parse_call_request("application/sdp", OFFER.encode()) == api.CallRequest(OFFER, None)
    assert api.parse_call_request("Application/SDP; charset=utf-8", OFFER.encode()).sdp == OFFER
    refused(ErrorCode.EXTERNAL_BAD_PARAMS, api.parse_call_request, "application/sdp", b"hello")
    refused(ErrorCode.EXTERNAL_BAD_PARAMS, api.parse_call_request, "application/json", OFFER.encode())
    refused(ErrorCode.EXTERNAL_PAYLOAD_TOO_LARGE, api.parse_call_request, "application/sdp",
            (OFFER + "a=x\r\n" * 30_000).encode())


def test_multipart_offer_with_session() -> None:
    session = {"type": "realtime", "model": "gpt-realtime", "id": "sess_1", "instructions": "Hi"}
    ctype, body = multipart([("sdp", "application/sdp", OFFER.encode()),
                             ("session", "application/json", json.dumps(session).encode())])
    parsed = api.parse_call_request(ctype, body)
    assert parsed.sdp == OFFER
    assert parsed.session == {"type": "realtime", "model": "gpt-realtime", "instructions": "Hi"}  # id stripped
    _, body = multipart([("sdp", "application/sdp", OFFER.encode())], boundary="b 1")
    assert api.parse_call_request('multipart/form-data; boundary="b 1"', body) == api.CallRequest(OFFER, None)


def test_multipart_refusals() -> None:
    ctype, body = multipart([("session", "application/json", b'{"type":"realtime"}')])
    refused(ErrorCode.EXTERNAL_MISSING_PARAMS, api.parse_call_request, ctype, body)
    ctype, body = multipart([("sdp", "application/sdp", OFFER.encode()), ("sdp", "application/sdp", OFFER.encode())])
    refused(ErrorCode.EXTERNAL_BAD_PARAMS, api.parse_call_request, ctype, body)
    ctype, body = multipart([("sdp", "application/sdp", OFFER.encode()), ("session", "application/json", b"{")])
    refused(ErrorCode.EXTERNAL_BAD_PARAMS, api.parse_call_request, ctype, body)
    ctype, body = multipart([("sdp", "application/sdp", OFFER.encode()), ("extra", "text/plain", b"x")])
    refused(ErrorCode.EXTERNAL_BAD_PARAMS, api.parse_call_request, ctype, body)
    refused(ErrorCode.EXTERNAL_BAD_PARAMS, api.parse_call_request, "multipart/form-data", body)
    refused(ErrorCode.EXTERNAL_BAD_PARAMS, api.parse_call_request, ctype, body[:-8])  # not closed


# --- arbitrary bodies: a clean 400 (or 413), never anything else ---------------------------------

_CLEAN = {ErrorCode.EXTERNAL_BAD_PARAMS, ErrorCode.EXTERNAL_MISSING_PARAMS, ErrorCode.EXTERNAL_PAYLOAD_TOO_LARGE}


def _only_clean_refusals(fn, *args) -> None:
    try:
        fn(*args)
    except SwitchError as exc:
        assert exc.code in _CLEAN
        response = api.error_response(exc)
        head, _, body = response.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 4")
        error = json.loads(body)["error"]
        assert error["code"] == exc.code.value and error["type"] == "invalid_request_error" and error["message"]


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=12)
_near_secret = st.fixed_dictionaries({}, optional={
    "expires_after": st.fixed_dictionaries({}, optional={
        "anchor": st.sampled_from(["created_at", "x"]) | _json_values,
        "seconds": st.integers(-5, 8000) | _json_values}) | _json_values,
    "session": st.fixed_dictionaries({}, optional={
        "type": st.sampled_from(["realtime", "transcription"]) | _json_values,
        "model": _json_values, "audio": _json_values,
                                                    "max_output_tokens": _json_values}) | _json_values,
})


@settings(max_examples=300)
@given(st.binary(max_size=300) | _json_values.map(lambda v: json.dumps(v).encode())
       | _near_secret.map(lambda v: json.dumps(v).encode()))
def test_secret_bodies_never_raise_but_400(body: bytes) -> None:
    _only_clean_refusals(api.parse_secret_request, body)


def test_revoke_request() -> None:
    assert api.parse_revoke_request(b'{"value": "ek_abc"}') == "ek_abc"
    for body in (b"", b"[]", b'{"value": "rsk_abc"}', b'{"value": "ek_"}', b'{"value": "ek_a", "x": 1}'):
        refused(ErrorCode.EXTERNAL_BAD_PARAMS, api.parse_revoke_request, body)


@settings(max_examples=300)
@given(st.binary(max_size=300) | _json_values.map(lambda v: json.dumps(v).encode())
       | st.dictionaries(st.sampled_from(["value", "x"]), st.text(max_size=300) | _json_values, max_size=2)
       .map(lambda v: json.dumps(v).encode()))
def test_revoke_bodies_never_raise_but_400(body: bytes) -> None:
    _only_clean_refusals(api.parse_revoke_request, body)


_parts = st.lists(st.tuples(st.sampled_from(["sdp", "session", "x", ""]),
                            st.sampled_from(["application/sdp", "application/json", "text/plain"]),
                            st.sampled_from([OFFER.encode(), b'{"type":"realtime"}', b"", b"--XyZ"])
                            | st.binary(max_size=40)),
                  max_size=4)


@settings(max_examples=300)
@given(st.sampled_from(["application/sdp", "multipart/form-data; boundary=XyZ", "multipart/form-data",
                        "multipart/form-data; boundary=", "text/plain", ""]) | st.text(max_size=40),
       st.binary(max_size=400) | _parts.map(lambda p: multipart(p)[1]))
def test_call_bodies_never_raise_but_400(content_type: str, body: bytes) -> None:
    _only_clean_refusals(api.parse_call_request, content_type, body)


@settings(max_examples=200)
@given(_parts, st.integers(0, 200), st.binary(max_size=8))
def test_mangled_multipart_never_raises_but_400(parts: list, cut: int, junk: bytes) -> None:
    ctype, body = multipart(parts)
    _only_clean_refusals(api.parse_call_request, ctype, body[:cut] + junk + body[cut:])


# --- responses -----------------------------------------------------------------------------------

def _split(response: bytes) -> tuple[str, dict[bytes, bytes], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    parsed = parse_head(head)
    return parsed.start, dict(parsed.headers), body


def test_responses() -> None:
    start, headers, body = _split(api.sdp_response("v=0\r\n", "rtc_u1_abc"))
    assert start == "HTTP/1.1 201 Created" and headers[b"location"] == b"/v1/realtime/calls/rtc_u1_abc"
    assert headers[b"content-type"] == b"application/sdp" and body == b"v=0\r\n"
    assert headers[b"access-control-expose-headers"] == b"Location"
    start, headers, body = _split(api.error_response(SwitchError(ErrorCode.EXTERNAL_NO_CREDITS, "no credits left")))
    assert start.startswith("HTTP/1.1 402") and int(headers[b"content-length"]) == len(body)
    assert json.loads(body) == {"error": {"message": "no credits left", "type": "insufficient_quota",
                                          "code": "EXTERNAL_NO_CREDITS", "param": None}}
    assert _split(api.error_response(SwitchError(ErrorCode.EXTERNAL_INVALID_AUTH)))[0].startswith("HTTP/1.1 401")
    assert _split(api.error_response(SwitchError(ErrorCode.INTERNAL_ERROR)))[0].startswith("HTTP/1.1 500")
    start, headers, _ = _split(api.preflight_response())
    assert start.startswith("HTTP/1.1 204") and b"Authorization" in headers[b"access-control-allow-headers"]
    assert _split(api.json_response(200, {"value": "ek_x"}))[2] == b'{"value":"ek_x"}'
    with pytest.raises(ValueError):
        api.sdp_response("v=0", "rtc_\r\nSet-Cookie: x")


def test_call_id_from_location() -> None:
    assert api.call_id_from_location("/v1/realtime/calls/rtc_u1_9c65") == "rtc_u1_9c65"
    assert api.call_id_from_location("https://api.openai.com/v1/realtime/calls/rtc_x?y=1") == "rtc_x"
    refused(ErrorCode.INTERNAL_UPSTREAM_REJECTED, api.call_id_from_location, "/v1/realtime/calls/")
