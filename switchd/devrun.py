"""`make run`: switchdb, the provider simulator (without OPENAI_API_KEY) and switchd, on local defaults.

State lives in ./var (database, ipc socket, spool, demo key). Ctrl-C stops all three cleanly.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import trio

from common.config import read_env_file

BIN = Path(sys.executable).parent


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def start(argv: list[str], env: dict[str, str], log: Path) -> tuple[trio.Process, str]:
    """Start a daemon and wait for its `listening` line."""
    proc = await trio.lowlevel.open_process(
        argv, env=env, stdout=subprocess.PIPE, stderr=open(log, "ab"), stdin=subprocess.DEVNULL
    )
    assert proc.stdout is not None
    buffer = b""
    with trio.fail_after(30):
        while b"listening" not in buffer:
            chunk = await proc.stdout.receive_some(4096)
            if not chunk:
                raise SystemExit(f"{argv[0]} failed to start; see {log}")
            buffer += chunk
    return proc, buffer.decode().split("listening", 1)[1].split()[0]


async def run() -> None:
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
    demo = json.loads(seed.stdout)
    procs: list[trio.Process] = []
    try:
        db, endpoint = await start([str(BIN / "switchdb"), "serve"], env, var / "switchdb.log")
        procs.append(db)
        say(f"switchdb  {endpoint}  (log: var/switchdb.log)")
        if "OPENAI_API_KEY" not in env and "UPSTREAM_URL" not in env:
            sim, sim_url = await start([str(BIN / "switchd-sim"), "--port", "0"], env, var / "sim.log")
            procs.append(sim)
            env["UPSTREAM_URL"] = f"{sim_url}/v1/realtime?model=gpt-realtime"
            say(f"simulator {sim_url}  (no OPENAI_API_KEY: relaying to the built-in provider simulator)")
        else:
            say(f"upstream  {env.get('UPSTREAM_URL', 'wss://api.openai.com/v1/realtime?model=gpt-realtime')}")
        switch, url = await start([str(BIN / "switchd")], env, var / "switchd.log")
        procs.append(switch)
        client_url = f"{url}/v1/realtime?rs_key={demo['key']}&rs_sessid={demo['session_id']}"
        say("")
        say(f"Realtime Switch is up. Connect a client to:\n  {client_url}")
        say(f"Try it:  {BIN / 'python'} -m switchd.democlient '{client_url}'")
        say("Logs in var/*.log. Ctrl-C stops everything.")
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                for proc in procs:
                    nursery.start_soon(_exit_on_death, proc, nursery.cancel_scope)
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break
    finally:
        with trio.CancelScope(shield=True):
            for proc in reversed(procs):  # switchd first, so its last usage reaches switchdb
                if proc.returncode is None:
                    proc.send_signal(signal.SIGTERM)
                    with trio.move_on_after(15):
                        await proc.wait()
                    if proc.returncode is None:
                        proc.kill()
        say("stopped")


async def _exit_on_death(proc: trio.Process, scope: trio.CancelScope) -> None:
    await proc.wait()
    say(f"{proc.args[0]} exited with {proc.returncode}; stopping")
    scope.cancel()


def main() -> None:
    trio.run(run)


if __name__ == "__main__":
    main()
