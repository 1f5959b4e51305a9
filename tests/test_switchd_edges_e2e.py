"""switchd's edges end to end, real processes: stopping under repeated signals, `make run`'s Ctrl-C,
WORKERS=2 after TIME-WAIT, the descriptor limit, hostile handshakes and the log, METRICS_HOST,
the /healthz cache, half-open handshakes, and serving wss:// itself."""
from __future__ import annotations

import json
import os
import re
import resource
import signal
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
import trustme
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from tests.daemons import BIN, base_env, start_make_run
from tests.stack import Stack, client_url, metrics_url
from tests.upstream import ScriptedProvider, response_done


def host_port(url: str) -> tuple[str, int]:
    hostport = url.split("//", 1)[1].split("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    return host, int(port)


async def raw_exchange(host: str, port: int, data: bytes) -> bytes:
    """Send `data`, read until the server closes."""
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            await stream.send_all(data)
            answer = b""
            while chunk := await stream.receive_some(65536):
                answer += chunk
    return answer


async def http_get(host: str, port: int, path: str) -> tuple[int, str]:
    answer = await raw_exchange(host, port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


async def until(check: Callable[[], Awaitable[bool]], patience: float = 10) -> None:
    """Wait for a state another process reaches (its log, its database), failing after `patience` s."""
    with trio.fail_after(patience):
        while True:
            if await check():
                return
            await trio.lowlevel.checkpoint()


def metric(body: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", body, re.M)
    assert match, name
    return float(match.group(1))


UPGRADE = ("GET {target} {version}\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n")


# --- stopping ---------------------------------------------------------------------------------


@pytest.mark.parametrize("signals,workers", [((signal.SIGINT, signal.SIGINT), "1"),
                                             ((signal.SIGTERM, signal.SIGINT), "1"),
                                             ((signal.SIGTERM, signal.SIGTERM), "2")])  # the supervisor passes both on
async def test_second_signal_ends_the_grace_and_spools_the_usage(
    stack: Stack, plain_provider: ScriptedProvider, signals: tuple[int, int], workers: str
) -> None:
    account_id, key = await stack.account(tokens=10_000)
    async with stack.switchd(plain_provider.url, SHUTDOWN_GRACE="120", WORKERS=workers) as sw:
        async with open_websocket_url(client_url(sw, key, "twice")) as ws:
            up = await plain_provider.next()
            await up.send_json(response_done(40, 60))
            with trio.fail_after(10):
                await ws.get_message()
            stack.db.terminate(signal.SIGSTOP)  # switchdb cannot take the usage: the grace would run 120 s
            try:
                sw.terminate(signals[0])
                with trio.fail_after(10), pytest.raises(ConnectionClosed) as closed:
                    await ws.get_message()
                assert closed.value.reason.code == 1001
                started = time.monotonic()
                sw.terminate(signals[1])
                with trio.fail_after(20):
                    assert await sw.proc.wait() == 0
                assert time.monotonic() - started < 10  # not the 120 s grace
            finally:
                stack.db.terminate(signal.SIGCONT)
    assert any((stack.tmp / "switchd-spool").iterdir()) and "again" in sw.log()  # kept on disk, not lost
    async with stack.switchd(plain_provider.url, WORKERS=workers):  # the next start on the same spool delivers it

        async def billed() -> bool:
            return await stack.credits(account_id) == 10_000 - 100

        await until(billed, patience=20)


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_two_signals_at_once_still_stop_cleanly(
    stack: Stack, plain_provider: ScriptedProvider, workers: str
) -> None:
    """The second signal may land anywhere in the shutdown, even before it began or after it ended."""
    for attempt in range(3):
        async with stack.switchd(plain_provider.url, name=f"both{attempt}", WORKERS=workers) as sw:
            sw.terminate(signal.SIGTERM)
            sw.terminate(signal.SIGINT)
            with trio.fail_after(15):
                assert await sw.proc.wait() == 0, sw.log()[-3000:]
            assert "Traceback" not in sw.log()


async def test_make_run_ctrl_c_stops_once_and_bills_every_response_seen(tmp_path: Path) -> None:
    """SIGINT to the whole process group, as a terminal's Ctrl-C sends it, while responses stream."""
    proc, out = await start_make_run(tmp_path)
    assert proc.stdout is not None
    try:
        url = re.search(rb"Connect a client to:\s+(\S+)", out).group(1).decode()  # type: ignore[union-attr]
        seen, done = 0, 0
        async with open_websocket_url(url) as ws:
            create = json.dumps({"type": "response.create", "response": {"output_modalities": ["text"]}})
            await ws.send_message(create)
            with trio.fail_after(60), pytest.raises(ConnectionClosed) as closed:
                while True:
                    event = json.loads(await ws.get_message())
                    if event["type"] == "response.done":
                        seen += event["response"]["usage"]["total_tokens"]
                        done += 1
                        if done == 3:
                            os.killpg(proc.pid, signal.SIGINT)  # while the fourth response streams
                        await ws.send_message(create)
            assert closed.value.reason.code == 1001
        with trio.fail_after(60):
            while chunk := await proc.stdout.receive_some(65536):
                out += chunk
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    assert b"stopped" in out and done >= 3
    log = (tmp_path / "var" / "switchd.log").read_text()
    assert log.count("received SIGTERM") == 1 and "SIGINT" not in log and "again" not in log
    assert "received SIGINT" not in (tmp_path / "var" / "switchdb.log").read_text()
    env = base_env(DB_PATH=str(tmp_path / "var" / "switch.db"))
    seed = await trio.run_process([str(BIN / "switchdb"), "seed", "--json", "--key-file",
                                   str(tmp_path / "var" / "demo-key")], env=env, cwd=tmp_path, capture_stdout=True)
    account = json.loads(seed.stdout)["account_id"]
    usage = json.loads((await trio.run_process([str(BIN / "switchdb"), "usage", "--account", account, "--json"],
                                               env=env, cwd=tmp_path, capture_stdout=True)).stdout)
    assert usage["total_tokens"] >= seen > 0  # every response the client saw is billed, before devrun ended


async def test_workers_start_at_once_on_a_port_with_time_wait_connections(
    stack: Stack, plain_provider: ScriptedProvider
) -> None:
    _, key = await stack.account()
    async with stack.switchd(plain_provider.url, name="first") as sw:  # one process, as after a plain `make run`
        host, port = host_port(sw.address)
        for _ in range(3):  # rejected handshakes: switchd closes first, its end stays in TIME-WAIT
            assert (await raw_exchange(host, port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")).startswith(b"HTTP/1.1 426")

    async def time_wait() -> bool:  # 06: TIME-WAIT, on 127.0.0.1:port
        return bool(re.search(rf"0100007F:{port:04X} \S+ 06 ", await trio.Path("/proc/net/tcp").read_text()))

    await until(time_wait)
    async with stack.switchd(plain_provider.url, WORKERS="2", PORT=str(port)) as sw:
        assert sw.address.endswith(f":{port}")
        async with open_websocket_url(client_url(sw, key, "tw")):
            await plain_provider.next()


# --- resources ------------------------------------------------------------------------------


def limit_for_one_more(pid: int) -> int:
    """The descriptor limit that leaves `pid` exactly one free descriptor number (lowest first)."""
    open_fds = {int(name) for name in os.listdir(f"/proc/{pid}/fd")}
    limit = len(open_fds)
    while limit - sum(1 for fd in open_fds if fd < limit) != 1:
        limit += 1
    return limit


async def test_at_the_descriptor_limit_sessions_get_503_and_the_log_stays_small(
    stack: Stack, plain_provider: ScriptedProvider
) -> None:
    _, key = await stack.account()
    async with stack.switchd(plain_provider.url, LOG_LEVEL="DEBUG") as sw:  # DEBUG: each failure counted
        host, port = host_port(sw.address)
        soft, hard = resource.prlimit(sw.pid, resource.RLIMIT_NOFILE)
        resource.prlimit(sw.pid, resource.RLIMIT_NOFILE, (limit_for_one_more(sw.pid), hard))  # one client, no upstream
        try:
            request = UPGRADE.format(target=f"/v1/realtime?rs_key={key}&rs_sessid=fd", version="HTTP/1.1", extra="")
            answer = await raw_exchange(host, port, request.encode())
            assert answer.startswith(b"HTTP/1.1 503") and answer.endswith(b"EXTERNAL_OVER_CAPACITY")
            # One connection holds the last descriptor; the next ones wait in the backlog while accept fails.
            holder = await trio.open_tcp_stream(host, port)
            waiting = [await trio.open_tcp_stream(host, port) for _ in range(3)]
            t0 = time.monotonic()

            async def fifteen_failed() -> bool:  # one each 0.1 s: what must not become 15 log lines
                return sw.log().count("accepting a client failed: EMFILE") >= 15

            await until(fifteen_failed)
            assert time.monotonic() - t0 < 9  # the holder was not yet cut by the handshake timeout
            await holder.aclose()
            for stream in waiting:
                await stream.aclose()
        finally:
            resource.prlimit(sw.pid, resource.RLIMIT_NOFILE, (soft, hard))
        log = sw.log()  # 15 failed accepts and more by now (the counting itself: test_switchd_edges)
        assert log.count("accepting a client: EMFILE") == 1 and "Traceback" not in log
        assert log.count("no socket for an upstream: refusing sessions: EMFILE") == 1
        async with open_websocket_url(client_url(sw, key, "fd-after")):  # sessions work again
            await plain_provider.next()


# --- hostile handshakes -----------------------------------------------------------------------


async def test_hostile_handshakes_are_400_and_the_log_stays_clean(
    stack: Stack, plain_provider: ScriptedProvider
) -> None:
    _, key = await stack.account()
    async with stack.switchd(plain_provider.url) as sw:
        host, port = host_port(sw.address)
        target = f"/v1/realtime?rs_key={key}&rs_sessid=h"
        for version, extra in (("HTTP/1.0", ""),
                               ("HTTP/1.1", "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n"),
                               ("HTTP/1.1", "X-Evil: a\x00b\r\n")):
            request = UPGRADE.format(target=target, version=version, extra=extra)
            answer = await raw_exchange(host, port, request.encode())
            assert answer.startswith(b"HTTP/1.1 400") and answer.endswith(b"EXTERNAL_BAD_PARAMS"), answer
        for hostile in (f"/#?rs_key={key}", f"/v1/realtime#?rs_key={key}&rs_sessid=h",
                        f"/\x1b[2J\x07x?rs%5Fkey={key}", f"/v1/realtime?rs_sessid=bad%20id&rs_key={key}"):
            request = UPGRADE.format(target=hostile, version="HTTP/1.1", extra="")
            answer = await raw_exchange(host, port, request.encode())
            assert answer.startswith(b"HTTP/1.1 400"), answer
    log = sw.log()
    assert "handshake rejected 400" in log
    assert key not in log and key[-12:] not in log
    assert "\x1b" not in log and "\x07" not in log and "\\x1b[2J\\x07x" in log


async def test_half_open_handshake_holds_no_slot_and_is_cut_at_the_timeout(
    stack: Stack, plain_provider: ScriptedProvider
) -> None:
    from switchd.server import HANDSHAKE_TIMEOUT_S

    _, key = await stack.account()
    async with stack.switchd(plain_provider.url, MAX_SESSIONS="1") as sw:
        host, port = host_port(sw.address)
        half = await trio.open_tcp_stream(host, port)
        await half.send_all(f"GET /v1/realtime?rs_key={key}&rs_sessid=half HTTP/1.1\r\nHost: x\r\n".encode())
        started = time.monotonic()
        async with open_websocket_url(client_url(sw, key, "whole")):  # the one slot is free meanwhile
            await plain_provider.next()
        with trio.fail_after(HANDSHAKE_TIMEOUT_S + 5):
            answer = b""
            while chunk := await half.receive_some(65536):
                answer += chunk
        assert HANDSHAKE_TIMEOUT_S - 0.5 <= time.monotonic() - started and answer.startswith(b"HTTP/1.1 426")
        async with open_websocket_url(client_url(sw, key, "again")):
            await plain_provider.next()
        body = (await http_get(*host_port(metrics_url(sw)), "/metrics"))[1]
        assert metric(body, "switch_sessions_total") == 2


# --- /metrics and /healthz --------------------------------------------------------------------


async def test_metrics_bind_metrics_host_and_health_is_cached(stack: Stack, plain_provider: ScriptedProvider) -> None:
    async with stack.switchd(plain_provider.url, METRICS_HOST="127.0.0.2") as sw:
        host, port = host_port(metrics_url(sw))
        assert host == "127.0.0.2"
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", port)  # not on HOST
        count = "switch_switchdb_rtt_seconds_count"
        before = metric((await http_get(host, port, "/metrics"))[1], count)
        for _ in range(5):
            assert await http_get(host, port, "/healthz") == (200, "ok\n")
        assert metric((await http_get(host, port, "/metrics"))[1], count) == before + 1  # one PING for five


# --- wss:// served by switchd itself ----------------------------------------------------------


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[trustme.CA, Path, Path]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file = tmp_path / "switchd-cert.pem", tmp_path / "switchd-key.pem"
    cert.private_key_pem.write_to_path(str(key_file))
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    return ca, cert_file, key_file


async def test_switchd_serves_wss_itself(
    stack: Stack, provider: ScriptedProvider, tls_files: tuple[trustme.CA, Path, Path]
) -> None:
    # wss:// in, and ws:// or wss:// out
    ca, cert_file, key_file = tls_files
    account_id, key = await stack.account(tokens=10_000)
    async with stack.switchd(provider.url, TLS_CERT_FILE=str(cert_file), TLS_KEY_FILE=str(key_file)) as sw:
        assert sw.address.startswith("wss://") and metrics_url(sw).startswith("http://")
        client_tls = ssl.create_default_context()
        ca.configure_trust(client_tls)
        async with open_websocket_url(client_url(sw, key, "tls"), ssl_context=client_tls) as ws:
            up = await provider.next()
            await ws.send_message('{"type":"response.create"}')
            with trio.fail_after(10):
                assert json.loads(await up.ws.get_message())["type"] == "response.create"
                await up.send_json(response_done(40, 60))
                got = json.loads(await ws.get_message())
                assert got["type"] == "response.done", got
        with pytest.raises(ConnectionRejected) as rejected:  # the handshake's answers come over TLS too
            async with open_websocket_url(client_url(sw, "rsk_unknown", "tls2"), ssl_context=client_tls):
                pass
        assert rejected.value.status_code == 401
        # A client that does not trust the certificate fails its TLS handshake; switchd goes on serving.
        untrusting = trio.SSLStream(await trio.open_tcp_stream(*host_port(sw.address)), ssl.create_default_context(),
                                    server_hostname="127.0.0.1")
        with trio.fail_after(10), pytest.raises(trio.BrokenResourceError):
            await untrusting.do_handshake()
        await untrusting.aclose()
        async with open_websocket_url(client_url(sw, key, "tls3"), ssl_context=client_tls):
            await provider.next()
        body = (await http_get(*host_port(metrics_url(sw)), "/metrics"))[1]  # /metrics stays plain HTTP
        assert metric(body, "switch_sessions_total") == 2

        async def billed() -> bool:
            return await stack.credits(account_id) == 10_000 - 100

        await until(billed)


async def test_bad_tls_or_port_config_stops_switchd_naming_the_key(stack: Stack, tmp_path: Path) -> None:
    (tmp_path / "bad.pem").write_text("not a certificate\n")
    for env, key in (({"TLS_CERT_FILE": str(tmp_path / "bad.pem"), "TLS_KEY_FILE": str(tmp_path / "bad.pem")},
                      "TLS_CERT_FILE"),
                     ({"PORT": "69464"}, "PORT"),
                     ({"UPSTREAM_URL": "ws://127.0.0.1:70000/v1"}, "UPSTREAM_URL")):
        settings = {**stack.env, "UPSTREAM_URL": "ws://127.0.0.1:1/v1", "PORT": "0", "METRICS_PORT": "0", **env}
        result = await trio.run_process([str(BIN / "switchd")], env=settings, cwd=tmp_path, capture_stderr=True,
                                        check=False)
        err = result.stderr.decode()
        assert result.returncode == 2 and key in err and "Traceback" not in err, err

