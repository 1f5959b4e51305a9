"""Session memory and resilience end to end: restore, reconnect, provider faults, lossless usage."""
from __future__ import annotations

import json
import signal
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from switchd.session import CHECKPOINT_CHARS
from tests.daemons import daemon
from tests.stack import Stack, client_url, metrics_url
from tests.test_switchd_e2e import http_get
from tests.upstream import ScriptedProvider, Upstream, response_done, session_created

MARKER = "\n\nHere is the previous conversation that happened which should be continued now:\n"
FORBIDDEN = {"id", "object", "expires_at", "model", "tracing"}


def session_updated(instructions: str) -> dict:
    return {
        "type": "session.updated", "event_id": "event_u",
        "session": {"type": "realtime", "object": "realtime.session", "id": "sess_1", "model": "gpt-realtime",
                    "expires_at": 123, "instructions": instructions, "tracing": None, "include": None,
                    "output_modalities": ["audio"], "audio": {"output": {"voice": "marin", "speed": None}}},
    }


async def speak(up: Upstream, user: str, agent: str) -> None:
    await up.send_json({"type": "conversation.item.input_audio_transcription.delta", "item_id": "i1", "delta": user})
    await up.send_json({"type": "conversation.item.input_audio_transcription.completed", "item_id": "i1",
                        "transcript": user, "usage": {"type": "tokens", "total_tokens": 1}})
    await up.send_json({"type": "response.output_audio_transcript.delta", "delta": agent})


async def drain(ws, count: int) -> list[dict]:
    with trio.fail_after(10):
        return [json.loads(await ws.get_message()) for _ in range(count)]


def assert_clean(value: object) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            assert v is not None, k
            assert_clean(v)


async def test_session_is_saved_and_restored_with_its_conversation(stack: Stack, provider: ScriptedProvider) -> None:
    _, key = await stack.account()
    user, agent = 'Say "hi" | to C:\\dir, café 😀', "Hi! \"Quoted\" | back\\slash ünïcode"
    async with stack.switchd(provider.url) as sw:
        async with open_websocket_url(client_url(sw, key, "mem")) as ws:
            up = await provider.next()
            await up.send_json(session_created())
            await up.send_json(session_updated("Be brief."))
            await speak(up, user, agent)
            await drain(ws, 5)
        for round in range(3):  # restored again and again: the context stays single
            async with open_websocket_url(client_url(sw, key, "mem")) as ws:
                up = await provider.next()
                first = await up.receive_json()
                assert first["type"] == "session.update"
                session = first["session"]
                assert not FORBIDDEN & set(session)
                assert_clean(session)
                assert session["instructions"] == "Be brief." + MARKER + f"user:{user}\nagent:{agent}\n"
                assert session["audio"] == {"output": {"voice": "marin"}}
                # The provider echoes the restored config, context included; it must not be saved back.
                await up.send_json(session_updated(session["instructions"]))
                await drain(ws, 1)
    for log in ("switchd.log", "switchdb.log"):  # never a transcript (nor a key) in the logs
        text = (stack.tmp / log).read_text()
        assert "café" not in text and "Quoted" not in text and key not in text


def stored_conversation(stack: Stack, account_id: str, session_id: str) -> str:
    """The conversation switchdb holds, read from its real SQLite file (unencrypted in the tests)."""
    with closing(sqlite3.connect(f"file:{stack.tmp / 'switch.db'}?mode=ro", uri=True)) as db:
        row = db.execute("SELECT data FROM sessions WHERE account_id = ? AND session_id = ? AND type = 'CONV'",
                         (account_id, session_id)).fetchone()
    return row[0] if row else ""


async def test_transcripts_relayed_with_the_audio_reach_the_conversation_in_order(
    stack: Stack, provider: ScriptedProvider
) -> None:
    """The provider's compact transcript deltas, relayed with its audio; the conversation gets every
    one, in order, checkpointed mid-session."""
    account_id, key = await stack.account()
    words = [f"word{i:02d} " for i in range(48)]
    down = ['{"type":"conversation.item.input_audio_transcription.delta","item_id":"i1","delta":"Hello \\"you\\" "}']
    for i, word in enumerate(words):
        down.append(f'{{"type":"response.output_audio.delta","delta":"{"AAAA" * (i + 1)}"}}')
        down.append(f'{{"type":"response.output_audio_transcript.delta","delta":"{word}"}}')
    async with stack.switchd(provider.url) as sw:
        async with open_websocket_url(client_url(sw, key, "spoken")) as ws:
            up = await provider.next()
            with trio.fail_after(10):
                for frame in down:
                    await up.ws.send_message(frame)
                assert [await ws.get_message() for _ in down] == down  # relayed untouched, in order
                # No response.done, no other event: the deltas kept for the reader still reach switchdb
                # while the session is open, checkpointed whenever 200 characters have gathered.
                while len(stored_conversation(stack, account_id, "spoken")) < CHECKPOINT_CHARS:
                    await trio.lowlevel.checkpoint()
            mid = stored_conversation(stack, account_id, "spoken")
            assert mid.startswith('user:Hello "you" \nagent:word00 word01 ')
        with trio.fail_after(10):  # at the session's end, the rest, still in order
            while not stored_conversation(stack, account_id, "spoken").endswith("\n"):
                await trio.lowlevel.checkpoint()
    assert stored_conversation(stack, account_id, "spoken") == 'user:Hello "you" \nagent:' + "".join(words) + "\n"


async def test_sessions_are_private_to_their_account(stack: Stack, provider: ScriptedProvider) -> None:
    _, key_a = await stack.account()
    _, key_b = await stack.account()
    async with stack.switchd(provider.url) as sw:
        async with open_websocket_url(client_url(sw, key_a, "shared-id")) as ws:
            up = await provider.next()
            await up.send_json(session_updated("Secret instructions of A"))
            await speak(up, "A's words", "A's answer")
            await drain(ws, 4)
        async with open_websocket_url(client_url(sw, key_b, "shared-id")) as ws:
            up = await provider.next()
            await ws.send_message('{"type":"response.create"}')
            assert await up.receive_json() == {"type": "response.create"}  # no stored session.update first


async def test_upstream_drop_reconnects_restores_and_keeps_client_frames_in_order(
    stack: Stack, provider: ScriptedProvider
) -> None:
    account_id, key = await stack.account(tokens=10_000)
    async with stack.switchd(provider.url) as sw:
        async with open_websocket_url(client_url(sw, key, "drop")) as ws:
            up = await provider.next()
            await up.send_json(session_created())
            await up.send_json(session_updated("Stay calm."))
            await speak(up, "first words", "first answer")
            await up.send_json(response_done(10, 20))
            await drain(ws, 6)
            await up.ws._stream.aclose()  # the network drops: no close frame
            # Frames written before switchd reads the EOF are lost in TCP like on any relay;
            # the guarantee is for what the client sends once the drop is known.
            with trio.fail_after(10):
                while "switch_upstream_reconnects_total 1" not in (await http_get(metrics_url(sw)))[1]:
                    await trio.lowlevel.checkpoint()
            for i in range(50):  # the client keeps talking during the outage
                await ws.send_message(json.dumps({"type": "input_audio_buffer.append", "audio": f"{i}"}))
            up2 = await provider.next()
            await up2.send_json(session_created())  # a resumed client must not see a second one
            restore = await up2.receive_json()
            assert restore["type"] == "session.update"
            assert restore["session"]["instructions"] == "Stay calm." + MARKER + "user:first words\nagent:first answer"
            got = [json.loads(await up2.ws.get_message())["audio"] for _ in range(50)]
            assert got == [str(i) for i in range(50)]
            await up2.send_json(response_done(5, 5))
            event = (await drain(ws, 1))[0]
            assert event["type"] == "response.done"  # not session.created
        status, body = await http_get(metrics_url(sw))
        assert "switch_upstream_reconnects_total 1" in body
    with trio.fail_after(10):
        while await stack.credits(account_id) != 10_000 - 30 - 10 - 1:
            await trio.lowlevel.checkpoint()


async def test_provider_session_cap_is_invisible_to_the_client(stack: Stack, provider: ScriptedProvider) -> None:
    _, key = await stack.account()
    async with stack.switchd(provider.url) as sw:
        async with open_websocket_url(client_url(sw, key, "cap")) as ws:
            up = await provider.next()
            await up.send_json({"type": "error", "event_id": "e", "error": {
                "type": "invalid_request_error", "code": "session_expired",
                "message": "Your session hit the maximum duration of 60 minutes.", "param": None, "event_id": None}})
            await up.close(1001, "Your session hit the maximum duration of 60 minutes.")
            up2 = await provider.next()
            await ws.send_message('{"type":"response.create"}')
            assert await up2.receive_json() == {"type": "response.create"}
            await up2.send_json({"type": "rate_limits.updated", "rate_limits": []})
            assert (await drain(ws, 1))[0]["type"] == "rate_limits.updated"  # the error never reached it


async def test_bad_provider_key_is_not_retried(stack: Stack, provider: ScriptedProvider) -> None:
    _, key = await stack.account()
    async with stack.switchd(provider.url) as sw:
        async with open_websocket_url(client_url(sw, key, "k3000")) as ws:
            up = await provider.next()
            await up.send_json({"type": "error", "event_id": "e", "error": {
                "type": "invalid_request_error", "code": "invalid_api_key", "message": "Incorrect API key provided"}})
            await up.close(3000, "invalid_request_error.invalid_api_key")
            error = (await drain(ws, 1))[0]
            with trio.fail_after(10), pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
        assert error["error"]["code"] == "invalid_api_key"
        assert closed.value.reason.code == 1011
        assert closed.value.reason.reason == "invalid_request_error.invalid_api_key"
        status, body = await http_get(metrics_url(sw))
        assert "switch_upstream_reconnects_total 0" in body


async def test_unreachable_provider_closes_1011_after_five_tries(stack: Stack, tmp_path: Path) -> None:
    _, key = await stack.account()
    dead = trio.socket.socket()
    await dead.bind(("127.0.0.1", 0))  # a port nobody listens on
    port = dead.getsockname()[1]
    async with stack.switchd(f"ws://127.0.0.1:{port}/v1/realtime") as sw:
        async with open_websocket_url(client_url(sw, key, "gone")) as ws:
            with trio.fail_after(30), pytest.raises(ConnectionClosed) as closed:
                while True:
                    await ws.get_message()
        assert closed.value.reason.code == 1011
        status, body = await http_get(metrics_url(sw))
        assert "switch_upstream_reconnects_total 5" in body
    dead.close()


async def test_switchdb_killed_and_restarted_bills_every_token_once(stack: Stack, provider: ScriptedProvider) -> None:
    account_id, key = await stack.account(tokens=100_000)
    async with stack.switchd(provider.url, ZMQ_TIMEOUT_MS="300") as sw:
        async with open_websocket_url(client_url(sw, key, "kill")) as ws:
            up = await provider.next()
            for _ in range(5):
                await up.send_json(response_done(10, 10))
            await drain(ws, 5)
            with trio.fail_after(10):
                while await stack.credits(account_id) != 100_000 - 100:
                    await trio.lowlevel.checkpoint()
            stack.db.terminate(signal.SIGKILL)
            await stack.db.proc.wait()
            for _ in range(12):  # two full batches and two reports while switchdb is dead
                await up.send_json(response_done(10, 10))
            await drain(ws, 12)
            await stack.restart_db()
        with trio.fail_after(20):
            while await stack.credits(account_id) != 100_000 - 17 * 20:
                await trio.lowlevel.checkpoint()
    usage = await stack.cli("usage", "--account", account_id)
    assert usage["total_tokens"] == 17 * 20


async def test_two_switches_share_one_switchdb_over_tcp(tmp_path: Path, provider: ScriptedProvider,
                                                        ca_file: Path) -> None:
    probe = trio.socket.socket()
    await probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    from tests.daemons import base_env

    env = base_env(ZMQ_SOCKET_PATH=f"tcp://127.0.0.1:{port}", DB_PATH=str(tmp_path / "switch.db"),
                   UPSTREAM_CA_FILE=str(ca_file))
    async with daemon(["switchdb", "serve"], env, tmp_path / "switchdb.log") as db:
        stack = Stack(tmp_path, env, db)
        account_id, key = await stack.account(tokens=50_000)
        async with stack.switchd(provider.url, name="one") as one, stack.switchd(provider.url, name="two") as two:
            async with open_websocket_url(client_url(one, key, "a")) as wa, open_websocket_url(client_url(two, key, "b")) as wb:
                ua, ub = await provider.next(), await provider.next()
                for i in range(10):
                    await ua.send_json(response_done(7, 3))
                    await ub.send_json(response_done(1, 1))
                await drain(wa, 10)
                await drain(wb, 10)
        with trio.fail_after(10):
            while await stack.credits(account_id) != 50_000 - 10 * 10 - 10 * 2:
                await trio.lowlevel.checkpoint()
