"""Properties: any stream of requests gets the same answers and leaves the same store on SQLite and PostgreSQL."""
from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.usage import UsageTotals
from common.wire import MessageType, Request
from switchdb import accounts, db
from tests.pg import fresh_database, open_conn
from tests.batches import handle_batch

_runs = itertools.count()


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[db.Connection, db.Connection]]:
    with fresh_database() as url:
        sqlite = open_conn("sqlite", tmp_path_factory.mktemp("props"), None)
        postgres = open_conn("postgresql", Path("."), url)
        yield sqlite, postgres
        sqlite.close()
        postgres.close()


usage_args = st.tuples(
    st.integers(0, 5),  # batch id, from a few: repeats within a batch and across batches
    st.integers(0, 2),  # account (2: unknown)
    st.integers(0, 400),
    st.integers(0, 400),
)
texts = st.text(st.characters(blacklist_categories=["Cs"]), max_size=30) | st.just("a\x00b")
requests = st.one_of(
    usage_args.map(lambda a: ("usage", a)),
    st.tuples(st.integers(0, 2), texts).map(lambda a: ("append", a)),
    st.integers(0, 2).map(lambda a: ("credits", a)),
    st.sampled_from(['{"input_tokens": -1}', "[]", '{"input_tokens": 1e3}']).map(lambda a: ("bad", a)),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.lists(requests, min_size=1, max_size=12), min_size=1, max_size=4),
       st.integers(0, 300), st.integers(-50, 300))
def test_both_stores_answer_alike(
    stores: tuple[db.Connection, db.Connection], batches: list[list[tuple[str, Any]]], topup: int, tokens: int
) -> None:
    run = next(_runs)
    answers, states = [], []
    for conn in stores:
        with db.transaction(conn):
            ids = [accounts.create_account(conn, f"p{run}-{i}@example.com", "Free", max(tokens, 0), topup).id
                   for i in range(2)] + [f"acct_nobody{run}"]
        names = {ids[0]: "A", ids[1]: "B", ids[2]: "N"}
        got = []
        for n, batch in enumerate(batches):
            built = []
            for i, (kind, args) in enumerate(batch):
                rid = f"r{n}-{i}"
                if kind == "usage":
                    b, a, inp, out = args
                    usage = UsageTotals(input_tokens=inp, output_tokens=out, reports=1).to_json()
                    built.append(Request(rid, MessageType.RECORD_USAGE, (f"{run}-b{b}", ids[a], "s", "p", "m", usage)))
                elif kind == "append":
                    a, text = args
                    built.append(Request(rid, MessageType.APPEND_CONVERSATION, (ids[a], "s", text)))
                elif kind == "credits":
                    built.append(Request(rid, MessageType.GET_CREDITS, (ids[args],)))
                else:
                    built.append(Request(rid, MessageType.RECORD_USAGE, (f"{run}-x", ids[0], "s", "p", "m", args)))
            outcomes = handle_batch(conn, built, db.utc_now())
            got += [(o.status, o.fields, o.summarise, _named(o.message, names)) for o in outcomes]
        answers.append(got)
        states.append((
            [tuple(accounts.require_account(conn, a).as_json()[k] for k in ("token_remaining", "topup_remaining"))
             for a in ids[:2]],
            sorted((b, names[a], t) for b, a, t in conn.execute(
                "SELECT batch_id, account_id, total_tokens FROM usage_metrics WHERE batch_id LIKE ?", (f"{run}-%",))),
            [conn.execute("SELECT data FROM sessions WHERE account_id = ? AND type = 'CONV'", (a,)).fetchall()
             for a in ids],
        ))
    assert answers[0] == answers[1]
    assert states[0] == states[1]


def _named(message: str, names: dict[str, str]) -> str:
    for account_id, name in names.items():
        message = message.replace(account_id, name)
    return message
