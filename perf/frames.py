"""Realistic upstream (provider → switchd) frames for the metering benchmarks, and forged ones.

Shapes and sizes follow the protocol reference (sections 1.4, 1.5, 3): compact GA JSON with
`type` first, 21-character ids, audio deltas of 20–100 ms of 24 kHz PCM16, `response.done` of
~0.9–1.3 KB with the usage block before metadata. A conversation is a series of turns; each turn
yields the frames the provider sends for one user utterance and one spoken reply, so the mix's
weights (mostly audio) come from the traffic itself rather than from a hand-picked table.
Deterministic (seeded) so every method and every run sees the same frames.
"""
from __future__ import annotations

import base64
import json
import random
import string
from collections import Counter
from dataclasses import dataclass

SAMPLE_RATE = 24_000
BYTES_PER_MS = SAMPLE_RATE * 2 // 1000  # PCM16 mono
_ID_CHARS = string.ascii_letters + string.digits
WORDS = ("okay so the flight leaves at nine and you can check in online before that or at the desk "
         "sure I can help with that let me look up your booking one moment please thanks").split()


@dataclass(frozen=True, slots=True)
class Frame:
    kind: str  # the event type, for per-kind reporting
    text: str


def compact(event: dict) -> str:
    return json.dumps(event, separators=(",", ":"))


class _Ids:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def __call__(self, prefix: str) -> str:
        return prefix + "".join(self.rng.choice(_ID_CHARS) for _ in range(21))


def audio_b64(rng: random.Random, ms: int) -> str:
    # Random bytes: base64 of noise has the same length and character mix as real speech.
    return base64.b64encode(rng.randbytes(ms * BYTES_PER_MS)).decode()


def usage_block(rng: random.Random) -> dict:
    text_in, audio_in = rng.randint(80, 900), rng.randint(10, 400)
    cached = rng.choice((0, 64, 128, 256))
    text_out, audio_out = rng.randint(10, 80), rng.randint(40, 600)
    return {
        "total_tokens": text_in + audio_in + text_out + audio_out,
        "input_tokens": text_in + audio_in,
        "output_tokens": text_out + audio_out,
        "input_token_details": {
            "text_tokens": text_in, "audio_tokens": audio_in, "image_tokens": 0, "cached_tokens": cached,
            "cached_tokens_details": {"text_tokens": cached, "audio_tokens": 0, "image_tokens": 0},
        },
        "output_token_details": {"text_tokens": text_out, "audio_tokens": audio_out},
    }


def response_object(ids: _Ids, resp_id: str, conv_id: str, status: str, transcript: str | None,
                    usage: dict | None, metadata: dict | None) -> dict:
    output = [] if transcript is None else [{
        "id": ids("item_"), "type": "message", "status": "completed", "role": "assistant",
        "content": [{"type": "output_audio", "transcript": transcript}],
    }]
    return {
        "object": "realtime.response", "id": resp_id, "status": status, "status_details": None, "output": output,
        "conversation_id": conv_id, "output_modalities": ["audio"], "max_output_tokens": "inf",
        "audio": {"output": {"format": {"type": "audio/pcm", "rate": SAMPLE_RATE}, "voice": "alloy"}},
        "usage": usage, "metadata": metadata,
    }


def turn(rng: random.Random, ids: _Ids, conv_id: str) -> list[Frame]:
    """The provider's frames for one user utterance and one spoken reply, in order."""
    out: list[Frame] = []

    def add(event: dict) -> None:
        out.append(Frame(event["type"], compact(event)))

    user_item, resp_id, agent_item = ids("item_"), ids("resp_"), ids("item_")
    add({"type": "input_audio_buffer.speech_started", "event_id": ids("event_"), "audio_start_ms": 1000,
         "item_id": user_item})
    add({"type": "input_audio_buffer.speech_stopped", "event_id": ids("event_"), "audio_end_ms": 2000,
         "item_id": user_item})
    add({"type": "input_audio_buffer.committed", "event_id": ids("event_"), "previous_item_id": None,
         "item_id": user_item})
    user_words = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
    item = {"id": user_item, "type": "message", "status": "completed", "role": "user",
            "content": [{"type": "input_audio", "transcript": None}]}
    add({"type": "conversation.item.added", "event_id": ids("event_"), "previous_item_id": None, "item": item})
    add({"type": "conversation.item.done", "event_id": ids("event_"), "previous_item_id": None, "item": item})
    add({"type": "response.created", "event_id": ids("event_"),
         "response": response_object(ids, resp_id, conv_id, "in_progress", None, None, None)})
    for word in user_words[: rng.randint(2, 5)]:
        add({"type": "conversation.item.input_audio_transcription.delta", "event_id": ids("event_"),
             "item_id": user_item, "content_index": 0, "delta": word + " ", "obfuscation": "aLxx0jTEciOGe"})
    add({"type": "conversation.item.input_audio_transcription.completed", "event_id": ids("event_"),
         "item_id": user_item, "content_index": 0, "transcript": " ".join(user_words),
         "usage": {"type": "tokens", "total_tokens": 22, "input_tokens": 13,
                   "input_token_details": {"text_tokens": 0, "audio_tokens": 13}, "output_tokens": 9}})
    base = {"response_id": resp_id, "item_id": agent_item, "output_index": 0}
    agent_item_event = {"id": agent_item, "type": "message", "status": "in_progress", "role": "assistant",
                        "content": []}
    add({"type": "response.output_item.added", "event_id": ids("event_"), "response_id": resp_id,
         "output_index": 0, "item": agent_item_event})
    add({"type": "conversation.item.added", "event_id": ids("event_"), "previous_item_id": user_item,
         "item": agent_item_event})
    add({"type": "response.content_part.added", "event_id": ids("event_"), **base, "content_index": 0,
         "part": {"type": "output_audio", "transcript": ""}})
    # 2–8 s of speech in deltas of 20–100 ms; roughly one transcript word per ~300 ms of audio.
    reply_ms, spoken, words = rng.randint(2000, 8000), 0, []
    next_word_at = 0
    while spoken < reply_ms:
        if spoken >= next_word_at:
            word = rng.choice(WORDS)
            words.append(word)
            add({"type": "response.output_audio_transcript.delta", "event_id": ids("event_"), **base,
                 "content_index": 0, "delta": word + " "})
            next_word_at += rng.randint(200, 400)
        ms = rng.choice((20, 40, 50, 60, 80, 100))
        add({"type": "response.output_audio.delta", "event_id": ids("event_"), **base, "content_index": 0,
             "delta": audio_b64(rng, ms)})
        spoken += ms
    transcript = " ".join(words)
    add({"type": "response.output_audio.done", "event_id": ids("event_"), **base, "content_index": 0})
    add({"type": "response.output_audio_transcript.done", "event_id": ids("event_"), **base,
         "content_index": 0, "transcript": transcript})
    add({"type": "response.content_part.done", "event_id": ids("event_"), **base, "content_index": 0,
         "part": {"type": "output_audio", "transcript": transcript}})
    done_item = {**agent_item_event, "status": "completed",
                 "content": [{"type": "output_audio", "transcript": transcript}]}
    add({"type": "response.output_item.done", "event_id": ids("event_"), "response_id": resp_id,
         "output_index": 0, "item": done_item})
    add({"type": "conversation.item.done", "event_id": ids("event_"), "previous_item_id": user_item,
         "item": done_item})
    metadata = rng.choice((None, {"topic": "booking", "client_ref": ids("ref_")}))
    add({"type": "response.done", "event_id": ids("event_"),
         "response": response_object(ids, resp_id, conv_id, "completed", transcript, usage_block(rng), metadata)})
    add({"type": "rate_limits.updated", "event_id": ids("event_"),
         "rate_limits": [{"name": "tokens", "limit": 15_000_000, "remaining": rng.randint(10**6, 15 * 10**6),
                          "reset_seconds": 0.001}]})
    return out


def conversation(turns: int, seed: int = 1) -> list[Frame]:
    rng = random.Random(seed)
    ids = _Ids(rng)
    conv_id = ids("conv_")
    frames: list[Frame] = []
    for _ in range(turns):
        frames.extend(turn(rng, ids, conv_id))
    return frames


def mix_of(frames: list[Frame]) -> dict[str, dict[str, float]]:
    """Share of frames and average size per kind."""
    counts = Counter(f.kind for f in frames)
    sizes: Counter[str] = Counter()
    for f in frames:
        sizes[f.kind] += len(f.text)
    return {k: {"share": counts[k] / len(frames), "count": counts[k], "avg_bytes": sizes[k] / counts[k]}
            for k in sorted(counts, key=counts.__getitem__, reverse=True)}


def forged_frames() -> list[tuple[str, str, str]]:
    """(case, explanation, frame): client-chosen text that a byte scan mistakes for usage (reference 3.3)."""
    rng = random.Random(7)
    ids = _Ids(rng)
    conv = ids("conv_")
    usage = usage_block(rng)
    # 1. Metadata (client-chosen, echoed unescaped) ahead of usage: key order is not guaranteed.
    done = {"type": "response.done", "event_id": ids("event_"),
            "response": response_object(ids, ids("resp_"), conv, "completed", "Sure, one moment.", None,
                                        {"input_tokens": "0", "output_tokens": "0"})}
    # Re-insert metadata before usage, as a serializer with another key order would.
    resp = done["response"]
    resp.pop("usage")
    resp["usage"] = usage
    metadata_first = compact(done)
    # 2. A tool schema echoed by session.updated: an unknown JSON-Schema keyword holds
    #    `"type":"response.done"` and a numeric `"input_tokens"`; no usage is reported at all.
    tool = {"type": "function", "name": "lookup", "description": "Look up a booking",
            "parameters": {"type": "object", "properties": {"ref": {"type": "string"}},
                           "x-note": {"type": "response.done"}, "input_tokens": 5_000_000,
                           "output_tokens": 5_000_000}}
    session_updated = compact({"type": "session.updated", "event_id": ids("event_"),
                               "session": {"type": "realtime", "object": "realtime.session", "id": ids("sess_"),
                                           "model": "gpt-realtime", "tools": [tool]}})
    # 3. Whitespace drift: the same honest response.done, pretty-printed. Not forgery, but the
    #    byte pattern stops matching and the response goes unbilled.
    spaced = json.dumps(json.loads(metadata_first.replace('"input_tokens":"0","output_tokens":"0"', '"topic":"x"')))
    return [
        ("metadata before usage", "client metadata {'input_tokens':'0'} precedes the real usage block",
         metadata_first),
        ("tool schema in session.updated", "an echoed tool schema carries \"type\":\"response.done\" and "
         "\"input_tokens\":5000000", session_updated),
        ("whitespace drift", "an honest response.done written with ', ' and ': ' separators", spaced),
    ]
