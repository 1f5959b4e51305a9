"""Several `switchdb serve` replicas on one real PostgreSQL, and switchd's client spreading over them."""
from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import psycopg
import pytest
import trio

from common.dbclient import DbClient, open_db_client
from common.errors import ErrorCode, SwitchError
from common.usage import UsageTotals
from common.wire import MessageType
from switchdb import accounts, db
from tests.daemons import Daemon, base_env, daemon
from tests.pg import open_conn, pg_url  # noqa: F401

USAGE_5 = UsageTotals(input_tokens=3, output_tokens=2, reports=1).to_json()


def seed(tmp_path: Path, url: str, tokens: int) -> tuple[str, str]:
    conn = open_conn("postgresql", tmp_path, url)
    with db.transaction(conn):
        account = accounts.create_account(conn, "r@example.com", "Free", tokens)
        key, _ = accounts.create_key(conn, account.id, "r")
    conn.close()
    return account.id, key


@asynccontextmanager
async def replicas(tmp_path: Path, url: str, count: int, **extra: str) -> AsyncIterator[list[Daemon]]:
    """`count` replicas on `url`, all launched at the same moment."""
    async with AsyncExitStack() as stack:
        started: list[Daemon | None] = [None] * count

        async def start(i: int) -> None:
            env = base_env(ZMQ_SOCKET_PATH=f"ipc://{tmp_path}/r{i}.sock", DB_URL=url, LOG_LEVEL="INFO", **extra)
            started[i] = await stack.enter_async_context(
                daemon(["switchdb", "serve"], env, tmp_path / f"r{i}.log", cwd=tmp_path)
            )

        async with trio.open_nursery() as nursery:
            for i in range(count):
                nursery.start_soon(start, i)
        yield [d for d in started if d is not None]


def stored(tmp_path: Path, url: str, account_id: str) -> tuple[int, set[str], int]:
    """(balance, batch ids stored, usage rows) of the account."""
    conn = open_conn("postgresql", tmp_path, url)
    balance = accounts.require_account(conn, account_id).credits
    ids = [row[0] for row in conn.execute("SELECT batch_id FROM usage_metrics WHERE account_id = ?", (account_id,))]
    conn.close()
    return balance, set(ids), len(ids)


async def test_two_replicas_starting_at_once_apply_the_migrations_once(tmp_path: Path, pg_url: str) -> None:  # noqa: F811
    async with replicas(tmp_path, pg_url, 2) as (first, second):
        logs = first.log() + second.log()
    for name, _ in db.MIGRATIONS:
        assert logs.count(f"applied migration {name}") == 1, logs
    with psycopg.connect(pg_url) as conn:
        names = [row[0] for row in conn.execute("SELECT name FROM schema_migrations ORDER BY name")]
    assert names == [name for name, _ in db.MIGRATIONS]
    assert "password" not in logs and "postgres:@" not in logs


async def test_four_replicas_many_clients_one_account_exact(tmp_path: Path, pg_url: str) -> None:  # noqa: F811
    start = 10_000_000
    account_id, _ = seed(tmp_path, pg_url, start)
    clients, per_client = 8, 60
    acked: list[int] = []
    async with replicas(tmp_path, pg_url, 4) as running:
        endpoints = [d.address for d in running]

        async def client(c: int) -> None:
            # Each client talks to one replica; every fifth batch is also resent, at once, to the
            # next replica: a retry racing its original on another replica.
            async with open_db_client(endpoints[c % 4], 20_000) as own, \
                    open_db_client(endpoints[(c + 1) % 4], 20_000) as other, trio.open_nursery() as nursery:
                for i in range(per_client):
                    nursery.start_soon(record, own, f"c{c}-{i}")
                    if i % 5 == 0:
                        nursery.start_soon(record, other, f"c{c}-{i}")

        async def record(client: DbClient, batch_id: str) -> None:
            (credits,) = await client.request(
                MessageType.RECORD_USAGE, batch_id, account_id, "s", "openai", "m", USAGE_5
            )
            acked.append(int(credits))

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for c in range(clients):
                    nursery.start_soon(client, c)
    balance, ids, rows = stored(tmp_path, pg_url, account_id)
    assert rows == len(ids) == clients * per_client
    assert balance == start - 5 * clients * per_client
    assert len(acked) == clients * (per_client + per_client // 5)
    assert min(acked) == balance  # no reply ever showed less than what was finally deducted


async def test_a_killed_replica_costs_one_timeout_and_no_doubled_bill(tmp_path: Path, pg_url: str) -> None:  # noqa: F811
    start = 1_000_000
    account_id, key = seed(tmp_path, pg_url, start)
    timeout_ms = 1000
    async with replicas(tmp_path, pg_url, 2) as (first, second):
        endpoints = f"{first.address},{second.address}"
        async with open_db_client(endpoints, timeout_ms) as client:
            for i in range(20):  # round-robin: both replicas answer
                await client.request(MessageType.RECORD_USAGE, f"a{i}", account_id, "s", "openai", "m", USAGE_5)
            first.terminate(signal.SIGSTOP)  # a replica holding requests without answering...
            with trio.fail_after(4 * timeout_ms / 1000):
                async with trio.open_nursery() as nursery:
                    for i in range(10):
                        nursery.start_soon(client.request, MessageType.RECORD_USAGE, f"b{i}", account_id, "s",
                                           "openai", "m", USAGE_5)
                        nursery.start_soon(client.request, MessageType.VALIDATE_AND_LOAD, key, "s")
            first.terminate(signal.SIGKILL)  # ...then killed: what it held is lost with it
            await first.proc.wait()
            with trio.fail_after(4 * timeout_ms / 1000):
                for i in range(10):
                    await client.request(MessageType.RECORD_USAGE, f"c{i}", account_id, "s", "openai", "m", USAGE_5)
                    # a retry of a batch the dead replica may have recorded: never deducted twice
                    await client.request(MessageType.RECORD_USAGE, f"b{i}", account_id, "s", "openai", "m", USAGE_5)
                (credits,) = await client.request(MessageType.GET_CREDITS, account_id)
    balance, ids, rows = stored(tmp_path, pg_url, account_id)
    assert rows == len(ids) == 40
    assert balance == int(credits) == start - 5 * 40


async def test_a_database_outage_is_answered_retryable_and_the_retry_counts_once(
    tmp_path: Path, pg_url: str  # noqa: F811
) -> None:
    account_id, _ = seed(tmp_path, pg_url, 1000)
    name = pg_url.rsplit("?", 1)[0].rsplit("/", 1)[1]
    admin_url = pg_url.replace(f"/{name}?", "/postgres?")
    async with replicas(tmp_path, pg_url, 1) as (replica,), open_db_client(replica.address, 10_000) as client:
        args = (account_id, "s", "openai", "m", USAGE_5)
        assert await client.request(MessageType.RECORD_USAGE, "b0", *args) == ("995",)
        with psycopg.connect(admin_url, autocommit=True) as admin:
            # The database goes away under the replica: its pooled connections die, new ones are refused.
            admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
            with pytest.raises(SwitchError) as err:
                await client.request(MessageType.RECORD_USAGE, "b1", *args)
            assert err.value.code == ErrorCode.INTERNAL_DB_UNAVAILABLE  # switchd keeps the batch and retries
            admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
        assert await client.request(MessageType.RECORD_USAGE, "b1", *args) == ("990",)
        assert await client.request(MessageType.RECORD_USAGE, "b1", *args) == ("990",)
    assert "failed, to be retried" in replica.log()
    balance, ids, _ = stored(tmp_path, pg_url, account_id)
    assert (balance, ids) == (990, {"b0", "b1"})


async def test_one_sessions_appends_stay_in_order_across_replicas(tmp_path: Path, pg_url: str) -> None:  # noqa: F811
    account_id, key = seed(tmp_path, pg_url, 1000)
    async with replicas(tmp_path, pg_url, 2) as (first, second), \
            open_db_client(f"{first.address},{second.address}", 5000) as client:
        lines = [f"user:line {i}\n" for i in range(300)]
        for session in ("s1", "s2"):
            for line in lines:
                await client.send(MessageType.APPEND_CONVERSATION, account_id, session, line)
        # Requests alternate between the replicas; both see every append once it is committed.
        with trio.fail_after(20):
            for session in ("s1", "s2"):
                while True:  # each try is a real round trip to a replica
                    _, _, update = await client.request(MessageType.VALIDATE_AND_LOAD, key, session)
                    if update.endswith("line 299\\n\"}}"):
                        break
        conn = open_conn("postgresql", tmp_path, pg_url)
        stored = [conn.execute("SELECT data FROM sessions WHERE session_id = ? AND type = 'CONV'", (s,)).fetchone()[0]
                  for s in ("s1", "s2")]
        conn.close()
    assert stored == ["".join(lines)] * 2
