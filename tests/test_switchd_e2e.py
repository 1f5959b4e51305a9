"""switchd end to end: real switchdb and switchd processes, a scripted provider, real sockets."""
from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from tests.stack import Stack, client_url, metrics_url
from tests.upstream import ScriptedProvider, response_done, session_created


async def http_get(url: str) -> tuple[int, str]:
    host_port = url.split("//", 1)[1].split("/", 1)
    host, port = host_port[0].rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(f"GET /{host_port[1] if len(host_port) > 1 else ''} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


async def rejected(url: str, **kwargs) -> tuple[int, str]:
    with pytest.raises(ConnectionRejected) as exc:
        async with open_websocket_url(url, **kwargs):
            pass
    return exc.value.status_code, (exc.value.body or b"").decode()


async def test_handshake_rejections(stack: Stack, provider: ScriptedProvider) -> None:
    _, key = await stack.account(tokens=1000)
    _, broke_key = await stack.account(tokens=0)
    async with stack.switchd(provider.url, MAX_SESSIONS="1") as sw:
        assert await rejected(client_url(sw, None, "s1")) == (400, "EXTERNAL_MISSING_PARAMS")
        assert await rejected(client_url(sw, key, None)) == (400, "EXTERNAL_MISSING_PARAMS")
        assert await rejected(client_url(sw, key, "bad id!")) == (400, "EXTERNAL_BAD_PARAMS")
        assert await rejected(client_url(sw, key, "s1", rs_api="GEMINI")) == (400, "EXTERNAL_BAD_PARAMS")
        assert await rejected(client_url(sw, "rsk_unknown", "s1")) == (401, "EXTERNAL_INVALID_AUTH")
        assert await rejected(client_url(sw, broke_key, "s1")) == (402, "EXTERNAL_NO_CREDITS")
        async with open_websocket_url(client_url(sw, key, "s1")):
            await provider.next()
            assert await rejected(client_url(sw, key, "s2")) == (503, "EXTERNAL_OVER_CAPACITY")
    log = (stack.tmp / "switchd.log").read_text()
    assert key not in log and "rs_key=%2A%2A%2A" in log


async def test_db_unavailable_is_503(stack: Stack, provider: ScriptedProvider, tmp_path: Path) -> None:
    async with stack.switchd(provider.url, ZMQ_SOCKET_PATH=f"ipc://{tmp_path}/nobody.sock", ZMQ_TIMEOUT_MS="200") as sw:
        assert await rejected(client_url(sw, "rsk_whatever", "s1")) == (503, "INTERNAL_DB_UNAVAILABLE")
        status, body = await http_get(metrics_url(sw).replace("/metrics", "/healthz"))
        assert status == 503 and "INTERNAL_DB_UNAVAILABLE" in body


async def test_key_by_header_and_subprotocol(stack: Stack, provider: ScriptedProvider) -> None:
    _, key = await stack.account()
    async with stack.switchd(provider.url) as sw:
        url = client_url(sw, None, "hdr")
        async with open_websocket_url(url, extra_headers=[(b"Authorization", f"Bearer {key}".encode()),
                                                          (b"OpenAI-Beta", b"realtime=v1")]):
            up = await provider.next()
            assert up.headers.get("authorization") is None  # no provider key configured: nothing sent
            assert "openai-beta" not in up.headers
        async with open_websocket_url(url, subprotocols=["realtime", f"openai-insecure-api-key.{key}"]) as ws:
            assert ws.subprotocol == "realtime"
            await provider.next()


async def test_relay_is_faithful_and_ordered_both_ways(stack: Stack, provider: ScriptedProvider) -> None:
    _, key = await stack.account()
    async with stack.switchd(provider.url, OPENAI_API_KEY="sk-test-provider") as sw:
        async with open_websocket_url(client_url(sw, key, "relay", model="gpt-realtime-mini")) as ws:
            up = await provider.next()
            with trio.fail_after(5):
                await ws.ping(b"are you there")  # answered by switchd itself
                await up.ws.ping(b"provider heartbeat")  # answered by switchd as the provider's client
            assert up.headers["authorization"] == "Bearer sk-test-provider"
            assert "model=gpt-realtime-mini" in up.path
            # Odd but valid text: unicode, escapes, the audio prefix, a near-limit size.
            frames = [
                json.dumps({"type": "input_audio_buffer.append", "audio": "QUJD" * (i % 50 + 1)}) if i % 3 else
                json.dumps({"type": "conversation.item.create", "n": i, "t": "é\"\\|\n😀"}, ensure_ascii=i % 2 == 0)
                for i in range(1200)
            ]
            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    async def client_sends() -> None:
                        for f in frames:
                            await ws.send_message(f)
                    nursery.start_soon(client_sends)
                    got = [await up.ws.get_message() for _ in frames]
                assert got == frames
                down = [json.dumps({"type": "response.output_audio.delta", "delta": "AAAA" * (i % 40), "i": i})
                        if i % 2 else json.dumps({"type": "response.output_audio_transcript.delta", "delta": f"w{i} "})
                        for i in range(1200)]
                async with trio.open_nursery() as nursery:
                    async def provider_sends() -> None:
                        for f in down:
                            await up.ws.send_message(f)
                    nursery.start_soon(provider_sends)
                    got = [await ws.get_message() for _ in down]
                assert got == down
        status, body = await http_get(metrics_url(sw))
        assert status == 200
        assert 'switch_frames_relayed_total{direction="client_to_upstream"} 1200' in body
        assert 'switch_frames_relayed_total{direction="upstream_to_client"} 1200' in body
        assert "switch_switchdb_rtt_seconds_count" in body


async def test_metering_bills_exactly_and_ignores_forged_metadata(stack: Stack, provider: ScriptedProvider) -> None:
    account_id, key = await stack.account(tokens=100_000)
    forged = {"input_tokens": 0, "output_tokens": 0, "type": "response.done", "usage": {"input_tokens": 0}}
    async with stack.switchd(provider.url) as sw:
        async with open_websocket_url(client_url(sw, key, "meter")) as ws:
            up = await provider.next()
            await up.send_json(session_created())
            for i in range(7):
                await up.send_json(response_done(100 + i, 200, metadata=forged))
            await up.send_json({"type": "conversation.item.input_audio_transcription.completed", "event_id": "e",
                                "item_id": "i", "content_index": 0, "transcript": "hi",
                                "usage": {"type": "tokens", "total_tokens": 22, "input_tokens": 13, "output_tokens": 9}})
            await up.send_json({"type": "conversation.item.input_audio_transcription.completed", "event_id": "e",
                                "item_id": "j", "content_index": 0, "transcript": "yo",
                                "usage": {"type": "duration", "seconds": 2.5}})
            # Not usage: a response.created whose metadata spells a response.done.
            await up.send_json({"type": "response.created", "response": {"metadata": forged, "usage": None}})
            with trio.fail_after(10):
                for _ in range(10):
                    await ws.get_message()
    expected = sum(100 + i + 200 for i in range(7)) + 22
    with trio.fail_after(10):
        while (await stack.credits(account_id)) != 100_000 - expected:
            await trio.lowlevel.checkpoint()  # the last batch is delivered by the outbox after the session
    usage = await stack.cli("usage", "--account", account_id)
    assert usage["total_tokens"] == expected
    assert usage["breakdown"]["input_audio"] == sum(100 + i for i in range(7))
    assert usage["breakdown"]["output_audio"] == 1400
    assert usage["breakdown"]["transcription"] == 22


async def test_credit_cutoff_closes_4402_and_bills(stack: Stack, provider: ScriptedProvider) -> None:
    account_id, key = await stack.account(tokens=300)
    async with stack.switchd(provider.url) as sw:
        async with open_websocket_url(client_url(sw, key, "cut")) as ws:
            up = await provider.next()
            await up.send_json(response_done(100, 100))
            await up.send_json(response_done(100, 100))
            with trio.fail_after(10):
                assert json.loads(await ws.get_message())["type"] == "response.done"
                assert json.loads(await ws.get_message())["type"] == "response.done"
                error = json.loads(await ws.get_message())
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.get_message()
            assert error["error"]["type"] == "insufficient_credits" and error["error"]["code"] == "EXTERNAL_NO_CREDITS"
            assert closed.value.reason.code == 4402
            with trio.fail_after(10), pytest.raises(ConnectionClosed):
                await up.ws.get_message()  # the upstream was closed too
        with trio.fail_after(10):
            while await stack.credits(account_id) != -100:
                await trio.lowlevel.checkpoint()
        status, body = await http_get(metrics_url(sw))
        assert "switch_credit_cutoffs_total 1" in body


async def test_idle_timeout_closes_4408(stack: Stack, provider: ScriptedProvider) -> None:
    _, key = await stack.account()
    async with stack.switchd(provider.url, IDLE_TIMEOUT="0.5") as sw:
        async with open_websocket_url(client_url(sw, key, "idle")) as ws:
            await provider.next()
            with trio.fail_after(10), pytest.raises(ConnectionClosed) as closed:
                while True:
                    await ws.get_message()
            assert closed.value.reason.code == 4408


async def test_binary_and_oversize_frames_get_errors_and_never_reach_upstream(
    stack: Stack, provider: ScriptedProvider
) -> None:
    _, key = await stack.account()
    async with stack.switchd(provider.url, MAX_PAYLOAD_LENGTH="1000") as sw:
        async with open_websocket_url(client_url(sw, key, "bad")) as ws:
            up = await provider.next()
            await ws.send_message(b"\x00\x01binary")
            await ws.send_message(json.dumps({"type": "input_audio_buffer.append", "audio": "A" * 2000}))
            await ws.send_message('{"type":"input_audio_buffer.commit"}')
            with trio.fail_after(10):
                errors = [json.loads(await ws.get_message()) for _ in range(2)]
                assert await up.ws.get_message() == '{"type":"input_audio_buffer.commit"}'
            assert [e["error"]["code"] for e in errors] == ["EXTERNAL_BINARY_FRAME", "EXTERNAL_PAYLOAD_TOO_LARGE"]
            # Past the WebSocket layer's hard limit the connection itself is closed with 1009.
            with trio.fail_after(10), pytest.raises(ConnectionClosed) as closed:
                await ws.send_message("x" * 20_000_000)
                await ws.get_message()
            assert closed.value.reason.code == 1009


async def test_sigterm_closes_1001_and_flushes_pending_usage(stack: Stack, provider: ScriptedProvider) -> None:
    account_id, key = await stack.account(tokens=10_000)
    async with stack.switchd(provider.url) as sw:
        async with open_websocket_url(client_url(sw, key, "term")) as ws:
            up = await provider.next()
            await up.send_json(response_done(40, 60))  # one report: below the batch size, inside 2 s
            with trio.fail_after(10):
                await ws.get_message()
                sw.terminate(signal.SIGTERM)
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.get_message()
            assert closed.value.reason.code == 1001
        with trio.fail_after(15):
            assert await sw.proc.wait() == 0
    assert await stack.credits(account_id) == 10_000 - 100


async def hanging_provider(task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Accepts TCP connections and never answers the WebSocket handshake."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    held: list[trio.SocketStream] = []

    async def hold(stream: trio.SocketStream) -> None:
        held.append(stream)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, hold, listeners)
        task_status.started(f"ws://127.0.0.1:{listeners[0].socket.getsockname()[1]}/v1/realtime")


async def wait_metric(sw, line: str) -> None:
    with trio.fail_after(10):
        while line not in (await http_get(metrics_url(sw)))[1]:
            await trio.lowlevel.checkpoint()


async def test_buffer_overflow_while_provider_is_not_open(stack: Stack) -> None:
    _, key = await stack.account()
    async with trio.open_nursery() as nursery:
        url = await nursery.start(hanging_provider)
        async with stack.switchd(url) as sw:
            async with open_websocket_url(client_url(sw, key, "flood")) as ws:
                with trio.fail_after(30), pytest.raises(ConnectionClosed) as closed:
                    for _ in range(10_001):
                        await ws.send_message('{"type":"input_audio_buffer.append","audio":"AAAA"}')
                    error = json.loads(await ws.get_message())
                    await ws.get_message()
            assert error["error"]["code"] == "EXTERNAL_BUFFER_OVERFLOW"
            assert closed.value.reason.code == 1008
        nursery.cancel_scope.cancel()


async def test_client_leaving_before_upstream_opens_ends_the_session(stack: Stack) -> None:
    _, key = await stack.account()
    async with trio.open_nursery() as nursery:
        url = await nursery.start(hanging_provider)
        async with stack.switchd(url) as sw:
            async with open_websocket_url(client_url(sw, key, "early")) as ws:
                await ws.send_message('{"type":"response.create"}')
                await wait_metric(sw, "switch_sessions_open 1")
            await wait_metric(sw, "switch_sessions_open 0")
        nursery.cancel_scope.cancel()


async def test_missing_config_key_stops_switchd_naming_it(tmp_path: Path) -> None:
    from tests.daemons import BIN, base_env

    result = await trio.run_process([str(BIN / "switchd")], env=base_env(UPSTREAM_URL="ws://127.0.0.1:1/"),
                                    cwd=tmp_path, capture_stderr=True, check=False)
    assert result.returncode == 2
    assert "ZMQ_SOCKET_PATH" in result.stderr.decode() and "Traceback" not in result.stderr.decode()


async def test_workers_share_the_port_and_bill_exactly(stack: Stack, provider: ScriptedProvider) -> None:
    account_id, key = await stack.account(tokens=10_000)
    async with stack.switchd(provider.url, WORKERS="2") as sw:
        ports = sw.ready_line.split()[-1].split(",")
        assert len(ports) == 2
        for i in range(16):  # the kernel spreads connections over both workers
            async with open_websocket_url(client_url(sw, key, f"w{i}")) as ws:
                up = await provider.next()
                await up.send_json(response_done(5, 5))
                with trio.fail_after(10):
                    await ws.get_message()
        totals = []
        for port in ports:
            body = (await http_get(f"http://127.0.0.1:{port}/metrics"))[1]
            totals.append(next(int(line.split()[1]) for line in body.splitlines() if line.startswith("switch_sessions_total ")))
        assert sum(totals) == 16 and min(totals) > 0
        sw.terminate()
        with trio.fail_after(20):
            assert await sw.proc.wait() == 0
    assert await stack.credits(account_id) == 10_000 - 16 * 10


def rss_bytes(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * 4096


async def test_slow_client_slows_its_upstream_and_memory_stays_bounded(stack: Stack, provider: ScriptedProvider) -> None:
    _, key = await stack.account()
    chunk = json.dumps({"type": "response.output_audio.delta", "delta": "A" * 256_000})
    async with stack.switchd(provider.url) as sw:
        async with open_websocket_url(client_url(sw, key, "slow"), max_message_size=1 << 20) as ws:
            up = await provider.next()
            before = rss_bytes(sw.proc.pid)
            sent = 0
            with trio.move_on_after(3):  # the client reads nothing meanwhile
                while sent < 1000:  # 256 MB if nothing pushed back
                    await up.ws.send_message(chunk)
                    sent += 1
            assert sent < 1000, "the provider was never slowed down"
            assert rss_bytes(sw.proc.pid) - before < 64 * 1024 * 1024
            with trio.fail_after(30):
                for _ in range(sent):  # everything that was accepted arrives, in order
                    assert await ws.get_message() == chunk


async def test_untrusted_provider_certificate_is_a_clear_1011_never_a_hang(stack: Stack) -> None:
    import ssl

    import trustme

    from tests.upstream import scripted_provider

    _, key = await stack.account()
    stranger = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("127.0.0.1").configure_cert(stranger)  # a CA switchd was never told about
    async with scripted_provider(stranger) as impostor, stack.switchd(impostor.url) as sw:
        async with open_websocket_url(client_url(sw, key, "mitm")) as ws:
            with trio.fail_after(10), pytest.raises(ConnectionClosed) as closed:
                while True:
                    await ws.get_message()
        assert closed.value.reason.code == 1011
    log = (stack.tmp / "switchd.log").read_text()
    assert "certificate verify failed" in log and "reconnect" not in log  # named, and not retried


async def test_revoking_the_key_ends_the_open_session_with_4401(stack: Stack, provider: ScriptedProvider) -> None:
    account_id, _ = await stack.account()
    created = await stack.cli("key", "create", "--account", account_id, "--label", "leaky")
    async with stack.switchd(provider.url) as sw:
        async with open_websocket_url(client_url(sw, created["key"], "revoked-mid-session")) as ws:
            up = await provider.next()
            await up.send_json(session_created())
            with trio.fail_after(10):
                await ws.get_message()
            await stack.cli("key", "revoke", created["key_hash"])
            with trio.fail_after(15), pytest.raises(ConnectionClosed) as closed:
                while True:
                    event = json.loads(await ws.get_message())
            assert event["error"]["code"] == "EXTERNAL_INVALID_AUTH"
            assert closed.value.reason.code == 4401
