"""Token usage: running totals in the provider's own shape, and its strict JSON form on the wire.

switchd adds each provider report into a `UsageTotals` (no per-report objects are kept) and
sends `to_json()`; switchdb reads it back with `UsageTotals.from_json`, which refuses anything
that is not a non-negative integer count.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

from common import fastjson
from common.errors import ErrorCode, SwitchError


def _count(value: object) -> int:
    # Provider reports are trusted but must never crash or credit the account.
    return value if type(value) is int and value > 0 else 0


def _seconds(value: object) -> float | None:
    """A finite, non-negative number of seconds as a float; None for anything else, an int too
    big for a float included (float() of it raises OverflowError)."""
    if type(value) is not int and type(value) is not float:
        return None
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except OverflowError:
        return None
    return seconds if 0 <= seconds < math.inf else None


_NO_DETAILS: dict[str, object] = {}


def _loads(text: str) -> object:
    """json.loads(text), same result and same refusals; raises INTERNAL_BAD_USAGE for what is not JSON."""
    try:
        return fastjson.loads(text)
    except (ValueError, RecursionError, TypeError):
        raise SwitchError(ErrorCode.INTERNAL_BAD_USAGE, "usage_json is not JSON") from None


def _read_strictly(data: dict[str, object]) -> tuple[list[int], float]:
    """(the counts in field order, then reports and total_tokens; seconds), or INTERNAL_BAD_USAGE naming the first bad part."""

    def count(obj: Mapping[str, object], key: str) -> int:
        value = obj.get(key, 0)
        if type(value) is not int or value < 0:
            raise SwitchError(ErrorCode.INTERNAL_BAD_USAGE, f"usage count {key} must be a non-negative integer")
        return value

    def details(key: str) -> Mapping[str, object]:
        value = data.get(key, {})
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise SwitchError(ErrorCode.INTERNAL_BAD_USAGE, f"usage {key} must be an object")
        return value

    inp, out = details("input_token_details"), details("output_token_details")
    seconds = _seconds(data.get("transcription_seconds", 0))
    if seconds is None:
        raise SwitchError(ErrorCode.INTERNAL_BAD_USAGE, "usage transcription_seconds must be a non-negative number")
    counts = [
        count(obj, key)
        for obj, key in (
            (data, "input_tokens"), (data, "output_tokens"), (inp, "text_tokens"), (inp, "audio_tokens"),
            (inp, "image_tokens"), (inp, "cached_tokens"), (out, "text_tokens"), (out, "audio_tokens"),
            (data, "transcription_tokens"), (data, "reports"), (data, "total_tokens"),
        )
    ]
    return counts, seconds


@dataclass(slots=True)
class UsageTotals:
    input_tokens: int = 0
    output_tokens: int = 0
    input_text: int = 0
    input_audio: int = 0
    input_image: int = 0
    input_cached: int = 0
    output_text: int = 0
    output_audio: int = 0
    transcription_tokens: int = 0
    transcription_seconds: float = 0.0
    reports: int = 0

    @property
    def tokens(self) -> int:
        """What a batch deducts: input + output + transcription."""
        return self.input_tokens + self.output_tokens + self.transcription_tokens

    def add_response(self, usage: Mapping[str, object]) -> int:
        """Add a `response.done` usage block; returns the tokens it deducts."""
        inp, out = _count(usage.get("input_tokens")), _count(usage.get("output_tokens"))
        self.input_tokens += inp
        self.output_tokens += out
        details = usage.get("input_token_details")
        if isinstance(details, Mapping):
            self.input_text += _count(details.get("text_tokens"))
            self.input_audio += _count(details.get("audio_tokens"))
            self.input_image += _count(details.get("image_tokens"))
            self.input_cached += _count(details.get("cached_tokens"))
        details = usage.get("output_token_details")
        if isinstance(details, Mapping):
            self.output_text += _count(details.get("text_tokens"))
            self.output_audio += _count(details.get("audio_tokens"))
        self.reports += 1
        return inp + out

    def add_transcription(self, usage: Mapping[str, object]) -> int:
        """Add an input-transcription usage block; a duration report is kept in seconds and deducts nothing."""
        self.reports += 1
        if usage.get("type") == "duration":
            self.transcription_seconds += _seconds(usage.get("seconds")) or 0.0
            return 0
        total = _count(usage.get("total_tokens"))
        if not total:
            total = _count(usage.get("input_tokens")) + _count(usage.get("output_tokens"))
        self.transcription_tokens += total
        return total

    def merge(self, other: UsageTotals) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def to_json(self) -> str:
        """The batch in the provider's usage shape (SPEC section 8)."""
        return json.dumps(
            {
                "input_tokens": self.input_tokens,
                "output_tokens": self.output_tokens,
                "total_tokens": self.tokens,
                "input_token_details": {
                    "text_tokens": self.input_text,
                    "audio_tokens": self.input_audio,
                    "image_tokens": self.input_image,
                    "cached_tokens": self.input_cached,
                },
                "output_token_details": {"text_tokens": self.output_text, "audio_tokens": self.output_audio},
                "transcription_tokens": self.transcription_tokens,
                "transcription_seconds": self.transcription_seconds,
                "reports": self.reports,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> UsageTotals:
        """Strict reading of a batch; raises INTERNAL_BAD_USAGE on anything but non-negative integer counts."""
        data = _loads(text)
        if not isinstance(data, dict):
            raise SwitchError(ErrorCode.INTERNAL_BAD_USAGE, "usage_json must be an object")
        get = data.get
        inp = get("input_token_details", _NO_DETAILS)
        out = get("output_token_details", _NO_DETAILS)
        seconds = _seconds(get("transcription_seconds", 0))
        # The common case (every part present and well-formed) in one pass; anything else (null
        # details, a bad count) is read by `_read_strictly`, which names the first bad part.
        if type(inp) is dict and type(out) is dict and seconds is not None:
            iget, oget = inp.get, out.get
            values = (
                get("input_tokens", 0), get("output_tokens", 0), iget("text_tokens", 0), iget("audio_tokens", 0),
                iget("image_tokens", 0), iget("cached_tokens", 0), oget("text_tokens", 0), oget("audio_tokens", 0),
                get("transcription_tokens", 0), get("reports", 0), get("total_tokens", 0),
            )
            for value in values:
                if type(value) is not int or value < 0:
                    break
            else:
                return cls(*values[:9], seconds, values[9])
        counts, seconds = _read_strictly(data)
        return cls(*counts[:9], seconds, counts[9])

    def as_dict(self) -> dict[str, int | float]:
        return asdict(self)
