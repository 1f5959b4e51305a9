"""A small Trio adapter for pyzmq sockets.

ZeroMQ's FD is edge-triggered: it signals that `zmq.EVENTS` changed, not that a message is
waiting. So the reader drains with NOBLOCK until `zmq.Again`, re-reads `zmq.EVENTS` before
parking on the FD, and a send (which can swallow the edge by processing pending commands)
wakes a parked reader when `zmq.EVENTS` shows input. Only one task may call `recv` (two
waiters on one FD raise BusyResourceError); sends are plain non-blocking calls and so are
serialised by Trio's single thread.

Cost matters here (switchdb reads and answers tens of thousands of messages a second through
it), so the hot paths avoid pyzmq's generic helpers: a multipart message is read frame by frame
with `copy=False`, whose `Frame.more` replaces a `getsockopt(RCVMORE)` call per frame, and
written frame by frame with `SNDMORE` instead of `send_multipart`. `recv_nowait` and
`send_many_nowait` let a server drain everything waiting and answer a whole burst per wake-up,
with one `zmq.EVENTS` check per burst instead of one per message.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from types import MethodType
from typing import cast

import trio
import zmq

# Fallback for a lost edge while waiting for room to send at the high-water mark.
_WRITABLE_RECHECK_S = 0.005
_NOBLOCK = zmq.NOBLOCK
_SNDMORE = zmq.NOBLOCK | zmq.SNDMORE
_POLLIN = zmq.POLLIN
_POLLOUT = zmq.POLLOUT
_EVENTS = zmq.EVENTS


class ZmqSocket:
    def __init__(self, sock: zmq.Socket) -> None:
        self.sock = sock
        self._fd = cast(int, sock.getsockopt(zmq.FD))
        self._parked: trio.CancelScope | None = None
        self._writable = trio.lowlevel.ParkingLot()
        self._recv = sock.recv
        # pyzmq's Python-level Socket.send only adds DRAFT routing_id/group handling before calling
        # the Cython send; bound directly, a frame costs a quarter as much (0.3 µs instead of 1.2).
        self._send = MethodType(zmq.backend.Socket.send, sock)

    def recv_nowait(self) -> list[bytes] | None:
        """The next message if one is waiting, else None; never blocks, never yields."""
        recv = self._recv
        try:
            frame = recv(_NOBLOCK, copy=False)
        except zmq.Again:
            return None
        parts = [frame.bytes]
        # The rest of a multipart message is delivered atomically with its first frame.
        while frame.more:
            frame = recv(_NOBLOCK, copy=False)
            parts.append(frame.bytes)
        return parts

    async def wait_readable(self) -> None:
        """Return once a message may be waiting (after a checkpoint when `zmq.EVENTS` shows input).

        Call it only after `recv_nowait` returned None: the FD's edge is only re-armed by
        draining the socket. It always yields: under a steady stream input is nearly always
        waiting again, and a reader that never yielded would hold the event loop for as long
        as the stream lasts.
        """
        events = cast(int, self.sock.getsockopt(_EVENTS))
        if events & _POLLOUT and self._writable:
            self._writable.unpark_all()
        if events & _POLLIN:
            await trio.lowlevel.checkpoint()
            return
        with trio.CancelScope() as self._parked:
            await trio.lowlevel.wait_readable(self._fd)
        self._parked = None

    async def recv(self) -> list[bytes]:
        while True:
            message = self.recv_nowait()
            if message is not None:
                return message
            await self.wait_readable()

    def _send_frames(self, frames: Sequence[bytes]) -> bool:
        send = self._send
        *head, last = frames
        if head:
            try:
                send(head[0], _SNDMORE)
            except zmq.Again:
                return False
            # Once the first frame is taken, ZeroMQ takes the rest of the message (atomic multipart).
            for frame in head[1:]:
                send(frame, _SNDMORE)
            send(last, _NOBLOCK)
            return True
        try:
            send(last, _NOBLOCK)
        except zmq.Again:
            return False
        return True

    def _wake_parked_reader(self) -> None:
        if self._parked is not None and cast(int, self.sock.getsockopt(_EVENTS)) & _POLLIN:
            self._parked.cancel()

    def send_nowait(self, frames: Sequence[bytes]) -> bool:
        """Send if there is room; False at the high-water mark."""
        if not self._send_frames(frames):
            return False
        self._wake_parked_reader()
        return True

    def send_many_nowait(self, messages: Iterable[Sequence[bytes]]) -> list[Sequence[bytes]]:
        """Send each message that there is room for; returns those refused at the high-water mark, in order."""
        refused: list[Sequence[bytes]] = []
        send = self._send_frames
        for frames in messages:
            if refused or not send(frames):
                refused.append(frames)
        self._wake_parked_reader()
        return refused

    async def send(self, frames: Sequence[bytes]) -> None:
        """Send, waiting for room. Cancelled means not sent: a caller may safely send it elsewhere."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if self.send_nowait(frames):
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        while True:
            with trio.move_on_after(_WRITABLE_RECHECK_S):
                await self._writable.park()
            if self.send_nowait(frames):
                return

    def close(self) -> None:
        self.sock.close(linger=0)
