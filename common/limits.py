"""The largest amount each entry point accepts, and exact decimal text for money.

Every amount the switch stores is an integer in a fixed unit, and every one has a maximum,
chosen so that any sum the ledger makes of in-range amounts stays inside a signed 64-bit
column (SQLite INTEGER, PostgreSQL BIGINT): a batch at the largest counts and the highest
prices costs under 3e17 nano-USD, times the largest markup under 3e18, against 2**63 ≈ 9.2e18.

Units:
- money (costs, USD balances, top-ups): nano-USD, 1e-9 USD (`USD_SCALE` decimals);
- token prices: milli-USD per 1M tokens (`TOKEN_PRICE_SCALE` decimals of USD per 1M), so n
  tokens cost exactly n × price nano-USD;
- duration prices: nano-USD per minute;
- markup: ten-thousandths (1.3 → 13000).
"""
from __future__ import annotations

import re
from decimal import Decimal, localcontext

from common.errors import ErrorCode, SwitchError

USD_SCALE = 9
TOKEN_PRICE_SCALE = 3
MINUTE_PRICE_SCALE = 9
MARKUP_SCALE = 4

# Each limit is inclusive. A usage batch is several provider reports summed; no real report comes
# near these (a context is 128k tokens, a session 60 minutes).
MAX_REPORT_TOKENS = 10**10  # any one token count in a usage report or batch
MAX_REPORT_MS = 10**10  # transcribed audio in one usage report or batch, in milliseconds
MAX_BALANCE_TOKENS = 10**15  # a token balance, a top-up or an adjustment
MAX_BALANCE_USD = 10**9 * 10**USD_SCALE  # $1,000,000,000 as a balance, top-up, adjustment or cost
MAX_TOKEN_PRICE = 1000 * 10**TOKEN_PRICE_SCALE  # $1,000 per 1M tokens
MAX_MINUTE_PRICE = 1000 * 10**MINUTE_PRICE_SCALE  # $1,000 per minute
MAX_MARKUP = 10 * 10**MARKUP_SCALE  # ten times the list price
MIN_MARKUP = 1  # 0.0001: a markup of zero would make a money account free without saying so

# name → (smallest, largest) for `check_amount`; "signed" amounts (adjustments) also accept −largest.
LIMITS: dict[str, tuple[int, int]] = {
    "report_tokens": (0, MAX_REPORT_TOKENS),
    "report_ms": (0, MAX_REPORT_MS),
    "balance_tokens": (0, MAX_BALANCE_TOKENS),
    "balance_usd": (0, MAX_BALANCE_USD),
    "token_price": (0, MAX_TOKEN_PRICE),
    "minute_price": (0, MAX_MINUTE_PRICE),
    "markup": (MIN_MARKUP, MAX_MARKUP),
}


def check_amount(
    name: str, value: object, *, signed: bool = False, code: ErrorCode = ErrorCode.EXTERNAL_BAD_PARAMS
) -> int:
    """`value` when it is an int within the limit called `name` (−max..max when `signed`);
    otherwise SwitchError(code) saying which limit and why. `code` is INTERNAL_BAD_USAGE for
    switchd's usage batches, which no client typed."""
    low, high = LIMITS[name]
    if type(value) is not int:  # bool and float (the overflow that once reached SQLite) included
        raise SwitchError(code, f"{name} must be an integer, got {type(value).__name__}")
    if signed:
        low = -high
    if value < low:
        raise SwitchError(code, f"{name} {_short(value)} is below its minimum {low}")
    if value > high:
        raise SwitchError(code, f"{name} {_short(value)} is above its maximum {high}")
    return value


def _short(value: int) -> str:
    # A value of thousands of digits must not make a message of thousands of characters.
    return str(value) if value.bit_length() < 300 else f"{'-' if value < 0 else ''}(a {value.bit_length()}-bit number)"


# Plain decimal notation only: no exponent, no NaN or Infinity, no spaces, no thousands separators.
# 40 digits is far beyond any maximum, and keeps Decimal's work small.
_DECIMAL = re.compile(r"([+-]?)([0-9]{1,40})(?:\.([0-9]{1,40}))?").fullmatch


def parse_decimal(text: str, *, name: str, scale: int, maximum: int, signed: bool = False) -> int:
    """The integer number of 10**-scale units in decimal `text` ("0.0030344" at scale 9 → 3034400).

    Raises SwitchError(EXTERNAL_BAD_PARAMS) naming `name` for anything else: not plain decimal
    notation, negative (unless `signed`), more than `scale` decimals, beyond ±maximum units.
    """
    match = _DECIMAL(text) if isinstance(text, str) else None
    if match is None:
        raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, f"{name} must be a decimal number like 12.5, got {text!r:.60}")
    sign, _, fraction = match.groups()
    if sign == "-" and not signed:
        raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, f"{name} must not be negative")
    with localcontext() as ctx:
        ctx.prec = 100  # exact for 40 + 40 digits
        units = Decimal(text).scaleb(scale)
        if units != units.to_integral_value():
            raise SwitchError(
                ErrorCode.EXTERNAL_BAD_PARAMS,
                f"{name} has {len((fraction or '').rstrip('0'))} decimals; at most {scale}",
            )
        value = int(units)
    if abs(value) > maximum:
        raise SwitchError(
            ErrorCode.EXTERNAL_BAD_PARAMS, f"{name} {text} is beyond its maximum {format_decimal(maximum, scale)}"
        )
    return value


def format_decimal(units: int, scale: int) -> str:
    """`units` of 10**-scale as the shortest exact decimal text (3034400 at scale 9 → "0.0030344")."""
    with localcontext() as ctx:
        ctx.prec = max(100, len(str(abs(units))) + scale)
        text = format(Decimal(units).scaleb(-scale).normalize(), "f")
    return text


def parse_usd(text: str, *, name: str = "amount", signed: bool = False) -> int:
    """USD decimal text as nano-USD, at most $1e9 (or ±$1e9 when `signed`, for adjustments)."""
    return parse_decimal(text, name=name, scale=USD_SCALE, maximum=MAX_BALANCE_USD, signed=signed)


def format_usd(nano_usd: int) -> str:
    return format_decimal(nano_usd, USD_SCALE)


def parse_token_price(text: str, *, name: str = "price") -> int:
    """USD per 1M tokens as milli-USD per 1M tokens (at most 3 decimals, at most $1,000)."""
    return parse_decimal(text, name=name, scale=TOKEN_PRICE_SCALE, maximum=MAX_TOKEN_PRICE)


def parse_minute_price(text: str, *, name: str = "price per minute") -> int:
    """USD per minute as nano-USD per minute (at most 9 decimals, at most $1,000)."""
    return parse_decimal(text, name=name, scale=MINUTE_PRICE_SCALE, maximum=MAX_MINUTE_PRICE)


def parse_markup(text: str, *, name: str = "markup") -> int:
    """A price multiplier ("1.3") in ten-thousandths: from 0.0001 to 10."""
    value = parse_decimal(text, name=name, scale=MARKUP_SCALE, maximum=MAX_MARKUP)
    return check_amount("markup", value)
