"""The usage journal end to end: switchd killed with SIGKILL at the worst moments, restarted on
the same SPOOL_DIR, bills every report the client saw exactly once; clients come back."""
from __future__ import annotations

import json
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from perf.procs import children
from switchd.journal import parse_journal
from tests.stack import Stack, client_url
from tests.test_resilience_e2e import MARKER, drain, session_updated, speak, stored_conversation
from tests.upstream import ScriptedProvider, response_done, session_created


async def wait_for(predicate: Callable[[], Awaitable[bool]]) -> None:
    """Until `predicate`, about other processes' state, holds (20 s at most)."""
    with trio.fail_after(20):
        # Their files and database: there is no event of ours to wait on.
        while not await predicate():
            await trio.lowlevel.checkpoint()


def journals(spool: Path) -> list[Path]:
    return sorted(spool.rglob("journal-*.jsonl"))


def journal_text(spool: Path) -> str:
    return "".join(p.read_text() for p in journals(spool))


async def credits_become(stack: Stack, account_id: str, expected: int) -> None:
    async def check() -> bool:
        return await stack.credits(account_id) == expected
    await wait_for(check)


def usage_rows(stack: Stack, account_id: str) -> list[tuple[str, int]]:
    import sqlite3
    from contextlib import closing

    with closing(sqlite3.connect(f"file:{stack.tmp / 'switch.db'}?mode=ro", uri=True)) as db:
        return db.execute("SELECT batch_id, input_tokens + output_tokens FROM usage_metrics WHERE account_id = ?",
                          (account_id,)).fetchall()


async def test_sigkill_right_after_n_responses_bills_exactly_n_after_restart(
    stack: Stack, provider: ScriptedProvider
) -> None:
    account_id, key = await stack.account(tokens=100_000)
    spool = stack.tmp / "switchd-spool"
    first = 5 * (5 + 50)  # one full batch, acknowledged before the kill
    n = 3  # then three more the client sees; the next flush would be 2 s later
    expected = first + sum(i + 10 * i for i in range(1, n + 1))
    async with stack.switchd(provider.url) as sw:
        async with open_websocket_url(client_url(sw, key, "n")) as ws:
            up = await provider.next()
            for _ in range(5):
                await up.send_json(response_done(5, 50))
            await drain(ws, 5)
            await credits_become(stack, account_id, 100_000 - first)
            for i in range(1, n + 1):
                await up.send_json(response_done(i, 10 * i))
            seen = await drain(ws, n)
            assert [e["type"] for e in seen] == ["response.done"] * n
            sw.terminate(signal.SIGKILL)  # at once: the session never gets to flush
            await sw.proc.wait()
    (dead,) = journals(spool)
    owed, _ = parse_journal(dead.read_bytes())
    assert len(owed.pending) + len(owed.unacked) > 0  # what the kill would have lost without the journal
    async with stack.switchd(provider.url):  # the same SPOOL_DIR
        await credits_become(stack, account_id, 100_000 - expected)

        async def replayed() -> bool:  # the dead journal goes once everything in it is acknowledged
            return len(journals(spool)) == 1
        await wait_for(replayed)
        assert await stack.credits(account_id) == 100_000 - expected
    assert sum(tokens for _, tokens in usage_rows(stack, account_id)) == expected
    assert journals(spool) == []  # the clean stop leaves nothing owed, so no file


async def test_kill_between_batch_sent_and_ack_is_not_billed_twice(stack: Stack, provider: ScriptedProvider) -> None:
    account_id, key = await stack.account(tokens=100_000)
    spool = stack.tmp / "switchd-spool"
    async with stack.switchd(provider.url, ZMQ_TIMEOUT_MS="300") as sw:
        async with open_websocket_url(client_url(sw, key, "window")) as ws:
            up = await provider.next()
            stack.db.terminate(signal.SIGSTOP)  # switchdb takes the batch into its socket but does not answer
            try:
                for _ in range(5):  # a full batch: sent at once
                    await up.send_json(response_done(40, 60))
                await drain(ws, 5)

                async def sent_unacked() -> bool:  # journaled, sent, timed out at least once, no ack
                    text = journal_text(spool)
                    return '"t":"b"' in text and "not recorded" in sw.log()
                await wait_for(sent_unacked)
                (batch_id,) = [json.loads(line)["id"] for line in journal_text(spool).splitlines()
                               if '"t":"b"' in line]
                assert '"t":"k"' not in journal_text(spool)
                sw.terminate(signal.SIGKILL)
                await sw.proc.wait()
            finally:
                stack.db.terminate(signal.SIGCONT)
    # switchdb now reads the request(s) the dead switchd had sent; the restart resends the same id.
    async with stack.switchd(provider.url, ZMQ_TIMEOUT_MS="300"):
        await credits_become(stack, account_id, 100_000 - 500)

        async def replayed() -> bool:
            return len(journals(spool)) == 1
        await wait_for(replayed)
    assert usage_rows(stack, account_id) == [(batch_id, 500)]  # the journaled id, recorded once
    assert await stack.credits(account_id) == 100_000 - 500


async def test_corrupt_journal_is_kept_aside_and_a_torn_one_replayed(stack: Stack, provider: ScriptedProvider) -> None:
    account_id, _ = await stack.account(tokens=1000)
    spool = stack.tmp / "switchd-spool"
    spool.mkdir()
    garbage = b'{"t":"h","v":1,"replaces":null}\nthis is not json\n{"t":"k","id":"x"}\n'
    (spool / "journal-1-corrupt.jsonl").write_bytes(garbage)
    usage = json.dumps({"input_tokens": 30, "output_tokens": 0, "reports": 1})
    torn = (
        b'{"t":"h","v":1,"replaces":null}\n'
        + json.dumps({"t": "r", "n": 0, "a": account_id, "s": "t", "m": "gpt-realtime", "u": usage}).encode() + b"\n"
        + b'{"t":"r","n":1,"a":"' + account_id.encode() + b'","s":"t","m":"gpt-re'  # died mid-write
    )
    (spool / "journal-2-torn.jsonl").write_bytes(torn)
    async with stack.switchd(provider.url) as sw:
        await credits_become(stack, account_id, 1000 - 30)  # the whole report, not the torn one
        assert (spool / "journal-1-corrupt.bad").read_bytes() == garbage  # kept byte for byte
        assert not (spool / "journal-1-corrupt.jsonl").exists()
        assert "journal-1-corrupt.jsonl cannot be read" in sw.log()

        async def replayed() -> bool:
            return not (spool / "journal-2-torn.jsonl").exists()
        await wait_for(replayed)
    assert (spool / "journal-1-corrupt.bad").exists()  # never deleted


async def test_worker_killed_under_workers_2_is_replayed_by_its_restart(
    stack: Stack, provider: ScriptedProvider
) -> None:
    account_id, key = await stack.account(tokens=100_000)
    spool = stack.tmp / "switchd-spool"
    async with stack.switchd(provider.url, WORKERS="2") as sw:
        workers = children(sw.pid)
        assert len(workers) == 2
        async with open_websocket_url(client_url(sw, key, "wk")) as ws:
            up = await provider.next()
            for _ in range(3):
                await up.send_json(response_done(7, 3))
            await drain(ws, 3)
            # The worker serving this session is the one whose journal holds its reports.
            (holding,) = [p for p in journals(spool) if '"t":"r"' in p.read_text()]
            pid = int(holding.name.split("-")[1])
            assert pid in workers
            os.kill(pid, signal.SIGKILL)
            try:
                with trio.fail_after(10):
                    while True:
                        await ws.get_message()
            except ConnectionClosed:
                pass
        await credits_become(stack, account_id, 100_000 - 30)  # replayed by the restarted worker

        async def restarted() -> bool:
            now = children(sw.pid)
            return len(now) == 2 and pid not in now and not holding.exists()
        await wait_for(restarted)
        assert holding.parent.name.startswith("worker-")
        sw.terminate()
        with trio.fail_after(20):
            assert await sw.proc.wait() == 0
    assert await stack.credits(account_id) == 100_000 - 30


async def test_client_comes_back_to_a_new_switchd_after_sigkill(stack: Stack, provider: ScriptedProvider) -> None:
    """The session and its conversation up to the last checkpoint, and every report, survive a SIGKILL."""
    account_id, key = await stack.account(tokens=10_000)
    user, agent = "Tell me about the weather " * 6, "It is sunny with a light breeze all day " * 4
    async with stack.switchd(provider.url) as sw:
        async with open_websocket_url(client_url(sw, key, "back")) as ws:
            up = await provider.next()
            await up.send_json(session_created())
            await up.send_json(session_updated("Be brief."))
            await speak(up, user, agent)
            await up.send_json(response_done(10, 20))
            await drain(ws, 6)

            async def checkpointed() -> bool:
                return stored_conversation(stack, account_id, "back").startswith("user:")
            await wait_for(checkpointed)
            sw.terminate(signal.SIGKILL)
            await sw.proc.wait()
            with trio.fail_after(10):
                try:
                    while True:
                        await ws.get_message()
                except ConnectionClosed as exc:
                    assert exc.reason.code == 1006  # what a client sees when its switchd dies
    async with stack.switchd(provider.url) as sw2:  # a new process (same SPOOL_DIR, as after a restart)
        async with open_websocket_url(client_url(sw2, key, "back")) as ws:
            up = await provider.next()
            restore = await up.receive_json()
            assert restore["type"] == "session.update"
            instructions = restore["session"]["instructions"]
            assert instructions.startswith("Be brief." + MARKER + "user:" + user)
            assert agent.split()[0] in instructions
            await up.send_json(response_done(1, 1))
            await drain(ws, 1)
        await credits_become(stack, account_id, 10_000 - 1 - 30 - 2)  # transcription + both responses


async def test_sigterm_with_switchdb_down_leaves_the_journal_for_the_next_start(
    stack: Stack, provider: ScriptedProvider
) -> None:
    account_id, key = await stack.account(tokens=100_000)
    spool = stack.tmp / "switchd-spool"
    async with stack.switchd(provider.url, ZMQ_TIMEOUT_MS="200", SHUTDOWN_GRACE="2") as sw:
        async with open_websocket_url(client_url(sw, key, "down")) as ws:
            up = await provider.next()
            stack.db.terminate(signal.SIGKILL)
            await stack.db.proc.wait()
            for _ in range(3):
                await up.send_json(response_done(100, 0))
            await drain(ws, 3)
            sw.terminate()
            with trio.fail_after(15):
                assert await sw.proc.wait() == 0
    assert "usage batches left in the journal for the next start" in sw.log()
    (left,) = journals(spool)
    assert parse_journal(left.read_bytes())[0].unacked  # the session's batch, id fixed
    assert list(spool.glob("usage-*")) == []  # one mechanism: no spool files any more
    await stack.restart_db()
    async with stack.switchd(provider.url):
        await credits_become(stack, account_id, 100_000 - 300)

        async def replayed() -> bool:
            return not left.exists()
        await wait_for(replayed)


async def test_chaos_run_loses_nothing_and_bills_nothing_twice(tmp_path: Path) -> None:
    """perf.chaos in a small configuration: a correctness check (every kind of fault), not a timing one."""
    from perf.chaos import Config, run

    results = await run(Config(sessions=3, duration=15, fault_every=1.2, seed=7), tmp_path)
    assert set(results["faults"]) == {"switchd worker", "switchdb", "upstream drop"}
    assert results["responses_seen"] > 0 and results["tokens_seen"] > 0
    assert results["tokens_lost"] == 0
    assert results["tokens_billed_twice"] == 0
    assert results["balances_exact"] and results["journals_left"] == []
