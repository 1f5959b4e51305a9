"""Amount limits and exact decimal text for money."""
from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.errors import ErrorCode, SwitchError
from common.limits import (
    LIMITS,
    MAX_BALANCE_USD,
    MAX_MARKUP,
    MAX_MINUTE_PRICE,
    MAX_TOKEN_PRICE,
    USD_SCALE,
    check_amount,
    format_decimal,
    format_usd,
    parse_decimal,
    parse_markup,
    parse_minute_price,
    parse_token_price,
    parse_usd,
)


@pytest.mark.parametrize("name", sorted(LIMITS))
def test_each_limit_at_its_maximum_and_one_past(name: str) -> None:
    low, high = LIMITS[name]
    assert check_amount(name, high) == high and check_amount(name, low) == low
    for bad in (high + 1, low - 1):
        with pytest.raises(SwitchError) as exc:
            check_amount(name, bad)
        assert exc.value.code == ErrorCode.EXTERNAL_BAD_PARAMS and name in exc.value.message
    assert check_amount(name, -high, signed=True) == -high
    with pytest.raises(SwitchError):
        check_amount(name, -high - 1, signed=True)


@pytest.mark.parametrize("value", [1.0, True, "1", None, Decimal(1)])
def test_only_integers_are_amounts(value: object) -> None:
    with pytest.raises(SwitchError) as exc:
        check_amount("balance_tokens", value)
    assert "integer" in exc.value.message


def test_the_probed_values_are_refused_with_a_clear_message() -> None:
    for value in (2**63 - 1, 2**63, 10**5000):
        with pytest.raises(SwitchError) as exc:
            check_amount("balance_tokens", value)
        assert "above its maximum" in exc.value.message and len(exc.value.message) < 200
    with pytest.raises(SwitchError) as exc:
        check_amount("report_tokens", 2**63 - 1, code=ErrorCode.INTERNAL_BAD_USAGE)
    assert exc.value.code == ErrorCode.INTERNAL_BAD_USAGE


def test_usd_text() -> None:
    assert parse_usd("0.0030344") == 3_034_400
    assert format_usd(3_034_400) == "0.0030344"
    assert parse_usd("25") == 25 * 10**9 and format_usd(25 * 10**9) == "25"
    assert format_usd(0) == "0" and format_usd(1) == "0.000000001" and format_usd(-1_500_000_000) == "-1.5"
    assert parse_usd("-10.5", signed=True) == -10_500_000_000 and parse_usd("+2", signed=True) == 2 * 10**9
    assert parse_usd("1.500000000000") == 1_500_000_000  # trailing zeros are not extra precision
    assert parse_usd("1000000000") == MAX_BALANCE_USD
    assert parse_token_price("0.40") == 400 and parse_token_price("1000") == MAX_TOKEN_PRICE
    assert parse_minute_price("0.017") == 17_000_000 and parse_minute_price("1000") == MAX_MINUTE_PRICE
    assert parse_markup("1.3") == 13_000 and parse_markup("10") == MAX_MARKUP


@pytest.mark.parametrize("text,fragment", [
    ("-1", "negative"), ("NaN", "decimal number"), ("nan", "decimal number"), ("Infinity", "decimal number"),
    ("1e3", "decimal number"), (" 1", "decimal number"), ("1,000", "decimal number"), ("", "decimal number"),
    ("0x10", "decimal number"), ("1.", "decimal number"), (".5", "decimal number"), ("١", "decimal number"),
    ("0.0000000001", "at most 9"), ("1000000000.000000001", "maximum"), ("1000000001", "maximum"),
    ("9" * 41, "decimal number"),
])
def test_bad_usd_text_is_refused(text: str, fragment: str) -> None:
    with pytest.raises(SwitchError) as exc:
        parse_usd(text, name="--usd")
    assert exc.value.code == ErrorCode.EXTERNAL_BAD_PARAMS
    assert fragment in exc.value.message and "--usd" in exc.value.message


def test_bad_prices_and_markups_are_refused() -> None:
    for parse, text in ((parse_token_price, "0.0625"), (parse_token_price, "1000.001"), (parse_minute_price, "-0.1"),
                        (parse_markup, "0"), (parse_markup, "10.0001"), (parse_markup, "1.00001")):
        with pytest.raises(SwitchError) as exc:
            parse(text)
        assert exc.value.code == ErrorCode.EXTERNAL_BAD_PARAMS
    with pytest.raises(SwitchError):
        parse_usd(None)  # type: ignore[arg-type]


@given(st.integers(min_value=-MAX_BALANCE_USD, max_value=MAX_BALANCE_USD))
def test_usd_text_round_trips(nano: int) -> None:
    text = format_usd(nano)
    assert parse_usd(text, signed=True) == nano
    assert Decimal(text) * 10**USD_SCALE == nano and "E" not in text


@given(st.integers(min_value=0, max_value=10**30), st.integers(min_value=0, max_value=12))
def test_decimal_text_round_trips_at_any_scale(units: int, scale: int) -> None:
    assert parse_decimal(format_decimal(units, scale), name="x", scale=scale, maximum=10**30) == units
