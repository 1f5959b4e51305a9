"""Relay: what switchd adds between a client and the provider, through real processes.

switchdb and switchd run as processes; the load is perf.engine, a lean epoll process playing
both ends: N WebSocket clients and the provider-like peer switchd connects upstream to. The
peer's listening socket is made here once (port 0) and handed to every engine run
(`--peer-fd`), so the one switchd keeps one UPSTREAM_URL. "Direct" runs the very same clients
straight to the very same peer, without switchd; every figure is through vs direct, measured
back to back. (perf.load and perf.upstream, on trio-websocket, cost as much CPU per message as
switchd: with them the machine, not switchd, set the capacity. perf.load is still what
bench_connect and operators use.)

Every benchmark below runs twice, each time against its own switchd: with the provider over TLS
(`wss://`, a certificate made at run time by perf.tls and trusted through UPSTREAM_CA_FILE, as in
production: the headline figures), then over plain `ws://`. Clients speak plain ws:// to switchd
(as behind a load balancer); "direct" clients speak to the provider as the provider is served
(TLS on the TLS path). The bare TCP proxies pass the client's TLS through end to end; the
asyncio + websockets relay (perf.floor) takes plain ws:// and connects upstream like switchd.

(a) one session closed loop, ~1 KB frames, plain audio-delta echo: round trip p50/p99, direct
    meaning the clients' process straight to the peer in a process of its own (`--peer-only`),
    beside the same loop through perf.floor's relays (the asyncio + websockets relay is the bar
    switchd must beat), what the two wake-ups any relay adds to it cost here (perf.wakeup, in
    the same rounds) and the one-process figures (the engine playing both ends, which never
    sleeps direct);
(b) one session pipelined (256 frames in flight): frames/s, direct, through switchd and through
    each of perf.floor's relays;
(c) N sessions at realtime rate (50 appends/s of 20 ms audio each; the peer answers each with an
    audio delta, a transcript delta every 10 appends, a response.done with usage every 3 s):
    added latency p50/p99/p99.9, frames lost, switchd CPU (% of one core, µs per relayed
    message, user and system apart), the engine's own CPU and the machine's busy cores;
(d) capacity: the most realtime sessions with p99 added ≤ 5 ms, p99.9 added ≤ 20 ms and nothing
    lost — the (c) points, then bisection between the last pass and the first fail, bounded in time;
(e) switchd beside perf.floor's relays in the same place (its dedicated core), N realtime sessions,
    and the bare Trio proxy's own capacity by (d)'s search: what any Trio relay holds here;
(f) WORKERS=2 on one port, each worker at (d)'s capacity: CPU per message against one process at that load.

The machine has 2 cores shared by the engine, switchd (and switchdb, and whatever else runs):
every (c)/(d) row carries all their CPU so contention is visible.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from common.config import Settings
from perf import memory, procs
from perf.report import emit, fmt, percentile, ratio, table
from perf.tls import TlsFiles, make_certs

P99_ADDED_LIMIT_MS = 5.0
PIPELINE_WINDOW = 256
TARGET_SESSIONS = 150  # the realtime sessions per process
# The headline first: production's provider is always wss://.
UPSTREAMS = ("tls", "plain")
# (f): switchd processes sharing one port; two, as this machine has two cores.
WORKERS = 2
P999_ADDED_LIMIT_MS = 20.0
# A direct run slower than this means the machine cannot even drive N sessions without switchd
# (engine starved): "added" latency is then meaningless and the point cannot pass.
BASELINE_P99_LIMIT_MS = 20.0
DRAIN_S = "3"
# Other users' processes or the hypervisor taking this much CPU during a run (the machine is
# shared): the run measured them as much as switchd; such a point is marked. Any failing point is
# re-measured once, since a short window's tail is a handful of samples (at 1 session, p99 is the
# 3rd-worst of 250) that one hiccup of the VM decides; the first attempt stays in the JSON
# (`failed_attempts`) and the table marks the point.
DISTURBED_OTHERS_CORES = 0.25
DISTURBED_STEAL_CORES = 0.10
# (a)/(b) measure the relay itself: the peer answers audio only (no transcripts, no usage).
PLAIN_PEER = ["--transcript-every", "0", "--response-every", "0"]


@dataclass(frozen=True)
class Relay:
    """What realtime runs go through: its name (its CPU's key in the engine's summary), how the
    clients reach it given a session-prefix tag, and the --watch flags for its processes."""
    name: str
    via: Callable[[str], list[str]]
    watch: list[str]


@dataclass(frozen=True)
class Plan:
    closed_rounds: int
    closed_s: float
    flood_s: float
    ns: tuple[int, ...]
    duration: float
    warmup: float
    capacity_budget_s: float
    floor_sessions: int = 150
    wakeup_rounds: int = 5000
    retry_failed: bool = True  # off in smoke: that run only checks the fields, and must stay short
    driven_warmup: float = 0.3  # (a), (b), (e): seconds sent before the closed loop or the flood is measured
    # Smoke runs every stage on the TLS path (the headline) but only (a) and (c) on the plain one:
    # the stages share their code, and the suite must stay short.
    plain_full: bool = True
    memory_sessions: int = 50


PLANS = {
    # 150 is where the target sits, so it is measured, not interpolated.
    "full": Plan(3, 3.0, 3.0, (1, 50, 100, 150, 200, 300, 400), 6.0, 1.5, 150.0),
    "quick": Plan(1, 2.0, 2.0, (1, 50, 150), 3.0, 1.0, 30.0, floor_sessions=50, wakeup_rounds=2000,
                  memory_sessions=20),
    "smoke": Plan(1, 0.3, 0.3, (2,), 0.6, 0.2, 0.0, floor_sessions=2, wakeup_rounds=50, retry_failed=False,
                  driven_warmup=0.1, plain_full=False, memory_sessions=2),
}


class Env:
    """The running processes, the peer's listening socket, and how to reach them."""

    def __init__(self, stack: procs.Stack, key: str, peer: socket.socket, switchd: procs.Daemon,
                 tls: TlsFiles | None = None) -> None:
        self.stack, self.key, self.peer, self.switchd, self.tls = stack, key, peer, switchd, tls

    def through(self, prefix: str) -> list[str]:
        return ["--url", f"{self.switchd.address}/v1/realtime", "--key", self.key, "--session-prefix", prefix]

    def upstream_url(self) -> str:
        return upstream_url(self.peer, self.tls)

    def peer_args(self) -> list[str]:
        """perf.engine's TLS flags on the TLS path: the peer serves TLS, clients trust its CA."""
        return [] if self.tls is None else self.tls.peer_args()

    def switchd_env(self) -> dict[str, str]:
        return switchd_upstream_env(self.tls)


def upstream_url(peer: socket.socket, tls: TlsFiles | None) -> str:
    """switchd's UPSTREAM_URL: the peer's socket, wss:// on the TLS path."""
    host, port = peer.getsockname()[:2]
    return f"{'ws' if tls is None else 'wss'}://{host}:{port}/v1/realtime?model=gpt-realtime"


def switchd_upstream_env(tls: TlsFiles | None) -> dict[str, str]:
    # A wss:// upstream needs a provider key; the benchmark's peer accepts any.
    return {} if tls is None else {"OPENAI_API_KEY": "sk-perf-peer-accepts-any", **tls.trust_env()}


@asynccontextmanager
async def open_env(tmp: Path, peer: socket.socket, tls: TlsFiles | None = None, **switchd_env: str
                   ) -> AsyncIterator[Env]:
    """switchdb with an account, and switchd relaying to the engine's peer socket (over TLS with `tls`)."""
    async with procs.open_stack(tmp) as stack:
        _, key = await stack.account()
        async with stack.switchd(upstream_url(peer, tls), name="switchd", **switchd_upstream_env(tls),
                                 **switchd_env) as switchd:
            yield Env(stack, key, peer, switchd, tls)


def peer_socket() -> socket.socket:
    """The engine peer's listening socket: port 0, loopback; it outlives every engine run."""
    return socket.create_server(("127.0.0.1", 0), backlog=4096)


async def engine(env: Env, *args: str, timeout: float = 300) -> dict[str, Any]:
    """One perf.engine run in its own process, serving the peer on env.peer; its JSON summary."""
    fd = env.peer.fileno()
    with trio.fail_after(timeout):
        done = await trio.run_process([sys.executable, "-m", "perf.engine", *args, *env.peer_args(), "--peer-fd",
                                       str(fd), "--json"],
                                      capture_stdout=True, capture_stderr=True, check=False,
                                      stdin=subprocess.DEVNULL, pass_fds=(fd,))
    if done.returncode != 0:
        raise RuntimeError(f"perf.engine {' '.join(args)} failed:\n{done.stderr.decode()[-3000:]}")
    return json.loads(done.stdout)


async def load(*args: str, timeout: float = 300) -> dict[str, Any]:
    """One perf.load run in its own process; its JSON summary (bench_connect's load generator)."""
    with trio.fail_after(timeout):
        done = await trio.run_process([sys.executable, "-m", "perf.load", *args, "--json"], capture_stdout=True,
                                      capture_stderr=True, check=False, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise RuntimeError(f"perf.load {' '.join(args)} failed:\n{done.stderr.decode()[-3000:]}")
    return json.loads(done.stdout)


async def quiesce(switchd: procs.Daemon, timeout: float = 15) -> None:
    """Wait until switchd has closed every session of the previous run (bounded), so runs don't overlap."""
    url = switchd.word_after("metrics") + "/metrics"
    deadline = trio.current_time() + timeout
    while trio.current_time() < deadline:
        values = procs.metric_values(await procs.http_get(url))
        if values.get("switch_sessions_open", 0) == 0:
            return
        await trio.sleep(0.1)


def _watch(env: Env) -> list[str]:
    return ["--watch", f"switchd={env.switchd.pid}", "--watch", f"switchdb={env.stack.db.pid}"]


def switchd_relay(env: Env) -> Relay:
    return Relay("switchd", env.through, _watch(env))


async def wakeup_rtt(rounds: int) -> dict[str, Any]:
    """perf.wakeup in its own process: two processes' ping-pong round trip (two wake-ups), p50/p99 µs."""
    with trio.fail_after(120):
        done = await trio.run_process([sys.executable, "-m", "perf.wakeup", "--rounds", str(rounds)],
                                      capture_stdout=True, stdin=subprocess.DEVNULL)
    result: dict[str, Any] = json.loads(done.stdout)
    return result


@asynccontextmanager
async def peer_process(env: Env, tmp: Path) -> AsyncIterator[str]:
    """The engine's peer as a process of its own, on env.peer (switchd's UPSTREAM_URL); its ws(s):// URL."""
    fd = env.peer.fileno()
    async with procs.daemon([sys.executable, "-m", "perf.engine", "--peer-only", "--peer-fd", str(fd),
                             *env.peer_args()],
                            procs.base_env(), tmp / "peer.log", cwd=tmp, pass_fds=(fd,)) as peer:
        yield f"{peer.address}/v1/realtime"


# perf.floor's relays: two bare TCP proxies, and the asyncio + websockets relay (the bar on the TLS path).
RELAYS = ("floor", "threads", "websockets")
RELAY_NAMES = {"floor": "bare Trio TCP proxy", "threads": "blocking threads TCP proxy",
               "websockets": "asyncio + websockets relay"}


@asynccontextmanager
async def bare_proxies(env: Env, tmp: Path, core: set[int] | None = None, names: tuple[str, ...] = RELAYS
                       ) -> AsyncIterator[dict[str, procs.Daemon]]:
    """perf.floor's relays to the peer (those of `names`): "floor" (a Trio TCP proxy), "threads" (a
    blocking TCP proxy, a thread per direction) and "websockets" (asyncio + websockets, to the peer's
    ws(s):// URL); pinned to `core` (switchd's place) when given."""
    port = env.peer.getsockname()[1]
    ca = [] if env.tls is None else ["--ca", str(env.tls.ca)]
    flags = {"floor": ["--target-port", str(port)], "threads": ["--target-port", str(port), "--threads"],
             "websockets": ["--websockets", env.upstream_url(), *ca]}
    async with AsyncExitStack() as stack:
        proxies = {}
        for name in names:
            proxies[name] = await stack.enter_async_context(procs.daemon(
                [sys.executable, "-m", "perf.floor", *flags[name]], procs.base_env(), tmp / f"{name}.log", cwd=tmp))
            if core is not None:
                procs.pin(proxies[name].pid, core)
        yield proxies


def _via(env: Env, proxy: procs.Daemon, name: str) -> list[str]:
    """Where clients connect to go through a perf.floor relay: the TCP proxies carry the client's own
    TLS to a TLS peer (wss:// through them); the websockets relay takes plain ws:// as switchd does."""
    url = proxy.address
    if name != "websockets" and env.tls is not None:
        url = "wss://" + url.removeprefix("ws://")
    return ["--url", f"{url}/v1/realtime", "--key", name, "--session-prefix", name]


async def closed_loop(env: Env, plan: Plan, tmp: Path) -> dict[str, Any]:
    """(a) The round trip through switchd against straight to the provider-like peer in a process of
    its own (the issue's "straight to the simulator": a client and a provider are two processes, so a
    direct round trip wakes each once), and through the two bare proxies of perf.floor to the same
    peer: what relaying alone adds in this place. Beside it, the engine playing both ends (it never
    sleeps) and perf.wakeup (two processes bouncing 1 KB, no event loop), in every round."""
    common = ["--pattern", "closed", "--frame-bytes", "1024", "--duration", str(plan.closed_s), "--warmup",
              str(plan.driven_warmup), "--samples", *PLAIN_PEER]
    runs: dict[str, list[int]] = {"direct": [], "through": [], "one_process_direct": [], "one_process_through": [],
                                  **{name: [] for name in RELAYS}}
    wakeups = []
    async with bare_proxies(env, tmp) as proxies:
        for r in range(plan.closed_rounds):
            async with peer_process(env, tmp) as peer_url:
                loops = {"direct": await engine(env, "--url", peer_url, "--no-peer", *common),
                         "through": await engine(env, "--no-peer", *env.through(f"closed{r}"), *common)}
                await quiesce(env.switchd)
                for name, proxy in proxies.items():
                    loops[name] = await engine(env, "--no-peer", *_via(env, proxy, name), *common)
            loops["one_process_direct"] = await engine(env, "--direct", *common)
            loops["one_process_through"] = await engine(env, *env.through(f"closed1p{r}"), *common)
            await quiesce(env.switchd)
            # What wake-ups cost swings with the VM's neighbours: measured in every round, beside the loops.
            wakeups.append(await wakeup_rtt(plan.wakeup_rounds))
            for name, run in loops.items():
                runs[name] += run["latency_us_samples"]
    for samples in runs.values():
        samples.sort()
    out: dict[str, Any] = {"frame_bytes": 1024, "rounds": plan.closed_rounds,
                           "samples_direct": len(runs["direct"]), "samples_through": len(runs["through"])}
    for q in (50, 99):
        dq, tq = percentile(runs["direct"], q) / 1000, percentile(runs["through"], q) / 1000
        out[f"p{q}_ms"] = {"direct": dq, "through": tq, "added": tq - dq, "ratio": ratio(tq, dq)}
    out["added_median_rtt_us"] = out["p50_ms"]["added"] * 1000
    direct_p50 = percentile(runs["direct"], 50)
    out["bare_proxies"] = {name: {"p50_ms": percentile(runs[name], 50) / 1000,
                                  "added_p50_us": percentile(runs[name], 50) - direct_p50}
                           for name in ("floor", "threads")}
    ws = runs["websockets"]
    out["websockets_relay"] = {"samples": len(ws), "p50_ms": percentile(ws, 50) / 1000,
                               "p99_ms": percentile(ws, 99) / 1000, "added_p50_us": percentile(ws, 50) - direct_p50,
                               "added_p99_us": percentile(ws, 99) - percentile(runs["direct"], 99)}
    # The TLS path's bar: switchd's added median over the asyncio + websockets relay's, in the same rounds.
    out["added_over_websockets_relay"] = ratio(out["added_median_rtt_us"], out["websockets_relay"]["added_p50_us"])
    d1q, t1q = (percentile(runs[k], 50) for k in ("one_process_direct", "one_process_through"))
    # One engine playing both ends never sleeps between them: through a relay, the round trip
    # wakes a sleeping process four times instead of none.
    out["one_process"] = {"direct_p50_ms": d1q / 1000, "through_p50_ms": t1q / 1000, "added_p50_us": t1q - d1q}
    # A relay adds two wake-ups to a round trip between two processes: one ping-pong's worth.
    out["wakeup"] = wakeups
    out["two_wakeups_us"] = sum(w["rtt_us"]["p50"] for w in wakeups) / len(wakeups)
    out["added_over_two_wakeups"] = ratio(out["added_median_rtt_us"], out["two_wakeups_us"])
    return out


async def pipelined(env: Env, plan: Plan, tmp: Path) -> dict[str, Any]:
    """(b) One session, PIPELINE_WINDOW frames in flight: direct, through switchd, through perf.floor's relays."""
    common = ["--pattern", "flood", "--frame-bytes", "1024", "--window", str(PIPELINE_WINDOW), "--duration",
              str(plan.flood_s), "--warmup", str(plan.driven_warmup), *PLAIN_PEER]
    d = await engine(env, "--direct", *common)
    await quiesce(env.switchd)
    t = await engine(env, *env.through("flood"), *common, *_watch(env))
    await quiesce(env.switchd)
    relays: dict[str, dict[str, Any]] = {}
    async with bare_proxies(env, tmp) as proxies:
        for name, proxy in proxies.items():
            r = await engine(env, *_via(env, proxy, name), *common, "--watch", f"{name}={proxy.pid}")
            relays[name] = {"frames_per_s": r["echoes_per_s"], "ratio_to_direct": ratio(r["echoes_per_s"],
                                                                                         d["echoes_per_s"]),
                            "lost": r["lost"], "cpu_pct_of_core": (r["cpu"].get(name) or {}).get("pct_of_one_core")}
    return {"window": PIPELINE_WINDOW, "frame_bytes": 1024,
            "frames_per_s": {"direct": d["echoes_per_s"], "through": t["echoes_per_s"],
                             "ratio": ratio(t["echoes_per_s"], d["echoes_per_s"])},
            "lost": {"direct": d["lost"], "through": t["lost"]},
            "relays": relays,
            "cpu": {"direct": d["cpu"], "through": t["cpu"]}}


def capacity_text(cap: dict[str, Any]) -> str:
    """A capacity search's result in words: "43 (fails at 46)"."""
    above = cap["bounded_above_by"]
    if above is None:
        return f"≥ {cap['sessions']} (every tried N held)"
    saturated = " where the direct baseline itself was saturated" if cap.get("limited_by_baseline") else ""
    return f"{cap['sessions']} (fails at {above}{saturated})"


def _per_message(cpu: dict[str, Any] | None, key: str, messages: int) -> float | None:
    return cpu[key] / messages * 1e6 if cpu and messages else None


def _realtime_args(plan: Plan, n: int) -> list[str]:
    return ["--sessions", str(n), "--duration", str(plan.duration), "--warmup", str(plan.warmup), "--rate", "50",
            "--frame-ms", "20", "--connect-concurrency", "32", "--drain", DRAIN_S]


async def realtime_point(env: Env, plan: Plan, n: int, tag: str, relay: Relay | None = None) -> dict[str, Any]:
    """N realtime sessions direct to the engine's peer, then through switchd (or `relay`); the added
    cost. With `relay`, the "switchd_*" figures are that relay's."""
    relay = relay or switchd_relay(env)
    common = _realtime_args(plan, n)
    started = time.monotonic()
    await quiesce(env.switchd)
    d = await engine(env, "--direct", *common)
    t = await engine(env, *relay.via(tag), *common, *relay.watch)
    await quiesce(env.switchd)
    lat_d, lat_t = d["latency_ms"] or {}, t["latency_ms"] or {}
    added = {q: lat_t.get(q, float("nan")) - lat_d.get(q, float("nan")) for q in ("p50", "p99", "p99.9")}
    sw = t["cpu"].get(relay.name) or {}
    eng = t["cpu"].get("engine") or {}
    relayed = t["sent_in_window"] + t["received_in_window"]
    point = {
        "sessions": n,
        "latency_ms": {"direct": lat_d, "through": lat_t},
        "added_ms": added,
        "lost": {"direct": d["lost"], "through": t["lost"]},
        "connect_failed": {"direct": d["connect_failed"], "through": t["connect_failed"]},
        "errors": {"direct": d["errors"], "through": t["errors"]},
        "close_codes": {"direct": d["close_codes"], "through": t["close_codes"]},
        "switchd_cpu_pct_of_core": sw.get("pct_of_one_core"),
        "relayed_messages_in_window": relayed,
        "switchd_us_per_relayed_message": _per_message(sw, "cpu_s", relayed),
        "switchd_user_us_per_relayed_message": _per_message(sw, "user_s", relayed),
        "switchd_system_us_per_relayed_message": _per_message(sw, "system_s", relayed),
        "switchd_user_s": sw.get("user_s"), "switchd_system_s": sw.get("system_s"),
        # If switchd had a core to itself and were purely CPU-bound: sessions that core could relay.
        # An upper bound for capacity (latency collapses before 100 %), comparable across machines.
        "switchd_sessions_per_core_ceiling": (n * plan.duration / sw["cpu_s"]) if sw and sw.get("cpu_s") else None,
        "engine_cpu_pct_of_core": {"direct": (d["cpu"].get("engine") or {}).get("pct_of_one_core"),
                                   "through": eng.get("pct_of_one_core")},
        "engine_us_per_message": {"direct": d["engine_us_per_message"], "through": t["engine_us_per_message"]},
        "send_lag_ms_p99": {"direct": (d["send_lag_ms"] or {}).get("p99"),
                            "through": (t["send_lag_ms"] or {}).get("p99")},
        "peer": {"direct": d["peer"], "through": t["peer"]},
        "cpu": {"direct": d["cpu"], "through": t["cpu"]},
    }
    point["baseline_ok"] = bool(d["lost"] == 0 and d["connect_failed"] == 0 and d["sessions_connected"] == n
                                and lat_d.get("p99", float("inf")) <= BASELINE_P99_LIMIT_MS)
    point["holds"] = bool(
        point["baseline_ok"] and t["connect_failed"] == 0 and t["sessions_connected"] == n and t["lost"] == 0
        and added["p99"] <= P99_ADDED_LIMIT_MS and added["p99.9"] <= P999_ADDED_LIMIT_MS)
    machines = [run["cpu"].get("machine") or {} for run in (d, t)]
    point["disturbed"] = any(m.get("others_cores", 0) > DISTURBED_OTHERS_CORES
                             or m.get("steal_cores", 0) > DISTURBED_STEAL_CORES for m in machines)
    point["elapsed_s"] = time.monotonic() - started
    return point


async def measured_point(env: Env, plan: Plan, n: int, tag: str, relay: Relay | None = None) -> dict[str, Any]:
    """A realtime point; re-measured once if it failed (the second attempt is the point)."""
    point = await realtime_point(env, plan, n, tag, relay)
    if point["holds"] or not plan.retry_failed:
        return point
    retry = await realtime_point(env, plan, n, f"{tag}r", relay)
    retry["failed_attempts"] = [{k: point[k] for k in ("added_ms", "lost", "holds", "baseline_ok", "cpu")}]
    return retry


async def capacity(env: Env, plan: Plan, points: list[dict[str, Any]], relay: Relay | None = None
                   ) -> dict[str, Any]:
    """Step search: the (c) points bracket the limit; bisect inside the bracket until the budget runs out."""
    tried = {p["sessions"]: p for p in points}
    # Capacity is the last N before the first failure: a pass above a failure (e.g. when both
    # runs are saturated and their difference is noise) does not count.
    hi = min((n for n, p in tried.items() if not p["holds"]), default=None)
    lo = max((n for n in tried if hi is None or n < hi), default=0)
    deadline = time.monotonic() + plan.capacity_budget_s
    steps: list[dict[str, Any]] = []
    # Bounded: each step halves the bracket, and no step starts past the time budget.
    while hi is not None and hi - lo > max(5, lo // 10) and time.monotonic() < deadline and len(steps) < 8:
        mid = (lo + hi) // 2
        p = await measured_point(env, plan, mid, f"cap{mid}", relay)
        tried[mid] = p
        steps.append({"sessions": mid, "holds": p["holds"], "baseline_ok": p["baseline_ok"],
                      "added_p99_ms": p["added_ms"]["p99"], "added_p99.9_ms": p["added_ms"]["p99.9"],
                      "lost": p["lost"]["through"], "switchd_cpu_pct_of_core": p["switchd_cpu_pct_of_core"]})
        lo, hi = (mid, hi) if p["holds"] else (lo, mid)
    return {
        "sessions": lo,
        "bounded_above_by": hi,  # None: every tried N held, so the capacity is at least `sessions`
        "criterion": f"p99 added ≤ {P99_ADDED_LIMIT_MS:g} ms, p99.9 added ≤ {P999_ADDED_LIMIT_MS:g} ms, 0 lost, "
                     f"every session connected, direct p99 ≤ {BASELINE_P99_LIMIT_MS:g} ms",
        "limited_by_baseline": bool(hi is not None and not tried[hi]["baseline_ok"]),
        "search_steps": steps,
        "points": {str(n): {"holds": p["holds"], "baseline_ok": p["baseline_ok"], "added_p99_ms": p["added_ms"]["p99"],
                            "added_p99.9_ms": p["added_ms"]["p99.9"], "lost": p["lost"]["through"],
                            "connect_failed": p["connect_failed"]["through"],
                            "cpu_pct_of_core": p["switchd_cpu_pct_of_core"],
                            "us_per_relayed_message": p["switchd_us_per_relayed_message"]}
                   for n, p in sorted(tried.items())},
    }


async def floor_comparison(env: Env, plan: Plan, tmp: Path, core: set[int] | None) -> dict[str, Any]:
    """(e) switchd side by side with perf.floor's relays in the same place: a bare Trio TCP proxy
    (what any Trio relay costs), a blocking one with a thread per direction (what the machine's
    wake-ups alone cost) and the asyncio + websockets relay (the usual Python gateway)."""
    n = plan.floor_sessions
    closed = ["--pattern", "closed", "--frame-bytes", "1024", "--duration", str(plan.closed_s), "--warmup",
              str(plan.driven_warmup), "--samples", *PLAIN_PEER]
    realtime = _realtime_args(plan, n)
    runs: dict[str, dict[str, Any]] = {}
    async with bare_proxies(env, tmp, core) as proxies:  # in switchd's place
        relays = [(name, _via(env, proxy, name), ["--watch", f"{name}={proxy.pid}"])
                  for name, proxy in proxies.items()]
        relays.append(("switchd", env.through("efloor"), _watch(env)))
        for name, via, watch in relays:
            c = await engine(env, *via, *closed)
            await quiesce(env.switchd)
            r = await engine(env, *via, *realtime, *watch)
            await quiesce(env.switchd)
            cpu = r["cpu"].get(name) or {}
            relayed = r["sent_in_window"] + r["received_in_window"]
            runs[name] = {
                "closed_p50_ms": percentile(sorted(c["latency_us_samples"]), 50) / 1000,
                "realtime_latency_ms": r["latency_ms"],
                "lost": r["lost"],
                "cpu_pct_of_core": cpu.get("pct_of_one_core"),
                "us_per_relayed_message": _per_message(cpu, "cpu_s", relayed),
                "user_us_per_relayed_message": _per_message(cpu, "user_s", relayed),
                "system_us_per_relayed_message": _per_message(cpu, "system_s", relayed),
            }
    # The bare Trio proxy's own capacity, by the same search and limits as switchd's: how many
    # realtime sessions any Trio relay can hold in this place, doing nothing but moving bytes. Alone
    # on the core, as switchd was for its own.
    async with bare_proxies(env, tmp, core, names=("floor",)) as alone:
        proxy = alone["floor"]
        bare = Relay("floor", lambda _tag: _via(env, proxy, "floor"), ["--watch", f"floor={proxy.pid}"])
        points: list[dict[str, Any]] = []
        for size in (s for s in plan.ns if s > 1 or len(plan.ns) == 1):
            points.append(await measured_point(env, plan, size, f"fl{size}", bare))
            if not points[-1]["holds"]:
                break
        floor_capacity = await capacity(env, plan, points, bare)
    f, t, w, a = runs["floor"], runs["threads"], runs["switchd"], runs["websockets"]
    return {"sessions": n, "floor": f, "threads": t, "websockets": a, "switchd": w, "floor_capacity": floor_capacity,
            "ratio_closed_p50_vs_websockets": ratio(w["closed_p50_ms"], a["closed_p50_ms"]),
            "ratio_us_per_message_vs_websockets": ratio(w["us_per_relayed_message"] or float("nan"),
                                                        a["us_per_relayed_message"] or float("nan")),
            "ratio_closed_p50": ratio(w["closed_p50_ms"], f["closed_p50_ms"]),
            "ratio_us_per_message": ratio(w["us_per_relayed_message"] or float("nan"),
                                          f["us_per_relayed_message"] or float("nan")),
            "ratio_closed_p50_vs_threads": ratio(w["closed_p50_ms"], t["closed_p50_ms"]),
            "ratio_us_per_message_vs_threads": ratio(w["us_per_relayed_message"] or float("nan"),
                                                     t["us_per_relayed_message"] or float("nan"))}


async def _worker_counts(urls: list[str]) -> list[dict[str, float]]:
    """Each worker's sessions accepted and frames relayed so far, from its own /metrics."""
    counts = []
    for url in urls:
        values = procs.metric_values(await procs.http_get(url))
        counts.append({"sessions": values.get("switch_sessions_total", 0.0),
                       "frames": sum(v for k, v in values.items() if k.startswith("switch_frames_relayed_total"))})
    return counts


async def workers_comparison(env: Env, plan: Plan, cap: dict[str, Any]) -> dict[str, Any]:
    """(f) WORKERS processes on one port, each at the load one switchd holds within the limits ((d)'s
    capacity): CPU per message against that one process at that load.

    Equal per-message cost at equal per-process load means each added core adds a whole
    process's capacity; the kernel's spread of the sessions over the workers is the other half.
    (At a load that saturates one process, WORKERS of them and the load engine together would ask
    more of this 2-core machine than it has: the run would measure the overload, not the workers.)
    """
    per_process = cap["sessions"] or min(map(int, cap["points"]))
    single = cap["points"][str(per_process)]
    n = WORKERS * per_process
    async with env.stack.switchd(env.upstream_url(), name="workers", WORKERS=str(WORKERS),
                                 **env.switchd_env()) as supervisor:
        urls = [f"http://127.0.0.1:{p}/metrics" for p in supervisor.ready_line.split()[-1].split(",")]
        pids = procs.children(supervisor.pid)
        if len(pids) != WORKERS:
            raise RuntimeError(f"WORKERS={WORKERS} switchd runs {len(pids)} worker processes")
        watch = [arg for i, pid in enumerate(pids) for arg in ("--watch", f"worker{i}={pid}")]
        before = await _worker_counts(urls)
        r = await engine(env, "--url", f"{supervisor.address}/v1/realtime", "--key", env.key, "--session-prefix",
                         "workers", *_realtime_args(plan, n), *watch, "--watch", f"switchdb={env.stack.db.pid}")
        after = await _worker_counts(urls)
    cpu = [r["cpu"].get(f"worker{i}") or {} for i in range(WORKERS)]
    relayed = r["sent_in_window"] + r["received_in_window"]
    total_cpu = sum(c.get("cpu_s") or 0.0 for c in cpu)
    per_message = total_cpu / relayed * 1e6 if relayed and all(c.get("cpu_s") is not None for c in cpu) else None
    return {
        "workers": WORKERS, "sessions": n, "sessions_per_process": per_process,
        "sessions_per_worker": [int(a["sessions"] - b["sessions"]) for a, b in zip(after, before)],
        "frames_per_worker": [int(a["frames"] - b["frames"]) for a, b in zip(after, before)],
        "latency_ms": r["latency_ms"], "lost": r["lost"], "connect_failed": r["connect_failed"],
        "cpu_pct_of_core_per_worker": [c.get("pct_of_one_core") for c in cpu],
        "us_per_relayed_message": per_message,
        "one_process_us_per_relayed_message": single["us_per_relayed_message"],
        "ratio_us_per_message": ratio(per_message or float("nan"), single["us_per_relayed_message"] or float("nan")),
        "switchdb_cpu_pct_of_core": (r["cpu"].get("switchdb") or {}).get("pct_of_one_core"),
        "machine": r["cpu"].get("machine"),
    }


async def session_memory(env: Env, plan: Plan, tmp: Path) -> dict[str, Any]:
    """switchd's memory per idle session and per session holding a maximal partial frame (perf.memory)."""
    async with peer_process(env, tmp):
        return await memory.per_session(env.switchd, env.key, plan.memory_sessions, Settings().max_payload_length)


async def one_upstream(plan: Plan, tmp: Path, tls: TlsFiles | None, full: bool = True) -> dict[str, Any]:
    """(a)–(f) against one switchd whose provider is served over TLS (`tls`) or plain ws://; only
    (a) and (c) unless `full` (the others are None then)."""
    tmp.mkdir()
    stage_s: dict[str, float] = {}
    clock = [time.monotonic()]

    def lap(name: str) -> None:
        now = time.monotonic()
        stage_s[name] = round(now - clock[0], 2)
        clock[0] = now

    with peer_socket() as peer:
        async with open_env(tmp, peer, tls) as env:
            url = env.upstream_url()
            lap("start")
            # First, while switchd's memory holds nothing but its start.
            mem = await session_memory(env, plan, tmp) if full else None
            lap("memory")
            # One session leaves the machine idle: the scheduler places its three processes.
            closed = await closed_loop(env, plan, tmp)
            lap("closed_loop")
            flood = await pipelined(env, plan, tmp) if full else None
            lap("pipelined")
            # "Per switchd process (one core)": from here switchd has a core of its own and the load
            # engine, switchdb and this process share the other, so the load never queues for the
            # core it measures (on this 2-core machine it did, and p99.9 was the scheduler's).
            with procs.dedicated_core(env.switchd.pid, env.stack.db.pid) as placement:
                points = []
                for n in plan.ns:
                    points.append(await measured_point(env, plan, n, f"rt{n}"))
                cap = await capacity(env, plan, points) if full else None
                lap("realtime_and_capacity")
                floor = await floor_comparison(env, plan, tmp, set(placement["under_test"]) if placement else None
                                               ) if full else None
                lap("floor")
            # Every core for the workers, the engine among them, as an operator would run WORKERS.
            workers = await workers_comparison(env, plan, cap) if cap is not None else None
            lap("workers")
    return {"upstream_url": url, "closed_loop": closed, "pipelined": flood, "realtime": points,
            "capacity": cap, "floor": floor, "workers": workers, "placement": placement, "memory": mem,
            "stage_s": stage_s}


async def run_async(mode: str) -> tuple[dict[str, Any], list[str]]:
    plan = PLANS[mode]
    results: dict[str, Any] = {"upstreams": list(UPSTREAMS), "headline": UPSTREAMS[0]}
    with tempfile.TemporaryDirectory(prefix="perf-relay-") as tmp_name:
        tmp = Path(tmp_name)
        tls = make_certs(tmp / "certs")
        for kind in UPSTREAMS:
            emit(f"\n--- relay with the provider over {'TLS (wss://)' if kind == 'tls' else 'plain ws://'} ---")
            results[kind] = await one_upstream(plan, tmp / kind, tls if kind == "tls" else None,
                                               full=kind == "tls" or plan.plain_full)
            _print(results[kind])
    _print_side_by_side(results)
    results.update({"plan": plan.__dict__, "load_engine": "perf.engine (epoll, both ends in one process)"})
    notes = [
        "results.tls: the provider (perf.engine's peer) served over TLS 1.3 with a certificate made at run time, "
        "switchd trusting its CA through UPSTREAM_CA_FILE (and SSL_CERT_FILE); results.plain: the same over ws://. "
        "Clients speak plain ws:// to switchd and to the asyncio + websockets relay; direct clients speak the "
        "provider's scheme, and their TLS passes end to end through the bare TCP proxies.",
        "Load: perf.engine, one epoll process playing the clients and the provider-like peer (pre-built frames, "
        "client frames masked with the zero key); switchd and switchdb are separate processes; all share this "
        "machine's cores (see cpu.*.machine).",
        "Added latency = through − direct at the same percentile, same load, same peer, measured back to back.",
        "Latency is the client-observed round trip of each append to its audio delta, from the frame's scheduled "
        "send time (no coordinated omission); frames scheduled during the warmup are not counted.",
        f"A point cannot hold when the direct run's p99 exceeds {BASELINE_P99_LIMIT_MS:g} ms: the machine then "
        "cannot drive N sessions even without switchd, so the difference is not switchd's.",
        "switchd µs per relayed message = switchd CPU (user, system) over the measured window / (frames sent + "
        "frames received by the clients in that window); the engine's µs per message uses the same denominator "
        "and covers both ends (through switchd it handles every message twice).",
        "Daemons log at WARNING during the benchmarks.",
    ]
    return results, notes


SIDE_BY_SIDE_TITLE = "Relay: the provider over TLS (the headline) beside plain ws://"


def side_by_side(r: dict[str, Any]) -> list[list[Any]]:
    """The relay's main figures, one row each: [measure, TLS path, plain path] (None where not run)."""
    def row(label: str, read: Any) -> list[Any]:
        cells = []
        for kind in UPSTREAMS:
            try:
                cells.append(read(r[kind]))
            except (KeyError, TypeError, IndexError):
                cells.append(None)
        return [label, *cells]

    def at(x: dict[str, Any], key: str) -> Any:
        p = next((q for q in sorted(x["realtime"], key=lambda q: q["sessions"]) if q["sessions"] >= TARGET_SESSIONS),
                 None)
        return None if p is None else p[key]

    return [
        row("closed loop: switchd added p50 µs", lambda x: x["closed_loop"]["added_median_rtt_us"]),
        row("closed loop: websockets relay added p50 µs",
            lambda x: x["closed_loop"]["websockets_relay"]["added_p50_us"]),
        row("closed loop: switchd / websockets relay", lambda x: x["closed_loop"]["added_over_websockets_relay"]),
        row(f"pipelined ({PIPELINE_WINDOW}): switchd / direct", lambda x: x["pipelined"]["frames_per_s"]["ratio"]),
        row(f"pipelined ({PIPELINE_WINDOW}): websockets relay / direct",
            lambda x: x["pipelined"]["relays"]["websockets"]["ratio_to_direct"]),
        row("capacity (sessions per process)", lambda x: x["capacity"]["sessions"]),
        row(f"at ≥{TARGET_SESSIONS} sessions: +p99 ms", lambda x: (at(x, "added_ms") or {}).get("p99")),
        row(f"at ≥{TARGET_SESSIONS} sessions: +p99.9 ms", lambda x: (at(x, "added_ms") or {}).get("p99.9")),
        row(f"at ≥{TARGET_SESSIONS} sessions: frames lost", lambda x: (at(x, "lost") or {}).get("through")),
        row(f"at ≥{TARGET_SESSIONS} sessions: switchd µs/msg", lambda x: at(x, "switchd_us_per_relayed_message")),
        row(f"WORKERS={WORKERS}: µs/msg vs one process", lambda x: x["workers"]["ratio_us_per_message"]),
        row("KiB per idle session", lambda x: _kib(x["memory"]["idle_bytes_per_session"])),
        row("KiB per session holding a maximal partial frame",
            lambda x: _kib(x["memory"]["partial_frame_bytes_per_session"])),
    ]


def _print_side_by_side(r: dict[str, Any]) -> None:
    emit(table(SIDE_BY_SIDE_TITLE, ["measure", *UPSTREAMS], side_by_side(r)))


def _print(r: dict[str, Any]) -> None:
    c = r["closed_loop"]
    emit(table("Relay (a): one session, closed loop, 1 KB frames — round trip (ms)",
               ["percentile", "direct", "through switchd", "added", "ratio"],
               [[f"p{q}", c[f"p{q}_ms"]["direct"], c[f"p{q}_ms"]["through"], c[f"p{q}_ms"]["added"],
                 c[f"p{q}_ms"]["ratio"]] for q in (50, 99)], digits=3))
    one = c["one_process"]
    emit(f"direct = a client process and the peer in a process of its own; wake-ups: two processes bouncing 1 KB "
         f"over loopback (perf.wakeup, once a round) took {', '.join(fmt(w['rtt_us']['p50'], 0) for w in c['wakeup'])} "
         f"µs a round trip (p50), the two wake-ups any relay adds to it; switchd added "
         f"{fmt(c['added_median_rtt_us'], 0)} µs (×{fmt(c['added_over_two_wakeups'])}). With one engine playing both "
         f"ends (never sleeping direct): {fmt(one['direct_p50_ms'] * 1000, 0)} → "
         f"{fmt(one['through_p50_ms'] * 1000, 0)} "
         f"µs, +{fmt(one['added_p50_us'], 0)}")
    bare = c["bare_proxies"]
    emit(f"The same loop through perf.floor's bare TCP proxies to the same peer (no WebSocket, no metering): "
         f"blocking threads proxy p50 {fmt(bare['threads']['p50_ms'], 3)} ms "
         f"(+{fmt(bare['threads']['added_p50_us'], 0)} µs), bare Trio proxy {fmt(bare['floor']['p50_ms'], 3)} ms "
         f"(+{fmt(bare['floor']['added_p50_us'], 0)} µs), "
         f"switchd +{fmt(c['added_median_rtt_us'], 0)} µs")
    ws = c["websockets_relay"]
    emit(f"asyncio + websockets relay (plain ws:// in, the provider's scheme upstream, as switchd): p50 "
         f"{fmt(ws['p50_ms'], 3)} ms (+{fmt(ws['added_p50_us'], 0)} µs), p99 {fmt(ws['p99_ms'], 3)} ms; "
         f"switchd's added median ×{fmt(c['added_over_websockets_relay'])} of it")
    f = r["pipelined"]
    if f is not None:
        sw = f["cpu"]["through"].get("switchd") or {}
        eng = f["cpu"]["through"].get("engine") or {}
        emit(table(f"Relay (b): one session, pipelined ({f['window']} in flight), 1 KB frames",
                   ["measure", "direct", "through", "ratio"],
                   [["frames/s", f["frames_per_s"]["direct"], f["frames_per_s"]["through"], f["frames_per_s"]["ratio"]],
                    ["switchd % of a core", None, sw.get("pct_of_one_core"), None],
                    ["engine % of a core", (f["cpu"]["direct"].get("engine") or {}).get("pct_of_one_core"),
                     eng.get("pct_of_one_core"), None],
                    *[[f"through {RELAY_NAMES[name]}: frames/s", None, x["frames_per_s"], x["ratio_to_direct"]]
                      for name, x in f["relays"].items()]]))
    rows = []
    for p in r["realtime"]:
        m = p["cpu"]["through"].get("machine") or {}
        rows.append([p["sessions"], p["latency_ms"]["direct"].get("p50"), p["latency_ms"]["direct"].get("p99"),
                     p["latency_ms"]["through"].get("p50"), p["latency_ms"]["through"].get("p99"),
                     p["added_ms"]["p50"], p["added_ms"]["p99"], p["added_ms"]["p99.9"], p["lost"]["through"],
                     p["connect_failed"]["through"], p["switchd_cpu_pct_of_core"], p["switchd_us_per_relayed_message"],
                     p["switchd_user_us_per_relayed_message"], p["switchd_system_us_per_relayed_message"],
                     p["switchd_sessions_per_core_ceiling"], p["engine_cpu_pct_of_core"]["direct"],
                     p["engine_cpu_pct_of_core"]["through"], p["engine_us_per_message"]["through"],
                     m.get("busy_cores"), m.get("others_cores"), m.get("steal_cores"),
                     ("yes" if p["holds"] else "NO" if p["baseline_ok"] else "NO (base)")
                     + (" (2nd try)" if p.get("failed_attempts") else "") + (" *" if p["disturbed"] else "")])
    where = r["placement"]
    emit(f"(c)–(e): switchd on CPU {where['under_test']}, the load engine, switchdb and the rest on CPU {where['load']}"
         if where else "(c)–(e): one core: everything shares it")
    emit(table("Relay (c): N sessions at realtime rate (50 × 20 ms appends/s each) — ms, CPU % of one core",
               ["N", "direct p50", "direct p99", "through p50", "through p99", "+p50", "+p99", "+p99.9", "lost",
                "conn fail", "switchd %", "µs/msg", "user", "sys", "ceiling", "engine % d", "engine % t",
                "eng µs/msg", "busy cores", "others", "steal", "holds"], rows, digits=2))
    emit("latency from each frame's scheduled send time; µs/msg = switchd CPU per message relayed (user + sys); "
         "ceiling = sessions one dedicated core could relay if switchd were purely CPU-bound (N × window / switchd "
         "CPU s); engine % d/t = the load engine (both ends) direct/through; eng µs/msg = its CPU per message "
         "through switchd; busy cores = every process on the machine during the through run, others = the part "
         "not switchd/switchdb/engine (other users' work), steal = cores the hypervisor took (VM); "
         f"NO (base) = even the direct run missed p99 ≤ {BASELINE_P99_LIMIT_MS:g} ms (machine saturated); "
         f"* = others > {DISTURBED_OTHERS_CORES:g} or steal > {DISTURBED_STEAL_CORES:g} cores in the direct or through "
         "run; (2nd try) = the first attempt failed and the point was measured again")
    cap = r["capacity"]
    if cap is not None:
        emit(f"Relay (d): capacity = {capacity_text(cap)} realtime sessions per switchd process ({cap['criterion']}; "
             f"{len(cap['search_steps'])} bisection step(s))")
    fl = r["floor"]
    if fl is not None:
        emit(table(f"Relay (e): switchd vs perf.floor's relays in the same place — {fl['sessions']} realtime "
                   "sessions, and a closed loop of 1 KB frames",
                   ["relay", "closed p50 ms", "realtime p50 ms", "realtime p99 ms", "lost", "CPU % of a core",
                    "µs/msg", "user", "sys"],
                   [[name, x["closed_p50_ms"], (x["realtime_latency_ms"] or {}).get("p50"),
                     (x["realtime_latency_ms"] or {}).get("p99"), x["lost"], x["cpu_pct_of_core"],
                     x["us_per_relayed_message"], x.get("user_us_per_relayed_message"),
                     x.get("system_us_per_relayed_message")] for name, x in (("bare Trio proxy", fl["floor"]),
                                                                   ("blocking threads proxy", fl["threads"]),
                                                                   ("asyncio + websockets relay", fl["websockets"]),
                                                                   ("switchd", fl["switchd"]))], digits=3))
        fc = fl.get("floor_capacity")
        if fc is not None:
            emit(f"The bare Trio proxy's capacity in the same place, by (d)'s search and limits: {capacity_text(fc)}; "
                 "tried: " + ", ".join(
                     f"{n} {'holds' if p['holds'] else 'fails'} (+p99 {fmt(p['added_p99_ms'])} ms, +p99.9 "
                     f"{fmt(p['added_p99.9_ms'])} ms, lost {p['lost']}, connects failed {p.get('connect_failed')}, "
                     f"{fmt(p.get('cpu_pct_of_core'), 0)} % of a core)" for n, p in fc["points"].items()))
        emit(f"switchd / asyncio + websockets relay: closed-loop p50 ×{fmt(fl['ratio_closed_p50_vs_websockets'])}, "
             f"CPU per message ×{fmt(fl['ratio_us_per_message_vs_websockets'])}")
        emit(f"switchd / bare Trio proxy: closed-loop p50 ×{fl['ratio_closed_p50'] or float('nan'):.2f}, "
             f"CPU per message ×{fl['ratio_us_per_message'] or float('nan'):.2f}; switchd / blocking threads proxy: "
             f"closed-loop p50 ×{fl['ratio_closed_p50_vs_threads'] or float('nan'):.2f}, "
             f"CPU per message ×{fl['ratio_us_per_message_vs_threads'] or float('nan'):.2f}")
    if r["workers"] is not None:
        _print_workers(r["workers"])
    m = r["memory"]
    if m is not None:
        emit(f"Memory: {m['sessions']} sessions: switchd RSS +{fmt(_kib(m['idle_bytes_per_session']), 1)} KiB per "
             f"idle session; +{fmt(_kib(m['partial_frame_bytes_per_session']), 1)} KiB per session holding a "
             f"{fmt(m['max_payload_length'])}-byte frame but its last byte ({m['sessions_open_while_holding']} "
             f"sessions still open then); RSS after closing them {fmt(_kib(m['rss_bytes']['after_close']), 0)} KiB "
             f"(before: {fmt(_kib(m['rss_bytes']['before']), 0)})")


def _kib(value: float | None) -> float | None:
    return None if value is None else value / 1024


def _print_workers(w: dict[str, Any]) -> None:
    lat = w["latency_ms"] or {}
    emit(f"Relay (f): WORKERS={w['workers']} on one port, {w['sessions']} realtime sessions "
         f"({w['sessions_per_process']} a worker, (d)'s capacity of one switchd): sessions per worker "
         f"{'/'.join(map(str, w['sessions_per_worker']))}, CPU "
         f"{'/'.join(f'{fmt(c, 0)} %' for c in w['cpu_pct_of_core_per_worker'])} of a core; "
         f"{fmt(w['us_per_relayed_message'])} µs per message against {fmt(w['one_process_us_per_relayed_message'])} "
         f"for one process (×{fmt(w['ratio_us_per_message'])}); p50 {fmt(lat.get('p50'))} ms, p99 "
         f"{fmt(lat.get('p99'))} ms (the load engine shares the two cores); lost {w['lost']}; switchdb "
         f"{fmt(w['switchdb_cpu_pct_of_core'], 1)} % of a core")


def run(mode: str) -> tuple[dict[str, Any], list[str]]:
    return trio.run(run_async, mode)
