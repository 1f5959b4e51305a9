"""The real system for end-to-end tests: switchdb and switchd as processes, the CLI for accounts."""
from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlencode

import trio

from perf import procs
from tests.daemons import Daemon, base_env, daemon

_names = itertools.count()


class Stack(procs.Stack):
    """The benchmarks' stack, with what the tests also need: top-ups, balances, a switchdb restart."""

    async def account(self, tokens: int = 100_000, topup: int = 0) -> tuple[str, str]:
        """A fresh account with `tokens` credits and a key for it: (account_id, key)."""
        email = f"user{next(_names)}@example.test"
        account = await self.cli("account", "create", "--email", email, "--tokens", str(tokens), "--topup", str(topup))
        key = await self.cli("key", "create", "--account", account["id"], "--label", "test")
        return account["id"], key["key"]

    async def credits(self, account_id: str) -> int:
        return (await self.cli("account", "show", account_id))["credits"]

    @asynccontextmanager
    async def switchd(self, upstream_url: str, name: str = "switchd", **env: str) -> AsyncIterator[Daemon]:
        settings = {
            **self.env, "UPSTREAM_URL": upstream_url, "PORT": "0", "METRICS_PORT": "0",
            "SPOOL_DIR": str(self.tmp / f"{name}-spool"), "SHUTDOWN_GRACE": "5", **env,
        }
        async with daemon(["switchd"], settings, self.tmp / f"{name}.log") as d:
            yield d

    async def restart_db(self) -> None:
        """Stop switchdb (SIGTERM) and start it again on the same file and endpoint."""
        self.db.terminate()
        with trio.fail_after(20):
            await self.db.proc.wait()
        self._db_cm = daemon(["switchdb", "serve"], self.env, self.tmp / "switchdb.log")
        self.db = await self._db_cm.__aenter__()


def client_url(switch: Daemon, key: str | None, session_id: str | None, **query: str) -> str:
    params = {**({"rs_key": key} if key else {}), **({"rs_sessid": session_id} if session_id else {}), **query}
    return f"{switch.address}/v1/realtime?{urlencode(params)}"


def metrics_url(switch: Daemon) -> str:
    words = switch.ready_line.split()
    return words[words.index("metrics") + 1] + "/metrics"


@asynccontextmanager
async def open_stack(tmp: Path, **extra: str) -> AsyncIterator[Stack]:
    env = base_env(ZMQ_SOCKET_PATH=f"ipc://{tmp}/switchdb.sock", DB_PATH=str(tmp / "switch.db"), LOG_LEVEL="DEBUG",
                   **extra)
    async with daemon(["switchdb", "serve"], env, tmp / "switchdb.log") as db:
        stack = Stack(tmp, env, db)
        try:
            yield stack
        finally:
            if stack.db is not db:  # restarted by the test
                await stack._db_cm.__aexit__(None, None, None)
