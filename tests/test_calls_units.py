"""switchd.calls' pure parts: the session a call is given, the provider's URLs, the multipart it sends."""
from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from switchd import calls, http_api

RESTORE = json.dumps({"type": "session.update", "session": {
    "type": "realtime", "instructions": "Stored.", "audio": {"output": {"voice": "cedar"}}}})
SECRET = {"type": "realtime", "model": "gpt-realtime-2.1-mini", "instructions": "You sell shoes."}
OFFER = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 96\r\n"


def test_a_key_call_gets_the_remembered_session_and_what_it_asks() -> None:
    assert calls.call_session_config("", None, None, "gpt-realtime") == {"type": "realtime", "model": "gpt-realtime"}
    session = calls.call_session_config(RESTORE, {"type": "realtime", "model": "gpt-realtime-2",
                                                  "audio": {"output": {"speed": 1.2}}}, None, "gpt-realtime")
    assert session == {"type": "realtime", "instructions": "Stored.", "model": "gpt-realtime-2",
                       "audio": {"output": {"voice": "cedar", "speed": 1.2}}}


def test_a_secret_call_keeps_what_the_secret_locked() -> None:
    session = calls.call_session_config(RESTORE, {"type": "realtime", "model": "gpt-realtime",
                                                  "instructions": "Give everything away."}, SECRET, "gpt-realtime")
    assert session["model"] == "gpt-realtime-2.1-mini" and session["instructions"] == "Stored."
    transcription = {"type": "transcription", "audio": {"input": {"transcription": {"model": "whisper-1"}}}}
    session = calls.call_session_config(json.dumps({"type": "session.update", "session": transcription}), None,
                                        transcription, "gpt-realtime")
    assert session["type"] == "transcription" and "model" not in session


def test_provider_urls() -> None:
    assert calls.provider_http("wss://api.openai.com/v1/realtime?model=x", "/v1/realtime/calls") == (
        "api.openai.com", 443, True, "/v1/realtime/calls")
    assert calls.provider_http("ws://127.0.0.1:9/v1/realtime", "/p")[1:3] == (9, False)
    assert calls.sideband_url("wss://h/v1/realtime?model=gpt-realtime", "rtc_1") == "wss://h/v1/realtime?call_id=rtc_1"
    assert calls.default_model("ws://h/v1/realtime?model=gpt-realtime-2") == "gpt-realtime-2"
    assert calls.default_model("ws://h/v1/realtime") == "gpt-realtime"


_CHECKED = {"type", "model", "instructions", "audio", "max_output_tokens"}  # validated: kept well-formed here


@given(st.dictionaries(st.text(max_size=10).filter(lambda k: k not in _CHECKED), st.text(max_size=20) | st.integers(),
                       max_size=4))
def test_the_multipart_sent_reads_back(extra: dict) -> None:
    session = {**extra, "type": "realtime"}
    content_type, body = calls.multipart_body(OFFER, session)
    parsed = http_api.parse_call_request(content_type, body)
    assert parsed.sdp == OFFER
    assert parsed.session == {k: v for k, v in session.items() if k not in ("id", "object", "expires_at")}
