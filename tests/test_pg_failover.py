"""Failover end to end: two switchd, three switchdb replicas, one PostgreSQL; a replica killed -9 mid-run
and restarted costs no token, bills none twice, and drops no session."""
from __future__ import annotations

import signal
from contextlib import AsyncExitStack
from pathlib import Path

import psycopg
import trio
from trio_websocket import open_websocket_url

from tests.daemons import base_env, daemon
from tests.pg import pg_url  # noqa: F401
from tests.stack import Stack, client_url
from tests.test_pg_replicas import replicas
from tests.upstream import response_done, scripted_provider, session_created

def rows(conn: psycopg.Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM usage_metrics").fetchone()[0])  # type: ignore[index]


SESSIONS = 6
ROUNDS = 8  # response.done per session


async def test_killed_replica_bills_every_token_exactly_once(tmp_path: Path, pg_url: str) -> None:  # noqa: F811
    start = 1_000_000
    async with scripted_provider() as provider, replicas(tmp_path, pg_url, 3) as running:
        endpoints = ",".join(d.address for d in running)
        env = base_env(ZMQ_SOCKET_PATH=endpoints, DB_URL=pg_url, ZMQ_TIMEOUT_MS="1000", LOG_LEVEL="INFO")
        stack = Stack(tmp_path, env, running[0])
        account_id, key = await stack.account(tokens=start)
        async with stack.switchd(provider.url, "sw1") as sw1, stack.switchd(provider.url, "sw2") as sw2, \
                AsyncExitStack() as clients:
            sessions = []
            for i in range(SESSIONS):
                ws = await clients.enter_async_context(
                    open_websocket_url(client_url(sw1 if i % 2 else sw2, key, f"fo{i}")))
                up = await provider.next()
                await up.send_json(session_created())
                sessions.append((ws, up))
            for ws, _ in sessions:
                with trio.fail_after(10):
                    await ws.get_message()  # session.created

            async def round_trip(n: int) -> None:
                async with trio.open_nursery() as nursery:
                    for ws, up in sessions:
                        nursery.start_soon(respond, ws, up, n)

            async def respond(ws, up, n: int) -> None:  # type: ignore[no-untyped-def]
                await up.send_json(response_done(10 + n, 20))
                with trio.fail_after(10):
                    assert '"response.done"' in await ws.get_message()

            for n in range(4):
                await round_trip(n)
            # The fifth report of each session sends its batch: to each replica in turn, so some to
            # the victim, which holds them unanswered (stopped) and is then killed.
            victim = running[1]
            victim.terminate(signal.SIGSTOP)
            for n in range(4, 6):
                await round_trip(n)
            # Every session's first batch stored: those the victim held only after one timeout, on another replica.
            with psycopg.connect(pg_url, autocommit=True) as conn, trio.fail_after(20):
                while await trio.to_thread.run_sync(rows, conn) < SESSIONS:
                    pass  # each look is a real query to PostgreSQL
            victim.terminate(signal.SIGKILL)
            await victim.proc.wait()
            await round_trip(6)
            replica_env = base_env(ZMQ_SOCKET_PATH=victim.address, DB_URL=pg_url, LOG_LEVEL="INFO")
            async with daemon(["switchdb", "serve"], replica_env, tmp_path / "r1-again.log", cwd=tmp_path):
                await round_trip(ROUNDS - 1)
                for ws, _ in sessions:
                    await ws.aclose()
                for sw in (sw1, sw2):  # a graceful stop flushes what the sessions still hold
                    sw.terminate()
                    with trio.fail_after(30):
                        assert await sw.proc.wait() == 0
        expected = SESSIONS * sum(10 + n + 20 for n in range(ROUNDS))
        usage = await stack.cli("usage", "--account", account_id)
        credits = await stack.credits(account_id)
    assert usage["total_tokens"] == expected  # every token billed, none twice
    assert credits == start - expected
    logs = (tmp_path / "sw1.log").read_text() + (tmp_path / "sw2.log").read_text()
    assert "trying another replica" in logs  # the victim did hold requests, answered by another
    for name in ("sw1", "sw2"):
        assert not list((tmp_path / f"{name}-spool").glob("rejected-*")), name
