"""The relay's hot path: a thread of its own carries the frames no session needs to read.

Woken by Trio for every frame, a relay pays for the event loop on the way: Trio's epoll, its
scheduling, then the receive and send layers. Even one task carrying every session's frames from
a nested epoll, woken through Trio, added ~100 µs to a round trip here where a plain blocking
epoll loop adds ~35. So while a direction carries only plain frames (a client's text frames, the
provider's audio deltas) its reader parks here, and the pump's thread, blocked in its own
level-triggered epoll, reads the ready sockets and writes each one's complete plain frames
straight on, as one write, many sockets per wake. Trio is not woken at all for them.

The first frame the session must see (an event to meter, a control frame, anything unusual or
big) hands the direction back: that frame stays first in the connection's buffer and the reader
parses it as usual. So does anything the pump cannot finish at once: a write the destination
will not take whole (back-pressure), a destination that is gone or busy, a lost connection.
Handing back crosses threads: the pump notes the reader in `_handed` and pokes an eventfd that
the Trio task of `run` waits on; that task reschedules every reader handed back since.

A frame the session only reads (a transcript delta: text for the conversation, nothing to act
on) need not stop the carrying: the pump forwards it with the audio and keeps its payload in the
connection's `observed` list, which the reader reads, in order, before the next frame it gets.
Up to MAX_OBSERVED are kept; the next one is handed back like any frame the session must see, so
the conversation is never more than that many deltas behind and the list stays bounded.

`lock` is held by the pump's thread while it serves a wake and by the Trio thread whenever it
parks or releases a reader, writes to a connection a lane may write to, or closes one
(ws.WsConnection takes it for every write once it has a lane). So a connection's bytes never
interleave, a parked connection's buffer is the pump's alone, and no fd number is written to
after it is given up. The pump's thread calls no Trio function: the clock it reads is Trio's own
(`current_time` of the run's clock is thread-safe), and its counters are its own.

Busy, the pump wakes at most once a `coalesce` (RELAY_COALESCE_MS): each wake costs about as much
as forwarding several frames, so when one finds two or more sockets ready it sleeps that long and
serves what has gathered in one pass. A lone session's frames (one ready socket a wake) never wait.
"""
from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
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
    def __init__(self, metrics: Metrics, coalesce: float = 0.0, *,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.metrics = metrics
        self.coalesce = coalesce
        self.sleep = sleep  # how the thread gathers (a test holds it to see what waits)
        self.lock = threading.Lock()
        self._epoll = select.epoll()
        self._parked: dict[int, tuple[WsConnection, Lane, trio.lowlevel.Task]] = {}
        self._handed: dict[trio.lowlevel.Task, outcome.Outcome[None]] = {}  # back to Trio at the next poke
        self._poke = -1  # the eventfd that wakes run's Trio task for what was handed back

    async def carry(self, conn: WsConnection, lane: Lane) -> None:
        """Park `conn`'s reader while the pump forwards its plain frames; back when one is not."""
        fd, task = conn.fd, trio.lowlevel.current_task()
        with self.lock:
            self._parked[fd] = (conn, lane, task)
            self._epoll.register(fd, select.EPOLLIN)

        def abort(_: object) -> trio.lowlevel.Abort:
            with self.lock:
                # Handed back but not yet rescheduled: the pump is done with it already.
                if self._handed.pop(task, None) is None:
                    self._release(fd)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def _release(self, fd: int) -> None:
        del self._parked[fd]
        self._epoll.unregister(fd)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The pump's thread, for as long as this task runs; and handing readers back to Trio."""
        stop = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._poke = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(stop, select.EPOLLIN)
        try:
            async with trio.open_nursery() as nursery:
                # Not cancellable: it ends when `stop` is poked, in the finally below.
                nursery.start_soon(partial(trio.to_thread.run_sync, self._serve_forever,
                                           trio.lowlevel.current_clock(), stop, thread_name="switchd relay pump",
                                           limiter=trio.CapacityLimiter(1)))
                task_status.started()
                try:
                    while True:
                        await trio.lowlevel.wait_readable(self._poke)
                        os.eventfd_read(self._poke)
                        with self.lock:
                            handed, self._handed = self._handed, {}
                        for task, back in handed.items():
                            trio.lowlevel.reschedule(task, back)
                finally:
                    os.eventfd_write(stop, 1)  # the thread ends at its next wake; the nursery waits for it
        finally:
            self._epoll.close()
            os.close(stop)
            os.close(self._poke)

    def _serve_forever(self, clock: trio.abc.Clock, stop: int) -> None:
        poll, lock = self._epoll.poll, self.lock
        events = poll(-1, MAX_EVENTS)  # blocked here, the thread holds neither the GIL nor the lock
        while (stop, select.EPOLLIN) not in events:  # a C-level scan, not a Python loop per wake
            with lock:
                ready = self._wake(events, clock.current_time())
            if ready >= BUSY and self.coalesce:
                self.sleep(self.coalesce)
                events = poll(0, MAX_EVENTS)
            else:
                events = poll(-1, MAX_EVENTS)

    def _wake(self, events: list[tuple[int, int]], now: float) -> int:
        """Serve the ready sockets; the most that were ready at once."""
        if not events:
            return 0
        self.metrics.relay_wakes += 1
        ready, handed = 0, len(self._handed)
        # More sockets get ready while these are served: look again a few times before sleeping.
        for _ in range(BURSTS):
            ready = max(ready, len(events))
            self._serve(events, now)
            events = self._epoll.poll(0, MAX_EVENTS)
            if not events:
                break
        if len(self._handed) != handed:
            os.eventfd_write(self._poke, 1)
        return ready

    def _serve(self, events: list[tuple[int, int]], now: float) -> None:
        metrics, parked = self.metrics, self._parked
        for fd, _ in events:
            entry = parked.get(fd)
            if entry is None:  # the stop eventfd, or a reader released since the poll
                continue
            conn, lane, task = entry
            try:
                back, frames, size = conn.forward_plain(lane, now)
            except Exception as exc:  # a bug ends that session, not the pump
                self._hand_back(fd, task, outcome.Error(exc))
                continue
            if frames:
                if lane.inbound:
                    metrics.pump_frames_in += frames
                    metrics.pump_bytes_in += size
                else:
                    metrics.pump_frames_out += frames
                    metrics.pump_bytes_out += size
            if back:
                self._hand_back(fd, task, outcome.Value(None))

    def _hand_back(self, fd: int, task: trio.lowlevel.Task, back: outcome.Outcome[None]) -> None:
        self._release(fd)
        self._handed[task] = back
