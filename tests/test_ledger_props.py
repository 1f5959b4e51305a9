"""The ledger's pure parts, with Hypothesis: the direct price of a plain usage row (switchdb's fast
path) is exactly `common.pricing.batch_cost`, whatever the counts and the model; the price book
travels to switchd unchanged.
"""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import SwitchError
from common.limits import MAX_REPORT_TOKENS
from common.pricing import DEFAULT_PRICES, ModelPrices, PriceBook, batch_cost
from common.usage import UsageTotals
from switchdb import prices, usage
from tests.batches import handle_batch

BOOK = PriceBook({**DEFAULT_PRICES, "text-only": ModelPrices(text_in=1_000, text_out=2_000)})
MODELS = st.sampled_from([*DEFAULT_PRICES, "text-only", "gpt-realtime-2025-08-28", "unknown-model", ""])
counts = st.one_of(st.integers(0, 2_000), st.integers(0, MAX_REPORT_TOKENS), st.just(0))


@settings(max_examples=400, deadline=None)
@given(
    model=MODELS,
    values=st.tuples(*[counts] * 9),
    seconds=st.one_of(st.just(0.0), st.floats(0, 10_000, allow_nan=False)),
)
def test_a_plain_rows_direct_price_is_batch_cost(model: str, values: tuple[int, ...], seconds: float) -> None:
    inp, out, transcription, text, audio, image, cached, out_text, out_audio = values
    totals = UsageTotals(inp, out, text, audio, image, cached, out_text, out_audio, transcription, seconds, 1)
    try:
        row = usage.usage_row("b", "a", "s", "openai", model, totals)
    except SwitchError:
        return  # beyond the limits: refused before any price
    assert len(row) == 17  # plain: no details beyond the columns
    fast = usage._plain_cost(BOOK, row)
    try:
        reference = batch_cost(usage.totals_of(row), BOOK, model).nano_usd
    except SwitchError:
        assert fast is None  # what batch_cost refuses, the fast path leaves to it
        return
    assert fast is None or fast == reference
    if not transcription and not seconds and model in ("gpt-realtime", "gpt-realtime-2025-08-28"):
        assert fast == reference  # the common case takes the fast path
    assert reference >= 0


def test_the_book_travels_unchanged() -> None:
    travelled = prices.book_from_json(prices.book_json(BOOK))
    assert {n: p.as_usd() for n, p in travelled.models.items()} == {n: p.as_usd() for n, p in BOOK.models.items()}
    assert (travelled.fallback, travelled.transcription_fallback) == (BOOK.fallback, BOOK.transcription_fallback)
    for bad in ("", "{}", "[]", '{"models": {"m": {"text_in": -1}}, "fallback": "m", "transcription_fallback": "m"}'):
        try:
            prices.book_from_json(bad)
        except SwitchError:
            continue
        raise AssertionError(f"accepted {bad!r}")


_ops = st.lists(
    st.one_of(
        st.tuples(st.just("topup"), st.integers(1, 10**6)),
        st.tuples(st.just("adjust"), st.integers(-(10**6), 10**6).filter(bool), st.booleans()),
        st.tuples(st.just("usage"), st.integers(0, 5_000), st.integers(0, 5_000), st.integers(0, 3)),
    ),
    max_size=12,
)


@settings(max_examples=60, deadline=None)
@given(unit=st.sampled_from(["tokens", "usd"]), markup=st.integers(1, 100_000), ops=_ops)
def test_the_balance_is_always_the_sum_of_its_history(unit: str, markup: int, ops: list[tuple[object, ...]]) -> None:
    """On a real (in-memory) SQLite store, whatever the sequence of top-ups, adjustments (refused or
    not) and usage batches (some sent twice), the balance equals the sum of the account's history
    and a plain running total of what each operation should do."""
    from common.pricing import charge, default_book
    from common.wire import MessageType, Request
    from switchdb import accounts, db, ledger
    from switchdb.db import transaction, utc_now

    conn = db.open_database(":memory:", None)
    db.migrate(conn)
    try:
        with transaction(conn):
            account = accounts.create_account(
                conn, "p@example.com", "Free", *((1000, 0) if unit == "tokens" else (None, 0)),
                **({"usd": 10**6, "markup": markup} if unit == "usd" else {"markup": markup}),
            )
        expected = account.credits
        for n, op in enumerate(ops):
            if op[0] == "topup":
                with transaction(conn):
                    accounts.top_up(conn, account.id, op[1], unit)  # type: ignore[arg-type]
                expected += op[1]  # type: ignore[operator]
            elif op[0] == "adjust":
                amount, allow = op[1], op[2]
                try:
                    with transaction(conn):
                        ledger.adjust(conn, account.id, unit, amount, "r", allow)  # type: ignore[arg-type]
                    expected += amount  # type: ignore[operator]
                except SwitchError:
                    assert expected + amount < 0 and not allow  # type: ignore[operator]
            else:
                _, inp, out, repeat = op
                totals = UsageTotals(input_tokens=inp, input_text=inp, output_tokens=out, output_audio=out,
                                     reports=1)
                request = Request("r", MessageType.RECORD_USAGE,
                                  (f"b{n}", account.id, "s", "openai", "gpt-realtime", totals.to_json()))
                for _ in range(1 + repeat):  # retries count once
                    handle_batch(conn, [request], utc_now())
                cost = batch_cost(totals, default_book(), "gpt-realtime").nano_usd
                expected -= charge(cost, markup) if unit == "usd" else inp + out
            with transaction(conn):
                history = ledger.history(conn, account.id)
            assert history["balance"] == history["sum"] == expected
    finally:
        conn.close()
