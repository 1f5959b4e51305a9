"""The provider events a benchmark peer sends besides audio: compact JSON, `type` first, like the provider.

Shared by perf.upstream (trio-websocket peer) and perf.engine (epoll peer), so both drive
switchd's metering path (response.done usage, transcript deltas) with the same bytes.
"""
from __future__ import annotations

import json

TRANSCRIPT = "Sure, I can help with that. Let me look up your booking, one moment please. " * 2
RATE_LIMITS = ('{"type":"rate_limits.updated","event_id":"event_perf_rate_limits","rate_limits":[{"name":"tokens",'
               '"limit":15000000,"remaining":14999716,"reset_seconds":0.001}]}')


def _dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


def session_created(n: int) -> str:
    return _dumps({"type": "session.created", "event_id": f"event_perf_created_{n:08d}",
                   "session": {"type": "realtime", "object": "realtime.session", "id": f"sess_perf{n:017d}",
                               "model": "gpt-realtime", "output_modalities": ["audio"]}})


def response_id(session: int, n: int) -> str:
    return f"resp_perf{session:08d}r{n:06d}"


def response_done(resp: str, n: int) -> str:
    # ~1 KB like the provider's: output item with transcript, usage block, then metadata.
    return _dumps({
        "type": "response.done", "event_id": f"event_perf_done_{n:010d}",
        "response": {
            "object": "realtime.response", "id": resp, "status": "completed", "status_details": None,
            "output": [{"id": f"item_{resp}", "type": "message", "status": "completed", "role": "assistant",
                        "content": [{"type": "output_audio", "transcript": TRANSCRIPT}]}],
            "conversation_id": "conv_perf000000000000000", "output_modalities": ["audio"],
            "max_output_tokens": "inf",
            "audio": {"output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "alloy"}},
            "usage": {"total_tokens": 253, "input_tokens": 132, "output_tokens": 121,
                      "input_token_details": {"text_tokens": 119, "audio_tokens": 13, "image_tokens": 0,
                                              "cached_tokens": 64, "cached_tokens_details": {
                                                  "text_tokens": 64, "audio_tokens": 0, "image_tokens": 0}},
                      "output_token_details": {"text_tokens": 30, "audio_tokens": 91}},
            "metadata": None,
        }})


def response_created(resp: str, n: int) -> str:
    return _dumps({"type": "response.created", "event_id": f"event_perf_created_{n:010d}",
                   "response": {"object": "realtime.response", "id": resp, "status": "in_progress",
                                "status_details": None, "output": [], "usage": None, "metadata": None}})


def transcript_delta(resp: str, n: int) -> str:
    return (f'{{"type":"response.output_audio_transcript.delta","event_id":"event_perf_t{n:010d}",'
            f'"response_id":"{resp}","item_id":"item_{resp}","output_index":0,"content_index":0,'
            f'"delta":"booking "}}')


def audio_delta_head(resp: str) -> str:
    """An audio delta with `%s` for the event_id and then the audio; `type` first, so switchd's fast path takes it."""
    return (f'{{"type":"response.output_audio.delta","event_id":"%s","response_id":"{resp}",'
            f'"item_id":"item_{resp}","output_index":0,"content_index":0,"delta":"%s"}}')
