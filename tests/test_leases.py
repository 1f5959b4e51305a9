"""Balance leases in the store (both stores) and across PostgreSQL replicas: never more leased than held."""
from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio
import trio.testing

from common.dbclient import open_db_client
from common.errors import ErrorCode, SwitchError
from common.usage import UsageTotals
from common.replies import Validated
from common.wire import OK, MessageType, Request
from switchd import billing
from switchd.billing import Ledger, open_lease, record, renew_lease, run_leases
from switchdb import accounts, db, leases, service
from tests.upstream import response_done
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


class StoreDb:
    """A DbClient over the real switchdb handlers on one connection, in order; with `lose`, a
    request is carried out but its answer lost (switchd's request timed out)."""

    def __init__(self, conn: db.Connection) -> None:
        self.conn = conn
        self.lose = False
        self.down = False
        self.count = 0

    async def request(self, type: MessageType, *args: str, timeout_s: float | None = None) -> tuple[str, ...]:
        await trio.lowlevel.checkpoint()
        if self.down:
            raise SwitchError(ErrorCode.INTERNAL_DB_UNAVAILABLE, "switchdb is away")
        self.count += 1
        now = db.format_time(datetime.now(UTC))
        (result,) = service.run_batch(self.conn, [Request(str(self.count), type, args)], now)
        if self.lose:
            raise SwitchError(ErrorCode.INTERNAL_DB_UNAVAILABLE, f"switchdb did not answer {type}")
        if isinstance(result, int):
            return (str(result),)
        if result.status != OK:
            raise SwitchError(ErrorCode(result.status), result.message)
        return result.fields


RESPONSE = 333  # tokens of response_done(100, 233)


def can_spend(ledger: Ledger) -> int:
    """Everything the session may take off the balance, as it sees it: spent, plus its credits."""
    return ledger.spent + max(ledger.credits, 0)


async def test_a_renewal_whose_answer_is_lost_never_frees_what_its_session_goes_on_spending(tmp_path: Path) -> None:
    """Two sessions share 8,000 tokens. A's renewal is carried out but its answer lost: A goes on
    with the credits it holds, so switchdb must not have lowered A's lease below them, or B's next
    renewal is granted them too and together they can spend more than the account holds (before
    the fix, 8,999: three responses beyond the one each may overrun)."""
    conn = open_conn("sqlite", tmp_path, None)
    with db.transaction(conn):
        account_id = accounts.create_account(conn, "lost@example.com", "Free", 8000).id
    store = StoreDb(conn)
    ledgers = []
    for name in ("a", "b"):
        account, key = await open_lease(store, Validated(account_id, 8000, ""))  # type: ignore[arg-type]
        assert account.balance == 4000
        ledgers.append(Ledger(account_id, name, "gpt-realtime", account.balance, lease_key=key))
    a, b = ledgers
    for _ in range(3):
        a.add(response_done(100, 233))
        b.add(response_done(100, 233))
    batch = b.take_batch()
    assert batch is not None
    b.acknowledged(await record(store, batch))  # B's 999 recorded: still counted in B's lease too
    store.lose = True
    await renew_lease(a, store)
    store.lose = False
    assert a.credits == 4000 - 3 * RESPONSE  # no answer: A goes on with what it held
    await renew_lease(b, store)
    assert can_spend(a) + can_spend(b) <= 8000
    with db.transaction(conn):
        assert leases.leased(conn, account_id) >= a.holding() + b.holding()
    conn.close()


async def advance(clock: trio.testing.MockClock, seconds: float) -> None:
    """Virtual time moves on by `seconds`; back once every task that woke is blocked again."""
    clock.jump(seconds)
    await trio.testing.wait_all_tasks_blocked()


async def test_a_session_spends_no_more_of_a_lease_it_could_not_renew_before_it_lapses(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """switchdb away: the session goes on with what it holds, but not past LEASE_VALID_S after the
    last answered renewal was asked; by then switchdb (LEASE_S) may have given the lease to another."""
    assert billing.LEASE_VALID_S + 5 + 1 < leases.LEASE_S  # a renewal's timeout, and expiry stored to the second
    conn = open_conn("sqlite", tmp_path, None)
    with db.transaction(conn):
        account_id = accounts.create_account(conn, "lapse@example.com", "Free", 8000).id
    store = StoreDb(conn)
    account, key = await open_lease(store, Validated(account_id, 8000, ""))  # type: ignore[arg-type]
    ledger = Ledger(account_id, "s", "gpt-realtime", account.balance, lease_key=key)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_leases, ledger, store)
        await advance(autojump_clock, billing.RENEW_S + 1)  # one renewal answered
        assert ledger.credits == 4000 and ledger.lease_until is not None
        store.down = True
        await advance(autojump_clock, ledger.lease_until - trio.current_time() - 0.5)
        assert ledger.credits == 4000  # a renewal failed, the lease still stands: spent as held
        await advance(autojump_clock, 1)
        assert ledger.credits == 0  # lapsed: the next report cuts the session unless a renewal comes
        assert not await ledger.refill()
        store.down = False
        assert await ledger.refill()  # switchdb back: renewed, the session goes on
        nursery.cancel_scope.cancel()
    conn.close()
