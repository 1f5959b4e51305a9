"""WORKERS > 1: several switchd processes accept on one port (SO_REUSEPORT), one per core.

The supervisor starts the workers, prints one ready line once all of them serve, restarts a
worker that dies, and on SIGTERM/SIGINT passes one SIGTERM on and waits for every worker's
graceful shutdown (a later signal is passed on too: it ends the workers' grace). Workers run in
their own process group, so a terminal's Ctrl-C reaches the supervisor alone, not every worker
a second time. Each worker has its own metrics port (METRICS_PORT + index, or a free one)
and its own spool directory (SPOOL_DIR/worker-<index>), since a spool belongs to one process.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import trio

from common.config import Settings
from switchd.server import Stop
from switchd.upstream import backoff

log = logging.getLogger(__name__)

WORKER_ENV = "SWITCHD_WORKER"  # set for a worker: its index; the worker binds with SO_REUSEPORT
START_TIMEOUT_S = 30.0


def _reserve_port(host: str, port: int) -> socket.socket:
    """Bind (without listening) so port 0 becomes a concrete port every worker can share.

    SO_REUSEADDR as well: without it the bind fails while connections of the previous run are
    in TIME-WAIT on the port (the workers' own sockets set both)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


class Workers:
    def __init__(self, settings: Settings, port: int) -> None:
        self.settings = settings
        self.port = port
        self.procs: dict[int, trio.Process] = {}
        self.metrics_ports: dict[int, str] = {}
        self.stopping = trio.Event()

    def env(self, index: int) -> dict[str, str]:
        s = self.settings
        return {
            **os.environ,
            WORKER_ENV: str(index),
            "WORKERS": "1",
            "PORT": str(self.port),
            "METRICS_PORT": str(s.metrics_port + index if s.metrics_port else 0),
            "SPOOL_DIR": str(Path(s.spool_dir) / f"worker-{index}"),
        }

    async def run_worker(self, index: int, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        attempt = 0
        while not self.stopping.is_set():
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "switchd"], env=self.env(index), stdout=subprocess.PIPE,
                stdin=subprocess.DEVNULL, process_group=0,
            )
            self.procs[index] = proc
            line = await self._ready_line(proc)
            if line:
                self.metrics_ports[index] = line.rsplit(":", 1)[-1]
                task_status.started()
                task_status = trio.TASK_STATUS_IGNORED
                attempt = 0
            await proc.wait()
            if self.stopping.is_set():
                return
            attempt += 1
            log.error("worker %d exited with %s; restarting", index, proc.returncode)
            await trio.sleep(backoff(min(attempt, 5)))

    @staticmethod
    async def _ready_line(proc: trio.Process) -> str:
        assert proc.stdout is not None
        buffer = b""
        with trio.move_on_after(START_TIMEOUT_S):
            while b"\n" not in buffer:
                chunk = await proc.stdout.receive_some(4096)
                if not chunk:
                    return ""
                buffer += chunk
        return buffer.decode().strip()

    def signal_all(self) -> None:
        self.stopping.set()
        for proc in self.procs.values():
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)

    async def stop(self, stop: Stop) -> None:
        """One SIGTERM to each worker; if another signal comes meanwhile, one more (it ends their grace)."""
        self.signal_all()
        async with trio.open_nursery() as nursery:

            async def hurry() -> None:
                await stop.hurried.wait()
                self.signal_all()

            nursery.start_soon(hurry)
            for index, proc in self.procs.items():
                if await proc.wait() != 0:
                    log.error("worker %d exited with %s while stopping", index, proc.returncode)
            nursery.cancel_scope.cancel()


async def supervise(settings: Settings) -> bool:
    """Run WORKERS switchd processes until SIGTERM/SIGINT; True when every worker exited cleanly."""
    reserved = _reserve_port(settings.host, settings.port)
    workers = Workers(settings, reserved.getsockname()[1])
    stop = Stop()
    async with trio.open_nursery() as nursery:
        await nursery.start(stop.watch_signals)
        with trio.fail_after(START_TIMEOUT_S):
            for index in range(settings.workers):
                await nursery.start(workers.run_worker, index)
        reserved.close()
        scheme = "wss" if settings.tls_cert_file else "ws"
        sys.stdout.write(
            f"switchd listening {scheme}://{settings.host}:{workers.port} metrics http://{settings.metrics_host}:"
            f"{workers.metrics_ports[0]} workers "
            + ",".join(workers.metrics_ports[i] for i in sorted(workers.metrics_ports)) + "\n"
        )
        sys.stdout.flush()
        log.info("%d workers on port %d", settings.workers, workers.port)
        await stop.requested.wait()
        with trio.CancelScope(shield=True):
            await workers.stop(stop)
        nursery.cancel_scope.cancel()  # the signal watcher
    return all(proc.returncode == 0 for proc in workers.procs.values())
