"""The ledger in switchdb's store and service, on real SQLite files and a real PostgreSQL:
exact cost per usage row, USD balances exact to the nano-USD, the price book in the store,
limits on usage batches, and USD balances exact under concurrent writers.

Tests taking `conn` run on both stores.
"""
from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.errors import ErrorCode, SwitchError
from common.limits import MAX_REPORT_TOKENS, format_usd
from common.pricing import charge
from common.usage import UsageTotals
from common.wire import OK, MessageType, Request
from switchdb import accounts, db, ledger, prices, service
from switchdb.db import transaction, utc_now
from tests.pg import fresh_database, open_conn, store_kind, store_url  # noqa: F401
from tests.batches import handle_batch


@pytest.fixture
def conn(tmp_path: Path, store_kind: str, store_url: str | None) -> Iterator[db.Connection]:  # noqa: F811
    c = open_conn(store_kind, tmp_path, store_url, "ledger.db")
    yield c
    c.close()


def usd_account(conn: db.Connection, usd: int, markup: int = 10_000, email: str = "usd@example.com") -> str:
    with transaction(conn):
        return accounts.create_account(conn, email, usd=usd, markup=markup).id


def key_for(conn: db.Connection, account_id: str) -> str:
    with transaction(conn):
        return accounts.create_key(conn, account_id, "t")[0]


def record(conn: db.Connection, batch_id: str, account_id: str, totals: UsageTotals,
           model: str = "gpt-realtime") -> service.Outcome:
    (outcome,) = handle_batch(
        conn, [Request("r", MessageType.RECORD_USAGE, (batch_id, account_id, "s1", "openai", model, totals.to_json()))],
        utc_now(),
    )
    return outcome


def mixed_totals() -> UsageTotals:
    """Text, audio, cached text and audio, and transcription tokens of a known transcription model."""
    t = UsageTotals(transcription_model="gpt-4o-transcribe")
    t.add_response({
        "input_tokens": 1000, "output_tokens": 300,
        "input_token_details": {"text_tokens": 400, "audio_tokens": 600, "image_tokens": 0, "cached_tokens": 250,
                                "cached_tokens_details": {"text_tokens": 200, "audio_tokens": 50}},
        "output_token_details": {"text_tokens": 100, "audio_tokens": 200},
    })
    t.add_transcription({"type": "tokens", "input_tokens": 70, "output_tokens": 20, "total_tokens": 90,
                         "input_token_details": {"text_tokens": 10, "audio_tokens": 60}})
    return t


# The plain formula at the shipped list prices (nano-USD per token = milli-USD per 1M tokens):
# gpt-realtime text in 4000, cached 400, text out 16000, audio in 32000, cached audio 400, audio out
# 64000; gpt-4o-transcribe text in 2500, audio in 6000, text out 10000.
MIXED_COST = (
    (400 - 200) * 4000 + 200 * 400 + (600 - 50) * 32000 + 50 * 400 + 100 * 16000 + 200 * 64000
    + 10 * 2500 + 60 * 6000 + 20 * 10000
)


def balance(conn: db.Connection, account_id: str) -> int:
    return accounts.require_account(conn, account_id).credits


def test_a_usd_account_is_lowered_by_cost_times_markup_exactly(conn: db.Connection) -> None:
    assert MIXED_COST == 33_485_000  # $0.033485
    account_id = usd_account(conn, usd=10**9, markup=13_000)  # $1 at 1.3 times list price
    outcome = record(conn, "b1", account_id, mixed_totals())
    charged = -(-MIXED_COST * 13 // 10)
    assert charged == 43_530_500
    assert outcome == service.Outcome(OK, (str(10**9 - charged), "usd", "13000", str(MIXED_COST)))
    assert balance(conn, account_id) == 10**9 - charged == 956_469_500
    assert record(conn, "b1", account_id, mixed_totals()).fields[0] == str(10**9 - charged)  # a retry: once
    row = conn.execute("SELECT cost_nano, charged_nano FROM usage_metrics WHERE batch_id = 'b1'").fetchone()
    assert tuple(map(int, row)) == (MIXED_COST, charged)
    with transaction(conn):
        statement = ledger.statement(conn, account_id)
    assert (statement["cost_usd"], statement["charged_usd"]) == ("0.033485", "0.0435305")
    assert statement["breakdown"]["input_cached"] == 250 and statement["total_tokens"] == 1390


def test_a_token_account_is_lowered_by_tokens_and_its_reply_keeps_one_field(conn: db.Connection) -> None:
    with transaction(conn):
        account_id = accounts.create_account(conn, "tok@example.com", "Free", 5000).id
    outcome = record(conn, "b1", account_id, mixed_totals())
    assert outcome == service.Outcome(OK, (str(5000 - 1390),))
    row = conn.execute("SELECT cost_nano, charged_nano FROM usage_metrics").fetchone()
    assert tuple(map(int, row)) == (MIXED_COST, MIXED_COST)  # its cost is known too (markup 1)


def test_price_set_changes_the_next_batch_and_not_past_ones(conn: db.Connection) -> None:
    account_id = usd_account(conn, usd=10**9)
    plain = UsageTotals(input_tokens=1000, input_text=1000, reports=1)
    record(conn, "b1", account_id, plain)
    with transaction(conn):
        prices.set_price(conn, "gpt-realtime", {"text_in": 8000})  # $8 per 1M
    record(conn, "b2", account_id, plain)
    costs = [int(c) for (c,) in conn.execute("SELECT cost_nano FROM usage_metrics ORDER BY batch_id")]
    assert costs == [4_000_000, 8_000_000]
    assert balance(conn, account_id) == 10**9 - 12_000_000


def test_a_price_set_through_another_connection_prices_this_ones_next_batch(
    tmp_path: Path, conn: db.Connection, store_kind: str, store_url: str | None  # noqa: F811
) -> None:
    """The book a connection read is reused only while the store's version of it is unchanged:
    a price set by the CLI (another connection, another process) or by a transaction rolled back
    is never priced by a stale copy."""
    account_id = usd_account(conn, usd=10**9)
    plain = UsageTotals(input_tokens=1000, input_text=1000, reports=1)
    record(conn, "b1", account_id, plain)
    other = open_conn(store_kind, tmp_path, store_url, "ledger.db")
    try:
        with transaction(other):
            prices.set_price(other, "gpt-realtime", {"text_in": 8000})  # $8 per 1M
        record(conn, "b2", account_id, plain)
        with pytest.raises(RuntimeError), transaction(conn):
            prices.set_price(conn, "gpt-realtime", {"text_in": 2000})
            assert prices.load_book(conn).models["gpt-realtime"].text_in == 2000
            raise RuntimeError("rolled back")
        record(conn, "b3", account_id, plain)
        with transaction(other):
            prices.set_fallback(other, "gpt-realtime-mini")  # $0.60 per 1M text in
        record(conn, "b4", account_id, plain, "not-in-the-book")
    finally:
        other.close()
    costs = [int(c) for (c,) in conn.execute("SELECT cost_nano FROM usage_metrics ORDER BY batch_id")]
    assert costs == [4_000_000, 8_000_000, 8_000_000, 600_000]


def test_an_unknown_model_is_priced_by_the_fallback_and_logged_once(
    conn: db.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    account_id = usd_account(conn, usd=10**9)
    model = f"mystery-{uuid.uuid4().hex[:8]}"
    plain = UsageTotals(input_tokens=1000, input_text=1000, reports=1)
    with caplog.at_level(logging.WARNING, logger="common.pricing"):
        record(conn, "b1", account_id, plain, model)
        record(conn, "b2", account_id, plain, model)
    assert [int(c) for (c,) in conn.execute("SELECT cost_nano FROM usage_metrics")] == [4_000_000] * 2
    warnings = [r for r in caplog.records if model in r.getMessage()]
    assert len(warnings) == 1 and "gpt-realtime" in warnings[0].getMessage()
    with transaction(conn):
        prices.set_fallback(conn, "gpt-realtime-mini")  # $0.60 per 1M text in
    record(conn, "b3", account_id, plain, model)
    assert int(conn.execute("SELECT cost_nano FROM usage_metrics WHERE batch_id = 'b3'").fetchone()[0]) == 600_000


def test_a_fallback_without_every_rate_is_refused_and_nothing_changes(conn: db.Connection) -> None:
    with pytest.raises(SwitchError) as err, transaction(conn):
        prices.set_fallback(conn, "whisper-1")  # per minute only
    assert err.value.code == ErrorCode.EXTERNAL_BAD_PARAMS and "whisper-1" in err.value.message
    assert prices.load_book(conn).fallback == "gpt-realtime"
    with pytest.raises(SwitchError), transaction(conn):
        prices.set_fallback(conn, "no-such-model")
    assert prices.load_book(conn).fallback == "gpt-realtime"


def test_the_seeded_book_is_the_shipped_one(conn: db.Connection) -> None:
    from common.pricing import DEFAULT_PRICES

    book = prices.load_book(conn)
    assert dict(book.models) == DEFAULT_PRICES
    travelled = prices.book_from_json(prices.book_json(book))  # rates travel; dates and sources stay in the store
    assert {n: p.as_usd() for n, p in travelled.models.items()} == {n: p.as_usd() for n, p in DEFAULT_PRICES.items()}
    assert (travelled.fallback, travelled.transcription_fallback) == (book.fallback, book.transcription_fallback)


@pytest.mark.parametrize("count", [MAX_REPORT_TOKENS + 1, 2**63 - 1, 2**63])
def test_a_usage_batch_beyond_the_limits_is_refused_for_good(conn: db.Connection, count: int) -> None:
    account_id = usd_account(conn, usd=10**9)
    text = UsageTotals(input_tokens=count, input_text=count, reports=1).to_json()
    with pytest.raises(SwitchError) as err:
        service.read_row("b1", account_id, "s", "openai", "gpt-realtime", text)
    assert err.value.code == ErrorCode.INTERNAL_BAD_USAGE
    (outcome,) = handle_batch(
        conn, [Request("r", MessageType.RECORD_USAGE, ("b1", account_id, "s", "openai", "gpt-realtime", text))],
        utc_now(),
    )
    assert outcome.status == ErrorCode.INTERNAL_BAD_USAGE
    assert conn.execute("SELECT count(*) FROM usage_metrics").fetchone()[0] == 0
    assert balance(conn, account_id) == 10**9
    # At the maximum: recorded, and the statement sums it.
    at_max = UsageTotals(input_tokens=MAX_REPORT_TOKENS, input_text=MAX_REPORT_TOKENS, reports=1)
    assert record(conn, "b2", account_id, at_max).status == OK
    assert balance(conn, account_id) == 10**9 - MAX_REPORT_TOKENS * 4000


def test_validate_and_load_gives_a_usd_account_its_unit_markup_and_book(conn: db.Connection) -> None:
    account_id = usd_account(conn, usd=2_500_000_000, markup=13_000)
    key = key_for(conn, account_id)
    (outcome,) = handle_batch(conn, [Request("r", MessageType.VALIDATE_AND_LOAD, (key, "s1"))], utc_now())
    assert outcome.status == OK
    assert outcome.fields[:5] == (account_id, "2500000000", "", "usd", "13000")
    book = prices.book_from_json(outcome.fields[5])
    assert book.fallback == "gpt-realtime" and book.models["gpt-realtime"].audio_out == 64_000
    with transaction(conn):
        token_id = accounts.create_account(conn, "tok@example.com", "Free", 10).id
    token_key = key_for(conn, token_id)
    (outcome,) = handle_batch(
        conn, [Request("r", MessageType.VALIDATE_AND_LOAD, (token_key, "s1"))], utc_now()
    )
    assert outcome.fields == (token_id, "10", "")  # a token account's reply is unchanged


def test_a_suspended_account_is_refused_until_resumed(conn: db.Connection) -> None:
    account_id = usd_account(conn, usd=10**9)
    key = key_for(conn, account_id)
    with transaction(conn):
        ledger.set_status(conn, account_id, ledger.SUSPENDED)
    (outcome,) = handle_batch(conn, [Request("r", MessageType.VALIDATE_AND_LOAD, (key, "s1"))], utc_now())
    assert outcome.status == ErrorCode.EXTERNAL_INVALID_AUTH
    with transaction(conn):
        ledger.set_status(conn, account_id, ledger.ACTIVE)
    (outcome,) = handle_batch(conn, [Request("r", MessageType.VALIDATE_AND_LOAD, (key, "s1"))], utc_now())
    assert outcome.status == OK


def test_the_balance_is_the_sum_of_its_history(conn: db.Connection) -> None:
    account_id = usd_account(conn, usd=5 * 10**9, markup=11_000)
    with transaction(conn):
        accounts.top_up(conn, account_id, 10**9, ledger.USD)
        ledger.adjust(conn, account_id, ledger.USD, -300_000_001, "correction")
    for n in range(5):
        record(conn, f"b{n}", account_id, mixed_totals())
    with transaction(conn):
        ledger.adjust(conn, account_id, ledger.USD, 7, "refund")
        data = ledger.history(conn, account_id)
    assert [e["kind"] for e in data["entries"]] == ["create", "topup", "adjust", "adjust"]
    assert data["sum"] == data["balance"] == balance(conn, account_id)
    assert data["balance"] == 6 * 10**9 - 300_000_001 + 7 - 5 * charge(MIXED_COST, 11_000)


def test_an_adjustment_below_zero_needs_allow_negative(conn: db.Connection) -> None:
    with transaction(conn):
        account_id = accounts.create_account(conn, "t@example.com", "Free", 100).id
    with pytest.raises(SwitchError) as err, transaction(conn):
        ledger.adjust(conn, account_id, ledger.TOKENS, -101, "too much")
    assert "--allow-negative" in err.value.message and balance(conn, account_id) == 100
    with transaction(conn):
        assert ledger.adjust(conn, account_id, ledger.TOKENS, -101, "on purpose", allow_negative=True) == -1
        assert ledger.history(conn, account_id)["sum"] == -1


def test_emails_are_unique_whatever_their_case_in_any_script(conn: db.Connection) -> None:
    with transaction(conn):
        first = accounts.create_account(conn, "Zoë@Example.com").id
    for other in ("ZOË@EXAMPLE.COM", "zoe\u0308@example.com"):
        with pytest.raises(SwitchError) as err, transaction(conn):
            accounts.create_account(conn, other)
        assert err.value.code == ErrorCode.EXTERNAL_CONFLICT
    assert accounts.find_account(conn, "ZOË@example.COM").id == first
    for bad in ("no-at-sign", "a@b", "two@@example.com", " a@example.com"):
        with pytest.raises(SwitchError) as err, transaction(conn):
            accounts.create_account(conn, bad)
        assert err.value.code == ErrorCode.EXTERNAL_BAD_PARAMS


def test_usd_balances_stay_exact_with_concurrent_writers_on_postgresql(tmp_path: Path) -> None:
    threads, per_thread = 6, 40
    with fresh_database() as url:
        setup = open_conn("postgresql", tmp_path, url)
        account_id = usd_account(setup, usd=20 * 10**9, markup=13_000)  # stays above zero: adjustments pass
        errors: list[BaseException] = []

        def writer(n: int) -> None:
            conn = open_conn("postgresql", tmp_path, url)
            try:
                for i in range(per_thread):
                    # Each batch twice (a retry racing its original on another replica), in varying groups.
                    rows = [service.read_row(f"b{n}-{i}", account_id, "s", "openai", "gpt-realtime",
                                             mixed_totals().to_json())] * 2
                    service.run_batch(conn, rows, utc_now())
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
            finally:
                conn.close()

        def adjuster() -> None:
            conn = open_conn("postgresql", tmp_path, url)
            try:
                for i in range(20):
                    with transaction(conn):
                        ledger.adjust(conn, account_id, ledger.USD, 1000 if i % 2 else -500, f"correction {i}")
                    with transaction(conn):
                        accounts.top_up(conn, account_id, 3, ledger.USD)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
            finally:
                conn.close()

        workers = [threading.Thread(target=writer, args=(n,)) for n in range(threads)]
        workers.append(threading.Thread(target=adjuster))
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        assert not errors
        charged = charge(MIXED_COST, 13_000)
        adjusted = 10 * 1000 - 10 * 500 + 20 * 3
        assert balance(setup, account_id) == 20 * 10**9 - threads * per_thread * charged + adjusted
        total = setup.execute("SELECT count(*), sum(charged_nano) FROM usage_metrics").fetchone()
        assert (int(total[0]), int(total[1])) == (threads * per_thread, threads * per_thread * charged)
        with transaction(setup):
            assert ledger.history(setup, account_id)["sum"] == balance(setup, account_id)
            assert ledger.statement(setup, account_id)["charged_usd"] == format_usd(threads * per_thread * charged)
        setup.close()


def test_a_store_from_before_the_ledger_is_upgraded(
    tmp_path: Path, store_kind: str, store_url: str | None, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    """Existing accounts get an opening entry (balance = sum of history), their email keys (two that
    fold to one stay reachable by id), and existing usage rows their cost at the book's prices."""
    before = [m for m in db.MIGRATIONS if not m[0].startswith(("0008", "0009", "0010", "0011"))]
    monkeypatch.setattr(db, "MIGRATIONS", before)
    conn = open_conn(store_kind, tmp_path, store_url, "old.db")
    now = utc_now()
    with transaction(conn):
        olds = (("acct_a", "Straße@example.com", 900, 50), ("acct_b", "STRASSE@example.com", 5, 0))
        for account_id, email, plan, topup in olds:
            conn.execute(
                "INSERT INTO accounts (id, email, plan_name, token_remaining, topup_remaining, status, created_at,"
                " updated_at) VALUES (?, ?, 'Free', ?, ?, 'active', ?, ?)", (account_id, email, plan, topup, now, now))
        conn.execute(
            "INSERT INTO usage_metrics (batch_id, account_id, session_id, provider, model, input_tokens, output_tokens,"
            " transcription_tokens, input_text, input_audio, input_image, input_cached, output_text, output_audio,"
            " transcription_seconds, reports, total_tokens, created_at)"
            " VALUES ('old', 'acct_a', 's', 'openai', 'gpt-realtime', 100, 0, 0, 100, 0, 0, 0, 0, 0, 0.0, 1, 100, ?)",
            (now,))
    monkeypatch.undo()
    applied = db.migrate(conn)
    assert applied == ["0008_ledger_prices", "0009_ledger_accounts", "0010_ledger_usage_cost",
                       "0011_ledger_credit_entries"]
    assert db.migrate(conn) == []
    with transaction(conn):
        history = ledger.history(conn, "acct_a")
    assert history["entries"][0]["kind"] == "opening" and history["entries"][0]["amount"] == 1050
    assert history["sum"] == history["balance"] == 950
    assert int(conn.execute("SELECT cost_nano FROM usage_metrics").fetchone()[0]) == 100 * 4000
    assert accounts.find_account(conn, "strasse@EXAMPLE.com").id == "acct_a"
    assert accounts.find_account(conn, "acct_b").email == "STRASSE@example.com"
    with pytest.raises(SwitchError), transaction(conn):
        accounts.create_account(conn, "strasse@example.com")
    conn.close()
