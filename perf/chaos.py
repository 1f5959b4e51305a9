"""`python -m perf.chaos`: realtime sessions through switchd while its parts are killed at random.

N clients hold realtime sessions (one account each) through switchd (WORKERS=2) for D seconds,
asking for responses one after another and reconnecting with the same `rs_sessid` whenever they
are cut. Meanwhile a fault loop, at random moments, kills a switchd worker with SIGKILL (the
supervisor restarts it), kills switchdb with SIGKILL and starts it again, or drops the provider's
connections without a close frame. With `--postgres` the store is a throwaway PostgreSQL server
(the `pgserver` wheel's binaries) shared by `--replicas` switchdb replicas, switchd spreads over
them (ZMQ_SOCKET_PATH lists their endpoints), and the fault loop kills a random replica with
SIGKILL and starts it again, or kills the PostgreSQL server itself (postmaster and every backend,
SIGKILL) and starts it again on the same data directory. The provider here is scripted in this
process and keeps its own ledger: the tokens of every `response.done` it sent, per account; the
clients count the tokens of every `response.done` they received.

At the end the run stops switchd gracefully (and, if a journal is still owed, runs one more
switchd on the same SPOOL_DIR until it is delivered), then compares per account:

- lost: tokens a client saw that switchdb did not bill (the guarantee: must be 0);
- billed twice: tokens billed beyond what the provider sent at all (must be 0);
- balance exact: the account's balance is its start minus the sum of its usage rows.

Tokens the provider sent that neither a client saw nor switchd read (still in a socket when a
worker was killed) are reported as `unseen_unbilled`: no one was served them. Prints a table;
writes `perf/results/chaos.json` (`chaos-postgres.json` with `--postgres`); exits 1 when anything
was lost or billed twice.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import stat
import statistics
import subprocess
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlencode

import trio
from trio_websocket import (
    ConnectionClosed, HandshakeError, WebSocketConnection, WebSocketRequest, open_websocket_url, serve_websocket,
)

from perf import procs
from perf.report import emit, envelope, table, write_json

RESULTS = Path(__file__).parent / "results"
AUDIO = json.dumps({"type": "response.output_audio.delta", "delta": "AAAA" * 64})


@dataclass(frozen=True)
class Config:
    sessions: int = 24
    duration: float = 180.0
    fault_every: float = 4.0  # mean seconds between faults
    seed: int = 1
    workers: int = 2
    postgres: bool = False  # the PostgreSQL store and switchdb replicas instead of one switchdb on SQLite
    replicas: int = 3  # switchdb replicas, with postgres


@dataclass
class Tally:
    sent: Counter[str] = field(default_factory=Counter)  # provider: tokens per account, once written
    seen: Counter[str] = field(default_factory=Counter)  # clients: tokens per account, once received
    responses_seen: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    cuts: int = 0
    restored: int = 0  # reconnections that got a response again
    stalls: int = 0  # responses asked for and never answered within 5 s (the request fell into a drop)
    interruptions: list[float] = field(default_factory=list)  # seconds from a cut to the next response


class Provider:
    """A scripted provider: answers each response.create with audio and a response.done, and remembers it."""

    def __init__(self, tally: Tally, rng: random.Random) -> None:
        self.tally = tally
        self.rng = rng
        self.connections: set[WebSocketConnection] = set()
        self.url = ""

    async def handler(self, request: WebSocketRequest) -> None:
        ws = await request.accept(subprotocol="realtime" if "realtime" in request.proposed_subprotocols else None)
        self.connections.add(ws)
        try:
            while True:
                event = json.loads(await ws.get_message())
                if event.get("type") == "session.update":
                    session = {**event.get("session", {}), "type": "realtime"}
                    await ws.send_message(json.dumps({"type": "session.updated", "session": session}))
                elif event.get("type") == "response.create":
                    account = event["response"]["metadata"]["account"]
                    for _ in range(3):
                        await ws.send_message(AUDIO)
                    inp, out = self.rng.randint(10, 400), self.rng.randint(10, 900)
                    await ws.send_message(json.dumps(done_event(inp, out)))
                    self.tally.sent[account] += inp + out
        except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.connections.discard(ws)

    async def drop_some(self) -> int:
        """Cut about half the provider's connections without a close frame, as a network drop does."""
        victims = [ws for ws in list(self.connections) if self.rng.random() < 0.5]
        for ws in victims:
            await ws._stream.aclose()  # no close frame: switchd sees the connection vanish
        return len(victims)


def done_event(inp: int, out: int) -> dict:
    return {"type": "response.done", "response": {"object": "realtime.response", "status": "completed", "usage": {
        "total_tokens": inp + out, "input_tokens": inp, "output_tokens": out,
        "input_token_details": {"text_tokens": 0, "audio_tokens": inp, "image_tokens": 0, "cached_tokens": 0},
        "output_token_details": {"text_tokens": 0, "audio_tokens": out}}}}


class Restartable:
    """A daemon the fault loop may kill; `start` brings it back on the same files."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.argv, self.env, self.log = argv, env, log
        self.daemon: procs.Daemon | None = None
        self._cm: object = None

    async def start(self) -> procs.Daemon:
        cm = procs.daemon(self.argv, self.env, self.log, cwd=self.log.parent)  # no .env of the checkout
        self.daemon = await cm.__aenter__()
        self._cm = cm
        return self.daemon

    async def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.daemon is not None:
            self.daemon.terminate(sig)
            await self._cm.__aexit__(None, None, None)  # type: ignore[attr-defined]
            self.daemon = None


PG_READY = b"database system is ready to accept connections"


class Postgres:
    """A throwaway PostgreSQL server on `pgdata`, with the `pgserver` wheel's binaries.

    The postmaster runs as a child of this process (not daemonised by pg_ctl, as pgserver does), so
    that after a SIGKILL this process reaps it and a new postmaster on the same data directory does
    not mistake a zombie for a live server holding the lock file. It is ready when it logs so: after
    a kill, that is after crash recovery has replayed the WAL.
    """

    def __init__(self, pgdata: Path, log: Path) -> None:
        with warnings.catch_warnings():  # platformdirs: no XDG_RUNTIME_DIR here, which is fine
            warnings.simplefilter("ignore")
            from pgserver._commands import POSTGRES_BIN_PATH

        self.bin = POSTGRES_BIN_PATH
        self.pgdata, self.log = pgdata, log
        self.sockets = Path(tempfile.mkdtemp(prefix="chaos-pg-"))  # short: a Unix socket path is ~107 bytes at most
        self.user: str | None = None
        self.proc: trio.Process | None = None
        self.nursery: trio.Nursery | None = None  # where its log is read, for as long as it runs

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres:@/{database}?host={self.sockets}"

    async def init(self) -> None:
        self.pgdata.mkdir()
        if os.geteuid() == 0:  # postgres refuses to run as root: as pgserver does, its own user runs it
            from pgserver.utils import ensure_folder_permissions, ensure_prefix_permissions, ensure_user_exists

            entry = ensure_user_exists("pgserver")
            assert entry is not None
            self.user = entry.pw_name
            for path in (self.pgdata, self.sockets):
                os.chown(path, entry.pw_uid, entry.pw_gid)
                ensure_prefix_permissions(path)
            ensure_folder_permissions(self.bin, stat.S_IXGRP | stat.S_IXOTH | stat.S_IRGRP | stat.S_IROTH)
            ensure_folder_permissions(self.bin.parent / "lib", stat.S_IRGRP | stat.S_IROTH)
        await trio.run_process(
            [str(self.bin / "initdb"), "-D", str(self.pgdata), "--auth=trust", "--encoding=utf8", "-U", "postgres"],
            capture_stdout=True, capture_stderr=True, env=self._env(), user=self.user)

    def _env(self) -> dict[str, str]:
        return {**os.environ, "LC_ALL": "C"}  # the ready line is matched in English

    async def start(self) -> None:
        assert self.nursery is not None
        with trio.fail_after(60):
            self.proc = await self.nursery.start(self._serve)

    async def _serve(self, *, task_status: trio.TaskStatus[trio.Process] = trio.TASK_STATUS_IGNORED) -> None:
        # fsync off: the faults here kill processes, not the machine; what a process wrote is in the
        # page cache and crash recovery finds it, as with fsync on.
        argv = [str(self.bin / "postgres"), "-D", str(self.pgdata), "-k", str(self.sockets), "-h", "",
                "-c", "fsync=off"]
        proc = await trio.lowlevel.open_process(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                                stderr=subprocess.PIPE, env=self._env(), user=self.user)
        assert proc.stderr is not None
        seen, started = b"", False
        async with await trio.open_file(self.log, "ab") as log:
            while chunk := await proc.stderr.receive_some(65536):  # until every backend has gone too
                await log.write(chunk)
                if not started:
                    seen = seen[-len(PG_READY):] + chunk
                    if PG_READY in seen:
                        started = True
                        task_status.started(proc)
        if not started:
            await proc.wait()
            raise RuntimeError(f"postgres exited ({proc.returncode}) before it was ready; see {self.log}")

    async def kill(self) -> None:
        """SIGKILL the postmaster and every backend, as the OOM killer or a container's kill does."""
        assert self.proc is not None
        backends = procs.children(self.proc.pid)
        self.proc.kill()  # first: a live postmaster would restart backends killed before it
        for pid in backends:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await self.proc.wait()
        self.proc = None

    async def stop(self) -> None:
        """A fast shutdown (SIGINT): clients cut, a checkpoint, exit."""
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGINT)
        with trio.move_on_after(30):
            await self.proc.wait()
        if self.proc.returncode is None:
            await self.kill()
        self.proc = None


@asynccontextmanager
async def postgres_server(tmp: Path) -> AsyncIterator[Postgres]:
    """A fresh PostgreSQL server in `tmp/pg`, stopped (and its socket directory removed) at the end."""
    server = Postgres(tmp / "pg", tmp / "postgres.log")
    try:
        await server.init()
        async with trio.open_nursery() as server.nursery:
            await server.start()
            try:
                yield server
            finally:
                with trio.CancelScope(shield=True):
                    await server.stop()
    finally:
        shutil.rmtree(server.sockets, ignore_errors=True)


async def client(index: int, address: str, key: str, account: str, tally: Tally, stop: trio.Event,
                 rng: random.Random) -> None:
    """One session: responses one after another; reconnects with the same session id when cut."""
    url = f"{address}/v1/realtime?{urlencode({'rs_key': key, 'rs_sessid': f'chaos{index}'})}"
    ask = json.dumps({"type": "response.create", "response": {"metadata": {"account": account}}})
    cut_at: float | None = None
    first = True
    while not stop.is_set():
        try:
            async with open_websocket_url(url) as ws:
                if first:  # saved by switchd, restored on every later connection
                    await ws.send_message(json.dumps({"type": "session.update", "session": {
                        "type": "realtime", "instructions": f"chaos session {index}"}}))
                    first = False
                while not stop.is_set():
                    await ws.send_message(ask)
                    with trio.move_on_after(5) as waited:  # a request lost in a drop: ask again
                        while True:
                            event = json.loads(await ws.get_message())
                            if event.get("type") == "response.done":
                                tally.seen[account] += event["response"]["usage"]["total_tokens"]
                                tally.responses_seen += 1
                                if cut_at is not None:
                                    tally.interruptions.append(trio.current_time() - cut_at)
                                    tally.restored += 1
                                    cut_at = None
                                break
                    if waited.cancelled_caught:
                        tally.stalls += 1
                    await trio.sleep(rng.uniform(0.05, 0.3))
        except (ConnectionClosed, HandshakeError, OSError, trio.BrokenResourceError):
            if cut_at is None:
                cut_at = trio.current_time()
                tally.cuts += 1
            await trio.sleep(rng.uniform(0.1, 0.5))


@dataclass
class Store:
    """What switchd bills through: one switchdb on SQLite, or replicas sharing a PostgreSQL server."""

    switchdbs: list[Restartable]
    postgres: Postgres | None
    env: dict[str, str]  # for the CLI: the store, and every switchdb endpoint

    def kinds(self) -> list[str]:
        if self.postgres is None:
            return ["switchd worker", "switchdb", "upstream drop"]
        return ["switchd worker", "switchdb replica", "postgres", "upstream drop"]

    async def ensure_up(self) -> None:
        if self.postgres is not None and self.postgres.proc is None:
            await self.postgres.start()
        for switchdb in self.switchdbs:
            if switchdb.daemon is None:
                await switchdb.start()


@asynccontextmanager
async def open_store(config: Config, tmp: Path) -> AsyncIterator[Store]:
    if not config.postgres:
        env = procs.base_env(ZMQ_SOCKET_PATH=f"ipc://{tmp}/switchdb.sock", DB_PATH=str(tmp / "switch.db"),
                             LOG_LEVEL="WARNING")
        switchdbs = [Restartable(["switchdb", "serve"], env, tmp / "switchdb.log")]
        async with stopped_at_exit(switchdbs):
            yield Store(switchdbs, None, env)
        return
    async with postgres_server(tmp) as pg:
        env = procs.base_env(DB_URL=pg.url(), LOG_LEVEL="WARNING")
        endpoints = [f"ipc://{tmp}/switchdb-r{i}.sock" for i in range(config.replicas)]
        switchdbs = [Restartable(["switchdb", "serve"], {**env, "ZMQ_SOCKET_PATH": endpoint},
                                 tmp / f"switchdb-r{i}.log") for i, endpoint in enumerate(endpoints)]
        async with stopped_at_exit(switchdbs):
            yield Store(switchdbs, pg, {**env, "ZMQ_SOCKET_PATH": ",".join(endpoints)})


@asynccontextmanager
async def stopped_at_exit(switchdbs: list[Restartable]) -> AsyncIterator[None]:
    """Started one after another (the first applies the migrations); stopped at the end, whatever happens."""
    try:
        for switchdb in switchdbs:
            await switchdb.start()
        yield
    finally:
        with trio.CancelScope(shield=True):
            for switchdb in switchdbs:
                await switchdb.stop()


async def faults(config: Config, switchd: procs.Daemon, store: Store, provider: Provider,
                 tally: Tally, stop: trio.Event, rng: random.Random) -> None:
    kinds = store.kinds()
    while not stop.is_set():
        with trio.move_on_after(rng.expovariate(1 / config.fault_every)):
            await stop.wait()
        if stop.is_set():
            return
        kind = kinds[tally.faults.total() % len(kinds)] if tally.faults.total() < len(kinds) else rng.choice(kinds)
        if kind == "switchd worker":
            workers = procs.children(switchd.pid)
            if not workers:
                continue  # a restart still under way
            os.kill(rng.choice(workers), signal.SIGKILL)
        elif kind in ("switchdb", "switchdb replica"):
            # One switchdb: no draw, so a seed gives the same faults as before replicas existed.
            switchdb = store.switchdbs[0] if len(store.switchdbs) == 1 else rng.choice(store.switchdbs)
            await switchdb.stop(signal.SIGKILL)
            await trio.sleep(rng.uniform(0.2, 1.5))
            await switchdb.start()
        elif kind == "postgres":
            assert store.postgres is not None
            await store.postgres.kill()
            await trio.sleep(rng.uniform(0.2, 1.5))
            await store.postgres.start()  # after crash recovery
        else:
            await provider.drop_some()
        tally.faults[kind] += 1


def journals(spool: Path) -> list[Path]:
    return sorted(spool.rglob("journal-*.jsonl"))


@asynccontextmanager
async def provider_server(tally: Tally, rng: random.Random) -> AsyncIterator[Provider]:
    provider = Provider(tally, rng)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, provider.handler, "127.0.0.1", 0, None)
        provider.url = f"ws://127.0.0.1:{server.port}/v1/realtime?model=gpt-realtime"
        yield provider
        nursery.cancel_scope.cancel()


async def run(config: Config, tmp: Path) -> dict:
    """The whole run in `tmp`; returns the results (see the module docstring)."""
    async with open_store(config, tmp) as store:
        return await run_on(config, tmp, store)


async def run_on(config: Config, tmp: Path, store: Store) -> dict:
    rng = random.Random(config.seed)
    tally = Tally()
    spool = tmp / "spool"
    switchd_env = {**store.env, "PORT": "0", "METRICS_PORT": "0", "HOST": "127.0.0.1", "SPOOL_DIR": str(spool),
                   "SHUTDOWN_GRACE": "5", "ZMQ_TIMEOUT_MS": "1000"}
    first = store.switchdbs[0].daemon
    assert first is not None
    stack = procs.Stack(tmp, store.env, first)
    start_credits = 10**9
    accounts = [await stack.account(tokens=start_credits) for _ in range(config.sessions)]
    stop = trio.Event()
    async with provider_server(tally, rng) as provider:
        switchd_env["UPSTREAM_URL"] = provider.url
        async with procs.daemon(["switchd"], {**switchd_env, "WORKERS": str(config.workers)},
                                tmp / "switchd.log", cwd=tmp) as sw:
            async with trio.open_nursery() as nursery:
                for i, (account, key) in enumerate(accounts):
                    nursery.start_soon(client, i, sw.address, key, account, tally, stop, random.Random(rng.random()))
                nursery.start_soon(faults, config, sw, store, provider, tally, stop, random.Random(config.seed))
                await trio.sleep(config.duration)
                stop.set()
            await store.ensure_up()
            sw.terminate()  # graceful: the sessions close and hand their usage over
            with trio.fail_after(60):
                await sw.proc.wait()
        if journals(spool):  # what the last stop could not deliver: one more start delivers it
            async with procs.daemon(["switchd"], {**switchd_env, "WORKERS": "1"}, tmp / "switchd-final.log",
                                    cwd=tmp) as last:
                own = f"journal-{last.pid}-"
                with trio.fail_after(60):  # until only its own journal is left
                    while [p for p in journals(spool) if not p.name.startswith(own)]:  # noqa: ASYNC110
                        await trio.sleep(0.1)
    per_account = []
    for account, _ in accounts:
        shown = await stack.cli("account", "show", account)
        usage = await stack.cli("usage", "--account", account)
        billed = start_credits - shown["credits"]
        per_account.append({
            "account": account, "sent": tally.sent[account], "seen": tally.seen[account], "billed": billed,
            "lost": max(0, tally.seen[account] - billed), "billed_twice": max(0, billed - tally.sent[account]),
            "balance_exact": usage["total_tokens"] == billed,
        })
    durations = sorted(tally.interruptions)
    return {
        "config": asdict(config),
        "store": "postgresql" if config.postgres else "sqlite",
        "tokens_lost": sum(a["lost"] for a in per_account),
        "tokens_billed_twice": sum(a["billed_twice"] for a in per_account),
        "balances_exact": all(a["balance_exact"] for a in per_account),
        "tokens_sent": sum(a["sent"] for a in per_account),
        "tokens_seen": sum(a["seen"] for a in per_account),
        "tokens_billed": sum(a["billed"] for a in per_account),
        "unseen_unbilled": sum(max(0, a["sent"] - a["billed"]) for a in per_account),
        "responses_seen": tally.responses_seen,
        "faults": dict(tally.faults),
        "cuts": tally.cuts,
        "sessions_restored": tally.restored,
        "stalls": tally.stalls,
        "interruption_s": {
            "count": len(durations),
            "median": statistics.median(durations) if durations else None,
            "max": durations[-1] if durations else None,
        },
        "journals_left": [str(p) for p in journals(spool)],
        "accounts": per_account,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m perf.chaos", description=__doc__.split("\n")[0])
    defaults = Config()
    parser.add_argument("--sessions", type=int, default=defaults.sessions)
    parser.add_argument("--duration", type=float, default=defaults.duration, help="seconds")
    parser.add_argument("--fault-every", type=float, default=defaults.fault_every, help="mean seconds between faults")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--postgres", action="store_true",
                        help="PostgreSQL store, switchdb replicas; also kill replicas and the PostgreSQL server")
    parser.add_argument("--replicas", type=int, default=defaults.replicas, help="switchdb replicas, with --postgres")
    args = parser.parse_args()
    config = Config(args.sessions, args.duration, args.fault_every, args.seed, postgres=args.postgres,
                    replicas=args.replicas)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        results = trio.run(run, config, Path(tmp))
    emit(table("chaos run", ["", "value"], [
        ("sessions / seconds", f"{config.sessions} / {config.duration:g}"),
        ("store", f"postgresql, {config.replicas} switchdb replicas" if config.postgres else "sqlite, one switchdb"),
        *((f"faults: {k}", v) for k, v in sorted(results["faults"].items())),
        ("responses seen by clients", results["responses_seen"]),
        ("client cuts / sessions restored", f"{results['cuts']} / {results['sessions_restored']}"),
        ("responses never answered (asked again)", results["stalls"]),
        ("interruption median / max s", f"{results['interruption_s']['median'] or 0:.2f} / "
                                        f"{results['interruption_s']['max'] or 0:.2f}"),
        ("tokens sent / seen / billed", f"{results['tokens_sent']} / {results['tokens_seen']} / "
                                        f"{results['tokens_billed']}"),
        ("tokens lost", results["tokens_lost"]),
        ("tokens billed twice", results["tokens_billed_twice"]),
        ("balances exact", results["balances_exact"]),
    ]))
    name = "chaos-postgres" if config.postgres else "chaos"
    path = write_json(RESULTS, name, envelope(name, "full", started, results, [
        "lost = seen by a client but not billed; billed twice = billed beyond what the provider sent",
    ]))
    emit(f"results: {path}")
    if results["tokens_lost"] or results["tokens_billed_twice"] or not results["balances_exact"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
