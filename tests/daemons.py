"""Start the real daemons as processes for end-to-end tests.

Every daemon writes one line to stdout once it is serving (`... listening <address> ...`);
`daemon()` waits for that line (no sleeps), and on exit sends SIGTERM and waits for the exit.
stderr goes to a log file beside the test's tmp files, shown when a start fails.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio

BIN = Path(sys.executable).parent


@dataclass
class Daemon:
    proc: trio.Process
    ready_line: str
    log_path: Path
    _buffer: bytearray = field(default_factory=bytearray)

    @property
    def address(self) -> str:
        """The address token after 'listening' in the ready line."""
        words = self.ready_line.split()
        return words[words.index("listening") + 1]

    async def readline(self) -> str:
        assert self.proc.stdout is not None
        while b"\n" not in self._buffer:
            chunk = await self.proc.stdout.receive_some(65536)
            if not chunk:
                raise RuntimeError(f"{self.proc.args} exited before a line; log:\n{self.log()}")
            self._buffer += chunk
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer[:] = rest
        return line.decode()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def terminate(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)


def base_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _CONFIG_KEYS}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(overrides)
    return env


_CONFIG_KEYS = {
    "ZMQ_SOCKET_PATH", "ZMQ_TIMEOUT_MS", "DB_PATH", "DB_ENCRYPTION_KEY", "OPENAI_API_KEY", "UPSTREAM_URL",
    "GEMINI_API_KEY", "GEMINI_URL", "HOST", "PORT", "METRICS_PORT", "MAX_PAYLOAD_LENGTH", "IDLE_TIMEOUT",
    "MAX_SESSIONS", "SHUTDOWN_GRACE", "SPOOL_DIR", "LOG_LEVEL", "LOG_ACCOUNT", "LOG_FORMAT", "WORKERS",
}


@asynccontextmanager
async def daemon(
    argv: list[str],
    env: Mapping[str, str],
    log_path: Path,
    *,
    cwd: Path | None = None,
    start_timeout: float = 30,
    stop_timeout: float = 30,
) -> AsyncIterator[Daemon]:
    """Run `argv` (a console script name is looked up in the venv), wait for its ready line."""
    if not os.path.isabs(argv[0]) and (BIN / argv[0]).exists():
        argv = [str(BIN / argv[0]), *argv[1:]]
    log_file = open(log_path, "ab")
    proc = await trio.lowlevel.open_process(
        argv, env=dict(env), cwd=cwd, stdout=subprocess.PIPE, stderr=log_file, stdin=subprocess.DEVNULL
    )
    d = Daemon(proc, "", log_path)
    try:
        with trio.fail_after(start_timeout):
            while "listening" not in d.ready_line:
                d.ready_line = await d.readline()
        yield d
    finally:
        with trio.CancelScope(shield=True):
            d.terminate()
            with trio.move_on_after(stop_timeout):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            log_file.close()
