"""switchdb as a real process (`switchdb serve`), driven over ZeroMQ like switchd drives it.

Tests taking `on_store` run on both stores: the helpers below then use the test's PostgreSQL
database instead of the SQLite file.
"""
from __future__ import annotations

import json
import resource
import socket
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio
import zmq

from common.dbclient import DbClient, open_db_client
from common.errors import ErrorCode, SwitchError
from common.usage import UsageTotals
from common.wire import MAX_MESSAGE_BYTES, MessageType
from common.zmq_trio import ZmqSocket
from switchdb import accounts, sessions
from switchdb.db import Connection, migrate, open_database, transaction
from tests.daemons import BIN, base_env, daemon
from tests.pg import open_conn, store_kind, store_url  # noqa: F401

USAGE_5 = UsageTotals(input_tokens=3, output_tokens=2, input_audio=3, output_audio=2, reports=1).to_json()


_PG: dict[Path, str] = {}


@pytest.fixture
def on_store(tmp_path: Path, store_kind: str, store_url: str | None) -> Iterator[str]:  # noqa: F811
    if store_url is not None:
        _PG[tmp_path] = store_url
    yield store_kind
    _PG.pop(tmp_path, None)


@contextmanager
def store(tmp_path: Path, key: str | None = None) -> Iterator[Connection]:
    if tmp_path in _PG:
        conn = open_conn("postgresql", tmp_path, _PG[tmp_path])
    else:
        conn = open_database(str(tmp_path / "db.sqlite"), key)
        migrate(conn)
    try:
        yield conn
    finally:
        conn.close()


def seed(tmp_path: Path, tokens: int = 1000, topup: int = 0) -> tuple[str, str]:
    """An account and a key in the test's database file: (account_id, plaintext key)."""
    with store(tmp_path) as conn, transaction(conn):
        account = accounts.create_account(conn, "e2e@example.com", "Free", tokens, topup)
        key, _ = accounts.create_key(conn, account.id, "e2e")
    return account.id, key


def env(tmp_path: Path, endpoint: str | None = None, **extra: str) -> dict[str, str]:
    config = {"ZMQ_SOCKET_PATH": endpoint or f"ipc://{tmp_path}/db.sock"}
    if tmp_path in _PG:
        config["DB_URL"] = _PG[tmp_path]
    else:
        config["DB_PATH"] = str(tmp_path / "db.sqlite")
    return base_env(**{**config, **extra})


def switchdb(tmp_path: Path, *argv: str, **extra: str):  # type: ignore[no-untyped-def]
    return daemon(["switchdb", *argv], env(tmp_path, **extra), tmp_path / "switchdb.log", cwd=tmp_path)


async def refused(client: DbClient, type: MessageType, *args: str) -> SwitchError:
    with pytest.raises(SwitchError) as err:
        await client.request(type, *args)
    return err.value


async def test_every_message_type(tmp_path: Path, on_store: str) -> None:
    account_id, key = seed(tmp_path, tokens=100, topup=10)
    async with switchdb(tmp_path) as d, open_db_client(d.address, 5000) as db:
        assert d.address == f"ipc://{tmp_path}/db.sock"
        assert await db.request(MessageType.PING) == ()
        assert await db.request(MessageType.VALIDATE_AND_LOAD, key, "s1") == (account_id, "110", "")
        assert await db.request(MessageType.GET_CREDITS, account_id) == ("110",)
        args = ("batch-1", account_id, "s1", "openai", "gpt-realtime", USAGE_5)
        assert await db.request(MessageType.RECORD_USAGE, *args) == ("105",)
        assert await db.request(MessageType.RECORD_USAGE, *args) == ("105",)  # idempotent
        await db.send(MessageType.SAVE_SESSION, account_id, "s1", json.dumps(
            {"type": "session.updated", "session": {"id": "x", "model": "m", "type": "realtime", "voice": "ash",
                                                    "instructions": "Hi.", "tracing": None}}))
        await db.send(MessageType.APPEND_CONVERSATION, account_id, "s1", "user:hello \"there\" ✓\n")
        _, credits, update = await db.request(MessageType.VALIDATE_AND_LOAD, key, "s1")
        assert credits == "105"
        assert json.loads(update) == {"type": "session.update", "session": {
            "type": "realtime", "voice": "ash",
            "instructions": "Hi." + sessions.MARKER + "user:hello \"there\" ✓\n"}}

        assert (await refused(db, MessageType.VALIDATE_AND_LOAD, "rsk_wrong", "s1")).code == ErrorCode.EXTERNAL_INVALID_AUTH
        assert (await refused(db, MessageType.GET_CREDITS, "acct_nobody")).code == ErrorCode.EXTERNAL_NOT_FOUND
        err = await refused(db, MessageType.RECORD_USAGE, "b2", "acct_nobody", "s", "openai", "m", USAGE_5)
        assert err.code == ErrorCode.EXTERNAL_NOT_FOUND
        err = await refused(db, MessageType.RECORD_USAGE, "b3", account_id, "s", "openai", "m", '{"input_tokens":1.5}')
        assert err.code == ErrorCode.INTERNAL_BAD_USAGE

        # Spend it all: the key still authenticates, but with EXTERNAL_NO_CREDITS and the same fields.
        big = UsageTotals(input_tokens=200).to_json()
        assert await db.request(MessageType.RECORD_USAGE, "b4", account_id, "s1", "openai", "m", big) == ("-95",)
        err = await refused(db, MessageType.VALIDATE_AND_LOAD, key, "s1")
        assert err.code == ErrorCode.EXTERNAL_NO_CREDITS
        assert err.fields[:2] == (account_id, "-95") and "Hi." in err.fields[2]  # type: ignore[attr-defined]

        # The CLI writes to the same store while the daemon runs: a revoked key stops working.
        with store(tmp_path) as conn, transaction(conn):
            accounts.revoke_key(conn, accounts.hash_key(key))
        assert (await refused(db, MessageType.VALIDATE_AND_LOAD, key, "s1")).code == ErrorCode.EXTERNAL_INVALID_AUTH
    assert d.proc.returncode == 0
    assert key not in d.log() and "hello" not in d.log()


async def test_concurrent_clients_exact_balance(tmp_path: Path, on_store: str) -> None:
    clients, per_client = 8, 150
    account_id, _ = seed(tmp_path, tokens=1_000_000)
    acked: list[int] = []
    async with switchdb(tmp_path) as d:

        async def client(c: int) -> None:
            async with open_db_client(d.address, 10_000) as db, trio.open_nursery() as nursery:
                for i in range(per_client):
                    # every tenth batch is sent twice at once, like a retry racing its original
                    for _ in range(2 if i % 10 == 0 else 1):
                        nursery.start_soon(record, db, f"c{c}-{i}")

        async def record(db: DbClient, batch_id: str) -> None:
            (credits,) = await db.request(MessageType.RECORD_USAGE, batch_id, account_id, "s", "openai", "m", USAGE_5)
            acked.append(int(credits))

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for c in range(clients):
                    nursery.start_soon(client, c)
        async with open_db_client(d.address, 5000) as db:
            (credits,) = await db.request(MessageType.GET_CREDITS, account_id)
    expected = 1_000_000 - 5 * clients * per_client
    assert int(credits) == expected
    assert min(acked) == expected
    assert len(acked) == clients * (per_client + per_client // 10)


async def test_state_survives_a_restart_and_the_default_command_serves(tmp_path: Path, on_store: str) -> None:
    account_id, key = seed(tmp_path)
    async with switchdb(tmp_path, "serve") as d, open_db_client(d.address, 5000) as db:
        await db.request(MessageType.RECORD_USAGE, "b1", account_id, "s", "openai", "m", USAGE_5)
        await db.send(MessageType.SAVE_SESSION, account_id, "s", '{"session":{"type":"realtime","instructions":"X"}}')
        await db.send(MessageType.APPEND_CONVERSATION, account_id, "s", "user:a\n")
        await db.request(MessageType.PING)
    assert d.proc.returncode == 0
    async with switchdb(tmp_path) as d, open_db_client(d.address, 5000) as db:  # no subcommand: serve
        _, credits, update = await db.request(MessageType.VALIDATE_AND_LOAD, key, "s")
        assert credits == "995"
        assert json.loads(update)["session"]["instructions"] == "X" + sessions.MARKER + "user:a\n"
        assert await db.request(MessageType.RECORD_USAGE, "b1", account_id, "s", "openai", "m", USAGE_5) == ("995",)


async def test_sigterm_with_requests_in_flight_loses_nothing_acknowledged(tmp_path: Path, on_store: str) -> None:
    account_id, _ = seed(tmp_path, tokens=10_000_000)
    acked: set[str] = set()
    enough = trio.Event()
    async with switchdb(tmp_path) as d:

        async def client(c: int) -> None:
            async with open_db_client(d.address, 2000) as db:

                async def record(i: int) -> None:
                    batch_id = f"c{c}-{i}"
                    try:
                        await db.request(MessageType.RECORD_USAGE, batch_id, account_id, "s", "openai", "m", USAGE_5)
                    except SwitchError:
                        return  # not acknowledged: switchd would retry or spool it
                    acked.add(batch_id)
                    if len(acked) >= 300:
                        enough.set()

                async with trio.open_nursery() as nursery:
                    for i in range(10_000):
                        if d.proc.returncode is not None:
                            break
                        nursery.start_soon(record, i)
                        if i % 25 == 24:
                            await trio.lowlevel.checkpoint()  # let replies in, keep some hundreds in flight

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for c in range(4):
                    nursery.start_soon(client, c)
                await enough.wait()
                d.terminate()
                assert await d.proc.wait() == 0
    with store(tmp_path) as conn:
        stored = {row[0] for row in conn.execute("SELECT batch_id FROM usage_metrics")}
        balance = accounts.require_account(conn, account_id).credits
    assert acked <= stored
    assert balance == 10_000_000 - 5 * len(stored)


async def test_garbage_never_stops_the_daemon(tmp_path: Path, on_store: str) -> None:
    account_id, _ = seed(tmp_path)
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    junk = ZmqSocket(raw)
    async with switchdb(tmp_path) as d:
        raw.connect(d.address)
        answered = [
            ([b""], b"", ErrorCode.INTERNAL_MALFORMED_MESSAGE),
            ([b"only-id"], b"only-id", ErrorCode.INTERNAL_MALFORMED_MESSAGE),
            ([b"\xff\xfe\x00", b"\x80garbage"], b"\xff\xfe\x00", ErrorCode.INTERNAL_MALFORMED_MESSAGE),
            ([b"r1", b"DROP_TABLES"], b"r1", ErrorCode.INTERNAL_UNKNOWN_TYPE),
            ([b"r2", b"PING", b"extra"], b"r2", ErrorCode.INTERNAL_MALFORMED_MESSAGE),
            ([b"r3", b"GET_CREDITS"], b"r3", ErrorCode.INTERNAL_MALFORMED_MESSAGE),
            ([b"r4", b"GET_CREDITS", b"\xc3\x28"], b"r4", ErrorCode.INTERNAL_MALFORMED_MESSAGE),
            ([b"r5", b"RECORD_USAGE", b"b", account_id.encode(), b"s", b"p", b"m", b'{"input_tokens": -3}'],
             b"r5", ErrorCode.INTERNAL_BAD_USAGE),
            ([b"r6", b"RECORD_USAGE", b"b", account_id.encode(), b"s", b"p", b"m", b'{"input_tokens": "7"}'],
             b"r6", ErrorCode.INTERNAL_BAD_USAGE),
            ([b"r7", b"RECORD_USAGE", b"b", account_id.encode(), b"s", b"p", b"m", b"\x00\x01 not json"],
             b"r7", ErrorCode.INTERNAL_BAD_USAGE),
            ([b"r8", b"VALIDATE_AND_LOAD", b"k", b"s", b"x" * (MAX_MESSAGE_BYTES + 1)],
             b"r8", ErrorCode.INTERNAL_MALFORMED_MESSAGE),
            # An integer duration no float can hold (json reads it; float() overflows).
            ([b"r9", b"RECORD_USAGE", b"b", account_id.encode(), b"s", b"p", b"m",
              b'{"transcription_seconds": 1' + b"0" * 400 + b"}"], b"r9", ErrorCode.INTERNAL_BAD_USAGE),
        ]
        silent = [
            [b"n1", b"SAVE_SESSION", account_id.encode(), b"s"],
            [b"n2", b"SAVE_SESSION", account_id.encode(), b"s", b"{not json"],
            [b"n3", b"SAVE_SESSION", account_id.encode(), b"s", b"\xff"],
            [b"n4", b"APPEND_CONVERSATION", b"acct_nobody", b"s", b"user:x\n"],
            [b"n5", b"APPEND_CONVERSATION"],
        ]
        for frames, _, _ in answered:
            await junk.send(frames)
        for frames in silent:
            await junk.send(frames)
        await junk.send([b"ping-after", b"PING"])
        replies = {}
        with trio.fail_after(10):
            while b"ping-after" not in replies:
                rid, status, *fields = await junk.recv()
                replies[rid] = (status.decode(), fields)
        assert replies.pop(b"ping-after") == ("OK", [])
        assert replies == {rid: (code.value, []) for _, rid, code in answered}
        async with open_db_client(d.address, 5000) as db:
            assert await db.request(MessageType.GET_CREDITS, account_id) == ("1000",)
        with store(tmp_path) as conn:
            assert sessions.load(conn, account_id, "s") == (None, None)
    junk.close()
    assert d.proc.returncode == 0
    log = d.log()
    assert "SAVE_SESSION" in log and "APPEND_CONVERSATION" in log and "user:x" not in log


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_tcp_endpoint(tmp_path: Path, on_store: str) -> None:
    account_id, key = seed(tmp_path)
    endpoint = f"tcp://127.0.0.1:{free_tcp_port()}"
    async with switchdb(tmp_path, ZMQ_SOCKET_PATH=endpoint) as d, open_db_client(d.address, 5000) as db:
        assert d.address == endpoint
        assert await db.request(MessageType.VALIDATE_AND_LOAD, key, "s") == (account_id, "1000", "")


@pytest.mark.parametrize("key", ["wrong", None])
def test_encrypted_database_with_wrong_or_missing_key_fails_fast(tmp_path: Path, key: str | None) -> None:
    with store(tmp_path, "right"):
        pass
    extra = {"DB_ENCRYPTION_KEY": key} if key else {}
    proc = subprocess.run([str(BIN / "switchdb"), "serve"], env=env(tmp_path, **extra), cwd=tmp_path,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "DB_ENCRYPTION_KEY" in proc.stderr and "Traceback" not in proc.stderr


async def test_encrypted_database_serves_with_the_right_key(tmp_path: Path) -> None:
    with store(tmp_path, "s3cret") as conn, transaction(conn):
        account = accounts.create_account(conn, "enc@example.com", "Free")
    async with switchdb(tmp_path, DB_ENCRYPTION_KEY="s3cret") as d, open_db_client(d.address, 5000) as db:
        assert await db.request(MessageType.GET_CREDITS, account.id) == ("1000",)
    assert b"enc@example.com" not in (tmp_path / "db.sqlite").read_bytes()


async def test_a_second_daemon_on_the_same_ipc_path_refuses_to_start(tmp_path: Path) -> None:
    account_id, _ = seed(tmp_path)
    async with switchdb(tmp_path) as first, open_db_client(first.address, 5000) as db:
        other = tmp_path / "other"
        other.mkdir()
        # Another database, the same endpoint: it must not take the path over.
        with trio.fail_after(30):
            proc = await trio.run_process([str(BIN / "switchdb"), "serve"], capture_stdout=True, capture_stderr=True,
                                          check=False, env=env(tmp_path, DB_PATH=str(other / "db.sqlite")), cwd=other)
        stderr = proc.stderr.decode()
        assert proc.returncode == 1 and proc.stdout == b""
        assert stderr.count("\n") == 1 and "is in use" in stderr and first.address in stderr
        # The first daemon still owns the path and answers.
        assert await db.request(MessageType.GET_CREDITS, account_id) == ("1000",)
        async with open_db_client(first.address, 5000) as fresh:
            assert await fresh.request(MessageType.GET_CREDITS, account_id) == ("1000",)
        first.terminate(signal.SIGKILL)  # leaves its socket file behind
        await first.proc.wait()
    assert (tmp_path / "db.sock").exists()
    async with switchdb(tmp_path) as again, open_db_client(again.address, 5000) as db:  # a stale file is taken over
        assert await db.request(MessageType.GET_CREDITS, account_id) == ("1000",)


async def test_a_full_disk_is_answered_retryable_and_the_retry_counts_once(tmp_path: Path) -> None:
    # The daemon may not write past a file size limit (as on a full disk: the write fails), set
    # on the running process and lifted again. What it could not store it answers
    # INTERNAL_DB_UNAVAILABLE, so switchd keeps it; the retry after the space is back counts once.
    start = 1_000_000
    account_id, key = seed(tmp_path, tokens=start)
    async with switchdb(tmp_path) as d, open_db_client(d.address, 10_000) as db:
        assert await db.request(MessageType.RECORD_USAGE, "b-ok", account_id, "s", "openai", "m", USAGE_5) == (
            str(start - 5),)
        files = [tmp_path / name for name in ("db.sqlite", "db.sqlite-wal", "switchdb.log")]
        limit = max(f.stat().st_size for f in files if f.exists()) + 256 * 1024
        _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.prlimit(d.pid, resource.RLIMIT_FSIZE, (limit, hard))
        acked, failed = ["b-ok"], None
        model = "m" * 4000  # big rows: the write-ahead log reaches the limit within a few hundred batches
        for i in range(1000):
            try:
                await db.request(MessageType.RECORD_USAGE, f"b{i}", account_id, "s", "openai", model, USAGE_5)
            except SwitchError as exc:
                assert exc.code == ErrorCode.INTERNAL_DB_UNAVAILABLE  # retryable, never a refusal
                failed = f"b{i}"
                break
            acked.append(f"b{i}")
        assert failed is not None
        # A conversation append (no reply: switchd cannot retry it) while the disk is full is kept.
        await db.send(MessageType.APPEND_CONVERSATION, account_id, "s", "user:kept\n")
        with pytest.raises(SwitchError):  # still full: the append's batch failed too
            await db.request(MessageType.RECORD_USAGE, failed, account_id, "s", "openai", model, USAGE_5)
        resource.prlimit(d.pid, resource.RLIMIT_FSIZE, (hard, hard))
        (credits,) = await db.request(MessageType.RECORD_USAGE, failed, account_id, "s", "openai", model, USAGE_5)
        (again,) = await db.request(MessageType.RECORD_USAGE, failed, account_id, "s", "openai", model, USAGE_5)
        with trio.fail_after(10):
            while True:  # each try is a real round trip; the kept append is retried about once a second
                _, _, update = await db.request(MessageType.VALIDATE_AND_LOAD, key, "s")
                if update:
                    break
        assert json.loads(update)["session"]["instructions"].endswith(sessions.MARKER + "user:kept\n")
    assert int(credits) == int(again) == start - 5 * (len(acked) + 1)
    with store(tmp_path) as conn:
        ids = {row[0] for row in conn.execute("SELECT batch_id FROM usage_metrics")}
        assert ids == {*acked, failed}
        assert accounts.require_account(conn, account_id).credits == int(credits)
    assert "to be retried" in d.log()
