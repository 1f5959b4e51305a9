"""Relay: what switchd adds between a client and the provider, through real processes.

switchdb, switchd, `switchd-sim --echo` and `perf.upstream` run as processes; the load
generator (`perf.load`) runs as a separate process for every measurement, so it never shares a
Python interpreter with switchd. "Direct" runs the very same load against the same peer
without switchd; every figure is through vs direct, measured in the same run, alternating.

(a) one session closed loop, ~1 KB frames, echo peer: round trip p50/p99;
(b) one session pipelined (64 frames in flight), echo peer: frames/s;
(c) N sessions at realtime rate (50 appends/s of 20 ms audio each) against perf.upstream (50
    audio deltas/s back, transcripts, a response.done every 3 s): added latency p50/p99/p99.9,
    switchd CPU (% of one core, µs per relayed message), frames lost;
(d) capacity: the most realtime sessions with p99 added ≤ 5 ms and nothing lost — the (c)
    points, then bisection between the last pass and the first fail, bounded in time.

The machine has 2 cores shared by the load generator, the peer, switchd (and switchdb, and
whatever else runs): every (c)/(d) row carries all their CPU so contention is visible.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from perf import procs
from perf.report import emit, percentile, ratio, table

P99_ADDED_LIMIT_MS = 5.0
# A direct run slower than this means the machine cannot even drive N sessions without switchd
# (generator and peer starved): "added" latency is then meaningless and the point cannot pass.
BASELINE_P99_LIMIT_MS = 20.0
DRAIN_S = "3"


@dataclass(frozen=True)
class Plan:
    closed_rounds: int
    closed_s: float
    flood_s: float
    ns: tuple[int, ...]
    duration: float
    warmup: float
    capacity_budget_s: float


PLANS = {
    # 150 is where the target sits, so it is measured, not interpolated.
    "full": Plan(2, 3.0, 3.0, (1, 50, 100, 150, 200, 400), 6.0, 1.5, 90.0),
    "quick": Plan(1, 2.0, 2.0, (1, 50), 3.0, 1.0, 25.0),
    "smoke": Plan(1, 0.5, 0.5, (2,), 1.0, 0.3, 0.0),
}


class Env:
    """The running processes and how to reach them."""

    def __init__(self, stack: procs.Stack, key: str, echo: procs.Daemon, upstream: procs.Daemon,
                 sw_echo: procs.Daemon, sw_load: procs.Daemon) -> None:
        self.stack, self.key, self.echo, self.upstream = stack, key, echo, upstream
        self.sw_echo, self.sw_load = sw_echo, sw_load

    @staticmethod
    def client_url(switchd: procs.Daemon) -> str:
        return f"{switchd.address}/v1/realtime"


async def load(*args: str, timeout: float = 300) -> dict[str, Any]:
    """One perf.load run in its own process; its JSON summary."""
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


def _through(env: Env, switchd: procs.Daemon, prefix: str) -> list[str]:
    return ["--url", env.client_url(switchd), "--key", env.key, "--session-prefix", prefix]


async def closed_loop(env: Env, plan: Plan) -> dict[str, Any]:
    common = ["--pattern", "closed", "--frame-bytes", "1024", "--duration", str(plan.closed_s), "--warmup", "0.3",
              "--count", "1000000", "--samples"]
    direct: list[int] = []
    through: list[int] = []
    for r in range(plan.closed_rounds):
        d = await load("--url", env.echo.address, *common)
        await quiesce(env.sw_echo)
        t = await load(*_through(env, env.sw_echo, f"closed{r}"), *common)
        direct += d["latency_us_samples"]
        through += t["latency_us_samples"]
    direct.sort()
    through.sort()
    out: dict[str, Any] = {"frame_bytes": 1024, "rounds": plan.closed_rounds, "samples_direct": len(direct),
                           "samples_through": len(through)}
    for q in (50, 99):
        dq, tq = percentile(direct, q) / 1000, percentile(through, q) / 1000
        out[f"p{q}_ms"] = {"direct": dq, "through": tq, "added": tq - dq, "ratio": ratio(tq, dq)}
    out["added_median_rtt_us"] = out["p50_ms"]["added"] * 1000
    return out


async def pipelined(env: Env, plan: Plan) -> dict[str, Any]:
    common = ["--pattern", "flood", "--frame-bytes", "1024", "--window", "64", "--duration", str(plan.flood_s),
              "--warmup", "0.3"]
    d = await load("--url", env.echo.address, *common, "--watch", f"peer={env.echo.pid}")
    await quiesce(env.sw_echo)
    t = await load(*_through(env, env.sw_echo, "flood"), *common, "--watch", f"peer={env.echo.pid}",
                   "--watch", f"switchd={env.sw_echo.pid}")
    return {"window": 64, "frame_bytes": 1024,
            "frames_per_s": {"direct": d["echoes_per_s"], "through": t["echoes_per_s"],
                             "ratio": ratio(t["echoes_per_s"], d["echoes_per_s"])},
            "lost": {"direct": d["lost"], "through": t["lost"]},
            "cpu": {"direct": d["cpu"], "through": t["cpu"]}}


async def realtime_point(env: Env, plan: Plan, n: int, tag: str) -> dict[str, Any]:
    """N realtime sessions direct to perf.upstream, then through switchd; the added cost."""
    common = ["--sessions", str(n), "--duration", str(plan.duration), "--warmup", str(plan.warmup),
              "--rate", "50", "--frame-ms", "20", "--connect-concurrency", "32", "--drain", DRAIN_S,
              "--watch", f"upstream={env.upstream.pid}"]
    started = time.monotonic()
    d = await load("--url", env.upstream.address, *common)
    await quiesce(env.sw_load)
    t = await load(*_through(env, env.sw_load, tag), *common, "--watch", f"switchd={env.sw_load.pid}",
                   "--watch", f"switchdb={env.stack.db.pid}")
    await quiesce(env.sw_load)
    lat_d, lat_t = d["latency_ms"] or {}, t["latency_ms"] or {}
    added = {q: lat_t.get(q, float("nan")) - lat_d.get(q, float("nan")) for q in ("p50", "p99", "p99.9")}
    sw = t["cpu"].get("switchd") or {}
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
        "switchd_us_per_relayed_message": (sw["cpu_s"] / relayed * 1e6) if sw and relayed else None,
        "switchd_user_s": sw.get("user_s"), "switchd_system_s": sw.get("system_s"),
        # If switchd had a core to itself and were purely CPU-bound: sessions that core could relay.
        # An upper bound for capacity (latency collapses before 100 %), comparable across machines.
        "switchd_sessions_per_core_ceiling": (n * plan.duration / sw["cpu_s"]) if sw and sw.get("cpu_s") else None,
        "send_lag_ms_p99": {"direct": (d["send_lag_ms"] or {}).get("p99"),
                            "through": (t["send_lag_ms"] or {}).get("p99")},
        "cpu": {"direct": d["cpu"], "through": t["cpu"]},
    }
    point["baseline_ok"] = bool(d["lost"] == 0 and d["connect_failed"] == 0
                                and lat_d.get("p99", float("inf")) <= BASELINE_P99_LIMIT_MS)
    point["holds"] = bool(
        point["baseline_ok"] and t["connect_failed"] == 0 and t["sessions_connected"] == n and t["lost"] == 0
        and added["p99"] <= P99_ADDED_LIMIT_MS)
    point["elapsed_s"] = time.monotonic() - started
    return point


async def capacity(env: Env, plan: Plan, points: list[dict[str, Any]]) -> dict[str, Any]:
    """Step search: the (c) points bracket the limit; bisect inside the bracket until the budget runs out."""
    tried = {p["sessions"]: p for p in points}
    # Capacity is the last N before the first failure: a pass above a failure (e.g. when both
    # runs are saturated and their difference is noise) does not count.
    hi = min((n for n, p in tried.items() if not p["holds"]), default=None)
    lo = max((n for n in tried if hi is None or n < hi), default=0)
    deadline = time.monotonic() + plan.capacity_budget_s
    steps = []
    while hi is not None and hi - lo > max(5, lo // 8) and time.monotonic() < deadline:
        mid = (lo + hi) // 2
        p = await realtime_point(env, plan, mid, f"cap{mid}")
        tried[mid] = p
        steps.append({"sessions": mid, "holds": p["holds"], "baseline_ok": p["baseline_ok"],
                      "added_p99_ms": p["added_ms"]["p99"]})
        lo, hi = (mid, hi) if p["holds"] else (lo, mid)
    return {
        "sessions": lo,
        "bounded_above_by": hi,  # None: every tried N held, so the capacity is at least `sessions`
        "criterion": f"p99 added ≤ {P99_ADDED_LIMIT_MS} ms, 0 lost, every session connected, "
                     f"direct p99 ≤ {BASELINE_P99_LIMIT_MS} ms",
        "limited_by_baseline": bool(hi is not None and not tried[hi]["baseline_ok"]),
        "search_steps": steps,
        "points": {str(n): {"holds": p["holds"], "baseline_ok": p["baseline_ok"], "added_p99_ms": p["added_ms"]["p99"]}
                   for n, p in sorted(tried.items())},
    }


async def run_async(mode: str) -> tuple[dict[str, Any], list[str]]:
    plan = PLANS[mode]
    with tempfile.TemporaryDirectory(prefix="perf-relay-") as tmp_name:
        tmp = Path(tmp_name)
        async with AsyncExitStack() as stack_cm:
            stack = await stack_cm.enter_async_context(procs.open_stack(tmp))
            _, key = await stack.account()
            echo = await stack_cm.enter_async_context(procs.sim(tmp, "--echo", name="sim-echo"))
            upstream = await stack_cm.enter_async_context(procs.load_upstream(tmp))
            sw_echo = await stack_cm.enter_async_context(
                stack.switchd(f"{echo.address}/v1/realtime?model=gpt-realtime", name="switchd-echo"))
            sw_load = await stack_cm.enter_async_context(
                stack.switchd(f"{upstream.address}/v1/realtime?model=gpt-realtime", name="switchd-load"))
            env = Env(stack, key, echo, upstream, sw_echo, sw_load)
            closed = await closed_loop(env, plan)
            flood = await pipelined(env, plan)
            points = []
            for n in plan.ns:
                points.append(await realtime_point(env, plan, n, f"rt{n}"))
            cap = await capacity(env, plan, points)
    results = {"closed_loop": closed, "pipelined": flood, "realtime": points, "capacity": cap,
               "plan": plan.__dict__}
    _print(results)
    notes = [
        "The load generator is its own process per run; the peer (switchd-sim --echo or perf.upstream), "
        "switchd and switchdb are separate processes; all share this machine's cores (see cpu.*.machine).",
        "Added latency = through − direct at the same percentile, same load, same peer, measured back to back.",
        "Latency is the client-observed round trip of each append to its echo, from the frame's scheduled "
        "send time (no coordinated omission); frames scheduled during the warmup are not counted.",
        f"A point cannot hold when the direct run's p99 exceeds {BASELINE_P99_LIMIT_MS:g} ms: the machine then "
        "cannot drive N sessions even without switchd, so the difference is not switchd's.",
        "switchd µs per relayed message = switchd CPU over the measured window / (frames sent + frames "
        "received by the clients in that window).",
        "Daemons log at WARNING during the benchmarks.",
    ]
    return results, notes


def _print(r: dict[str, Any]) -> None:
    c = r["closed_loop"]
    emit(table("Relay (a): one session, closed loop, 1 KB frames — round trip (ms)",
               ["percentile", "direct", "through switchd", "added", "ratio"],
               [[f"p{q}", c[f"p{q}_ms"]["direct"], c[f"p{q}_ms"]["through"], c[f"p{q}_ms"]["added"],
                 c[f"p{q}_ms"]["ratio"]] for q in (50, 99)], digits=3))
    f = r["pipelined"]["frames_per_s"]
    emit(table("Relay (b): one session, pipelined (64 in flight), 1 KB frames", ["measure", "direct", "through", "ratio"],
               [["frames/s", f["direct"], f["through"], f["ratio"]]]))
    rows = []
    for p in r["realtime"]:
        m = p["cpu"]["through"].get("machine") or {}
        lg = p["cpu"]["through"].get("load generator") or {}
        up = p["cpu"]["through"].get("upstream") or {}
        rows.append([p["sessions"], p["latency_ms"]["direct"].get("p50"), p["latency_ms"]["direct"].get("p99"),
                     p["latency_ms"]["through"].get("p50"), p["latency_ms"]["through"].get("p99"),
                     p["added_ms"]["p50"], p["added_ms"]["p99"], p["added_ms"]["p99.9"], p["lost"]["through"],
                     p["connect_failed"]["through"], p["switchd_cpu_pct_of_core"], p["switchd_us_per_relayed_message"],
                     p["switchd_sessions_per_core_ceiling"], lg.get("pct_of_one_core"), up.get("pct_of_one_core"), m.get("busy_cores"),
                     "yes" if p["holds"] else "NO" if p["baseline_ok"] else "NO (base)"])
    emit(table("Relay (c): N sessions at realtime rate (50 × 20 ms appends/s each) — ms, CPU % of one core",
               ["N", "direct p50", "direct p99", "through p50", "through p99", "+p50", "+p99", "+p99.9", "lost", "conn fail", "switchd %",
                "µs/msg", "ceiling", "loadgen %", "upstream %", "busy cores", "holds"], rows, digits=2))
    emit("latency from each frame's scheduled send time; ceiling = sessions one dedicated core could relay if "
         "switchd were purely CPU-bound (N × window / switchd CPU s); busy cores = every process on the machine; "
         f"NO (base) = even the direct run missed p99 ≤ {BASELINE_P99_LIMIT_MS:g} ms (machine saturated)")
    cap = r["capacity"]
    above = cap["bounded_above_by"]
    why = ("every tried N held" if above is None else f"fails at {above}"
           + (" where the direct baseline itself was saturated" if cap["limited_by_baseline"] else ""))
    emit(f"Relay (d): capacity = {cap['sessions']} realtime sessions per switchd process ({why}; "
         f"{cap['criterion']}; {len(cap['search_steps'])} bisection step(s))")


def run(mode: str) -> tuple[dict[str, Any], list[str]]:
    return trio.run(run_async, mode)
