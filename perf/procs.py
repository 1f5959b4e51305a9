"""The real daemons as processes, for the benchmarks and the end-to-end tests alike.

Every daemon prints one ready line (`... listening <address> ...`) once it serves; `daemon()`
waits for that line (no sleeps, no fixed ports) and on exit sends SIGTERM and waits. The
benchmarks run each daemon with its temporary directory as cwd, so no `.env` of the checkout
leaks into a measurement.
"""
from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import attrs
import trio

from common.config import Settings

from perf.cpu import cpu_times, stat_fields  # cpu_times re-exported: the benchmarks read CPU through procs

BIN = Path(sys.executable).parent
DAEMON_LOG_LEVEL = "WARNING"  # per-session INFO lines are not on the per-frame path; keep the logs small
# Every key the daemons read: none may leak in from the environment the benchmarks run in.
_CONFIG_KEYS = {name.upper() for name in attrs.fields_dict(Settings)}
_emails = itertools.count()


def cpu_seconds(pid: int) -> float | None:
    """utime + stime: all the CPU a process used."""
    times = cpu_times(pid)
    return None if times is None else times[0] + times[1]


def base_env(**overrides: str) -> dict[str, str]:
    """This environment without any of the project's config keys, plus `overrides`."""
    env = {k: v for k, v in os.environ.items() if k not in _CONFIG_KEYS}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(overrides)
    return env


@dataclass
class Daemon:
    proc: trio.Process
    ready_line: str
    log_path: Path
    _buffer: bytearray = field(default_factory=bytearray)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def word_after(self, marker: str) -> str:
        words = self.ready_line.split()
        return words[words.index(marker) + 1]

    @property
    def address(self) -> str:
        return self.word_after("listening")

    async def readline(self) -> str:
        assert self.proc.stdout is not None
        while b"\n" not in self._buffer:
            chunk = await self.proc.stdout.receive_some(65536)
            if not chunk:
                raise RuntimeError(f"{self.proc.args} exited before a line; log:\n{self.log()[-4000:]}")
            self._buffer += chunk
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer[:] = rest
        return line.decode()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def terminate(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)


@asynccontextmanager
async def daemon(argv: list[str], env: Mapping[str, str], log_path: Path, *, cwd: Path | None = None,
                 start_timeout: float = 30, stop_timeout: float = 15,
                 pass_fds: tuple[int, ...] = ()) -> AsyncIterator[Daemon]:
    """Run `argv` (a console script name is looked up beside this Python), wait for its ready line."""
    if not os.path.isabs(argv[0]) and (BIN / argv[0]).exists():
        argv = [str(BIN / argv[0]), *argv[1:]]
    log_file = open(log_path, "ab")
    proc = await trio.lowlevel.open_process(
        argv, env=dict(env), cwd=cwd, stdout=subprocess.PIPE, stderr=log_file, stdin=subprocess.DEVNULL,
        pass_fds=pass_fds)
    d = Daemon(proc, "", log_path)
    try:
        with trio.fail_after(start_timeout):
            while "listening" not in d.ready_line:
                d.ready_line = await d.readline()
        yield d
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(stop_timeout):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            log_file.close()


@dataclass
class Stack:
    """switchdb running on a fresh database in `tmp`, and the environment to reach it."""

    tmp: Path
    env: dict[str, str]
    db: Daemon

    async def cli(self, *args: str) -> dict:
        result = await trio.run_process([str(BIN / "switchdb"), *args, "--json"], env=self.env, cwd=self.tmp,
                                        capture_stdout=True, capture_stderr=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"switchdb {' '.join(args)} failed: {result.stderr.decode()}")
        return json.loads(result.stdout)

    async def account(self, tokens: int = 10**15) -> tuple[str, str]:
        """A fresh account with effectively unlimited credits, and a key: (account_id, key)."""
        account = await self.cli("account", "create", "--email", f"perf{next(_emails)}@example.test",
                                 "--tokens", str(tokens))
        key = await self.cli("key", "create", "--account", account["id"], "--label", "perf")
        return account["id"], key["key"]

    @asynccontextmanager
    async def switchd(self, upstream_url: str, name: str = "switchd", **env: str) -> AsyncIterator[Daemon]:
        settings = {**self.env, "UPSTREAM_URL": upstream_url, "PORT": "0", "METRICS_PORT": "0",
                    "HOST": "127.0.0.1", "SPOOL_DIR": str(self.tmp / f"{name}-spool"), **env}
        async with daemon(["switchd"], settings, self.tmp / f"{name}.log", cwd=self.tmp) as d:
            yield d


@asynccontextmanager
async def open_stack(tmp: Path) -> AsyncIterator[Stack]:
    env = base_env(ZMQ_SOCKET_PATH=f"ipc://{tmp}/switchdb.sock", DB_PATH=str(tmp / "switch.db"),
                   LOG_LEVEL=DAEMON_LOG_LEVEL)
    async with daemon(["switchdb", "serve"], env, tmp / "switchdb.log", cwd=tmp) as db:
        yield Stack(tmp, env, db)


@asynccontextmanager
async def sim(tmp: Path, *flags: str, name: str = "sim") -> AsyncIterator[Daemon]:
    """switchd-sim on a free port; `--echo` sends every client frame straight back."""
    async with daemon(["switchd-sim", "--host", "127.0.0.1", "--port", "0", *flags],
                      base_env(LOG_LEVEL=DAEMON_LOG_LEVEL),
                      tmp / f"{name}.log", cwd=tmp) as d:
        yield d


@asynccontextmanager
async def load_upstream(tmp: Path, *flags: str) -> AsyncIterator[Daemon]:
    """perf.upstream: the realtime traffic shape (audio deltas, transcripts, response.done) as an echo."""
    async with daemon([sys.executable, "-m", "perf.upstream", "--host", "127.0.0.1", "--port", "0", *flags],
                      base_env(LOG_LEVEL=DAEMON_LOG_LEVEL), tmp / "upstream.log", cwd=tmp) as d:
        yield d


async def http_get(url: str, timeout: float = 5) -> str:
    """A tiny HTTP/1.1 GET (for switchd's /metrics) without pulling in an HTTP client."""
    rest = url.removeprefix("http://")
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.rpartition(":")
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            await stream.send_all(f"GET /{path} HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\n\r\n".encode())
            data = bytearray()
            while chunk := await stream.receive_some(65536):
                data += chunk
    return bytes(data).partition(b"\r\n\r\n")[2].decode()


def children(pid: int) -> list[int]:
    """The live processes whose parent is `pid` (a WORKERS supervisor's switchd workers), by pid."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = stat_fields(int(entry.name))  # None: gone meanwhile
            if fields is not None and int(fields[1]) == pid:
                found.append(int(entry.name))
    return sorted(found)


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of `pid` onto `cpus` (sched_setaffinity of a pid moves only its main thread);
    threads it starts later inherit the mask."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:
        return  # the process is gone
    for task in tasks:
        try:
            os.sched_setaffinity(int(task.name), cpus)
        except ProcessLookupError:
            pass  # that thread ended meanwhile


@contextmanager
def dedicated_core(pid: int, *others: int) -> Iterator[dict[str, list[int]] | None]:
    """`pid` (the process under test) gets a core of its own; `others`, this process and every
    process it starts from here on share the rest, so the load never queues for the core it
    measures. Yields the placement, or None on a single core (nothing to keep apart). Every mask
    comes back at the end."""
    mine = os.sched_getaffinity(0)
    cores = sorted(mine)
    if len(cores) < 2:
        yield None
        return
    core, rest = {cores[-1]}, set(cores[:-1])
    pin(pid, core)
    for other in others:
        pin(other, rest)
    os.sched_setaffinity(0, rest)
    try:
        yield {"under_test": sorted(core), "load": sorted(rest)}
    finally:
        os.sched_setaffinity(0, mine)
        for p in (pid, *others):
            pin(p, mine)


def metric_values(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out
