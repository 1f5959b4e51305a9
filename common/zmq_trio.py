"""A small Trio adapter for pyzmq sockets.

ZeroMQ's FD is edge-triggered: it signals that `zmq.EVENTS` changed, not that a message is
waiting. So the reader drains with NOBLOCK until `zmq.Again`, re-reads `zmq.EVENTS` before
parking on the FD, and a send (which can swallow the edge by processing pending commands)
wakes a parked reader when `zmq.EVENTS` shows input. Only one task may call `recv` (two
waiters on one FD raise BusyResourceError); sends are plain non-blocking calls and so are
serialised by Trio's single thread.
"""
from __future__ import annotations

from collections.abc import Sequence

import trio
import zmq

# Fallback for a lost edge while waiting for room to send at the high-water mark.
_WRITABLE_RECHECK_S = 0.005


class ZmqSocket:
    def __init__(self, sock: zmq.Socket) -> None:
        self.sock = sock
        self._fd: int = sock.getsockopt(zmq.FD)
        self._parked: trio.CancelScope | None = None
        self._writable = trio.lowlevel.ParkingLot()

    async def recv(self) -> list[bytes]:
        while True:
            try:
                return self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                pass
            events = self.sock.getsockopt(zmq.EVENTS)
            if events & zmq.POLLOUT and self._writable:
                self._writable.unpark_all()
            if events & zmq.POLLIN:
                continue
            with trio.CancelScope() as self._parked:
                await trio.lowlevel.wait_readable(self._fd)
            self._parked = None

    def send_nowait(self, frames: Sequence[bytes]) -> bool:
        """Send if there is room; False at the high-water mark."""
        try:
            self.sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        if self._parked is not None and self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self._parked.cancel()
        return True

    async def send(self, frames: Sequence[bytes]) -> None:
        while not self.send_nowait(frames):
            with trio.move_on_after(_WRITABLE_RECHECK_S):
                await self._writable.park()
        await trio.lowlevel.checkpoint()

    def close(self) -> None:
        self.sock.close(linger=0)
