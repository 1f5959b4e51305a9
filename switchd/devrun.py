"""`make run`: switchdb, the provider simulator (without OPENAI_API_KEY) and switchd, on local defaults,
and the demo page's app server (switchd/demo: the page is served by the demo tooling, not by switchd).

State lives in ./var (database, ipc socket, spool, demo key). Ctrl-C stops them all cleanly:
the daemons run in their own process group, so the terminal's SIGINT reaches devrun alone, which
sends each daemon one SIGTERM, switchd first (its last usage must reach switchdb). Another Ctrl-C
meanwhile is passed on as another SIGTERM to the daemon stopping: it ends its grace, never its usage.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

import trio

from common.config import read_env_file

BIN = Path(sys.executable).parent
STOP_TIMEOUT_S = 5.0


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def start(argv: list[str], env: dict[str, str], log: BinaryIO) -> tuple[trio.Process, str]:
    """Start a daemon and wait for its `listening` line."""
    proc = await trio.lowlevel.open_process(
        argv, env=env, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, process_group=0
    )
    assert proc.stdout is not None
    buffer = b""
    with trio.fail_after(30):
        while b"listening" not in buffer:
            chunk = await proc.stdout.receive_some(4096)
            if not chunk:
                raise SystemExit(f"{argv[0]} failed to start; see {log.name}")
            buffer += chunk
    return proc, buffer.decode().split("listening", 1)[1].split()[0]


def prepare() -> tuple[dict[str, str], Path, dict[str, str]]:
    """The environment, ./var and the demo account (seeded)."""
    var = Path("var").resolve()
    var.mkdir(exist_ok=True)
    env = {**read_env_file(Path(".env")), **os.environ}
    env.setdefault("ZMQ_SOCKET_PATH", f"ipc://{var}/switchdb.sock")
    env.setdefault("DB_PATH", str(var / "switch.db"))
    env.setdefault("SPOOL_DIR", str(var / "spool"))
    env["PYTHONUNBUFFERED"] = "1"
    seed = subprocess.run(
        [str(BIN / "switchdb"), "seed", "--json", "--key-file", str(var / "demo-key")],
        env=env, capture_output=True, text=True,
    )
    if seed.returncode != 0:
        raise SystemExit(f"switchdb seed failed: {seed.stderr.strip()}")
    return env, var, json.loads(seed.stdout)


async def run(env: dict[str, str], demo: dict[str, str], logs: dict[str, BinaryIO], key_file: Path) -> None:
    # switchd gets its whole grace (its usage is at stake), the others a fixed time.
    grace = float(env.get("SHUTDOWN_GRACE") or 10)
    procs: list[trio.Process] = []
    # Open before the first daemon starts and until the last has stopped: no signal finds devrun
    # without a handler (Python's would raise KeyboardInterrupt and orphan the daemons).
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        try:
            db, endpoint = await start([str(BIN / "switchdb"), "serve"], env, logs["switchdb"])
            procs.append(db)
            say(f"switchdb  {endpoint}  (log: var/switchdb.log)")
            if "OPENAI_API_KEY" not in env and "UPSTREAM_URL" not in env:
                sim, sim_url = await start([str(BIN / "switchd-sim"), "--port", "0"], env, logs["sim"])
                procs.append(sim)
                env["UPSTREAM_URL"] = f"{sim_url}/v1/realtime?model=gpt-realtime"
                say(f"simulator {sim_url}  (no OPENAI_API_KEY: relaying to the built-in provider simulator)")
            else:
                say(f"upstream  {env.get('UPSTREAM_URL', 'wss://api.openai.com/v1/realtime?model=gpt-realtime')}")
            switch, url = await start([str(BIN / "switchd")], env, logs["switchd"])
            procs.append(switch)
            client_url = f"{url}/v1/realtime?rs_key={demo['key']}&rs_sessid={demo['session_id']}"
            # The app server reads the key from its file: argv would show it in `ps`.
            app, page_url = await start(
                [str(BIN / "python"), "-m", "switchd.demo.app", "--switch", url, "--key-file", str(key_file)],
                env, logs["demo"],
            )
            procs.append(app)
            say("")
            say(f"Realtime Switch is up. Connect a client to:\n  {client_url}")
            say(f"Try it:  {BIN / 'python'} -m switchd.democlient '{client_url}'")
            say(f"Or in a browser (WebSocket and WebRTC, a client secret per session):  {page_url}/")
            say(f"The admin CLI, on this store:  DB_PATH={env['DB_PATH']} {BIN / 'switchdb'} account list")
            say("Logs in var/*.log. Ctrl-C stops everything.")
            async with trio.open_nursery() as nursery:
                for proc in procs:
                    nursery.start_soon(_exit_on_death, proc, nursery.cancel_scope)
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break
        finally:
            with trio.CancelScope(shield=True):
                for proc in reversed(procs):  # switchd first, so its last usage reaches switchdb
                    await _stop(proc, signals, grace + STOP_TIMEOUT_S if _name(proc) == "switchd" else STOP_TIMEOUT_S)
            say("stopped")


async def _stop(proc: trio.Process, signals: AsyncIterator[int], patience: float) -> None:
    """One SIGTERM, then one more for every signal devrun gets while it waits; SIGKILL past `patience` s."""
    if proc.returncode is not None:
        return
    proc.send_signal(signal.SIGTERM)
    async with trio.open_nursery() as nursery:

        async def forward() -> None:
            async for _ in signals:
                say(f"again: asking {_name(proc)} to stop now")
                proc.send_signal(signal.SIGTERM)

        nursery.start_soon(forward)
        with trio.move_on_after(patience):
            await proc.wait()
        nursery.cancel_scope.cancel()
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


async def _exit_on_death(proc: trio.Process, scope: trio.CancelScope) -> None:
    await proc.wait()
    say(f"{_name(proc)} exited with {proc.returncode}; stopping")
    scope.cancel()


def _name(proc: trio.Process) -> str:
    args = proc.args
    if isinstance(args, (str, bytes, os.PathLike)):
        return Path(os.fsdecode(args)).name
    if "-m" in args:  # python -m module: the module says which
        return os.fsdecode(args[list(args).index("-m") + 1])
    return Path(os.fsdecode(args[0])).name


def main() -> None:
    env, var, demo = prepare()
    with contextlib.ExitStack() as files:
        logs: dict[str, BinaryIO] = {
            name: files.enter_context(open(var / f"{name}.log", "ab"))
            for name in ("switchdb", "sim", "switchd", "demo")
        }
        trio.run(run, env, demo, logs, var / "demo-key")


if __name__ == "__main__":
    main()
