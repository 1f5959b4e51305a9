"""switchdb: VALIDATE_AND_LOAD round trip, RECORD_USAGE throughput, and stalls while it writes.

- VALIDATE_AND_LOAD: sequential requests through the real client (common/dbclient.py, as switchd
  uses it), idle database, p50/p99/max.
- RECORD_USAGE: `perf.dbflood` (a separate, lean pyzmq process) with 1 and with 8 DEALER
  clients, each keeping 64 requests in flight; acknowledged batches per second, and the CPU per
  request of switchdb and of the flood client (both share this machine's cores).
- PostgreSQL (DB_URL, a throwaway server from the `pgserver` wheel) beside SQLite, same run:
  VALIDATE_AND_LOAD p50/p99 through one replica, and RECORD_USAGE acknowledged batches/s with 1
  and with 2 replicas (one perf.dbflood process per replica, the clients split between them).
- Stall: what a client sees, PING round trips (answered by switchdb's reader task on the spot,
  never queued behind the database) every 1 ms from `perf.dbping`, a lean blocking process, for
  as long in three conditions: idle (this machine's own noise), 8 clients writing a steady
  STALL_RATE batches/s (the judged one), and 8 clients writing as fast as switchdb acknowledges
  (saturation: switchdb, its worker thread, the flood client and the probe then want more than
  the two cores, so the kernel's time slices show in it too). The three are summarised on the
  same number of samples.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from common.dbclient import open_db_client
from common.wire import MessageType
from perf import procs
from perf.cpu import CpuWindow
from perf.report import emit, summarize, table

PLANS = {"full": (3000, 5.0), "quick": (600, 2.0), "smoke": (30, 0.5)}  # (VALIDATE_AND_LOADs, flood seconds)
FLOOD_CLIENTS = (1, 8)
INFLIGHT = 64
PING_EVERY_MS = 1.0
# The steady write load the stall is judged under: half the throughput the issue asks switchdb
# for, some thirty times what a thousand realtime sessions flush (one batch per response).
STALL_RATE = 10_000
# The stall target is read on this percentile of the PINGs during the steady writes (see NOTES).
STALL_PERCENTILE = 99.9
PING_QS = (50, 99, STALL_PERCENTILE)


async def _probe(stack: procs.Stack, seconds: float) -> dict[str, Any]:
    """perf.dbping for `seconds`: its round trips (ms) and how many went unanswered."""
    argv = [sys.executable, "-m", "perf.dbping", "--endpoint", stack.env["ZMQ_SOCKET_PATH"],
            "--every", str(PING_EVERY_MS), "--duration", str(seconds)]
    with trio.fail_after(seconds + 60):
        done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, stdin=subprocess.DEVNULL,
                                      cwd=stack.tmp, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"perf.dbping failed:\n{done.stderr.decode()[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def ping_summary(samples: list[float], n: int, threshold_ms: float = 5.0) -> dict[str, float]:
    """Percentiles of the first `n` samples (so two runs compare on equal counts), and how many exceed the threshold."""
    kept = samples[:n]
    out = summarize(kept, PING_QS)
    out[f"over_{threshold_ms:g}ms"] = sum(1 for v in kept if v > threshold_ms)
    return out


async def _flood(stack: procs.Stack, account: str, clients: int, seconds: float, *, rate: float | None = None,
                 probe_s: float | None = None) -> dict[str, Any]:
    """One flood run (at `rate` batches/s, or as fast as acknowledged); with `probe_s`, perf.dbping
    probes switchdb for that long while the flood is on (the flood then lasts a little longer)."""
    if probe_s is not None:
        seconds = probe_s + 0.5
    argv = [sys.executable, "-m", "perf.dbflood", "--endpoint", stack.env["ZMQ_SOCKET_PATH"], "--account", account,
            "--clients", str(clients), "--inflight", str(INFLIGHT), "--duration", str(seconds)]
    if rate is not None:
        argv += ["--rate", str(rate)]
    proc = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                            stdin=subprocess.DEVNULL, cwd=stack.tmp)
    reader = procs.Daemon(proc, "", stack.tmp / "dbflood.log")
    probe: dict[str, Any] | None = None
    window = CpuWindow({"switchdb": stack.db.pid, "client": proc.pid})
    try:
        with trio.fail_after(seconds + 60):
            line = await reader.readline()
            if line.strip() != "dbflood flooding":
                raise RuntimeError(f"perf.dbflood: {line}")
            window.start()
            if probe_s is not None:
                probe = await _probe(stack, probe_s)
            result = json.loads(await reader.readline())
            cpu = window.stop()  # before the client exits: its /proc entry goes with it
            await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    span = cpu["machine"]["span_s"] if cpu.get("machine") else seconds
    acked = max(1, result["ok"])
    if cpu.get("switchdb"):
        result["switchdb_cpu_pct_of_core"] = 100 * cpu["switchdb"]["cpu_s"] / span
        result["switchdb_us_per_request"] = 1e6 * cpu["switchdb"]["cpu_s"] / acked
    result["client_cpu_pct_of_core"] = 100 * result["client_cpu_s"] / span
    result["client_us_per_request"] = 1e6 * result["client_cpu_s"] / acked
    result["machine"] = cpu.get("machine")
    result["probe"] = probe
    return result


async def run_async(mode: str) -> tuple[dict[str, Any], list[str]]:
    n_validate, flood_s = PLANS[mode]
    stall_s = 2 * flood_s  # twice the throughput floods: more samples for the percentile
    with tempfile.TemporaryDirectory(prefix="perf-switchdb-") as tmp_name:
        tmp = Path(tmp_name)
        async with procs.open_stack(tmp) as stack:
            account, key = await stack.account()
            async with open_db_client(stack.env["ZMQ_SOCKET_PATH"], 5000) as db:
                await db.request(MessageType.PING)
                rtts = []
                for i in range(n_validate):
                    t0 = time.perf_counter()
                    await db.request(MessageType.VALIDATE_AND_LOAD, key, f"perf-validate-{i % 50}")
                    rtts.append((time.perf_counter() - t0) * 1000)
            idle_window = CpuWindow({"switchdb": stack.db.pid})
            idle_window.start()
            idle_probe = await _probe(stack, stall_s)
            idle_machine = idle_window.stop().get("machine")
            floods = {str(c): await _flood(stack, account, c, flood_s) for c in FLOOD_CLIENTS}
            clients = FLOOD_CLIENTS[-1]
            steady = await _flood(stack, account, clients, stall_s, rate=STALL_RATE, probe_s=stall_s)
            saturated = await _flood(stack, account, clients, stall_s, probe_s=stall_s)
    probes = {"idle": idle_probe, "steady": steady.pop("probe"), "saturated": saturated.pop("probe")}
    n = min(len(p["rtt_ms"]) for p in probes.values())
    pings = {name: ping_summary(p["rtt_ms"], n) for name, p in probes.items()}
    unanswered = {name: p["unanswered"] for name, p in probes.items()}
    validate = summarize(rtts)
    q = f"p{STALL_PERCENTILE:g}"
    results = {
        "validate_and_load_ms": validate,
        "record_usage": floods,
        "record_usage_per_s_max": max(f["per_s"] for f in floods.values()),
        "ping_idle_ms": pings["idle"],
        "ping_idle_machine": idle_machine,
        "ping_steady_ms": pings["steady"],
        "ping_saturated_ms": pings["saturated"],
        "ping_unanswered": unanswered,
        "steady_flood": steady,
        "saturated_flood": saturated,
        "stall_rate": STALL_RATE,
        "ping_samples_compared": n,
        "stall_percentile": STALL_PERCENTILE,
        "stall_ms": pings["steady"][q],
        "idle_stall_ms": pings["idle"][q],
        "saturated_stall_ms": pings["saturated"][q],
        "worst_stall_ms": pings["steady"]["max"],
        "inflight_per_client": INFLIGHT,
    }
    emit(table(f"switchdb: VALIDATE_AND_LOAD round trip, {n_validate:,} sequential (ms)",
               ["p50", "p90", "p99", "max"], [[validate["p50"], validate["p90"], validate["p99"], validate["max"]]],
               digits=3))
    emit(table(f"switchdb: RECORD_USAGE, {INFLIGHT} in flight per client, {flood_s:g} s",
               ["clients", "acked/s", "errors", "switchdb µs/req", "switchdb %", "client µs/req", "client %",
                "other load (cores)", "steal (cores)"],
               [[c, f["per_s"], sum(v for k, v in f["statuses"].items() if k != "OK") + f["unanswered"],
                 f.get("switchdb_us_per_request"), f.get("switchdb_cpu_pct_of_core"), f["client_us_per_request"],
                 f["client_cpu_pct_of_core"], (f["machine"] or {}).get("others_cores"),
                 (f["machine"] or {}).get("steal_cores")] for c, f in floods.items()], digits=2))
    rows = [[name, p["n"], p["p50"], p["p99"], p[q], p["max"], p["over_5ms"], unanswered[name], flood]
            for (name, p), flood in zip(pings.items(), (None, steady["per_s"], saturated["per_s"]))]
    emit(table(f"switchdb: PING round trip (ms) from perf.dbping every {PING_EVERY_MS:g} ms for {stall_s:g} s, "
               f"first {n} samples of each; {clients} clients writing",
               ["writes", "n", "p50", "p99", q, "max", "> 5 ms", "unanswered", "acked/s"], rows, digits=3))
    emit(f"stall while writing {STALL_RATE:,} batches/s: {q} {pings['steady'][q]:.3f} ms, max "
         f"{pings['steady']['max']:.3f} (idle {pings['idle'][q]:.3f} / {pings['idle']['max']:.3f}; at saturation "
         f"{pings['saturated'][q]:.3f} / {pings['saturated']['max']:.3f})")
    notes = [
        "The stall is client-observed: PING latency (answered by switchdb's reader task without touching the "
        "database) from perf.dbping, a blocking pyzmq process with no event loop, every 1 ms for as long at idle, "
        f"under {clients} clients writing a steady {STALL_RATE:,} batches/s, and under {clients} clients writing as "
        "fast as switchdb acknowledges; all three are summarised on the same number of samples. It includes the "
        "probe's own scheduling, so it is an upper bound on switchdb's event-loop stall.",
        f"The stall target is judged under the steady writes: {STALL_RATE:,} batches/s is half the throughput the "
        "issue asks of switchdb and some thirty times what a thousand realtime sessions flush. At saturation "
        "switchdb's event loop and worker thread, the flood client and the probe want more than this machine's two "
        "cores, and the kernel's time slices (milliseconds each) show in the PINGs; that figure is printed beside.",
        f"It is read on the {q}, not on the max: with thousands of samples it is the 4th-10th worst, so one or two "
        "scheduling hiccups of the VM (seen at idle too: compare the idle row) do not decide it, while a stall "
        "that recurs with the writes (per batch, per commit, per checkpoint, per garbage collection: once a second "
        "or more often, each covering one or more 1 ms samples) still shows in it. The max is printed beside it.",
        "The flood client is a separate lean pyzmq process on the same cores; its CPU and switchdb's are "
        "reported per acknowledged request, with the machine's other load and steal in the same window. Each "
        "flood uses unique batch ids (no idempotent no-ops).",
        "VALIDATE_AND_LOAD goes through common/dbclient.py, as switchd sends it.",
    ]
    return results, notes


async def _postgres(tmp: Path, n_validate: int, flood_s: float) -> dict[str, Any]:
    """VALIDATE_AND_LOAD through one replica and RECORD_USAGE floods through 1 and 2 replicas, on PostgreSQL."""
    import warnings

    import pgserver  # a test/perf extra: PostgreSQL binaries in a wheel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        server = pgserver.get_server(tmp / "pg", cleanup_mode="stop")
        url = server.get_uri()
    try:
        env = procs.base_env(DB_URL=url, LOG_LEVEL=procs.DAEMON_LOG_LEVEL)
        results: dict[str, Any] = {}
        async with procs.daemon(["switchdb", "serve"], {**env, "ZMQ_SOCKET_PATH": f"ipc://{tmp}/pg0.sock"},
                                tmp / "pg0.log", cwd=tmp) as first:
            stack = procs.Stack(tmp, {**env, "ZMQ_SOCKET_PATH": first.address}, first)
            account, key = await stack.account()
            async with open_db_client(first.address, 5000) as db:
                await db.request(MessageType.PING)
                rtts = []
                for i in range(n_validate):
                    t0 = time.perf_counter()
                    await db.request(MessageType.VALIDATE_AND_LOAD, key, f"perf-validate-{i % 50}")
                    rtts.append((time.perf_counter() - t0) * 1000)
            results["validate_and_load_ms"] = summarize(rtts)
            results["record_usage_1_replica"] = await _pg_flood(tmp, [first.address], account, flood_s)
            async with procs.daemon(["switchdb", "serve"], {**env, "ZMQ_SOCKET_PATH": f"ipc://{tmp}/pg1.sock"},
                                    tmp / "pg1.log", cwd=tmp) as second:
                results["record_usage_2_replicas"] = await _pg_flood(
                    tmp, [first.address, second.address], account, flood_s)
        return results
    finally:
        server.cleanup()


async def _pg_flood(tmp: Path, endpoints: list[str], account: str, seconds: float) -> dict[str, Any]:
    """perf.dbflood, one process per replica (FLOOD_CLIENTS[-1] clients split between them), at once."""
    clients = max(1, FLOOD_CLIENTS[-1] // len(endpoints))
    results: list[dict[str, Any]] = []

    async def one(endpoint: str) -> None:
        argv = [sys.executable, "-m", "perf.dbflood", "--endpoint", endpoint, "--account", account,
                "--clients", str(clients), "--inflight", str(INFLIGHT), "--duration", str(seconds)]
        with trio.fail_after(seconds + 60):
            done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, stdin=subprocess.DEVNULL,
                                          cwd=tmp, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"perf.dbflood failed:\n{done.stderr.decode()[-3000:]}")
        results.append(json.loads(done.stdout.decode().splitlines()[-1]))

    async with trio.open_nursery() as nursery:
        for endpoint in endpoints:
            nursery.start_soon(one, endpoint)
    return {
        "replicas": len(endpoints),
        "clients": clients * len(endpoints),
        "per_s": sum(r["per_s"] for r in results),
        "errors": sum(sum(v for k, v in r["statuses"].items() if k != "OK") + r["unanswered"] for r in results),
    }


def run(mode: str) -> tuple[dict[str, Any], list[str]]:
    results, notes = trio.run(run_async, mode)
    n_validate, flood_s = PLANS[mode]
    with tempfile.TemporaryDirectory(prefix="perf-switchdb-pg-") as tmp_name:
        pg = trio.run(_postgres, Path(tmp_name), n_validate, flood_s)
    results["postgres"] = pg
    v = pg["validate_and_load_ms"]
    sqlite_v = results["validate_and_load_ms"]
    emit(table("switchdb: SQLite vs PostgreSQL (same run)",
               ["store", "replicas", "V&L p50 ms", "V&L p99 ms", "RECORD_USAGE acked/s"],
               [["SQLite", 1, sqlite_v["p50"], sqlite_v["p99"],
                 results["record_usage"][str(FLOOD_CLIENTS[-1])]["per_s"]],
                ["PostgreSQL", 1, v["p50"], v["p99"], pg["record_usage_1_replica"]["per_s"]],
                ["PostgreSQL", 2, None, None, pg["record_usage_2_replicas"]["per_s"]]], digits=3))
    notes.append(
        "PostgreSQL: a local server from the pgserver wheel on a Unix socket, on the same two cores as the "
        f"replicas and the flood clients; {FLOOD_CLIENTS[-1]} flood clients in all, split between the replicas. "
        "SQLite is one file behind one daemon (a second replica is a PostgreSQL topology only).")
    return results, notes
