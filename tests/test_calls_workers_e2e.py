"""WebRTC calls across switchd's workers (WORKERS=2) and against MAX_SESSIONS; real daemons, the simulator
and an aiortc browser, as in tests/test_calls_e2e.py.

Which worker of a SO_REUSEPORT group takes a connection is the kernel's hash of the connection's
addresses: the same client address and port land on the same worker again. So a harmless request
(another account's hangup: 404, counted as a rejection in the metrics of the worker that answered)
shows where an address lands, and the call's own hangup is then sent from an address known to
reach the worker that does not run the call. Each probe is closed with a reset (SO_LINGER 0), so
neither end keeps the address pair in TIME-WAIT and it can connect again at once.
"""
from __future__ import annotations

import json
import re
import socket
import struct
from pathlib import Path

import trio

from perf import procs
from tests.stack import metrics_url, open_stack
from tests.test_calls_e2e import TEXT, balance
from tests.webrtc import browser, post

SIM_MODEL = "/v1/realtime?model=gpt-realtime"


async def post_from(address: str, source: tuple[str, int] | None, path: str, key: str) -> tuple[tuple[str, int], int]:
    """POST from the client address `source` (None: any port): (the address used, the status)."""
    host, port = address.split("://", 1)[-1].rsplit(":", 1)
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    await sock.bind(source or (host, 0))
    await sock.connect((host, int(port)))
    local = sock.getsockname()
    stream = trio.SocketStream(sock)
    await stream.send_all(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
                          f"Content-Length: 0\r\n\r\n".encode())
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # a reset, no TIME-WAIT
    await stream.aclose()
    return (local[0], local[1]), int(data.split(b" ", 2)[1])


def worker_urls(switch: procs.Daemon) -> list[str]:
    host = metrics_url(switch).rsplit(":", 1)[0]
    return [f"{host}:{port}/metrics" for port in switch.word_after("workers").split(",")]


async def metric(url: str, name: str) -> float:
    return procs.metric_values(await procs.http_get(url))[name]


async def rejections(urls: list[str]) -> list[float]:
    return [await metric(url, "switch_sessions_rejected_total") for url in urls]


async def test_a_hangup_through_the_worker_not_running_the_call(tmp_path: Path) -> None:
    with trio.fail_after(120):
        async with open_stack(tmp_path) as stack, procs.sim(tmp_path, "--fast") as sim:
            account_id, key = await stack.account(tokens=100_000)
            _, stranger = await stack.account()
            async with stack.switchd(sim.address + SIM_MODEL, OPENAI_API_KEY="sk-operator", WORKERS="2") as switch:
                urls = worker_urls(switch)
                assert len(urls) == 2
                calls = switch.address.replace("ws://", "http://") + "/v1/realtime/calls"
                async with browser(calls, key) as peer:
                    call_id = (await peer.until("answered"))["location"].rsplit("/", 1)[1]
                    hangup = f"/v1/realtime/calls/{call_id}/hangup"
                    await peer.until("open")
                    await peer.send(TEXT)
                    usage = (await peer.until("event", "response.done"))["event"]["response"]["usage"]
                    # A call counts as open from its request on: the worker running it shows it.
                    opened = [await metric(url, "switch_sessions_open") for url in urls]
                    assert sorted(opened) == [0, 1]
                    runner = opened.index(1)
                    # Another account's hangup is 404 on both workers, and shows where each address lands.
                    landed: dict[int, tuple[str, int]] = {}
                    for _ in range(64):
                        before = await rejections(urls)
                        source, status = await post_from(switch.address, None, hangup, stranger)
                        assert status == 404
                        after = await rejections(urls)
                        (worker,) = [i for i in (0, 1) if after[i] == before[i] + 1]
                        landed.setdefault(worker, source)
                        if len(landed) == 2:
                            break
                    assert len(landed) == 2, "64 connections all reached one worker"
                    # The same address reaches the same worker again: that one hangs up for the owner.
                    before = await rejections(urls)
                    _, status = await post_from(switch.address, landed[1 - runner], hangup, stranger)
                    assert status == 404 and (await rejections(urls))[1 - runner] == before[1 - runner] + 1
                    _, status = await post_from(switch.address, landed[1 - runner], hangup, key)
                    assert status == 200
                    await peer.until("closed")
                # The worker running the call saw its sideband end and settled it: billed, slot given back.
                await balance(stack, account_id, 100_000 - usage["total_tokens"])
                with trio.fail_after(15):
                    while await metric(urls[runner], "switch_sessions_open") != 0:
                        pass
                status, _, body = await post(switch.address, hangup, key=key)  # ended: 404 on any worker
                assert status == 404 and json.loads(body)["error"]["code"] == "EXTERNAL_NOT_FOUND"
            log = switch.log()
            assert f"call {call_id} hung up for its client (its worker settles it)" in log
            assert f"call {call_id} ended (provider closed the sideband)" in log


async def test_calls_count_against_max_sessions(tmp_path: Path) -> None:
    with trio.fail_after(120):
        async with open_stack(tmp_path) as stack, procs.sim(tmp_path, "--fast") as sim:
            _, key = await stack.account()
            async with stack.switchd(sim.address + SIM_MODEL, MAX_SESSIONS="1") as switch:
                calls = switch.address.replace("ws://", "http://") + "/v1/realtime/calls"
                async with browser(calls, key) as first:
                    call_id = (await first.until("answered"))["location"].rsplit("/", 1)[1]
                    async with browser(calls, key) as second:
                        refused = await second.until("refused")
                        assert refused["status"] == 503
                        error = json.loads(refused["body"])["error"]
                        assert error["code"] == "EXTERNAL_OVER_CAPACITY" and "1 sessions open" in error["message"]
                    await refused_websocket(switch, key)  # the call holds the one slot
                    status, _, _ = await post(switch.address, f"/v1/realtime/calls/{call_id}/hangup", key=key)
                    assert status == 200
                    await first.until("closed")
                # The slot is free again once the call has ended.
                with trio.fail_after(15):
                    while await metric(metrics_url(switch), "switch_sessions_open") != 0:
                        pass
                async with browser(calls, key) as third:
                    await third.until("answered")
                    await third.until("open")
            # Two calls made at the provider, not three: the refused one was never offered to it.
            assert len(re.findall(r"call rtc_\S+ created", switch.log())) == 2


async def refused_websocket(switch: procs.Daemon, key: str) -> None:
    host, port = switch.address.split("://", 1)[1].rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(
            f"GET /v1/realtime?rs_key={key}&rs_sessid=ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            .encode())
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 503"), data[:200]
