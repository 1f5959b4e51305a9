"""Accept loops that survive running out of file descriptors without flooding the log.

trio.serve_listeners logs a full traceback for every failed accept, ten a second while the
process is at its descriptor limit; here the failures are counted and logged once per interval.
A session is refused (503) while no socket can be opened for its upstream, counted the same way.
"""
from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

log = logging.getLogger(__name__)

# What the kernel answers when the process (or the system) has no descriptor or buffer to spare.
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
RETRY_S = 0.1  # a pending connection waits in the backlog meanwhile
LOG_INTERVAL_S = 10.0


class ResourceAlarm:
    """Counts resource failures: the first is logged at once, then one line per interval with the
    count while they go on, and one line once an interval passed without any. `run` does the logging."""

    def __init__(self, what: str, interval: float = LOG_INTERVAL_S) -> None:
        self.what = what
        self.interval = interval
        self.failures = 0  # since the last line
        self._first = trio.Event()
        self._error: OSError | None = None

    def failed(self, exc: OSError) -> None:
        # Every failure at DEBUG only: at the descriptor limit they come ten times a second.
        log.debug("%s failed: %s", self.what, errno.errorcode.get(exc.errno or 0, exc.errno))
        self.failures += 1
        self._error = exc
        self._first.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self._first.wait()
            self._log()
            while True:
                await trio.sleep(self.interval)
                if not self.failures:
                    break
                self._log()
            self._first = trio.Event()
            log.warning("%s: working again (no failure in the last %.0f s)", self.what, self.interval)

    def _log(self) -> None:
        exc = self._error
        assert exc is not None
        log.error("%s: %s (%s); %d failure(s) since the last line", self.what,
                  errno.errorcode.get(exc.errno or 0, exc.errno), exc.strerror, self.failures)
        self.failures = 0


def can_open_socket(family: int = socket.AF_INET) -> OSError | None:
    """Whether one more socket can be opened now (an upstream connection will need it)."""
    try:
        socket.socket(family, socket.SOCK_STREAM).close()
    except OSError as exc:
        if exc.errno in RESOURCE_ERRNOS:
            return exc
        raise
    return None


async def serve_accepting(
    handler: Callable[[Any], Awaitable[object]],
    listeners: Sequence[trio.abc.Listener[Any]],
    alarm: ResourceAlarm,
    *,
    handler_nursery: trio.Nursery | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Like trio.serve_listeners (one handler task per connection), with resource failures counted."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(alarm.run)
        for listener in listeners:
            nursery.start_soon(_accept_loop, listener, handler, handler_nursery or nursery, alarm)
        task_status.started()


async def _accept_loop(
    listener: trio.abc.Listener[Any],
    handler: Callable[[Any], Awaitable[object]],
    handlers: trio.Nursery,
    alarm: ResourceAlarm,
) -> None:
    async with listener:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in RESOURCE_ERRNOS:
                    raise
                alarm.failed(exc)
                await trio.sleep(RETRY_S)
            else:
                handlers.start_soon(handler, stream)
