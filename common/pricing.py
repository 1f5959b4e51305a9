"""The price book (list prices per model and token type) and the exact cost of usage.

All integers (units in common/limits.py): token prices in milli-USD per 1M tokens, so n tokens
cost exactly n × price nano-USD; duration prices in nano-USD per minute; costs in nano-USD.
The one rounding is of transcribed minutes (a minute is 60,000 ms, and 3 divides no power of
ten): a batch's duration cost is rounded up to the nano-USD.

Cost follows the provider's own formula (protocol reference 3.4): cached tokens are part of the
input counts, so each modality's uncached part is its count minus its cached part, and each part
has its own price. Transcription is priced by the transcription model, per token or per minute.
"""
from __future__ import annotations

import datetime
import json
import logging
import re
from collections.abc import Mapping
from typing import Any

import attrs

from common.errors import ErrorCode, SwitchError
from common.limits import (
    MARKUP_SCALE,
    MAX_MINUTE_PRICE,
    MAX_TOKEN_PRICE,
    MINUTE_PRICE_SCALE,
    TOKEN_PRICE_SCALE,
    check_amount,
    format_decimal,
    parse_minute_price,
    parse_token_price,
)
from common.usage import MAX_MODEL_NAME, UsageTotals, attribute_cached, duration_ms

log = logging.getLogger(__name__)

TOKEN_TYPES = (
    "text_in", "cached_text_in", "text_out", "audio_in", "cached_audio_in", "audio_out", "image_in", "cached_image_in",
)
PRICE_TYPES = (*TOKEN_TYPES, "per_minute")
TRANSCRIPTION_TYPES = ("text_in", "audio_in", "text_out", "per_minute")
MS_PER_MINUTE = 60_000


def _price(maximum: int) -> Any:
    """An optional rate field: None, or an int from 0 to `maximum`."""

    def check(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if value is not None and (type(value) is not int or not 0 <= value <= maximum):
            raise SwitchError(
                ErrorCode.EXTERNAL_BAD_PARAMS, f"price {attribute.name} must be an integer from 0 to {maximum}"
            )

    return attrs.field(default=None, validator=check)


def _iso_date(_: object, attribute: attrs.Attribute[str], value: str) -> None:
    if value:
        try:
            datetime.date.fromisoformat(value)
        except ValueError:
            raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, f"{attribute.name} must be a date (YYYY-MM-DD)") from None


@attrs.frozen
class ModelPrices:
    """One model's list prices. None: the book has no such rate; a count of that type is then
    priced at the fallback model's rate and reported (`Priced.fallbacks`), never at zero."""

    text_in: int | None = _price(MAX_TOKEN_PRICE)  # milli-USD per 1M tokens
    cached_text_in: int | None = _price(MAX_TOKEN_PRICE)
    text_out: int | None = _price(MAX_TOKEN_PRICE)  # reasoning tokens are inside text out
    audio_in: int | None = _price(MAX_TOKEN_PRICE)
    cached_audio_in: int | None = _price(MAX_TOKEN_PRICE)
    audio_out: int | None = _price(MAX_TOKEN_PRICE)
    image_in: int | None = _price(MAX_TOKEN_PRICE)
    cached_image_in: int | None = _price(MAX_TOKEN_PRICE)
    per_minute: int | None = _price(MAX_MINUTE_PRICE)  # nano-USD per minute
    as_of: str = attrs.field(default="", validator=_iso_date)  # when these prices were read
    source: str = ""  # where they were read
    note: str = ""  # what is unverified or assumed

    def as_usd(self) -> dict[str, str | None]:
        """Each rate as USD decimal text (per 1M tokens; per minute for `per_minute`), None where absent."""
        return {
            name: None if (value := getattr(self, name)) is None
            else format_decimal(value, MINUTE_PRICE_SCALE if name == "per_minute" else TOKEN_PRICE_SCALE)
            for name in PRICE_TYPES
        }


@attrs.frozen
class Counts:
    """What one price entry multiplies: uncached and cached input per modality, output, audio minutes."""

    text_in: int = 0  # uncached
    cached_text_in: int = 0
    text_out: int = 0
    audio_in: int = 0  # uncached
    cached_audio_in: int = 0
    audio_out: int = 0
    image_in: int = 0  # uncached
    cached_image_in: int = 0
    audio_ms: int = 0  # transcribed audio billed by duration

    def __add__(self, other: Counts) -> Counts:
        return Counts(*(a + b for a, b in zip(attrs.astuple(self), attrs.astuple(other), strict=True)))

    def rates_used(self) -> tuple[str, ...]:
        """The price types these counts need: those whose count is not zero."""
        return tuple(rate for rate, n in zip(PRICE_TYPES, attrs.astuple(self), strict=True) if n)


def cost(counts: Counts, prices: ModelPrices) -> int:
    """The nano-USD `counts` cost at `prices`: Σ count × price, plus audio minutes × per-minute
    price rounded up. Raises SwitchError for a count beyond its maximum (INTERNAL_BAD_USAGE) or a
    non-zero count whose rate `prices` lacks (INTERNAL_BAD_CONFIG: fill it with `with_fallback`)."""
    total = 0
    for name in TOKEN_TYPES:
        n = check_amount("report_tokens", getattr(counts, name), code=ErrorCode.INTERNAL_BAD_USAGE)
        if n:
            total += n * _needed(prices, name)
    ms = check_amount("report_ms", counts.audio_ms, code=ErrorCode.INTERNAL_BAD_USAGE)
    if ms:
        total += -(-ms * _needed(prices, "per_minute") // MS_PER_MINUTE)
    return total


def _needed(prices: ModelPrices, name: str) -> int:
    rate = getattr(prices, name)
    if rate is None:
        raise SwitchError(ErrorCode.INTERNAL_BAD_CONFIG, f"no {name} price")
    return rate


def with_fallback(prices: ModelPrices, fallback: ModelPrices) -> ModelPrices:
    """`prices` with each absent rate taken from `fallback`."""
    return attrs.evolve(prices, **{
        name: getattr(fallback, name) for name in PRICE_TYPES if getattr(prices, name) is None
    })


def breakdown(totals: UsageTotals) -> tuple[Counts, Counts]:
    """(responses, transcription): the counts a batch is priced by, in the realtime model's and the
    transcription model's terms.

    Batches written before the per-modality keys existed (common/usage.py) are attributed here by
    the rules `UsageTotals.add_response` and `add_transcription` apply to each report; for a batch
    of reports added by those, every remainder below is zero and the result is linear in the
    reports. Raises INTERNAL_BAD_USAGE when a cached part exceeds its modality's count.
    """
    t = totals
    text, audio, image = t.input_text, t.input_audio, t.input_image
    text += max(0, t.input_tokens - text - audio - image)
    cached_text, cached_audio, cached_image = t.input_cached_text, t.input_cached_audio, t.input_cached_image
    rest = t.input_cached - cached_text - cached_audio - cached_image
    if cached_text > text or cached_audio > audio or cached_image > image:
        raise SwitchError(ErrorCode.INTERNAL_BAD_USAGE, "usage has more cached tokens than input tokens of their kind")
    if rest > 0:
        more = attribute_cached(rest, text - cached_text, image - cached_image, audio - cached_audio)
        cached_text, cached_audio, cached_image = cached_text + more[0], cached_audio + more[1], cached_image + more[2]
    responses = Counts(
        text_in=text - cached_text, cached_text_in=cached_text,
        text_out=t.output_text + max(0, t.output_tokens - t.output_text - t.output_audio),
        audio_in=audio - cached_audio, cached_audio_in=cached_audio, audio_out=t.output_audio,
        image_in=image - cached_image, cached_image_in=cached_image,
    )
    parts = t.transcription_text + t.transcription_audio + t.transcription_output
    transcription = Counts(
        text_in=t.transcription_text,
        audio_in=t.transcription_audio + max(0, t.transcription_tokens - parts),
        text_out=t.transcription_output,
        audio_ms=t.transcription_ms or duration_ms(t.transcription_seconds),
    )
    return responses, transcription


_SNAPSHOT = re.compile(r"(.+)-[0-9]{4}-[0-9]{2}-[0-9]{2}").fullmatch


def check_model_name(name: str) -> str:
    if not (isinstance(name, str) and 0 < len(name) <= MAX_MODEL_NAME and name.isprintable() and name.strip() == name):
        raise SwitchError(
            ErrorCode.EXTERNAL_BAD_PARAMS,
            f"a model name is 1 to {MAX_MODEL_NAME} printable characters, no outer spaces",
        )
    return name


def _copy(models: Mapping[str, ModelPrices]) -> dict[str, ModelPrices]:
    return dict(models)


@attrs.frozen
class PriceBook:
    """Prices by model name. A name the book lacks is priced as its model when it is a dated
    snapshot of one (`gpt-realtime-2025-08-28` → `gpt-realtime`), otherwise by a fallback model:
    `fallback` for responses, `transcription_fallback` for transcription. Each fallback must
    have every rate it may be asked for."""

    models: Mapping[str, ModelPrices] = attrs.field(converter=_copy)
    fallback: str = "gpt-realtime"
    transcription_fallback: str = "gpt-4o-transcribe"

    def __attrs_post_init__(self) -> None:
        for name in self.models:
            check_model_name(name)
        for name, needed in ((self.fallback, TOKEN_TYPES), (self.transcription_fallback, TRANSCRIPTION_TYPES)):
            prices = self.models.get(name)
            if prices is None:
                raise SwitchError(ErrorCode.INTERNAL_BAD_CONFIG, f"fallback model {name} is not in the price book")
            missing = [rate for rate in needed if getattr(prices, rate) is None]
            if missing:
                raise SwitchError(
                    ErrorCode.INTERNAL_BAD_CONFIG, f"fallback model {name} has no {', '.join(missing)} price"
                )

    def lookup(self, reported: str) -> tuple[str, ModelPrices] | None:
        """(the book's name, its prices) for a reported model name, or None when the book does not know it."""
        prices = self.models.get(reported)
        if prices is not None:
            return reported, prices
        snapshot = _SNAPSHOT(reported)
        if snapshot is not None and (prices := self.models.get(snapshot.group(1))) is not None:
            return snapshot.group(1), prices
        return None

    def resolve(
        self, reported: str, *, transcription: bool = False, needed: tuple[str, ...] | None = None
    ) -> tuple[str, ModelPrices, bool]:
        """(the name that prices `reported`, its prices with absent rates from the fallback, whether
        the fallback priced any of the `needed` rates: all of them for a model the book does not
        know). `needed` defaults to every rate of the kind (TOKEN_TYPES, or TRANSCRIPTION_TYPES)."""
        fallback = self.transcription_fallback if transcription else self.fallback
        found = self.lookup(reported)
        if found is None:
            return fallback, self.models[fallback], True
        name, prices = found
        if needed is None:
            needed = TRANSCRIPTION_TYPES if transcription else TOKEN_TYPES
        if all(getattr(prices, rate) is not None for rate in PRICE_TYPES):
            return name, prices, False
        filled = with_fallback(prices, self.models[fallback])
        return name, filled, any(getattr(prices, rate) is None for rate in needed)


@attrs.frozen
class Priced:
    """A batch's cost, what priced it, and the reported names a fallback priced (wholly or a rate)."""

    nano_usd: int
    model: str  # the book's entry for the responses ("" when there were none)
    transcription_model: str  # the book's entry for the transcription ("" when there was none)
    fallbacks: tuple[str, ...] = ()


def batch_cost(totals: UsageTotals, book: PriceBook, model: str) -> Priced:
    """The nano-USD cost of a batch of a session on `model` (transcription by `totals.transcription_model`).

    Raises SwitchError(INTERNAL_BAD_USAGE) for counts beyond their maxima or inconsistent cached counts.
    """
    responses, transcription = breakdown(totals)
    amount, names, fallbacks = 0, ["", ""], []
    for i, (counts, reported) in enumerate(((responses, model), (transcription, totals.transcription_model))):
        needed = counts.rates_used()
        if not needed:
            continue
        names[i], prices, fell_back = book.resolve(reported, transcription=bool(i), needed=needed)
        if fell_back:
            fallbacks.append(f"{reported or '(unknown transcription model)'} as {names[i]}")
        amount += cost(counts, prices)
    return Priced(amount, names[0], names[1], tuple(fallbacks))


def log_fallbacks(priced: Priced, seen: set[str]) -> None:
    """Warn once per process (per `seen`) for each model or rate a fallback priced."""
    for what in priced.fallbacks:
        if what not in seen:
            seen.add(what)
            log.warning("price book has no price for %s; priced by the fallback", what)


def charge(nano_usd: int, markup: int) -> int:
    """What an account pays for a cost at its markup (ten-thousandths), rounded up to the nano-USD."""
    check_amount("markup", markup)
    return -(-nano_usd * markup // 10**MARKUP_SCALE)


def transcription_model_of(session: Mapping[str, object]) -> str | None:
    """The input transcription model a `session.created`/`session.updated` session object names, if any."""
    audio = session.get("audio")
    inp = audio.get("input") if isinstance(audio, Mapping) else None
    config = inp.get("transcription") if isinstance(inp, Mapping) else None
    if not isinstance(config, Mapping):  # the beta shape
        config = session.get("input_audio_transcription")
    model = config.get("model") if isinstance(config, Mapping) else None
    return model if isinstance(model, str) and 0 < len(model) <= MAX_MODEL_NAME else None


# ---- The shipped book (operator changes it with `switchdb price set`) ----

_AS_OF = "2026-12-06"  # read from ../shared/reference/openai-realtime-webrtc-secrets-pricing.md §5
_DOCS = "https://developers.openai.com/api/docs/models/"


def _realtime(rates: str, source: str, note: str = "") -> ModelPrices:
    """`rates`: USD per 1M tokens in TOKEN_TYPES order, "-" for none."""
    values = [None if r == "-" else parse_token_price(r) for r in rates.split()]
    return ModelPrices(**dict(zip(TOKEN_TYPES, values, strict=True)), as_of=_AS_OF, source=source, note=note)


def _transcription(tokens: str, per_minute: str, source: str, note: str = "") -> ModelPrices:
    """`tokens`: USD per 1M tokens for text in, audio in, text out ("-" for none); `per_minute`: USD."""
    text_in, audio_in, text_out = (None if r == "-" else parse_token_price(r) for r in tokens.split())
    return ModelPrices(
        text_in=text_in, audio_in=audio_in, text_out=text_out, per_minute=parse_minute_price(per_minute),
        as_of=_AS_OF, source=source, note=note,
    )


# Realtime: text in, cached text in, text out, audio in, cached audio in, audio out, image in,
# cached image in, USD per 1M tokens. Transcription: text in, audio in, text out; then per minute.
DEFAULT_PRICES: dict[str, ModelPrices] = {
    "gpt-realtime": _realtime(
        "4 0.40 16 32 0.40 64 5 0.50",
        _DOCS + "compare?model=gpt-realtime ; audio: https://github.com/langwatch/langwatch/issues/7048",
        "text rates official; audio rates third-party (langwatch #7021, #7048, OpenAI cookbook PR #2258); "
        "image rates UNVERIFIED (as gpt-realtime-1.5)",
    ),
    "gpt-realtime-1.5": _realtime("4 0.40 16 32 0.40 64 5 0.50", _DOCS + "gpt-realtime-1.5"),
    "gpt-realtime-2": _realtime("4 0.40 24 32 0.40 64 5 0.50", _DOCS + "gpt-realtime-2"),
    "gpt-realtime-2.1": _realtime(
        "4 0.40 24 32 0.40 64 5 0.50", _DOCS + "gpt-realtime-2.1", "read from the zh/ja/ko model pages"
    ),
    "gpt-realtime-2.1-mini": _realtime("0.60 0.06 2.40 10 0.30 20 0.80 0.08", _DOCS + "gpt-realtime-2.1-mini"),
    "gpt-realtime-mini": _realtime(
        "0.60 0.06 2.40 10 0.30 20 0.80 0.08",
        _DOCS + "compare?model=gpt-realtime-mini ; audio: https://github.com/langwatch/langwatch/issues/7048",
        "text in official, audio in and cached audio third-party;"
        " the other rates UNVERIFIED (as gpt-realtime-2.1-mini)",
    ),
    "gpt-4o-mini-realtime-preview": _realtime(
        "0.60 0.30 2.40 10 0.30 20 - -", _DOCS + "gpt-4o-mini-realtime-preview", "no image input"
    ),
    "gpt-4o-transcribe": _transcription(
        "2.50 6.00 10.00", "0.006", _DOCS + "gpt-4o-transcribe",
        "text rates official; audio in and the per-minute rate third-party (the model page labels $2.5/$10 as audio)",
    ),
    "gpt-4o-mini-transcribe": _transcription(
        "1.25 3.00 5.00", "0.003", _DOCS + "compare?model=gpt-4o-mini-transcribe",
        "text rates official; audio in and the per-minute rate third-party",
    ),
    "whisper-1": _transcription("- - -", "0.006", _DOCS + "whisper-1", "third-party; per minute only"),
    "gpt-realtime-whisper": _transcription("- - -", "0.017", _DOCS + "gpt-realtime-whisper", "per minute only"),
    "gpt-live-transcribe": _transcription("- - -", "0.017", _DOCS + "gpt-live-transcribe", "per minute only"),
    "gpt-transcribe": _transcription("- - -", "0.0045", _DOCS + "gpt-transcribe", "per minute only"),
}


def default_book() -> PriceBook:
    return PriceBook(DEFAULT_PRICES)


def book_from_json(text: str) -> PriceBook:
    """`book_json`'s text as a PriceBook (what switchd does with it); raises SwitchError when malformed."""
    try:
        data = json.loads(text)
        models = {name: ModelPrices(**rates) for name, rates in data["models"].items()}
        return PriceBook(models, fallback=data["fallback"], transcription_fallback=data["transcription_fallback"])
    except (ValueError, KeyError, TypeError, AttributeError):
        raise SwitchError(ErrorCode.INTERNAL_MALFORMED_MESSAGE, "malformed price book") from None
