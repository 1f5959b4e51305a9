"""The RECORD_USAGE fast paths against the plain ones they stand in for.

The reader turns frames into usage rows without building a Request (`service.read_record`),
reads switchd's own usage_json layout with a regex (`usage.canonical_row`), and the worker
plans a flood's batches with a shorter loop (`usage._all_new`) and records an all-usage batch
without a savepoint. Each must give exactly what the general path gives: same rows, same
refusals, same balances.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import ErrorCode, SwitchError
from common.limits import MAX_REPORT_TOKENS
from common.usage import UsageTotals
from common.wire import MAX_MESSAGE_BYTES, MessageType, Request, decode_request, encode_request
from switchdb import accounts, service, usage
from switchdb.db import Connection, is_postgres, transaction, utc_now
from tests.pg import fresh_database, open_conn, store_kind, store_url  # noqa: F401
from tests.batches import handle_batch

ARGS = ("b1", "acct_1", "s", "openai", "gpt-realtime")


def reference_row(*args: str) -> usage.Row | tuple[str, str]:
    """What the general path makes of RECORD_USAGE arguments: the row, or the refusal's code."""
    *ids, usage_json = args
    try:
        return usage.usage_row(*ids, UsageTotals.from_json(usage_json))  # type: ignore[arg-type]
    except SwitchError as exc:
        return ("refused", exc.code)
    except OverflowError:  # from_json's own, for an integer duration beyond any float: a refusal too
        return ("refused", ErrorCode.INTERNAL_BAD_USAGE)


def fast_row(*args: str) -> usage.Row | tuple[str, str]:
    try:
        return service.read_row(*args)
    except SwitchError as exc:
        return ("refused", exc.code)


counts = st.one_of(st.integers(min_value=0, max_value=10**18 - 1), st.integers(min_value=0, max_value=2**64))
seconds = st.one_of(st.just(0.0), st.floats(min_value=0, allow_nan=False), st.integers(min_value=0, max_value=10**20))
totals = st.builds(
    UsageTotals, input_tokens=counts, output_tokens=counts, input_text=counts, input_audio=counts, input_image=counts,
    input_cached=counts, output_text=counts, output_audio=counts, transcription_tokens=counts,
    transcription_seconds=seconds, reports=counts,
)


@given(totals)
def test_switchds_layout_is_read_as_from_json_reads_it(t: UsageTotals) -> None:
    text = t.to_json()
    try:
        row = usage.canonical_row(*ARGS, text)
    except SwitchError as exc:  # counts past MAX_REPORT_TOKENS: refused, whichever way it is read
        assert fast_row(*ARGS, text) == ("refused", exc.code) == ("refused", ErrorCode.INTERNAL_BAD_USAGE)
        return
    if row is not None:
        assert row == reference_row(*ARGS, text)
        assert [type(v) for v in row[5:]] == [int] * 9 + [float, int, int]
    small = max(t.input_tokens, t.output_tokens, t.transcription_tokens, t.input_text, t.input_audio, t.input_image,
                t.input_cached, t.output_text, t.output_audio, t.reports, t.tokens) <= MAX_REPORT_TOKENS
    s = t.transcription_seconds
    plain_seconds = (type(s) is float and math.isfinite(s) and math.copysign(1, s) > 0) or (
        type(s) is int and s < 10**17)
    if small and plain_seconds:
        assert row is not None  # what switchd sends takes the fast way
    assert fast_row(*ARGS, text) == reference_row(*ARGS, text)


def _mutations(text: str) -> st.SearchStrategy[str]:
    position = st.integers(min_value=0, max_value=len(text))
    chars = st.sampled_from(list('0123456789-+.eE ",:{}[]a\\') + ["\u00e9", "\x00"])
    return st.one_of(
        st.tuples(position, chars).map(lambda pc: text[: pc[0]] + pc[1] + text[pc[0] :]),
        position.map(lambda p: text[:p] + text[p + 1 :]),
        st.tuples(position, chars).map(lambda pc: text[: pc[0]] + pc[1] + text[pc[0] + 1 :]),
    )


@settings(max_examples=400)
@given(totals.map(UsageTotals.to_json).flatmap(_mutations))
def test_any_near_miss_of_the_layout_is_read_as_from_json_reads_it(text: str) -> None:
    assert fast_row(*ARGS, text) == reference_row(*ARGS, text)


@pytest.mark.parametrize("text", [
    '{"transcription_seconds": 1' + "0" * 400 + "}",  # from_json itself raises OverflowError here
    UsageTotals(input_tokens=1).to_json().replace('"transcription_seconds":0.0', '"transcription_seconds":1e999'),
    json.dumps({"input_tokens": 2**63}, separators=(",", ":")),
])
def test_out_of_range_usage_is_refused_not_raised(text: str) -> None:
    with pytest.raises(SwitchError) as exc:
        service.read_row(*ARGS, text)
    assert exc.value.code == ErrorCode.INTERNAL_BAD_USAGE


field = st.one_of(st.text(max_size=6), st.binary(max_size=6).map(bytes))
usage_field = st.one_of(totals.map(UsageTotals.to_json), st.text(max_size=12), st.binary(max_size=12).map(bytes))


def _frames_and_reference(frames: list[bytes]) -> object:
    try:
        request = decode_request(frames)
        return service.read_usage(request)
    except SwitchError as exc:
        return ("refused", exc.code)


def _read_record(frames: list[bytes]) -> object:
    try:
        return service.read_record(frames)
    except SwitchError as exc:
        return ("refused", exc.code)


@settings(max_examples=300)
@given(st.lists(field, min_size=6, max_size=6), usage_field, st.integers(min_value=0, max_value=2))
def test_reading_frames_is_decoding_then_reading(args: list[str | bytes], usage_json: str | bytes, arity: int) -> None:
    raw = [a.encode() if isinstance(a, str) else a for a in [*args[:5], usage_json]]
    frames = [b"r1", MessageType.RECORD_USAGE.value.encode(), *raw][: 7 + arity]  # 5, 6 or 7 arguments
    assert _read_record(frames) == _frames_and_reference(frames)


def test_reading_frames_refuses_what_decoding_refuses() -> None:
    good = encode_request("r1", MessageType.RECORD_USAGE, *ARGS, UsageTotals(input_tokens=5).to_json())
    assert service.read_record(good) == service.read_usage(decode_request(good))
    assert service.read_record([memoryview(f) for f in good]) == service.read_record(good)
    for frames, code in [
        ([b"\xff", *good[1:]], ErrorCode.INTERNAL_MALFORMED_MESSAGE),  # the request id must be text too
        ([*good[:2], b"\xc3\x28", *good[3:]], ErrorCode.INTERNAL_MALFORMED_MESSAGE),
        ([*good[:7], b"x" * (MAX_MESSAGE_BYTES + 1)], ErrorCode.INTERNAL_MALFORMED_MESSAGE),
        (good[:7], ErrorCode.INTERNAL_MALFORMED_MESSAGE),
        ([*good[:7], b'{"input_tokens": -1}'], ErrorCode.INTERNAL_BAD_USAGE),
    ]:
        with pytest.raises(SwitchError) as exc:
            service.read_record(frames)
        assert exc.value.code == code


rows = st.lists(
    st.tuples(st.integers(min_value=0, max_value=40), st.sampled_from(["acct_a", "acct_b", "acct_c"]),
              st.integers(min_value=0, max_value=1000)),
    max_size=80,
)


@given(rows, st.dictionaries(st.sampled_from(["acct_a", "acct_b", "acct_c"]), st.integers(-500, 500), min_size=3))
def test_planning_a_flood_batch_matches_the_general_plan(
    spec: list[tuple[int, str, int]], balances: dict[str, int]
) -> None:
    batch = [(f"b{n}", account, "s", "openai", "m", tokens, 0, 0, 0, 0, 0, 0, 0, 0, 0.0, 1, tokens)
             for n, (_, account, tokens) in enumerate(spec)]  # distinct ids: the fast plan's precondition
    assert usage._all_new(batch, balances) == usage._plan(batch, dict(balances), set())  # type: ignore[arg-type]


# --- on a real file ------------------------------------------------------------------------------


@pytest.fixture
def conn(tmp_path: Path, store_kind: str, store_url: str | None) -> Connection:  # noqa: F811
    c = open_conn(store_kind, tmp_path, store_url, "u.db")
    yield c  # type: ignore[misc]
    c.close()


def _account(conn: Connection, email: str, tokens: int, topup: int = 0) -> str:
    with transaction(conn):
        return accounts.create_account(conn, email, "Free", tokens, topup).id


def _row(batch_id: str, account_id: str, tokens: int) -> usage.Row:
    return service.read_row(batch_id, account_id, "s", "openai", "m",
                            UsageTotals(input_tokens=tokens, input_text=tokens, reports=1).to_json())


@pytest.mark.parametrize("size", [1, 2, 63, 64, 65, 127, 128, 130])
def test_every_batch_size_stores_every_row_exactly(conn: Connection, size: int) -> None:
    a = _account(conn, "a@example.com", 10**6)
    results = service.run_batch(conn, [_row(f"b{i}", a, i) for i in range(size)], utc_now())
    assert results == [10**6 - i * (i + 1) // 2 for i in range(size)]
    if is_postgres(conn):
        typeof, types = "pg_typeof({})::text", ("bigint", "double precision")
    else:
        typeof, types = "typeof({})", ("integer", "real")
    stored = conn.execute(f"SELECT batch_id, input_tokens, {typeof.format('input_tokens')},"
                          f" {typeof.format('transcription_seconds')}, total_tokens"
                          " FROM usage_metrics ORDER BY id").fetchall()
    # (PostgreSQL inserts a batch's rows in batch id order: ids need not follow the arrival order.)
    assert sorted(stored) == sorted((f"b{i}", i, *types, i) for i in range(size))


def test_flood_batches_and_general_batches_agree(tmp_path: Path, store_kind: str) -> None:  # noqa: F811
    # The same stream (repeats, unknown accounts, top-ups, then batches of new ids only) through the
    # all-usage way (rows only) and through the general way (Requests, with a read among them):
    # same answers, same store.
    answers, stores = [], []
    for way in ("rows", "requests"):
        rng = random.Random(11)
        with contextlib.ExitStack() as cleanup:
            url = cleanup.enter_context(fresh_database()) if store_kind == "postgresql" else None
            c = open_conn(store_kind, tmp_path, url, f"{way}.db")
            cleanup.callback(c.close)
            answers.append(_flood_answers(c, rng, way))
            stores.append(_flood_store(c))
    assert answers[0] == answers[1]
    assert sorted(stores[0][1]) == sorted(stores[1][1])
    assert stores[0][0] == stores[1][0]


def _flood_answers(c: Connection, rng: random.Random, way: str) -> list[object]:
    ids = [_account(c, f"u{i}@example.com", rng.randint(0, 300), rng.choice([0, 50])) for i in range(2)]
    got: list[object] = []
    for start in range(0, 240, 60):
        fresh = start >= 120  # new and distinct ids, known accounts: the flood's shape
        batch: list[object] = []
        for n in range(start, start + 60):
            account = rng.choice(ids if fresh else [*ids, "acct_nobody"])
            batch_id = f"u{n}" if fresh else f"b{rng.randint(0, 150)}"
            args = (batch_id, account, "s", "openai", "m",
                    UsageTotals(input_tokens=rng.randint(0, 40), output_tokens=rng.randint(0, 40)).to_json())
            batch.append(service.read_row(*args) if way == "rows" else
                         Request(f"r{n}", MessageType.RECORD_USAGE, args))
        if way == "requests":
            batch.append(Request("credits", MessageType.GET_CREDITS, (ids[0],)))
        outcomes = handle_batch(c, batch, utc_now())  # type: ignore[arg-type]
        got += [(o.status, o.fields, o.message.replace(ids[0], "account0").replace(ids[1], "account1"))
                for o in outcomes[:60]]
    return got


def _flood_store(c: Connection) -> tuple[list[object], list[object]]:
    ids = [a for (a,) in c.execute("SELECT id FROM accounts ORDER BY created_at, email")]
    name = {a: f"account{i}" for i, a in enumerate(ids)}
    return ([(b, name.get(a, a), t) for b, a, t in
             c.execute("SELECT batch_id, account_id, total_tokens FROM usage_metrics ORDER BY id")],
            [(name[a], t, u) for a, t, u in c.execute("SELECT id, token_remaining, topup_remaining FROM accounts")])


def test_a_failing_row_in_a_flood_batch_fails_alone(conn: Connection) -> None:
    a = _account(conn, "a@example.com", 1000)
    if is_postgres(conn):
        conn.execute("CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
                     " IF NEW.batch_id = 'bad' THEN RAISE EXCEPTION 'boom'; END IF; RETURN NEW; END $$")
        conn.execute("CREATE TRIGGER boom BEFORE INSERT ON usage_metrics FOR EACH ROW EXECUTE FUNCTION boom()")
    else:
        conn.execute("CREATE TRIGGER boom BEFORE INSERT ON usage_metrics WHEN NEW.batch_id = 'bad'"
                     " BEGIN SELECT RAISE(ABORT, 'boom'); END")
    outcomes = handle_batch(conn, [_row("b1", a, 10), _row("bad", a, 10), _row("b2", a, 10)], utc_now())
    assert [(o.status, o.fields) for o in outcomes] == [
        ("OK", ("990",)), (ErrorCode.INTERNAL_ERROR, ()), ("OK", ("980",))
    ]
    assert {r[0] for r in conn.execute("SELECT batch_id FROM usage_metrics")} == {"b1", "b2"}
    assert accounts.require_account(conn, a).credits == 980
