"""Balance leases in the store (both stores) and across PostgreSQL replicas: never more leased than held."""
from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio

from common.dbclient import open_db_client
from common.errors import ErrorCode, SwitchError
from common.usage import UsageTotals
from common.wire import MessageType
from switchdb import accounts, db, leases
from tests.pg import open_conn, pg_url, store_kind, store_url  # noqa: F401
from tests.test_pg_replicas import replicas, seed, stored

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def lease(conn: db.Connection, account_id: str, key: str, wanted: int, now: datetime = T0, held: int = 0) -> int:
    with db.transaction(conn):
        return leases.lease(conn, account_id, key, wanted, now, held)


def test_leases_share_the_balance_renew_release_and_expire(
    tmp_path: Path, store_kind: str, store_url: str | None  # noqa: F811
) -> None:
    conn = open_conn(store_kind, tmp_path, store_url)
    with db.transaction(conn):
        account_id = accounts.create_account(conn, "l@example.com", "Free", 1000).id
    assert lease(conn, account_id, "a", 600) == 600
    assert lease(conn, account_id, "b", 600) == 400  # what a leaves
    assert lease(conn, account_id, "c", 1) == 0  # the account is dry: no lease, no row
    assert lease(conn, account_id, "a", 100) == 100  # set, not added: a gives 500 back
    assert lease(conn, account_id, "c", 900) == 500
    with db.transaction(conn):
        assert leases.leased(conn, account_id, T0) == 1000
    # A session that overran its lease keeps what it spent, even past the balance: no one else gets it.
    assert lease(conn, account_id, "b", 700, held=650) == 650
    with db.transaction(conn):
        assert leases.leased(conn, account_id, T0) == 1250
    assert lease(conn, account_id, "f", 10) == 0
    assert lease(conn, account_id, "c", 900) == 250  # c renews into what is left beside a and b
    with pytest.raises(SwitchError) as err:
        lease(conn, account_id, "b", 5, held=6)
    assert err.value.code == ErrorCode.EXTERNAL_BAD_PARAMS
    assert lease(conn, account_id, "b", 0) == 0  # released
    assert lease(conn, account_id, "d", 900) == 650
    # Not renewed for LEASE_S: void, whatever it held is the account's again.
    later = T0 + timedelta(seconds=leases.LEASE_S)
    assert lease(conn, account_id, "e", 2000, later) == 1000
    with db.transaction(conn):
        assert leases.leased(conn, account_id, later) == 1000
    with pytest.raises(SwitchError) as err:
        lease(conn, "nobody", "a", 1)
    assert err.value.code == ErrorCode.EXTERNAL_NOT_FOUND
    with pytest.raises(SwitchError) as err:
        lease(conn, account_id, "bad key!", 1)
    assert err.value.code == ErrorCode.EXTERNAL_BAD_PARAMS
    for text in ("-1", "1.5", "", "x", "١", str(leases.MAX_LEASE + 1), "9" * 40):
        with pytest.raises(SwitchError) as err:
            leases.parse_amount(text)
        assert err.value.code == ErrorCode.EXTERNAL_BAD_PARAMS
    assert leases.parse_amount(str(leases.MAX_LEASE)) == leases.MAX_LEASE
    conn.close()


USAGE_7 = UsageTotals(input_tokens=4, output_tokens=3, reports=1).to_json()


async def test_leases_on_four_replicas_never_exceed_the_balance(tmp_path: Path, pg_url: str) -> None:  # noqa: F811
    """Sessions on four replicas lease, spend from their lease and renew on one account at once,
    wanting more than it holds: no two leases ever hold the same tokens (RECORD_USAGE does not
    check the balance, so a doubly leased token would take it below zero)."""
    start = 700
    account_id, _ = seed(tmp_path, pg_url, start)
    sessions, rounds, want = 16, 12, 7
    dry: list[str] = []
    async with replicas(tmp_path, pg_url, 4) as running:
        endpoints = [d.address for d in running]

        async def session(s: int) -> None:
            key = f"s{s}"
            async with open_db_client(endpoints[s % 4], 20_000) as client:
                for r in range(rounds):
                    (amount,) = await client.request(MessageType.LEASE, account_id, key, "0", str(want))
                    if int(amount) < 7:
                        dry.append(key)
                        continue
                    await client.request(
                        MessageType.RECORD_USAGE, f"{key}-{r}", account_id, key, "openai", "m", USAGE_7
                    )

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for s in range(sessions):
                    nursery.start_soon(session, s)
        async with open_db_client(endpoints[0], 20_000) as client:
            (balance,) = await client.request(MessageType.GET_CREDITS, account_id)
            with pytest.raises(SwitchError) as err:
                await client.request(MessageType.LEASE, account_id, "s0", "0", "-5")
            assert err.value.code == ErrorCode.EXTERNAL_BAD_PARAMS
    final, _, rows = stored(tmp_path, pg_url, account_id)
    assert int(balance) == final == start - 7 * rows
    assert final >= 0  # every token spent was leased first: never two leases on the same tokens
    assert dry and rows > sessions  # the account ran dry while sessions still spent
    conn = open_conn("postgresql", tmp_path, pg_url)
    held = leases.leased(conn, account_id)
    conn.close()
    # A batch recorded after its session's last lease still counts in it: one per session at most.
    assert held <= final + 7 * sessions
