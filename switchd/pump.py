"""The relay's hot path: one task per process carries the frames no session needs to read.

Woken for every frame, a session's reader costs more than the frame: Trio re-arms epoll for it,
schedules it, and runs the receive and send layers, about 50 µs a message on this machine
against ~15 µs for the two syscalls that move it. So while a direction carries only plain frames
(a client's text frames, the provider's audio deltas) its reader parks here, and this one task
reads the ready sockets from its own level-triggered epoll and writes each one's complete plain
frames straight on, as one write, many sockets per wake.

The first frame the session must see (an event to meter, a control frame, anything unusual or
big) hands the direction back: that frame stays first in the connection's buffer and the reader
parses it as usual. So does anything the pump cannot finish at once: a write the destination
will not take whole (back-pressure), a destination that is gone or busy, a lost connection.

A frame the session only reads (a transcript delta: text for the conversation, nothing to act
on) need not stop the carrying: the pump forwards it with the audio and keeps its payload in the
connection's `observed` list, which the reader reads, in order, before the next frame it gets.
Up to MAX_OBSERVED are kept; the next one is handed back like any frame the session must see, so
the conversation is never more than that many deltas behind and the list stays bounded.

Busy, the pump wakes at most once a `coalesce` (RELAY_COALESCE_MS): each wake costs about as much
as forwarding several frames, so when one finds two or more sockets ready it sleeps that long and
serves what has gathered in one pass. A lone session's frames (one ready socket a wake) never wait.
"""
from __future__ import annotations

import select
from dataclasses import dataclass
from typing import TYPE_CHECKING

import outcome
import trio

from switchd.metrics import Metrics

if TYPE_CHECKING:
    from switchd.ws import WsConnection

MAX_EVENTS = 256
BURSTS = 4
BUSY = 2  # ready sockets in one wake that mean more are coming: gather before the next
MAX_OBSERVED = 16


@dataclass(slots=True)
class Lane:
    """Where one connection's plain frames go while the pump carries them."""

    pump: Pump
    dest: WsConnection | None  # None while there is nowhere to send (the upstream reconnecting)
    max_payload: int  # a bigger frame goes to the session (it answers with an error event)
    prefix: bytes  # a plain frame's payload starts with this; b"" for any text frame
    inbound: bool  # client → provider, as the metrics count it
    # Payload prefixes of frames forwarded like plain ones whose payload the reader reads later
    # (in conn.observed). Unmasked lanes only: a masked payload would be kept masked.
    observe: tuple[bytes, ...] = ()


class Pump:
    def __init__(self, metrics: Metrics, coalesce: float = 0.0) -> None:
        self.metrics = metrics
        self.coalesce = coalesce
        self._epoll = select.epoll()
        self._parked: dict[int, tuple[WsConnection, Lane, trio.lowlevel.Task]] = {}

    async def carry(self, conn: WsConnection, lane: Lane) -> None:
        """Park `conn`'s reader while the pump forwards its plain frames; back when one is not."""
        fd = conn.fd
        self._epoll.register(fd, select.EPOLLIN)
        self._parked[fd] = (conn, lane, trio.lowlevel.current_task())

        def abort(_: object) -> trio.lowlevel.Abort:
            self._release(fd)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def _release(self, fd: int) -> None:
        del self._parked[fd]
        self._epoll.unregister(fd)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            while True:
                await trio.lowlevel.wait_readable(self._epoll.fileno())
                while self._wake() >= BUSY and self.coalesce:
                    await trio.sleep(self.coalesce)
        finally:
            self._epoll.close()

    def _wake(self) -> int:
        """Serve the ready sockets; the most that were ready at once."""
        self.metrics.relay_wakes += 1
        now, ready = trio.current_time(), 0
        # More sockets get ready while these are served: look again a few times before going back
        # to Trio, whose wake-up costs as much as forwarding several frames.
        for _ in range(BURSTS):
            events = self._epoll.poll(0, MAX_EVENTS)
            if not events:
                break
            ready = max(ready, len(events))
            self._serve(events, now)
        return ready

    def _serve(self, events: list[tuple[int, int]], now: float) -> None:
        metrics, parked = self.metrics, self._parked
        for fd, _ in events:
            conn, lane, task = parked[fd]
            try:
                back, frames, size = conn.forward_plain(lane, now)
            except Exception as exc:  # a bug ends that session, not the pump
                self._release(fd)
                trio.lowlevel.reschedule(task, outcome.Error(exc))
                continue
            if frames:
                if lane.inbound:
                    metrics.frames_in += frames
                    metrics.bytes_in += size
                else:
                    metrics.frames_out += frames
                    metrics.bytes_out += size
            if back:
                self._release(fd)
                trio.lowlevel.reschedule(task)
