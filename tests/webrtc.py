"""The tests' handle on `tests.rtc_browser`, a WebRTC browser in its own process."""
from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import trio

REPO = Path(__file__).resolve().parent.parent


class Browser:
    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self._buffer = b""

    async def next(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        while b"\n" not in self._buffer:
            data = await self.process.stdout.receive_some(1 << 16)
            if not data:
                raise EOFError("the browser process ended")
            self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)

    async def until(self, op: str, event_type: str | None = None) -> dict[str, Any]:
        """The next line of `op` (for events: of `event_type`), skipping others."""
        while True:
            line = await self.next()
            if line["op"] == op and (event_type is None or line["event"]["type"] == event_type):
                return line

    async def command(self, **command: Any) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send_all(json.dumps(command).encode() + b"\n")

    async def send(self, event: dict[str, Any]) -> None:
        await self.command(op="send", event=event)


@asynccontextmanager
async def browser(url: str, key: str, session: dict[str, Any] | None = None) -> AsyncIterator[Browser]:
    """A browser that POSTs its offer to `url` (multipart when `session` is given)."""
    argv = [sys.executable, "-m", "tests.rtc_browser", url, key, *([json.dumps(session)] if session else [])]
    async with trio.open_nursery() as nursery:
        process = await nursery.start(partial(trio.run_process, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                              check=False, cwd=REPO))
        try:
            yield Browser(process)
        finally:
            nursery.cancel_scope.cancel()


async def post(address: str, path: str, body: bytes = b"", key: str | None = None,
               content_type: str = "application/json") -> tuple[int, dict[bytes, bytes], bytes]:
    """POST over a fresh connection to `address` (`ws://host:port` or `host:port`): (status, headers, body)."""
    host, port = address.split("://", 1)[-1].rsplit(":", 1)
    auth = f"Authorization: Bearer {key}\r\n" if key is not None else ""
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all((f"POST {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Content-Type: {content_type}\r\n"
                               f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])}
    return int(lines[0].split(b" ")[1]), headers, payload
