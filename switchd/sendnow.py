"""A write the kernel takes whole goes at once, without the trip through the scheduler that
`send_all` makes after every send; only what it does not take waits for the socket."""
from __future__ import annotations

import os

import trio


async def send_now(fd: int, stream: trio.abc.SendStream, data: bytes | bytearray | memoryview) -> None:
    """Write `data` to the socket `fd` (the one under `stream`; -1: none known), the rest by `stream`.

    Raises OSError as os.write does, and whatever `stream.send_all` raises."""
    if fd >= 0:
        try:
            sent = os.write(fd, data)
        except BlockingIOError:
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    await stream.send_all(data)
