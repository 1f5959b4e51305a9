"""Conversation summaries against a fake Gemini endpoint on loopback, on both stores."""
from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import trio

from common.dbclient import open_db_client
from common.errors import SwitchError
from common.wire import MessageType, Request
from switchdb import accounts, service, sessions, summarise
from switchdb.db import transaction, utc_now
from switchdb.pg import PgDatabase
from switchdb.worker import Database, Store
from tests.daemons import base_env, daemon
from tests.pg import open_conn, store_env, store_kind, store_url  # noqa: F401
from tests.batches import handle_batch

LINE = "user:" + "y" * 94 + "\n"  # 100 characters
LONG = LINE * 330  # 33,000 characters: past the 32,000 limit


@dataclass
class FakeLlm:
    """A generateContent look-alike. `answer` builds the reply text from the prompt; `gate` holds replies back."""

    answer: Callable[[str], str] = lambda prompt: "summary:short\n"
    status: int = 200
    gate: threading.Event = field(default_factory=threading.Event)
    received: threading.Event = field(default_factory=threading.Event)
    requests: list[tuple[dict[str, str], dict]] = field(default_factory=list)  # type: ignore[type-arg]
    url: str = ""


@contextmanager
def fake_llm(**kw: object) -> Iterator[FakeLlm]:
    fake = FakeLlm(**kw)  # type: ignore[arg-type]
    fake.gate.set()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            fake.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
            fake.received.set()
            fake.gate.wait(30)
            prompt = body["contents"][0]["parts"][0]["text"]
            reply = json.dumps({"candidates": [{"content": {"parts": [{"text": fake.answer(prompt)}]}}]}).encode()
            self.send_response(fake.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    fake.url = f"http://127.0.0.1:{server.server_address[1]}/v1beta/models/fake:generateContent"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        fake.gate.set()
        server.shutdown()
        server.server_close()


async def wait_for(event: threading.Event) -> None:
    with trio.fail_after(10):
        await trio.to_thread.run_sync(event.wait, abandon_on_cancel=True)


def test_request_and_response_shapes() -> None:
    body = json.loads(summarise.request_body("user:hi\n"))
    assert body["contents"][0]["parts"][0]["text"].endswith("user:hi\n")
    assert "24000" in body["contents"][0]["parts"][0]["text"]
    ok = json.dumps({"candidates": [{"content": {"parts": [{"text": " sum \n"}]}}]}).encode()
    assert summarise.parse_response(ok) == "sum"
    for bad in (b"nope", b"{}", b'{"candidates": []}', b'{"candidates": [{"content": {"parts": [{"text": " "}]}}]}'):
        with pytest.raises(SwitchError):
            summarise.parse_response(bad)


@pytest.fixture
def database(tmp_path: Path, store_kind: str, store_url: str | None) -> Iterator[tuple[Store, str]]:  # noqa: F811
    conn = open_conn(store_kind, tmp_path, store_url)
    with transaction(conn):
        account = accounts.create_account(conn, "s@example.com")
    if store_url is None:
        yield Database(conn), account.id
    else:  # the daemon's way on PostgreSQL: a pool
        conn.close()
        pool = PgDatabase(store_url)
        pool.open()
        yield pool, account.id
        pool.close()
    conn.close()


async def append(db: Store, account_id: str, text: str) -> service.Outcome:
    (outcome,) = await db.run(
        handle_batch, [Request("r", MessageType.APPEND_CONVERSATION, (account_id, "s", text))], utc_now()
    )
    return outcome


async def test_summary_replaces_the_text_and_keeps_what_came_meanwhile(database: tuple[Store, str]) -> None:
    db, account_id = database
    assert (await append(db, account_id, LONG + "agent:half a li")).summarise
    with fake_llm() as llm:
        llm.gate.clear()
        conversation = await db.run(sessions.get_conversation, account_id, "s")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(service.summarise_conversation, db, llm.url, "gk-test", account_id, "s", conversation)
            await wait_for(llm.received)
            await append(db, account_id, "ne\nuser:meanwhile\n")
            llm.gate.set()
    headers, body = llm.requests[0]
    assert headers["x-goog-api-key"] == "gk-test"
    # only complete lines go to the LLM; the line being written stays
    assert body["contents"][0]["parts"][0]["text"].endswith(LINE)
    stored = await db.run(sessions.get_conversation, account_id, "s")
    assert stored == "summary:short\nagent:half a line\nuser:meanwhile\n"


async def test_failures_leave_the_text_alone(database: tuple[Store, str]) -> None:
    db, account_id = database
    await append(db, account_id, LONG)
    for kw in ({"status": 500}, {"answer": lambda prompt: prompt + prompt}):
        with fake_llm(**kw) as llm:  # type: ignore[arg-type]
            with pytest.raises(SwitchError) as err:
                await service.summarise_conversation(db, llm.url, "gk", account_id, "s", LONG)
        assert "yyyy" not in err.value.message
    with pytest.raises(SwitchError):  # nobody listening
        await service.summarise_conversation(db, llm.url, "gk", account_id, "s", LONG)
    assert await db.run(sessions.get_conversation, account_id, "s") == LONG


async def test_summariser_task_runs_one_summary_per_session_at_a_time(database: tuple[Store, str]) -> None:
    db, account_id = database
    await append(db, account_id, LONG)
    with fake_llm() as llm:
        llm.gate.clear()
        send, receive = trio.open_memory_channel[tuple[str, str]](10)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(service.run_summariser, db, llm.url, "gk", receive)
            async with send:
                await send.send((account_id, "s"))
                await wait_for(llm.received)
                for _ in range(3):
                    await send.send((account_id, "s"))
                llm.gate.set()
    assert len(llm.requests) == 1
    assert await db.run(sessions.get_conversation, account_id, "s") == "summary:short\n"


async def test_two_replicas_never_summarise_one_session_at_once(database: tuple[Store, str]) -> None:
    # Two summariser tasks (as two replicas would run) asked about the same session: the claim
    # in the store lets one call the LLM; the other gives up at once.
    db, account_id = database
    await append(db, account_id, LONG)
    with fake_llm() as llm:
        llm.gate.clear()
        first_send, first = trio.open_memory_channel[tuple[str, str]](10)
        second_send, second = trio.open_memory_channel[tuple[str, str]](10)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(service.run_summariser, db, llm.url, "gk", first)
            async with first_send:
                await first_send.send((account_id, "s"))
                await wait_for(llm.received)
                assert await _claimed(db, account_id)
                async with second_send:
                    await second_send.send((account_id, "s"))
                # Returns once its one request is done: had it called the LLM, it would wait at the gate.
                with trio.fail_after(10):
                    await service.run_summariser(db, llm.url, "gk", second)
                llm.gate.set()
    assert len(llm.requests) == 1
    assert await db.run(sessions.get_conversation, account_id, "s") == "summary:short\n"
    assert not await _claimed(db, account_id)  # released after the summary


async def _claimed(db: Store, account_id: str) -> bool:
    def claimed(conn: object) -> bool:
        return bool(conn.execute(  # type: ignore[attr-defined]
            "SELECT 1 FROM summary_claims WHERE account_id = ? AND session_id = 's'", (account_id,)
        ).fetchone())

    return await db.run(claimed)


async def test_daemon_summarises_in_the_background(
    tmp_path: Path, store_kind: str, store_url: str | None  # noqa: F811
) -> None:
    conn = open_conn(store_kind, tmp_path, store_url)
    with transaction(conn):
        account = accounts.create_account(conn, "bg@example.com")
        key, _ = accounts.create_key(conn, account.id, "k")
    conn.close()
    with fake_llm() as llm:
        llm.gate.clear()
        env = base_env(ZMQ_SOCKET_PATH=f"ipc://{tmp_path}/db.sock", **store_env(store_kind, tmp_path, store_url),
                       GEMINI_API_KEY="gk-daemon", GEMINI_URL=llm.url)
        async with daemon(["switchdb"], env, tmp_path / "switchdb.log", cwd=tmp_path) as d, \
                open_db_client(d.address, 5000) as db:
            for start in range(0, len(LONG), 1000):
                await db.send(MessageType.APPEND_CONVERSATION, account.id, "s", LONG[start : start + 1000])
            await wait_for(llm.received)
            # Requests are answered while the LLM works, and text keeps coming.
            await db.send(MessageType.APPEND_CONVERSATION, account.id, "s", "user:during\n")
            _, _, update = await db.request(MessageType.VALIDATE_AND_LOAD, key, "s")
            assert json.loads(update)["session"]["instructions"].endswith("user:during\n")
            llm.gate.set()
            with trio.fail_after(10):
                while True:
                    _, _, update = await db.request(MessageType.VALIDATE_AND_LOAD, key, "s")
                    context = json.loads(update)["session"]["instructions"].partition(sessions.MARKER)[2]
                    if context.startswith("summary:"):
                        break  # each try is a real round trip to the daemon: no sleep needed between them
        assert context == "summary:short\nuser:during\n"
        assert len(llm.requests) == 1
        assert llm.requests[0][0]["x-goog-api-key"] == "gk-daemon"
    assert "yyyy" not in d.log() and "gk-daemon" not in d.log()
