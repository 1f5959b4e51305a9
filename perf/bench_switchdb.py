"""switchdb: VALIDATE_AND_LOAD round trip, RECORD_USAGE throughput, and stalls under a write flood.

- VALIDATE_AND_LOAD: sequential requests through the real client (common/dbclient.py, as switchd
  uses it), idle database, p50/p99/max.
- RECORD_USAGE: `perf.dbflood` (a separate, lean pyzmq process) with 1 and with 8 DEALER
  clients, each keeping 64 requests in flight; acknowledged batches per second, and the CPU per
  request of switchdb and of the flood client (both share this machine's cores).
- Stall: switchdb cannot be instrumented from outside, so this measures what a client sees:
  PING round trips (answered by switchdb's reader task on the spot, never queued behind the
  database) every ~1 ms during one more 8-client flood (twice as long, for more samples; the
  probe costs the benchmark process CPU, so the throughput floods run without it) and, with
  the same probe for as long, at idle. The two distributions are compared on the same number
  of samples: the idle one is this machine's own noise.
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
PING_EVERY_S = 0.001
# The stall target is read on this percentile of the PINGs during the 8-client flood (see NOTES).
STALL_PERCENTILE = 99.9
PING_QS = (50, 99, STALL_PERCENTILE)


async def _ping_probe(db: Any, out: list[float], stop: trio.Event) -> None:
    while not stop.is_set():
        t0 = time.perf_counter()
        await db.request(MessageType.PING)
        out.append((time.perf_counter() - t0) * 1000)
        await trio.sleep(PING_EVERY_S)


async def _idle_pings(db: Any, seconds: float) -> list[float]:
    pings: list[float] = []
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_ping_probe, db, pings, stop)
        await trio.sleep(seconds)
        stop.set()
    return pings


def ping_summary(samples: list[float], n: int, threshold_ms: float = 5.0) -> dict[str, float]:
    """Percentiles of the first `n` samples (so two runs compare on equal counts), and how many exceed the threshold."""
    kept = samples[:n]
    out = summarize(kept, PING_QS)
    out[f"over_{threshold_ms:g}ms"] = sum(1 for v in kept if v > threshold_ms)
    return out


async def _flood(stack: procs.Stack, account: str, clients: int, seconds: float, db: Any | None) -> dict[str, Any]:
    """One flood run; with `db`, PINGs probe switchdb while the flood is on."""
    argv = [sys.executable, "-m", "perf.dbflood", "--endpoint", stack.env["ZMQ_SOCKET_PATH"], "--account", account,
            "--clients", str(clients), "--inflight", str(INFLIGHT), "--duration", str(seconds)]
    proc = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                            stdin=subprocess.DEVNULL, cwd=stack.tmp)
    reader = procs.Daemon(proc, "", stack.tmp / "dbflood.log")
    pings: list[float] = []
    stop = trio.Event()
    window = CpuWindow({"switchdb": stack.db.pid, "client": proc.pid, "probe": os.getpid()})
    try:
        with trio.fail_after(seconds + 60):
            line = await reader.readline()
            if line.strip() != "dbflood flooding":
                raise RuntimeError(f"perf.dbflood: {line}")
            window.start()
            async with trio.open_nursery() as nursery:
                if db is not None:
                    nursery.start_soon(_ping_probe, db, pings, stop)
                result = json.loads(await reader.readline())
                stop.set()
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
    if db is not None and cpu.get("probe"):
        result["probe_cpu_pct_of_core"] = cpu["probe"]["pct_of_one_core"]
    result["machine"] = cpu.get("machine")
    result["pings"] = pings
    return result


async def run_async(mode: str) -> tuple[dict[str, Any], list[str]]:
    n_validate, flood_s = PLANS[mode]
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
                stall_s = 2 * flood_s
                idle_window = CpuWindow({"switchdb": stack.db.pid})
                idle_window.start()
                idle_pings = await _idle_pings(db, stall_s)  # as long as the probed flood: about as many samples
                idle_machine = idle_window.stop().get("machine")
                floods = {str(c): await _flood(stack, account, c, flood_s, None) for c in FLOOD_CLIENTS}
                probed = await _flood(stack, account, FLOOD_CLIENTS[-1], stall_s, db)
    n = min(len(idle_pings), len(probed["pings"]))
    probed["ping_ms"] = ping_summary(probed.pop("pings"), n)
    for f in floods.values():
        f.pop("pings")
    validate = summarize(rtts)
    idle = ping_summary(idle_pings, n)
    stall = probed["ping_ms"]
    results = {
        "validate_and_load_ms": validate,
        "record_usage": floods,
        "record_usage_per_s_max": max(f["per_s"] for f in floods.values()),
        "ping_idle_ms": idle,
        "ping_idle_machine": idle_machine,
        "ping_during_flood_ms": stall,
        "probed_flood": {k: v for k, v in probed.items() if k != "ping_ms"},
        "ping_samples_compared": n,
        "stall_percentile": STALL_PERCENTILE,
        "stall_ms": stall[f"p{STALL_PERCENTILE:g}"],
        "idle_stall_ms": idle[f"p{STALL_PERCENTILE:g}"],
        "worst_stall_ms": stall["max"],
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
    q = f"p{STALL_PERCENTILE:g}"
    rows = [["idle", idle["n"], idle["p50"], idle["p99"], idle[q], idle["max"], idle["over_5ms"], None],
            [f"{FLOOD_CLIENTS[-1]}-client flood", stall["n"], stall["p50"], stall["p99"], stall[q], stall["max"],
             stall["over_5ms"], probed["per_s"]]]
    emit(table(f"switchdb: PING round trip (ms), same probe every {PING_EVERY_S * 1000:g} ms for {stall_s:g} s, "
               f"first {n} samples of each", ["", "n", "p50", "p99", q, "max", "> 5 ms", "flood acked/s"], rows,
               digits=3))
    emit(f"stall during the {FLOOD_CLIENTS[-1]}-client flood: {q} {stall[q]:.3f} ms (idle {idle[q]:.3f}); "
         f"max {stall['max']:.3f} ms (idle {idle['max']:.3f}) (client-observed; see notes); the probe took "
         f"{probed.get('probe_cpu_pct_of_core', float('nan')):.0f} % of a core")
    notes = [
        "The stall is client-observed: PING latency (answered by switchdb's reader task without touching "
        "the database), sampled every ~1 ms during an 8-client flood of its own and, with the same probe for as "
        "long, at idle; both are summarised on the same number of samples. It includes the probe's own "
        "scheduling on a shared machine, so it is an upper bound on switchdb's event-loop stall. The throughput "
        "floods run without the probe (it costs the benchmark process a tenth of a core or more).",
        f"The stall target is read on the {q} of the PINGs during the {FLOOD_CLIENTS[-1]}-client flood, not on the "
        "max: with thousands of samples it is the 4th-5th worst, so one or two scheduling hiccups of the VM "
        "(seen at idle too: compare the idle column) do not decide it, while a stall that recurs with the "
        "writes (per batch, per commit, per checkpoint, per garbage collection: once a second or more often, "
        "each covering one or more 1 ms samples) still shows in it. The max is printed beside it.",
        "The flood client is a separate lean pyzmq process on the same cores; its CPU and switchdb's are "
        "reported per acknowledged request, with the machine's other load and steal in the same window. Each "
        "flood uses unique batch ids (no idempotent no-ops).",
        "VALIDATE_AND_LOAD goes through common/dbclient.py, as switchd sends it.",
    ]
    return results, notes


def run(mode: str) -> tuple[dict[str, Any], list[str]]:
    return trio.run(run_async, mode)
