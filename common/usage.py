"""Token usage: running totals in the provider's own shape, and its strict JSON form on the wire.

switchd adds each provider report into a `UsageTotals` (no per-report objects are kept) and
sends `to_json()`; switchdb reads it back with `UsageTotals.from_json`, which refuses anything
that is not a non-negative integer count.

Beside the provider's own counts, the totals keep what an exact price needs (common/pricing.py):
cached input per modality, transcription tokens by type, transcribed audio in whole
milliseconds (integers add exactly; the float seconds do not), and the transcription model.
Each report is attributed as it is added, so every token it bills is in exactly one priced type
and the cost of a batch is the sum of its reports' costs:
- input or output the details leave unattributed is text (the provider's catch-all; reasoning
  tokens are reported inside output text), and cached tokens given without a per-modality split
  are taken from text, then image, then audio: the smallest discount first, so the bill is never
  below the provider's;
- transcription input beyond its text is audio, and a total above its parts is audio too.
The JSON carries these as extra keys written only when not zero, so a batch without them keeps
the original layout. A batch written before they existed reads them as 0; its price
(`common.pricing.breakdown`) attributes what they would have held by the same rules.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from decimal import Decimal

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
        seconds = float(value)
    except OverflowError:
        return None
    return seconds if 0 <= seconds < math.inf else None


def duration_ms(seconds: float) -> int:
    """Seconds as whole milliseconds, rounded up, from the float's shortest decimal form (0.1 → 100, not 101)."""
    return math.ceil(Decimal(repr(seconds)) * 1000) if seconds else 0


def attribute_cached(cached: int, text: int, image: int, audio: int) -> tuple[int, int, int]:
    """(text, audio, image) parts of a cached count that does not say its modalities."""
    in_text = min(cached, text)
    in_image = min(cached - in_text, image)
    return in_text, min(cached - in_text - in_image, audio), in_image


MAX_MODEL_NAME = 128
_NO_DETAILS: dict[str, object] = {}


def _loads(text: str) -> object:
    """json.loads(text), same result and same refusals; raises INTERNAL_BAD_USAGE for what is not JSON."""
    try:
        return fastjson.loads(text)
    except (ValueError, RecursionError, TypeError):
        raise SwitchError(ErrorCode.INTERNAL_BAD_USAGE, "usage_json is not JSON") from None


def _read_strictly(data: dict[str, object]) -> tuple[list[int], float]:
    """(the counts in field order, then reports and total_tokens; seconds), or INTERNAL_BAD_USAGE
    naming the first bad part."""

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
    input_cached_text: int = 0  # parts of input_cached, which is their sum
    input_cached_audio: int = 0
    input_cached_image: int = 0
    transcription_text: int = 0  # transcription tokens by type: input text, input audio, output
    transcription_audio: int = 0
    transcription_output: int = 0
    transcription_ms: int = 0  # each duration report rounded up to the millisecond
    transcription_model: str = ""  # what priced the transcription; "" when switchd did not learn it

    @property
    def tokens(self) -> int:
        """What a batch deducts: input + output + transcription."""
        return self.input_tokens + self.output_tokens + self.transcription_tokens

    def add_response(self, usage: Mapping[str, object]) -> int:
        """Add a `response.done` usage block; returns the tokens it deducts."""
        inp, out = _count(usage.get("input_tokens")), _count(usage.get("output_tokens"))
        self.input_tokens += inp
        self.output_tokens += out
        text = audio = image = cached = 0
        split: object = None
        details = usage.get("input_token_details")
        if isinstance(details, Mapping):
            text, audio = _count(details.get("text_tokens")), _count(details.get("audio_tokens"))
            image, cached = _count(details.get("image_tokens")), _count(details.get("cached_tokens"))
            split = details.get("cached_tokens_details")
        text += max(0, inp - text - audio - image)
        if isinstance(split, Mapping):
            cached_text = min(_count(split.get("text_tokens")), text)
            cached_audio = min(_count(split.get("audio_tokens")), audio)
            cached_image = min(_count(split.get("image_tokens")), image)
        else:
            cached_text, cached_audio, cached_image = attribute_cached(cached, text, image, audio)
        self.input_text += text
        self.input_audio += audio
        self.input_image += image
        self.input_cached += cached_text + cached_audio + cached_image
        self.input_cached_text += cached_text
        self.input_cached_audio += cached_audio
        self.input_cached_image += cached_image
        text = audio = 0
        details = usage.get("output_token_details")
        if isinstance(details, Mapping):
            text, audio = _count(details.get("text_tokens")), _count(details.get("audio_tokens"))
        self.output_text += text + max(0, out - text - audio)
        self.output_audio += audio
        self.reports += 1
        return inp + out

    def add_transcription(self, usage: Mapping[str, object]) -> int:
        """Add an input-transcription usage block; a duration report is kept in seconds and deducts nothing."""
        self.reports += 1
        if usage.get("type") == "duration":
            seconds = _seconds(usage.get("seconds")) or 0.0
            self.transcription_seconds += seconds
            self.transcription_ms += duration_ms(seconds)
            return 0
        inp, out = _count(usage.get("input_tokens")), _count(usage.get("output_tokens"))
        total = _count(usage.get("total_tokens")) or inp + out
        text = audio = 0
        details = usage.get("input_token_details")
        if isinstance(details, Mapping):
            text, audio = _count(details.get("text_tokens")), _count(details.get("audio_tokens"))
        audio = max(audio, inp - text)
        audio += max(0, total - text - audio - out)
        self.transcription_tokens += total
        self.transcription_text += text
        self.transcription_audio += audio
        self.transcription_output += out
        return total

    def merge(self, other: UsageTotals) -> None:
        for f in fields(self):
            if f.name != "transcription_model":
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        self.transcription_model = self.transcription_model or other.transcription_model

    def to_json(self) -> str:
        """The batch in the provider's usage shape (SPEC section 8), and the extra keys when not zero."""
        inp: dict[str, object] = {
            "text_tokens": self.input_text,
            "audio_tokens": self.input_audio,
            "image_tokens": self.input_image,
            "cached_tokens": self.input_cached,
        }
        if self.input_cached_text or self.input_cached_audio or self.input_cached_image:
            inp["cached_tokens_details"] = {
                "text_tokens": self.input_cached_text,
                "audio_tokens": self.input_cached_audio,
                "image_tokens": self.input_cached_image,
            }
        data: dict[str, object] = {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "total_tokens": self.tokens,
            "input_token_details": inp,
            "output_token_details": {"text_tokens": self.output_text, "audio_tokens": self.output_audio},
            "transcription_tokens": self.transcription_tokens,
            "transcription_seconds": self.transcription_seconds,
            "reports": self.reports,
        }
        if self.transcription_text or self.transcription_audio or self.transcription_output:
            data["transcription_token_details"] = {
                "text_tokens": self.transcription_text,
                "audio_tokens": self.transcription_audio,
                "output_tokens": self.transcription_output,
            }
        if self.transcription_ms:
            data["transcription_ms"] = self.transcription_ms
        if self.transcription_model:
            data["transcription_model"] = self.transcription_model
        return json.dumps(data, separators=(",", ":"))

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
                return _read_extra(cls(*values[:9], seconds, values[9]), data, inp)
        counts, seconds = _read_strictly(data)
        totals = cls(*counts[:9], seconds, counts[9])  # type: ignore[arg-type, call-arg]
        return _read_extra(totals, data, data.get("input_token_details"))

    def as_dict(self) -> dict[str, int | float | str]:
        return asdict(self)


def _read_extra(totals: UsageTotals, data: dict[str, object], inp: object) -> UsageTotals:
    """`totals` with the extra keys read strictly (absent: 0, as a batch written before they existed)."""

    def counts(obj: object, name: str, keys: tuple[str, ...]) -> tuple[int, int, int]:
        if obj is None:
            return (0, 0, 0)
        if type(obj) is not dict:
            raise SwitchError(ErrorCode.INTERNAL_BAD_USAGE, f"usage {name} must be an object")
        values = tuple(obj.get(key, 0) for key in keys)
        if any(type(value) is not int or value < 0 for value in values):
            raise SwitchError(ErrorCode.INTERNAL_BAD_USAGE, f"usage {name} counts must be non-negative integers")
        return values

    t = totals
    split = counts(inp.get("cached_tokens_details") if type(inp) is dict else None, "cached_tokens_details",
                   ("text_tokens", "audio_tokens", "image_tokens"))
    if split[0] > t.input_text or split[1] > t.input_audio or split[2] > t.input_image:
        raise SwitchError(ErrorCode.INTERNAL_BAD_USAGE, "usage cached_tokens_details exceed their modality's tokens")
    t.input_cached_text, t.input_cached_audio, t.input_cached_image = split
    t.transcription_text, t.transcription_audio, t.transcription_output = counts(
        data.get("transcription_token_details"), "transcription_token_details",
        ("text_tokens", "audio_tokens", "output_tokens"),
    )
    ms = data.get("transcription_ms", 0)
    if type(ms) is not int or ms < 0:
        raise SwitchError(ErrorCode.INTERNAL_BAD_USAGE, "usage transcription_ms must be a non-negative integer")
    t.transcription_ms = ms
    model = data.get("transcription_model", "")
    if type(model) is not str or len(model) > MAX_MODEL_NAME:
        raise SwitchError(
            ErrorCode.INTERNAL_BAD_USAGE,
            f"usage transcription_model must be text of at most {MAX_MODEL_NAME} characters",
        )
    t.transcription_model = model
    return t
