"""What switchd holds per session: idle, and holding a maximal partial frame (its RSS, from /proc).

N clients open sessions (each with its upstream to the provider-like peer) and stay silent: the
growth of switchd's resident memory over N is the idle cost of a session. Then each client sends
the header of a text frame of MAX_PAYLOAD_LENGTH bytes and all of its payload but the last byte,
so every session holds the largest frame switchd accepts, unfinished: the growth over N, idle
included, is what a session can make switchd hold. The bytes still buffered by the kernel are
not in RSS: switchd's RSS is read once it has stopped growing.
"""
from __future__ import annotations

import base64
import os
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import trio

from perf import procs
from perf.wire import head

SETTLE_POLL_S = 0.1
SETTLE_TIMEOUT_S = 20.0
OPEN_TIMEOUT_S = 30.0


def rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


async def settled_rss(pid: int) -> int | None:
    """switchd's RSS once two readings a poll apart agree within 1 % (bounded by SETTLE_TIMEOUT_S)."""
    last = rss_bytes(pid)
    with trio.move_on_after(SETTLE_TIMEOUT_S):
        while True:
            await trio.sleep(SETTLE_POLL_S)
            now = rss_bytes(pid)
            if now is None or last is None or abs(now - last) <= last // 100:
                return now
            last = now
    return rss_bytes(pid)


async def open_session(host: str, port: int, resource: str) -> trio.SocketStream:
    """A WebSocket client session: the upgrade, then the 101 (the events after it are never read)."""
    stream = await trio.open_tcp_stream(host, port)
    key = base64.b64encode(os.urandom(16)).decode()
    await stream.send_all(f"GET {resource} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                          f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                          .encode())
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise RuntimeError(f"switchd closed the upgrade: {answer[:200]!r}")
        answer += chunk
    if not answer.startswith(b"HTTP/1.1 101"):
        status = answer.split(b"\r\n", 1)[0]
        raise RuntimeError(f"switchd refused the session: {status!r}")
    return stream


async def _sessions_open(metrics_url: str) -> float:
    return procs.metric_values(await procs.http_get(metrics_url)).get("switch_sessions_open", 0.0)


async def per_session(switchd: procs.Daemon, key: str, sessions: int, max_payload: int) -> dict[str, Any]:
    """switchd's memory per idle session and per session holding a maximal partial frame (bytes)."""
    host, _, port = switchd.address.removeprefix("ws://").rpartition(":")
    metrics_url = switchd.word_after("metrics") + "/metrics"
    base = await settled_rss(switchd.pid)
    async with AsyncExitStack() as stack:
        streams = []
        with trio.fail_after(OPEN_TIMEOUT_S):
            for i in range(sessions):
                resource = "/v1/realtime?" + urlencode({"rs_key": key, "rs_sessid": f"mem-{i}"})
                stream = await open_session(host, int(port), resource)
                stack.push_async_callback(stream.aclose)
                streams.append(stream)
            # switchd is another process: its gauge is polled, there is no event to wait on.
            while await _sessions_open(metrics_url) < sessions:
                await trio.sleep(SETTLE_POLL_S)  # noqa: ASYNC110
        idle = await settled_rss(switchd.pid)
        # A zero-key masked text frame (valid per RFC 6455), one byte short of complete.
        partial = head(max_payload, masked=True) + b"a" * (max_payload - 1)
        with trio.fail_after(OPEN_TIMEOUT_S):
            for stream in streams:
                await stream.send_all(partial)
        holding = await settled_rss(switchd.pid)
        still_open = await _sessions_open(metrics_url)
    after_close = await settled_rss(switchd.pid)

    def per(a: int | None, b: int | None) -> float | None:
        return (a - b) / sessions if a is not None and b is not None else None

    return {
        "sessions": sessions, "max_payload_length": max_payload,
        "rss_bytes": {"before": base, "idle": idle, "holding_partial_frames": holding, "after_close": after_close},
        "idle_bytes_per_session": per(idle, base),
        "partial_frame_bytes_per_session": per(holding, base),
        "partial_frame_over_idle_bytes_per_session": per(holding, idle),
        # Sessions switchd still held once every partial frame was in: fewer means it closed some,
        # and the figure is then not of a held frame.
        "sessions_open_while_holding": int(still_open),
    }
