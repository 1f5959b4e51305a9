"""Usage batches and the credits they deduct.

Credits are tokens: balance = token_remaining (the plan's) + topup_remaining. A batch takes
from the top-up first, then from the plan tokens, which may go negative (a session is cut off
by switchd at zero, but what was already spent is still billed).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from typing import NamedTuple

from common.errors import ErrorCode, SwitchError
from common.usage import UsageTotals
from switchdb.db import Connection

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


class Batch(NamedTuple):
    """One RECORD_USAGE, its usage already read (`UsageTotals.from_json`); a tuple, cheap to make."""

    batch_id: str
    account_id: str
    session_id: str
    provider: str
    model: str
    totals: UsageTotals


# SQLite integers are 64-bit; a larger count could not be stored (nor deducted) exactly.
MAX_COUNT = 2**63 - 1

_COLUMNS = (
    "batch_id, account_id, session_id, provider, model, input_tokens, output_tokens, transcription_tokens,"
    " input_text, input_audio, input_image, input_cached, output_text, output_audio, transcription_seconds,"
    " reports, total_tokens, created_at"
)
_ROW = "(" + ", ".join(["?"] * 18) + ")"
# Rows are inserted by multi-row statements of these sizes (a batch of n rows takes n // 64
# statements of 64 rows and one per bit of the rest), so a handful of prepared statements
# serve every batch size. Each statement binds its rows in one C call and runs in one SQLite
# step without the GIL: executemany would take the GIL back for every row, and wait for it
# while the event loop holds it.
_INSERT_SIZES = (64, 32, 16, 8, 4, 2, 1)
_INSERTS = {n: f"INSERT INTO usage_metrics ({_COLUMNS}) VALUES " + ", ".join([_ROW] * n) for n in _INSERT_SIZES}
# SQLite evaluates every SET expression on the old row: both use the top-up before this deduction.
_DEDUCT = (
    "UPDATE accounts SET topup_remaining = topup_remaining - min(max(topup_remaining, 0), :tokens),"
    " token_remaining = token_remaining - (:tokens - min(max(topup_remaining, 0), :tokens)),"
    " updated_at = :now WHERE id = :account RETURNING token_remaining + topup_remaining"
)
# One statement (so one cached prepared statement) for any number of ids: a JSON array parameter.
_BALANCES = "SELECT id, token_remaining + topup_remaining FROM accounts WHERE id IN (SELECT value FROM json_each(?))"
_ONE_BALANCE = "SELECT id, token_remaining + topup_remaining FROM accounts WHERE id = ?"
_SEEN = "SELECT batch_id FROM usage_metrics WHERE batch_id IN (SELECT value FROM json_each(?))"
_ONE_SEEN = "SELECT batch_id FROM usage_metrics WHERE batch_id = ?"


def record_batches(conn: Connection, batches: Sequence[Batch], now: str) -> list[int | SwitchError]:
    """Store each batch and deduct its tokens, once per batch_id, as if one after the other.

    Returns, per batch, the account's balance right after it (a batch id seen before, even
    earlier in `batches`, deducts nothing and gets the balance at its turn), or the SwitchError
    refusing it (unknown account, a count beyond 64 bits), which stores nothing.

    Runs inside the caller's transaction (the rows and the deductions stand or fall together)
    with a fixed number of statements: the balances and the batch ids already stored are read
    first, the new rows are inserted in one go, and each account is updated once by the sum of
    its new batches. Taking top-up first is additive, so deducting a sum leaves exactly what
    deducting each batch in turn would, and each batch lowers the balance by exactly its tokens.
    """
    if len(batches) == 1:  # the common unit of work at low load: plain equality lookups
        balances = dict(conn.execute(_ONE_BALANCE, (batches[0].account_id,)).fetchall())
        seen = {row[0] for row in conn.execute(_ONE_SEEN, (batches[0].batch_id,))}
    else:
        balances = dict(conn.execute(_BALANCES, (json.dumps(list({b.account_id for b in batches})),)).fetchall())
        seen = {row[0] for row in conn.execute(_SEEN, (json.dumps([b.batch_id for b in batches]),))}
    results: list[int | SwitchError] = []
    rows: list[tuple[object, ...]] = []
    spent: dict[str, int] = {}
    for batch_id, account_id, session_id, provider, model, t in batches:
        balance = balances.get(account_id)
        if balance is None:
            results.append(SwitchError(ErrorCode.EXTERNAL_NOT_FOUND, f"no account {account_id}"))
            continue
        if batch_id in seen:  # a retry of a batch already counted
            results.append(balance - spent.get(account_id, 0))
            continue
        tokens = t.input_tokens + t.output_tokens + t.transcription_tokens
        # Counts are never negative, so their bitwise or is beyond 64 bits exactly when one is.
        if (tokens | t.input_text | t.input_audio | t.input_image | t.input_cached | t.output_text | t.output_audio
                | t.reports) > MAX_COUNT:
            results.append(SwitchError(ErrorCode.INTERNAL_BAD_USAGE, "usage count beyond 64 bits"))
            continue
        seen.add(batch_id)
        rows.append((
            batch_id, account_id, session_id, provider, model, t.input_tokens, t.output_tokens,
            t.transcription_tokens, t.input_text, t.input_audio, t.input_image, t.input_cached, t.output_text,
            t.output_audio, t.transcription_seconds, t.reports, tokens, now,
        ))
        total = spent[account_id] = spent.get(account_id, 0) + tokens
        results.append(balance - total)
    start = 0
    for size in _INSERT_SIZES:
        while len(rows) - start >= size:
            conn.execute(_INSERTS[size], list(chain.from_iterable(rows[start : start + size])))
            start += size
    for account_id, tokens in spent.items():
        (after,) = conn.execute(_DEDUCT, {"tokens": tokens, "now": now, "account": account_id}).fetchone()
        if after != balances[account_id] - tokens:  # overflow, or a write this connection did not make
            raise RuntimeError(f"balance of {account_id} is {after!r}, expected {balances[account_id] - tokens}")
    return results


def record_usage(
    conn: Connection,
    batch_id: str,
    account_id: str,
    session_id: str,
    provider: str,
    model: str,
    totals: UsageTotals,
    now: str,
) -> int:
    """Store one batch and deduct its tokens (once per batch_id); returns the balance after it.

    `record_batches` with one batch (there is one way to record usage); raises its refusal.
    """
    (result,) = record_batches(conn, [Batch(batch_id, account_id, session_id, provider, model, totals)], now)
    if isinstance(result, SwitchError):
        raise result
    return result


def usage_summary(conn: Connection, account_id: str) -> UsageSummary:
    row = conn.execute(
        "SELECT coalesce(sum(input_tokens), 0), coalesce(sum(output_tokens), 0), coalesce(sum(total_tokens), 0),"
        " count(*), coalesce(sum(input_text), 0), coalesce(sum(input_audio), 0), coalesce(sum(input_image), 0),"
        " coalesce(sum(input_cached), 0), coalesce(sum(output_text), 0), coalesce(sum(output_audio), 0),"
        " coalesce(sum(transcription_tokens), 0), coalesce(sum(transcription_seconds), 0.0)"
        " FROM usage_metrics WHERE account_id = ?",
        (account_id,),
    ).fetchone()
    return UsageSummary(account_id, *row)
