"""Usage batches and the credits they deduct.

Credits are tokens: balance = token_remaining (the plan's) + topup_remaining. A batch takes
from the top-up first, then from the plan tokens, which may go negative (a session is cut off
by switchd at zero, but what was already spent is still billed).
"""
from __future__ import annotations

from dataclasses import dataclass

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

    Must run inside a savepoint: the row and the deduction stand or fall together, and an
    unknown account is found out (and refused) only after the insert.
    """
    tokens = totals.tokens
    inserted = conn.execute(
        "INSERT INTO usage_metrics (batch_id, account_id, session_id, provider, model, input_tokens,"
        " output_tokens, transcription_tokens, input_text, input_audio, input_image, input_cached, output_text,"
        " output_audio, transcription_seconds, reports, total_tokens, created_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (batch_id) DO NOTHING",
        (
            batch_id, account_id, session_id, provider, model, totals.input_tokens, totals.output_tokens,
            totals.transcription_tokens, totals.input_text, totals.input_audio, totals.input_image,
            totals.input_cached, totals.output_text, totals.output_audio, totals.transcription_seconds,
            totals.reports, tokens, now,
        ),
    ).rowcount
    if not inserted:  # a retry of a batch already counted
        return get_credits(conn, account_id)
    # SQLite evaluates every SET expression on the old row: both use the top-up before this batch.
    row = conn.execute(
        "UPDATE accounts SET topup_remaining = topup_remaining - min(max(topup_remaining, 0), :tokens),"
        " token_remaining = token_remaining - (:tokens - min(max(topup_remaining, 0), :tokens)),"
        " updated_at = :now WHERE id = :account RETURNING token_remaining + topup_remaining",
        {"tokens": tokens, "now": now, "account": account_id},
    ).fetchone()
    if row is None:
        raise SwitchError(ErrorCode.EXTERNAL_NOT_FOUND, f"no account {account_id}")
    return int(row[0])


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
