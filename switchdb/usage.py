"""Usage batches and the credits they deduct.

Credits are tokens: balance = token_remaining (the plan's) + topup_remaining. A batch takes
from the top-up first, then from the plan tokens, which may go negative (a session is cut off
by switchd at zero, but what was already spent is still billed).
"""
from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

from common.errors import ErrorCode, SwitchError
from common.limits import MAX_REPORT_MS, MAX_REPORT_TOKENS
from common.pricing import TOKEN_TYPES, batch_cost, charge, log_fallbacks
from common.usage import UsageTotals, duration_ms
from switchdb import prices
from switchdb.db import Connection, is_postgres

# Approximate list prices in USD per 1M tokens (gpt-realtime, as published when this was
# written). Used only for the operator's `usage` report, never for billing: credits are tokens.
PRICES_PER_MILLION = {
    "input_text": 4.00,
    "input_audio": 32.00,
    "input_image": 5.00,
    "input_cached": 0.40,
    "output_text": 16.00,
    "output_audio": 64.00,
    "transcription": 2.50,
}


@dataclass(frozen=True, slots=True)
class UsageSummary:
    account_id: str
    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    batches: int = 0
    input_text: int = 0
    input_audio: int = 0
    input_image: int = 0
    input_cached: int = 0
    output_text: int = 0
    output_audio: int = 0
    transcription: int = 0
    transcription_seconds: float = 0.0

    def as_json(self) -> dict[str, object]:
        return {
            "account_id": self.account_id,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "total_tokens": self.total_tokens,
            "batches": self.batches,
            "breakdown": {
                "input_text": self.input_text,
                "input_audio": self.input_audio,
                "input_image": self.input_image,
                "input_cached": self.input_cached,
                "output_text": self.output_text,
                "output_audio": self.output_audio,
                "transcription": self.transcription,
            },
            "cost_usd": cost_usd(self),
        }


def cost_usd(s: UsageSummary) -> float:
    """Approximate cost at list prices.

    The provider counts cached tokens inside the text/audio input counts without saying which;
    they are taken from text first (the usual case: cached instructions), then audio.
    """
    cached_text = min(s.input_cached, s.input_text)
    cached_audio = min(s.input_cached - cached_text, s.input_audio)
    per_million = (
        (s.input_text - cached_text) * PRICES_PER_MILLION["input_text"]
        + (s.input_audio - cached_audio) * PRICES_PER_MILLION["input_audio"]
        + s.input_image * PRICES_PER_MILLION["input_image"]
        + (cached_text + cached_audio) * PRICES_PER_MILLION["input_cached"]
        + s.output_text * PRICES_PER_MILLION["output_text"]
        + s.output_audio * PRICES_PER_MILLION["output_audio"]
        + s.transcription * PRICES_PER_MILLION["transcription"]
    )
    return round(per_million / 1_000_000, 6)


def get_credits(conn: Connection, account_id: str) -> int:
    row = conn.execute(
        "SELECT token_remaining + topup_remaining FROM accounts WHERE id = ?", (account_id,)
    ).fetchone()
    if row is None:
        raise SwitchError(ErrorCode.EXTERNAL_NOT_FOUND, f"no account {account_id}")
    return int(row[0])


# One RECORD_USAGE as its usage_metrics row, without created_at (bound once per statement) nor
# its cost (priced in the transaction, by the book it reads): the columns of BASE_COLUMNS in
# order, and only when the batch holds what those columns cannot (per-modality cached tokens,
# transcription details and model) its UsageTotals after them. A plain tuple: the reader makes
# one per request, tens of thousands a second.
Row = tuple[str, str, str, str, str, int, int, int, int, int, int, int, int, int, float, int, int]
# A row whose batch holds more than its columns: the same, and the batch's UsageTotals last.
DetailedRow = tuple[str, str, str, str, str, int, int, int, int, int, int, int, int, int, float, int, int, UsageTotals]
# Final: mypy then knows each index's type in a Row.
BATCH_ID: Final = 0
ACCOUNT_ID: Final = 1
MODEL: Final = 4
TOKENS: Final = 16
EXTRA: Final = 17

# SQLite integers are 64-bit; a larger count could not be stored (nor deducted) exactly.
MAX_COUNT = 2**63 - 1

BASE_COLUMNS = (
    "batch_id, account_id, session_id, provider, model, input_tokens, output_tokens, transcription_tokens,"
    " input_text, input_audio, input_image, input_cached, output_text, output_audio, transcription_seconds,"
    " reports, total_tokens"
)
_COLUMNS = BASE_COLUMNS + ", cost_nano, charged_nano, created_at"
_ROW_WIDTH = 19  # parameters per row (the row's 17, cost, charged); created_at is ?1, shared by every row


def _values(rows: int) -> str:
    return ", ".join(
        "(" + ", ".join(f"?{2 + r * _ROW_WIDTH + c}" for c in range(_ROW_WIDTH)) + ", ?1)" for r in range(rows)
    )


# Rows are inserted by multi-row statements of at most INSERT_ROWS rows (the last one of a batch
# has exactly the rows left; at most INSERT_ROWS statements to prepare, all cached). Each binds
# its rows in one C call and runs in one SQLite step without the GIL: executemany would take the
# GIL back for every row, and each time wait for the event loop to let go of it. Bigger
# statements would hold the GIL longer while binding (about 3 µs a row).
INSERT_ROWS = 64


@functools.cache
def _insert(rows: int) -> str:
    return f"INSERT INTO usage_metrics ({_COLUMNS}) VALUES {_values(rows)}"


# SQLite evaluates every SET expression on the old row: both use the top-up before this deduction.
_DEDUCT = (
    "UPDATE accounts SET topup_remaining = topup_remaining - min(max(topup_remaining, 0), :tokens),"
    " token_remaining = token_remaining - (:tokens - min(max(topup_remaining, 0), :tokens)),"
    " updated_at = :now WHERE id = :account RETURNING token_remaining + topup_remaining"
)
# The balances of the accounts named and the batch ids already stored, in one statement (each
# statement run is a GIL hand-off between the worker thread and the event loop) with one cached
# prepared statement for any number of ids: JSON array parameters.
_LOOKUP = (
    "SELECT id, token_remaining + topup_remaining, markup, unit FROM accounts"
    " WHERE id IN (SELECT value FROM json_each(?1)) UNION ALL"
    " SELECT batch_id, NULL, NULL, NULL FROM usage_metrics WHERE batch_id IN (SELECT value FROM json_each(?2))"
)


# switchd always writes usage_json in one layout (`UsageTotals.to_json`). A text in exactly that
# layout is read by this one regex, about twice as fast as building its JSON objects; any other
# text goes through `UsageTotals.from_json`. What the regex takes, from_json takes with the same
# values: valid JSON, every key once, counts of at most 18 digits (so within 64 bits, and their
# sum too) and finite seconds in JSON's number syntax.
_COUNT = r"(0|[1-9][0-9]{0,17})"
_SECONDS = r"((?:0|[1-9][0-9]{0,16})(?:\.[0-9]{1,17})?(?:[eE][-+]?[0-9]{1,3})?)"
_CANONICAL = re.compile(
    r'\{"input_tokens":' + _COUNT + r',"output_tokens":' + _COUNT + r',"total_tokens":' + _COUNT
    + r',"input_token_details":\{"text_tokens":' + _COUNT + r',"audio_tokens":' + _COUNT
    + r',"image_tokens":' + _COUNT + r',"cached_tokens":' + _COUNT
    + r'\},"output_token_details":\{"text_tokens":' + _COUNT + r',"audio_tokens":' + _COUNT
    + r'\},"transcription_tokens":' + _COUNT + r',"transcription_seconds":' + _SECONDS
    + r',"reports":' + _COUNT + r"\}"
).fullmatch


def canonical_row(
    batch_id: str, account_id: str, session_id: str, provider: str, model: str, usage_json: str
) -> Row | None:
    """The row of a batch whose usage_json is in switchd's own layout; None for any other text.

    For such a text, the same row as `usage_row(..., UsageTotals.from_json(usage_json))`.
    """
    match = _CANONICAL(usage_json)
    if match is None:
        return None
    groups = match.groups()
    transcription_seconds = float(groups[10])
    if transcription_seconds == math.inf:  # 1e999: from_json refuses it
        return None
    inp, out, _, in_text, in_audio, in_image, in_cached, out_text, out_audio, transcription, reports = map(
        int, groups[:10] + groups[11:]
    )
    _check_limits(max(inp, out, transcription, in_text, in_audio, in_image, in_cached, out_text, out_audio),
                  reports, duration_ms(transcription_seconds))
    return (
        batch_id, account_id, session_id, provider, model, inp, out, transcription, in_text, in_audio, in_image,
        in_cached, out_text, out_audio, transcription_seconds, reports, inp + out + transcription,
    )


def _check_limits(largest: int, reports: int, ms: int) -> None:
    """Refuse (INTERNAL_BAD_USAGE: for good, never retried) a batch beyond the stated maxima of
    common/limits.py: `largest` is its largest token count, `ms` its transcribed audio."""
    if largest > MAX_REPORT_TOKENS:
        raise SwitchError(ErrorCode.INTERNAL_BAD_USAGE, f"a usage count is above its maximum {MAX_REPORT_TOKENS}")
    if reports > MAX_COUNT:
        raise SwitchError(ErrorCode.INTERNAL_BAD_USAGE, "usage count beyond 64 bits")
    if ms > MAX_REPORT_MS:
        raise SwitchError(ErrorCode.INTERNAL_BAD_USAGE, f"transcribed audio is above its maximum {MAX_REPORT_MS} ms")


def usage_row(batch_id: str, account_id: str, session_id: str, provider: str, model: str, t: UsageTotals) -> Row:
    """The row a batch is stored as; raises INTERNAL_BAD_USAGE for a count beyond its maximum."""
    tokens = t.input_tokens + t.output_tokens + t.transcription_tokens
    _check_limits(
        max(t.input_tokens, t.output_tokens, t.transcription_tokens, t.input_text, t.input_audio, t.input_image,
            t.input_cached, t.output_text, t.output_audio, t.transcription_text, t.transcription_audio,
            t.transcription_output),
        t.reports, t.transcription_ms or duration_ms(t.transcription_seconds),
    )
    plain = not (t.input_cached_text or t.input_cached_audio or t.input_cached_image or t.transcription_text
                 or t.transcription_audio or t.transcription_output or t.transcription_ms or t.transcription_model)
    row = (
        batch_id, account_id, session_id, provider, model, t.input_tokens, t.output_tokens, t.transcription_tokens,
        t.input_text, t.input_audio, t.input_image, t.input_cached, t.output_text, t.output_audio,
        t.transcription_seconds, t.reports, tokens,
    )
    return row if plain else (*row, t)  # type: ignore[return-value]


def totals_of(row: Sequence[Any]) -> UsageTotals:
    """The UsageTotals a row (or its BASE_COLUMNS as read back) was made from, as far as it priced it."""
    extra = row[EXTRA] if len(row) > EXTRA else None
    if extra is not None:
        return extra
    return UsageTotals(
        int(row[5]), int(row[6]), int(row[8]), int(row[9]), int(row[10]), int(row[11]), int(row[12]), int(row[13]),
        int(row[7]), float(row[14]), int(row[15]),
    )


class Charged(NamedTuple):
    """A usage batch recorded for a USD account: what its RECORD_USAGE reply carries."""

    balance: int  # nano-USD, right after the batch
    markup: int  # ten-thousandths
    cost: int  # the batch at list price, nano-USD

    def fields(self) -> tuple[str, ...]:
        return (str(self.balance), "usd", str(self.markup), str(self.cost))


# Reported model names a fallback priced, each logged once per process.
_FALLBACKS_SEEN: set[str] = set()


def _costs(conn: Connection, rows: Sequence[Row]) -> list[int | SwitchError]:
    """Each row's cost at list price by the store's book (read in this transaction), or its refusal.

    A flood's rows mostly repeat a few shapes: a plain row is priced once per distinct model and counts.
    """
    book = prices.load_book(conn)
    memo: dict[tuple[object, ...], int] = {}
    costs: list[int | SwitchError] = []
    for row in rows:
        cost: int | SwitchError
        try:
            if len(row) <= EXTRA:
                key = row[MODEL : TOKENS]
                found = memo.get(key)
                if found is None:
                    found = _plain_cost(book, row)
                    if found is None:
                        found = _price(book, row[MODEL], totals_of(row))
                    memo[key] = found
                cost = found
            else:
                cost = _price(book, row[MODEL], row[EXTRA])  # type: ignore[misc]
        except SwitchError as exc:
            cost = exc
        costs.append(cost)
    return costs


_rates_of: tuple[object, dict[str, tuple[int | None, ...] | None]] = (None, {})


def _model_rates(book: prices.PriceBook, model: str) -> tuple[int | None, ...] | None:
    """The token rates (TOKEN_TYPES order) of the book's own entry for `model`, None when it has none."""
    global _rates_of
    owner, rates = _rates_of
    if owner is not book:
        rates = {}
        _rates_of = (book, rates)
    if model not in rates:
        found = book.lookup(model)
        if len(rates) > 1000:
            rates.clear()
        rates[model] = None if found is None else tuple(getattr(found[1], name) for name in TOKEN_TYPES)
    return rates[model]


def _plain_cost(book: prices.PriceBook, row: Row) -> int | None:
    """`batch_cost` of a row without details, the common case, worked out directly; None where
    that needs more (transcription, a model or rate the book lacks, a count beyond its maximum):
    the caller then asks `batch_cost` itself. The same attribution as `common.pricing.breakdown`."""
    inp, out, transcription, text, audio, image, cached, out_text, out_audio = row[5:14]
    if transcription or row[14]:
        return None
    rates = _model_rates(book, row[MODEL])
    if rates is None:
        return None
    text += max(0, inp - text - audio - image)
    cached_text = min(cached, text)
    cached_image = min(cached - cached_text, image)
    cached_audio = min(cached - cached_text - cached_image, audio)
    counts = (
        text - cached_text, cached_text, out_text + max(0, out - out_text - out_audio),
        audio - cached_audio, cached_audio, out_audio, image - cached_image, cached_image,
    )
    total = 0
    for n, rate in zip(counts, rates, strict=True):
        if n:
            if rate is None or n > MAX_REPORT_TOKENS:
                return None
            total += n * rate
    return total


def _price(book: prices.PriceBook, model: str, totals: UsageTotals) -> int:
    priced = batch_cost(totals, book, model)
    if priced.fallbacks:
        log_fallbacks(priced, _FALLBACKS_SEEN)
    return priced.nano_usd


def _plan(
    rows: Sequence[Row], balances: dict[str, int], seen: set[str], amounts: Sequence[int | SwitchError] | None = None
) -> tuple[list[int | SwitchError], list[int], dict[str, int]]:
    """(per row: the balance after it or its refusal; the indexes of the rows to insert; the amount
    to deduct per account).

    `balances` holds the known accounts' balances before `rows`, `seen` the batch ids already
    stored (it gets the new ones added), `amounts` what each row deducts (tokens, or nano-USD for
    a USD account; by default its tokens) or why it cannot be priced.
    """
    if amounts is None:
        amounts = [row[TOKENS] for row in rows]
    results: list[int | SwitchError] = []
    new: list[int] = []
    spent: dict[str, int] = {}
    for i, row in enumerate(rows):
        account_id = row[ACCOUNT_ID]
        balance = balances.get(account_id)
        amount = amounts[i]
        if balance is None:
            results.append(SwitchError(ErrorCode.EXTERNAL_NOT_FOUND, f"no account {account_id}"))
        elif row[BATCH_ID] in seen:  # a retry of a batch already counted
            results.append(balance - spent.get(account_id, 0))
        elif isinstance(amount, SwitchError):
            results.append(amount)
        else:
            seen.add(row[BATCH_ID])
            new.append(i)
            total = spent[account_id] = spent.get(account_id, 0) + amount
            results.append(balance - total)
    return results, new, spent


def _all_new(
    rows: Sequence[Row], balances: dict[str, int], amounts: Sequence[int] | None = None
) -> tuple[list[int | SwitchError], list[int], dict[str, int]]:
    """`_plan` when every account is known, every batch id new and distinct (a flood's batches)
    and every row priced: a third of the Python per row, which the worker thread runs holding the GIL."""
    if amounts is None:
        amounts = [row[TOKENS] for row in rows]
    after: dict[str, int] = {}
    results: list[int | SwitchError] = []
    for row, amount in zip(rows, amounts, strict=True):
        account_id = row[ACCOUNT_ID]
        balance = after[account_id] = after.get(account_id, balances[account_id]) - amount
        results.append(balance)
    return (
        results, list(range(len(rows))),
        {account_id: balances[account_id] - left for account_id, left in after.items()},
    )


USD = "usd"


def _amounts(
    rows: Sequence[Row], costs: Sequence[int | SwitchError], accounts: dict[str, tuple[int, bool]]
) -> tuple[list[int | SwitchError], list[int]]:
    """(what each row deducts: tokens, or for a USD account its cost × markup; what each is charged
    at the account's price, 0 for an unknown account or an unpriced row)."""
    amounts: list[int | SwitchError] = []
    charged: list[int] = []
    for row, cost in zip(rows, costs, strict=True):
        account = accounts.get(row[ACCOUNT_ID])
        if isinstance(cost, SwitchError) or account is None:
            amounts.append(cost if isinstance(cost, SwitchError) else 0)
            charged.append(0)
            continue
        markup, usd = account
        paid = cost if markup == 10_000 else charge(cost, markup)
        charged.append(paid)
        amounts.append(paid if usd else row[TOKENS])
    return amounts, charged


def _usd_results(
    rows: Sequence[Row], results: list[int | SwitchError | Charged], costs: Sequence[int | SwitchError],
    accounts: dict[str, tuple[int, bool]],
) -> list[int | SwitchError | Charged]:
    """The results of USD accounts' rows as `Charged` (their replies carry unit, markup and cost)."""
    for i, row in enumerate(rows):
        account = accounts.get(row[ACCOUNT_ID])
        result, cost = results[i], costs[i]
        if account is not None and account[1] and type(result) is int and type(cost) is int:
            results[i] = Charged(result, account[0], cost)
    return results


def record_rows(conn: Connection, rows: Sequence[Row], now: str) -> list[int | SwitchError | Charged]:
    """Store each batch with its cost and deduct it, once per batch_id, as if one after the other.

    Returns, per row, the account's balance right after it (a batch id seen before, even
    earlier in `rows`, deducts nothing and gets the balance at its turn) — for a USD account as
    `Charged`, in nano-USD — or the SwitchError refusing it (unknown account, or a batch the book
    cannot price: INTERNAL_BAD_USAGE), which stores nothing.

    Each row is priced by the store's book, read in this transaction (`prices.load_book`): its
    cost at list price and what the account is charged (× markup, rounded up per batch) are
    stored with it. A token account is lowered by the batch's tokens, a USD account by what it
    is charged.

    Runs inside the caller's transaction (the rows and the deductions stand or fall together)
    with a fixed number of statements: the balances and the batch ids already stored are read
    first, the new rows are inserted in one go, and each account is updated once by the sum of
    its new batches. Taking top-up first is additive, so deducting a sum leaves exactly what
    deducting each batch in turn would, and each batch lowers the balance by exactly its amount.
    The Python part is one short loop per row: it holds the GIL the event loop needs.
    """
    costs = _costs(conn, rows)
    if is_postgres(conn):
        return _record_rows_pg(conn, rows, now, costs)
    balances: dict[str, int] = {}
    accounts: dict[str, tuple[int, bool]] = {}
    seen: set[str] = set()
    wanted = list({row[ACCOUNT_ID] for row in rows})
    batch_ids = [row[BATCH_ID] for row in rows]
    for key, balance, markup, unit in conn.execute(_LOOKUP, (json.dumps(wanted), json.dumps(batch_ids))).fetchall():
        if balance is None:
            seen.add(key)
        else:
            balances[key] = balance
            accounts[key] = (markup, unit == USD)
    amounts, charged = _amounts(rows, costs, accounts)
    if (not seen and len(balances) == len(wanted) and len(set(batch_ids)) == len(batch_ids)
            and not any(isinstance(amount, SwitchError) for amount in amounts)):
        results, new, spent = _all_new(rows, balances, amounts)  # type: ignore[arg-type]
    else:
        results, new, spent = _plan(rows, balances, seen, amounts)
    for start in range(0, len(new), INSERT_ROWS):
        chunk = new[start : start + INSERT_ROWS]
        params: list[object] = [now]
        for i in chunk:
            params += rows[i][:TOKENS + 1]
            params.append(costs[i])
            params.append(charged[i])
        conn.execute(_insert(len(chunk)), params)
    for account_id, amount in spent.items():
        (after,) = conn.execute(_DEDUCT, {"tokens": amount, "now": now, "account": account_id}).fetchone()
        if after != balances[account_id] - amount:  # overflow, or a write this connection did not make
            raise RuntimeError(f"balance of {account_id} is {after!r}, expected {balances[account_id] - amount}")
    return _usd_results(rows, results, costs, accounts)  # type: ignore[arg-type]


# PostgreSQL, where several replicas write at once: the unique batch_id decides which rows are
# new (a concurrent insert of the same id waits for the other transaction, then skips), and each
# account's deduction is one atomic UPDATE ... RETURNING on the locked row.
_PG_ACCOUNTS = "SELECT id, markup, unit FROM accounts WHERE id = ANY(%s)"
_PG_COLUMNS = _COLUMNS
_PG_DEDUCT = (
    "UPDATE accounts SET topup_remaining = topup_remaining - least(greatest(topup_remaining, 0), %(tokens)s),"
    " token_remaining = token_remaining - (%(tokens)s - least(greatest(topup_remaining, 0), %(tokens)s)),"
    " updated_at = %(now)s WHERE id = %(account)s RETURNING token_remaining + topup_remaining"
)


@functools.cache
def _pg_insert(rows: int) -> str:
    row = "(" + ", ".join(["%s"] * (_ROW_WIDTH + 1)) + ")"
    return (
        f"INSERT INTO usage_metrics ({_PG_COLUMNS}) VALUES {', '.join([row] * rows)}"
        " ON CONFLICT (batch_id) DO NOTHING RETURNING batch_id"
    )


def _record_rows_pg(
    conn: Connection, rows: Sequence[Row], now: str, costs: Sequence[int | SwitchError]
) -> list[int | SwitchError | Charged]:
    """`record_rows` on PostgreSQL, exact with other replicas recording for the same accounts at once.

    The per-row balances of the reply are worked out from each account's balance after its one
    atomic deduction: nothing read earlier is written back.
    """
    raw = conn.raw
    wanted = sorted({row[ACCOUNT_ID] for row in rows})
    accounts = {
        account_id: (int(markup), unit == USD)
        for account_id, markup, unit in raw.execute(_PG_ACCOUNTS, (wanted,)).fetchall()
    }
    amounts, charged = _amounts(rows, costs, accounts)
    candidates: dict[str, int] = {}  # batch id → index of its first row
    for i, row in enumerate(rows):
        if row[ACCOUNT_ID] in accounts and not isinstance(amounts[i], SwitchError):
            candidates.setdefault(row[BATCH_ID], i)
    # Sorted by batch id, as every replica inserts: two transactions inserting the same ids (a
    # retry racing its original on another replica) then never wait on each other in a cycle.
    ordered = [candidates[batch_id] for batch_id in sorted(candidates)]
    inserted: set[str] = set()
    for start in range(0, len(ordered), INSERT_ROWS):
        chunk = ordered[start : start + INSERT_ROWS]
        params: list[object] = []
        for i in chunk:
            params += rows[i][:TOKENS + 1]
            params += (costs[i], charged[i], now)
        inserted.update(batch_id for (batch_id,) in raw.execute(_pg_insert(len(chunk)), params).fetchall())
    spent: dict[str, int] = {}
    for batch_id in inserted:
        i = candidates[batch_id]
        account_id = rows[i][ACCOUNT_ID]
        spent[account_id] = spent.get(account_id, 0) + amounts[i]  # type: ignore[operator]
    balance: dict[str, int] = {}  # each account's balance before this batch's deduction
    for account_id in wanted:
        if account_id not in accounts:
            continue
        if account_id in spent:
            (after,) = raw.execute(
                _PG_DEDUCT, {"tokens": spent[account_id], "now": now, "account": account_id}
            ).fetchone()
            balance[account_id] = int(after) + spent[account_id]
        else:
            (after,) = raw.execute(
                "SELECT token_remaining + topup_remaining FROM accounts WHERE id = %s", (account_id,)
            ).fetchone()
            balance[account_id] = int(after)
    results: list[int | SwitchError | Charged] = []
    counted: set[str] = set()
    for i, row in enumerate(rows):
        batch_id, account_id = row[BATCH_ID], row[ACCOUNT_ID]
        if account_id not in accounts:
            results.append(SwitchError(ErrorCode.EXTERNAL_NOT_FOUND, f"no account {account_id}"))
            continue
        if batch_id in inserted and batch_id not in counted:
            counted.add(batch_id)
            balance[account_id] -= amounts[i]  # type: ignore[operator]
        elif batch_id not in inserted and isinstance(amounts[i], SwitchError):
            results.append(amounts[i])
            continue
        results.append(balance[account_id])
    return _usd_results(rows, results, costs, accounts)


def usage_summary(conn: Connection, account_id: str) -> UsageSummary:
    row = conn.execute(
        "SELECT coalesce(sum(input_tokens), 0), coalesce(sum(output_tokens), 0), coalesce(sum(total_tokens), 0),"
        " count(*), coalesce(sum(input_text), 0), coalesce(sum(input_audio), 0), coalesce(sum(input_image), 0),"
        " coalesce(sum(input_cached), 0), coalesce(sum(output_text), 0), coalesce(sum(output_audio), 0),"
        " coalesce(sum(transcription_tokens), 0), coalesce(sum(transcription_seconds), 0.0)"
        " FROM usage_metrics WHERE account_id = ?",
        (account_id,),
    ).fetchone()
    # PostgreSQL sums BIGINTs as numeric: back to Python ints, as SQLite gives them.
    values: list[Any] = [*(int(value) for value in row[:-1]), float(row[-1])]
    return UsageSummary(account_id, *values)
