"""The end-to-end tests start the real daemons with the same launcher as the benchmarks."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import trio

from perf.procs import BIN, Daemon, base_env, daemon

__all__ = ["BIN", "Daemon", "base_env", "daemon", "start_make_run"]


async def start_make_run(cwd: Path) -> tuple[trio.Process, bytes]:
    """`make run` (python -m switchd.devrun) in `cwd`, on free ports, in its own process group as a
    terminal's foreground group would be; returns it and what it printed up to its ready line."""
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "switchd.devrun"], cwd=cwd, env=base_env(PORT="0", METRICS_PORT="0"),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    assert proc.stdout is not None
    out = b""
    try:
        with trio.fail_after(60):
            while b"Ctrl-C stops everything" not in out:
                chunk = await proc.stdout.receive_some(65536)
                assert chunk, out.decode()
                out += chunk
    except BaseException:
        proc.kill()
        with trio.CancelScope(shield=True):
            await proc.wait()
        raise
    return proc, out
