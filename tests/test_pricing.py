"""The price book and exact cost: against the provider's formula, additive, integer, bounded."""
from __future__ import annotations

import json
import logging
import math
from fractions import Fraction
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import ErrorCode, SwitchError
from common.limits import MAX_MINUTE_PRICE, MAX_REPORT_MS, MAX_REPORT_TOKENS, MAX_TOKEN_PRICE, format_usd
from common.pricing import (
    DEFAULT_PRICES,
    PRICE_TYPES,
    TOKEN_TYPES,
    Counts,
    ModelPrices,
    PriceBook,
    batch_cost,
    breakdown,
    charge,
    cost,
    default_book,
    log_fallbacks,
    transcription_model_of,
)
from common.usage import UsageTotals

BOOK = default_book()
NANO = 10**9
# The official GA response.done usage (protocol reference 1.3) and transcription usage.
GA_USAGE = {
    "total_tokens": 253, "input_tokens": 132, "output_tokens": 121,
    "input_token_details": {"text_tokens": 119, "audio_tokens": 13, "image_tokens": 0, "cached_tokens": 64,
                            "cached_tokens_details": {"text_tokens": 64, "audio_tokens": 0, "image_tokens": 0}},
    "output_token_details": {"text_tokens": 30, "audio_tokens": 91},
}
GA_TRANSCRIPTION = {"type": "tokens", "total_tokens": 22, "input_tokens": 13,
                    "input_token_details": {"text_tokens": 0, "audio_tokens": 13}, "output_tokens": 9}

small = st.integers(min_value=0, max_value=10**6)
rate = st.integers(min_value=0, max_value=MAX_TOKEN_PRICE)
prices_st = st.builds(
    ModelPrices, **{name: rate for name in TOKEN_TYPES}, per_minute=st.integers(min_value=0, max_value=MAX_MINUTE_PRICE)
)


# ---- A plain reading of the provider's formula (protocol reference 3.4, pricing reference 5) ----

def usd_per_token(price: int) -> Fraction:
    return Fraction(price, 1000 * 10**6)  # milli-USD per 1M tokens


@st.composite
def response_report(draw: st.DrawFn) -> dict[str, Any]:
    """A well-formed report: input = Σ modalities, each cached part within its modality. Without
    cached_tokens_details, the cached tokens are text (what the provider's text-first cache holds)."""
    text, audio, image, out_text, out_audio = (draw(small) for _ in range(5))
    details: dict[str, Any] = {"text_tokens": text, "audio_tokens": audio, "image_tokens": image}
    if draw(st.booleans()):
        split = {"text_tokens": draw(st.integers(0, text)), "audio_tokens": draw(st.integers(0, audio)),
                 "image_tokens": draw(st.integers(0, image))}
        details["cached_tokens"] = sum(split.values())
        details["cached_tokens_details"] = split
    else:
        details["cached_tokens"] = draw(st.integers(0, text))
    return {"input_tokens": text + audio + image, "output_tokens": out_text + out_audio,
            "total_tokens": text + audio + image + out_text + out_audio, "input_token_details": details,
            "output_token_details": {"text_tokens": out_text, "audio_tokens": out_audio}}


def reference_response_usd(usage: dict[str, Any], p: ModelPrices) -> Fraction:
    itd, otd = usage["input_token_details"], usage["output_token_details"]
    ctd = itd.get("cached_tokens_details", {"text_tokens": itd["cached_tokens"], "audio_tokens": 0, "image_tokens": 0})
    return sum((
        (itd["text_tokens"] - ctd["text_tokens"]) * usd_per_token(p.text_in),
        ctd["text_tokens"] * usd_per_token(p.cached_text_in),
        (itd["audio_tokens"] - ctd["audio_tokens"]) * usd_per_token(p.audio_in),
        ctd["audio_tokens"] * usd_per_token(p.cached_audio_in),
        (itd["image_tokens"] - ctd["image_tokens"]) * usd_per_token(p.image_in),
        ctd["image_tokens"] * usd_per_token(p.cached_image_in),
        otd["text_tokens"] * usd_per_token(p.text_out),
        otd["audio_tokens"] * usd_per_token(p.audio_out),
    ), Fraction(0))


transcription_report = st.one_of(
    st.builds(lambda t, a, o: {"type": "tokens", "total_tokens": t + a + o, "input_tokens": t + a,
                               "input_token_details": {"text_tokens": t, "audio_tokens": a}, "output_tokens": o},
              small, small, small),
    st.builds(lambda s: {"type": "duration", "seconds": s}, st.floats(min_value=0, max_value=3600)),
)


def reference_transcription_usd(reports: list[dict[str, Any]], p: ModelPrices) -> Fraction:
    usd, ms = Fraction(0), 0
    for r in reports:
        if r["type"] == "duration":
            ms += math.ceil(Fraction(repr(r["seconds"])) * 1000)  # each report to the whole millisecond, up
        else:
            details = r["input_token_details"]
            usd += details["text_tokens"] * usd_per_token(p.text_in)
            usd += details["audio_tokens"] * usd_per_token(p.audio_in) + r["output_tokens"] * usd_per_token(p.text_out)
    return usd + Fraction(ms * p.per_minute, 60_000 * NANO)


def book_with(realtime: ModelPrices, asr: ModelPrices) -> PriceBook:
    return PriceBook({"rt": realtime, "asr": asr}, fallback="rt", transcription_fallback="asr")


@settings(max_examples=300)
@given(st.lists(response_report(), max_size=8), st.lists(transcription_report, max_size=6), prices_st, prices_st)
def test_cost_agrees_with_the_providers_formula(
    responses: list[dict[str, Any]], transcriptions: list[dict[str, Any]], realtime: ModelPrices, asr: ModelPrices
) -> None:
    totals = UsageTotals(transcription_model="asr")
    for usage in responses:
        totals.add_response(usage)
    for usage in transcriptions:
        totals.add_transcription(usage)
    priced = batch_cost(totals, book_with(realtime, asr), "rt")
    tokens_usd = sum((reference_response_usd(u, realtime) for u in responses), Fraction(0))
    exact = (tokens_usd + reference_transcription_usd(transcriptions, asr)) * NANO
    assert priced.nano_usd == math.ceil(exact)  # exact to the nano-USD; only minutes can leave a fraction
    assert type(priced.nano_usd) is int and priced.fallbacks == ()
    # What switchdb reads back is priced the same.
    assert batch_cost(UsageTotals.from_json(totals.to_json()), book_with(realtime, asr), "rt") == priced


# ---- Additivity, on any reports at all ----

counts_any = st.one_of(st.integers(min_value=0, max_value=10**8), st.integers(min_value=-5, max_value=-1), st.none(),
                       st.floats(allow_nan=True), st.booleans(), st.text(max_size=2))
details_any = st.one_of(st.none(), counts_any, st.fixed_dictionaries({}, optional={
    "text_tokens": counts_any, "audio_tokens": counts_any, "image_tokens": counts_any, "cached_tokens": counts_any,
    "cached_tokens_details": st.one_of(st.none(), counts_any, st.fixed_dictionaries({}, optional={
        k: counts_any for k in ("text_tokens", "audio_tokens", "image_tokens")})),
}))
usage_any = st.fixed_dictionaries({}, optional={
    "type": st.sampled_from(["tokens", "duration", "other"]),
    "seconds": st.one_of(st.none(), st.booleans(), st.text(max_size=2), st.integers(-5, 10**5),
                         st.sampled_from([math.inf, math.nan]), st.floats(max_value=10**5)),
    "input_tokens": counts_any, "output_tokens": counts_any, "total_tokens": counts_any,
    "input_token_details": details_any,
    "output_token_details": st.one_of(st.none(), st.fixed_dictionaries({}, optional={
        "text_tokens": counts_any, "audio_tokens": counts_any, "reasoning_tokens": counts_any})),
})
report_any = st.tuples(st.booleans(), usage_any)  # (is a transcription, its usage block)


def totals_of(reports: list[tuple[bool, dict[str, Any]]]) -> UsageTotals:
    totals = UsageTotals(transcription_model="asr")
    for is_transcription, usage in reports:
        (totals.add_transcription if is_transcription else totals.add_response)(usage)
    return totals


def plus(a: tuple[Counts, Counts], b: tuple[Counts, Counts]) -> tuple[Counts, Counts]:
    return a[0] + b[0], a[1] + b[1]


@settings(max_examples=300)
@given(st.lists(report_any, max_size=12), st.integers(min_value=1, max_value=6), prices_st, prices_st)
def test_cost_is_additive_over_batches(
    reports: list[tuple[bool, dict[str, Any]]], size: int, realtime: ModelPrices, asr: ModelPrices
) -> None:
    """Malformed reports included: each is attributed as it is added, so a batch's counts are the
    sum of its reports' counts exactly (cached per modality too). The token cost is then exactly
    additive; the minutes' cost is rounded up once per batch, so split batches cost at most one
    nano-USD each more than one batch."""
    book = book_with(realtime, asr)
    whole = totals_of(reports)
    batches = [totals_of(reports[i : i + size]) for i in range(0, len(reports), size)]
    parts = [breakdown(b) for b in batches]
    summed = (Counts(), Counts())
    for part in parts:
        summed = plus(summed, part)
    assert breakdown(whole) == summed
    assert all(n >= 0 for counts in summed for n in attrs.astuple(counts))
    one = batch_cost(whole, book, "rt").nano_usd
    split = sum(batch_cost(b, book, "rt").nano_usd for b in batches)
    assert one >= 0 and 0 <= split - one < max(1, len(batches))
    if summed[1].audio_ms == 0:
        assert split == one
    tokens_only = attrs.evolve(summed[1], audio_ms=0)
    assert cost(summed[0], realtime) + cost(tokens_only, asr) == sum(
        cost(p[0], realtime) + cost(attrs.evolve(p[1], audio_ms=0), asr) for p in parts)


@given(st.lists(st.builds(Counts, *(st.integers(0, 10**9) for _ in PRICE_TYPES)), max_size=6), prices_st)
def test_cost_is_linear_in_counts(many: list[Counts], prices: ModelPrices) -> None:
    total = sum(many, Counts())
    assert 0 <= sum(cost(c, prices) for c in many) - cost(total, prices) < max(1, len(many))
    no_minutes = [attrs.evolve(c, audio_ms=0) for c in many]
    assert sum(cost(c, prices) for c in no_minutes) == cost(sum(no_minutes, Counts()), prices)


def test_cached_tokens_are_part_of_the_input_not_added_to_it() -> None:
    totals = UsageTotals()
    totals.add_response(GA_USAGE)
    responses, _ = breakdown(totals)
    assert responses == Counts(text_in=55, cached_text_in=64, audio_in=13, text_out=30, audio_out=91)
    # Cached audio is priced as cached audio, not as fresh audio (langwatch #7048).
    audio = dict(GA_USAGE, input_token_details={"text_tokens": 0, "audio_tokens": 100, "image_tokens": 0,
                                                "cached_tokens": 80, "cached_tokens_details": {"audio_tokens": 80}},
                 input_tokens=100, output_tokens=0, output_token_details={})
    totals = UsageTotals()
    totals.add_response(audio)
    assert breakdown(totals)[0] == Counts(audio_in=20, cached_audio_in=80)
    assert batch_cost(totals, BOOK, "gpt-realtime-mini").nano_usd == 20 * 10_000 + 80 * 300


def test_cached_without_details_is_text_then_image_then_audio() -> None:
    totals = UsageTotals()
    totals.add_response({"input_tokens": 30, "input_token_details": {"text_tokens": 10, "audio_tokens": 10,
                                                                     "image_tokens": 10, "cached_tokens": 25}})
    assert (totals.input_cached_text, totals.input_cached_image, totals.input_cached_audio) == (10, 10, 5)


def test_unattributed_tokens_are_text_and_reasoning_is_billed_once() -> None:
    totals = UsageTotals()
    # Reasoning inside the text count (the SDK's shape): billed once, at the text-out rate.
    totals.add_response({"input_tokens": 10, "output_tokens": 50,
                         "output_token_details": {"text_tokens": 40, "audio_tokens": 10, "reasoning_tokens": 30}})
    responses, _ = breakdown(totals)
    assert (responses.text_in, responses.text_out, responses.audio_out) == (10, 40, 10)
    # Output the details leave out (reasoning reported only in the total) is text out.
    totals.add_response({"output_tokens": 70, "output_token_details": {"text_tokens": 40, "audio_tokens": 10}})
    assert breakdown(totals)[0].text_out == 40 + 60


def test_transcription_split_and_remainders() -> None:
    totals = UsageTotals()
    assert totals.add_transcription(GA_TRANSCRIPTION) == 22
    assert (totals.transcription_text, totals.transcription_audio, totals.transcription_output) == (0, 13, 9)
    totals.add_transcription({"type": "tokens", "input_tokens": 5, "output_tokens": 1, "total_tokens": 10})
    assert totals.transcription_audio == 13 + 5 + 4  # input beyond its text, and the total beyond the parts
    assert (totals.transcription_output, totals.transcription_tokens) == (10, 32)


def test_batches_written_before_the_new_keys_are_priced_by_the_same_rules() -> None:
    legacy = json.dumps({
        "input_tokens": 132, "output_tokens": 121, "total_tokens": 275,
        "input_token_details": {"text_tokens": 119, "audio_tokens": 13, "image_tokens": 0, "cached_tokens": 64},
        "output_token_details": {"text_tokens": 30, "audio_tokens": 91},
        "transcription_tokens": 22, "transcription_seconds": 2.5, "reports": 3,
    })
    old = UsageTotals.from_json(legacy)
    assert (old.input_cached_text, old.transcription_audio, old.transcription_ms) == (0, 0, 0)  # read as written
    responses, transcription = breakdown(old)
    assert responses.cached_text_in == 64 and responses.text_in == 55
    assert transcription == Counts(audio_in=22, audio_ms=2500)
    new = UsageTotals(transcription_model="gpt-4o-mini-transcribe")
    new.add_response(dict(GA_USAGE, input_token_details={k: v for k, v in GA_USAGE["input_token_details"].items()
                                                          if k != "cached_tokens_details"}))
    assert breakdown(new)[0] == responses


# ---- The JSON switchd sends ----

@given(st.lists(report_any, max_size=8), st.text(max_size=20))
def test_usage_json_round_trips_the_new_fields(reports: list[tuple[bool, dict[str, Any]]], model: str) -> None:
    totals = totals_of(reports)
    totals.transcription_model = model
    assert UsageTotals.from_json(totals.to_json()) == totals


def test_usage_json_keeps_its_layout_when_the_new_fields_are_zero() -> None:
    totals = UsageTotals(input_tokens=5, input_text=5, output_tokens=1, output_text=1, reports=1)
    assert totals.to_json() == (
        '{"input_tokens":5,"output_tokens":1,"total_tokens":6,"input_token_details":{"text_tokens":5,"audio_tokens":0,'
        '"image_tokens":0,"cached_tokens":0},"output_token_details":{"text_tokens":1,"audio_tokens":0},'
        '"transcription_tokens":0,"transcription_seconds":0.0,"reports":1}'
    )


@pytest.mark.parametrize("bad", [
    '{"input_token_details":{"cached_tokens_details":{"text_tokens":1}}}',  # more cached text than text
    '{"input_token_details":{"text_tokens":1,"cached_tokens_details":{"text_tokens":-1}}}',
    '{"input_token_details":{"text_tokens":1,"cached_tokens_details":7}}',
    '{"transcription_token_details":{"audio_tokens":1.5}}',
    '{"transcription_token_details":[]}',
    '{"transcription_ms":-1}',
    '{"transcription_ms":2.5}',
    '{"transcription_model":7}',
    '{"transcription_model":"' + "m" * 129 + '"}',
])
def test_bad_new_usage_fields_are_refused(bad: str) -> None:
    with pytest.raises(SwitchError) as exc:
        UsageTotals.from_json(bad)
    assert exc.value.code == ErrorCode.INTERNAL_BAD_USAGE


def test_merge_adds_counts_and_keeps_the_model() -> None:
    a, b = UsageTotals(), UsageTotals(transcription_model="gpt-transcribe")
    a.add_response(GA_USAGE)
    b.add_transcription({"type": "duration", "seconds": 0.1})
    a.merge(b)
    assert (a.transcription_model, a.transcription_ms, a.input_cached_text, a.reports) == ("gpt-transcribe", 100, 64, 2)


# ---- Bounds ----

def test_every_count_at_its_maximum_prices_within_64_bits_and_one_past_is_refused() -> None:
    top = ModelPrices(**{name: MAX_TOKEN_PRICE for name in TOKEN_TYPES}, per_minute=MAX_MINUTE_PRICE)
    full = Counts(*[MAX_REPORT_TOKENS] * len(TOKEN_TYPES), audio_ms=MAX_REPORT_MS)
    most = cost(full, top)
    minutes = -(-MAX_REPORT_MS * MAX_MINUTE_PRICE // 60_000)
    assert most == len(TOKEN_TYPES) * MAX_REPORT_TOKENS * MAX_TOKEN_PRICE + minutes
    assert charge(most, 10 * 10**4) < 2**63
    for name in (*TOKEN_TYPES, "audio_ms"):
        limit = MAX_REPORT_MS if name == "audio_ms" else MAX_REPORT_TOKENS
        with pytest.raises(SwitchError) as exc:
            cost(attrs.evolve(full, **{name: limit + 1}), top)
        assert exc.value.code == ErrorCode.INTERNAL_BAD_USAGE and "maximum" in exc.value.message


def test_a_batch_beyond_the_maxima_is_refused_not_priced() -> None:
    totals = UsageTotals()
    totals.add_response({"input_tokens": MAX_REPORT_TOKENS, "input_token_details": {"audio_tokens": MAX_REPORT_TOKENS}})
    assert batch_cost(totals, BOOK, "gpt-realtime").nano_usd == MAX_REPORT_TOKENS * 32_000
    totals.add_response({"input_tokens": 1, "input_token_details": {"audio_tokens": 1}})
    with pytest.raises(SwitchError) as exc:
        batch_cost(totals, BOOK, "gpt-realtime")
    assert exc.value.code == ErrorCode.INTERNAL_BAD_USAGE


@pytest.mark.parametrize("field,value", [("text_in", -1), ("audio_out", MAX_TOKEN_PRICE + 1), ("text_out", 1.5),
                                         ("per_minute", MAX_MINUTE_PRICE + 1), ("cached_text_in", True)])
def test_prices_out_of_range_are_refused(field: str, value: object) -> None:
    with pytest.raises(SwitchError) as exc:
        ModelPrices(**{field: value})
    assert exc.value.code == ErrorCode.EXTERNAL_BAD_PARAMS and field in exc.value.message
    assert getattr(ModelPrices(**{field: MAX_MINUTE_PRICE if field == "per_minute" else MAX_TOKEN_PRICE}), field) > 0


def test_markup_charge_rounds_up_and_is_exact_at_one() -> None:
    assert charge(3_034_400, 10_000) == 3_034_400
    assert charge(3_034_400, 13_000) == 3_944_720
    assert charge(1, 13_000) == 2  # 1.3 nano-USD, rounded up
    for markup in (0, 10 * 10**4 + 1):
        with pytest.raises(SwitchError):
            charge(1, markup)


# ---- The price book ----

def test_default_book_ratio_the_issue_quotes() -> None:
    p = BOOK.models["gpt-realtime-2"]
    assert (p.audio_out, p.cached_text_in) == (64_000, 400)  # $64 and $0.40 per 1M
    assert p.audio_out // p.cached_text_in == 160 and p.audio_out % p.cached_text_in == 0


def test_default_book_worked_examples() -> None:
    totals = UsageTotals()
    totals.add_response(GA_USAGE)
    assert format_usd(batch_cost(totals, BOOK, "gpt-realtime-2").nano_usd) == "0.0072056"
    assert format_usd(batch_cost(totals, BOOK, "gpt-realtime-2.1-mini").nano_usd) == "0.00205884"
    assert format_usd(batch_cost(totals, BOOK, "gpt-realtime").nano_usd) == "0.0069656"


def test_a_dated_snapshot_is_priced_as_its_model() -> None:
    totals = UsageTotals()
    totals.add_response(GA_USAGE)
    priced = batch_cost(totals, BOOK, "gpt-realtime-2025-08-28")
    assert (priced.model, priced.fallbacks) == ("gpt-realtime", ())
    assert priced == attrs.evolve(batch_cost(totals, BOOK, "gpt-realtime"))
    assert batch_cost(totals, BOOK, "gpt-realtime-mini-2025-12-15").model == "gpt-realtime-mini"
    assert BOOK.lookup("gpt-realtime-2025-8-28") is None and BOOK.lookup("2025-08-28") is None


def test_an_unknown_model_is_priced_by_the_fallback_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    totals = UsageTotals()
    totals.add_response(GA_USAGE)
    priced = batch_cost(totals, BOOK, "gpt-realtime-9")
    assert priced.nano_usd == batch_cost(totals, BOOK, "gpt-realtime").nano_usd > 0
    assert priced.model == "gpt-realtime" and priced.fallbacks == ("gpt-realtime-9 as gpt-realtime",)
    other = PriceBook(DEFAULT_PRICES, fallback="gpt-realtime-2")
    assert batch_cost(totals, other, "gpt-realtime-9").nano_usd == batch_cost(totals, BOOK, "gpt-realtime-2").nano_usd
    seen: set[str] = set()
    with caplog.at_level(logging.WARNING, logger="common.pricing"):
        for _ in range(3):
            log_fallbacks(priced, seen)
    assert [r.getMessage() for r in caplog.records] == [
        "price book has no price for gpt-realtime-9 as gpt-realtime; priced by the fallback"]


def test_transcription_per_minute_on_duration_reports() -> None:
    totals = UsageTotals(transcription_model="gpt-realtime-whisper")
    assert totals.add_transcription({"type": "duration", "seconds": 60}) == 0
    priced = batch_cost(totals, BOOK, "gpt-realtime")
    assert (priced.nano_usd, priced.transcription_model, priced.fallbacks) == (17_000_000, "gpt-realtime-whisper", ())
    totals.add_transcription({"type": "duration", "seconds": 0.1})  # 100 ms of $0.017/min: 28,333.3 nano-USD
    assert batch_cost(totals, BOOK, "gpt-realtime").nano_usd == 17_000_000 + 28_334
    gpt_transcribe = UsageTotals(transcription_model="gpt-transcribe")
    gpt_transcribe.add_transcription({"type": "duration", "seconds": 120})
    assert format_usd(batch_cost(gpt_transcribe, BOOK, "gpt-realtime").nano_usd) == "0.009"


def test_transcription_tokens_priced_by_the_asr_model() -> None:
    totals = UsageTotals(transcription_model="gpt-4o-mini-transcribe")
    totals.add_transcription(GA_TRANSCRIPTION)
    priced = batch_cost(totals, BOOK, "gpt-realtime")
    assert priced.nano_usd == 13 * 3_000 + 9 * 5_000 and priced.model == ""  # no response in the batch
    # A per-minute model sending token reports: its token rates come from the transcription fallback, said so.
    totals.transcription_model = "gpt-live-transcribe"
    priced = batch_cost(totals, BOOK, "gpt-realtime")
    assert priced.nano_usd == 13 * 6_000 + 9 * 10_000
    assert priced.fallbacks == ("gpt-live-transcribe as gpt-live-transcribe",)
    # switchd did not learn the model: the transcription fallback, said so; never zero.
    totals.transcription_model = ""
    assert batch_cost(totals, BOOK, "gpt-realtime").fallbacks == ("(unknown transcription model) as gpt-4o-transcribe",)


def test_every_shipped_entry_is_dated_and_sourced() -> None:
    for name, prices in DEFAULT_PRICES.items():
        assert prices.as_of and prices.source.startswith("https://"), name
    assert DEFAULT_PRICES["gpt-realtime"].as_usd()["text_out"] == "16"
    assert DEFAULT_PRICES["gpt-transcribe"].as_usd()["per_minute"] == "0.0045"


@pytest.mark.parametrize("kwargs,message", [
    ({"fallback": "missing"}, "not in the price book"),
    ({"transcription_fallback": "gpt-realtime"}, "per_minute"),
    ({"fallback": "gpt-4o-mini-realtime-preview"}, "image_in"),
])
def test_a_book_whose_fallback_cannot_price_everything_is_refused(kwargs: dict[str, str], message: str) -> None:
    with pytest.raises(SwitchError) as exc:
        PriceBook(DEFAULT_PRICES, **kwargs)
    assert exc.value.code == ErrorCode.INTERNAL_BAD_CONFIG and message in exc.value.message


def test_bad_model_names_and_dates_are_refused() -> None:
    for name in ("", " gpt", "x" * 129, "a\nb"):
        with pytest.raises(SwitchError):
            PriceBook({**DEFAULT_PRICES, name: ModelPrices()})
    with pytest.raises(SwitchError):
        ModelPrices(as_of="yesterday")


def test_transcription_model_of_session_objects() -> None:
    ga = {"type": "realtime", "audio": {"input": {"transcription": {"model": "gpt-4o-mini-transcribe"}}}}
    assert transcription_model_of(ga) == "gpt-4o-mini-transcribe"
    assert transcription_model_of({"input_audio_transcription": {"model": "whisper-1"}}) == "whisper-1"
    for session in ({}, {"audio": {"input": {"transcription": None}}}, {"audio": 3},
                    {"audio": {"input": {"transcription": {"model": 5}}}}):
        assert transcription_model_of(session) is None
