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
        print("BROWSER", trio.current_time(), line[:100])
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
