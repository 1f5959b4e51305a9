"""The issue's performance targets, read from this run's results, each marked MET / NOT MET honestly.

A target whose benchmark did not run (or did not reach the load the target names, as in
--quick, or ran where the direct baseline was itself saturated) is NOT MEASURED rather than
guessed.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from perf.bench_relay import PIPELINE_WINDOW, TARGET_SESSIONS, capacity_text
from perf.report import fmt, table

MET, NOT_MET, NOT_MEASURED = "MET", "NOT MET", "NOT MEASURED"
REPORTED = "REPORTED"  # a figure the issue asks to see, with no goal to meet
CPU_PER_MESSAGE_GOAL_US = 25.0


@dataclass(frozen=True)
class Target:
    name: str
    goal: str
    benchmark: str
    read: Callable[[dict[str, Any]], tuple[float | None, str]]  # (value, shown text) from that benchmark's results
    ok: Callable[[float], bool] | None  # None: reported, not judged


def _point_at(relay: dict[str, Any], at_least: int) -> dict[str, Any] | None:
    """The smallest tried N ≥ at_least (the (c) points and the capacity search share the same shape)."""
    points = sorted(relay["realtime"], key=lambda p: p["sessions"])
    return next((p for p in points if p["sessions"] >= at_least), None)


Reading = Callable[[dict[str, Any]], tuple[float | None, str]]


def tls_path(read: Reading) -> Reading:
    """Judge a relay target on the TLS path (production's), and show the plain ws:// path's figure beside it."""
    def both(relay: dict[str, Any]) -> tuple[float | None, str]:
        value, shown = read(relay["tls"])
        plain = relay.get("plain")
        try:
            beside = read(plain)[1] if plain else "not run"
        except (KeyError, TypeError, IndexError):
            beside = "not run"
        return value, f"TLS: {shown} | plain ws://: {beside}"
    return both


def _beside_bare_proxy(r: dict[str, Any]) -> str:
    """The bare Trio TCP proxy's capacity in switchd's place ((e)): what any Trio relay holds here."""
    fc = (r.get("floor") or {}).get("floor_capacity")
    return f"; a bare Trio TCP proxy in its place: {capacity_text(fc)}" if fc else ""


def _capacity(r: dict[str, Any]) -> tuple[float | None, str]:
    cap = r["capacity"]
    shown = capacity_text(cap) + _beside_bare_proxy(r)
    if cap["bounded_above_by"] is None:
        # Every tried N held: the capacity is at least that, which only settles the target if it reached it.
        return (cap["sessions"] if cap["sessions"] >= TARGET_SESSIONS else None), shown
    return cap["sessions"], shown


def _failed_below(r: dict[str, Any]) -> int | None:
    """Where switchd missed its latency limits below TARGET_SESSIONS with the direct baseline within
    its own (latency only grows with load): None if it did not."""
    cap = r.get("capacity") or {}
    above = cap.get("bounded_above_by")
    if above is not None and above < TARGET_SESSIONS and not cap.get("limited_by_baseline"):
        return int(above)
    return None


def _workers(r: dict[str, Any]) -> tuple[float | None, str]:
    """(f): CPU per message of WORKERS processes on one port over one process's, each at the same load."""
    w = r.get("workers")
    if w is None:
        return None, "not run"
    spread = "/".join(map(str, w["sessions_per_worker"]))
    shown = (f"×{fmt(w['ratio_us_per_message'])} ({fmt(w['us_per_relayed_message'])} vs "
             f"{fmt(w['one_process_us_per_relayed_message'])} µs) with {w['workers']} workers at "
             f"{w['sessions_per_process']} sessions each; sessions per worker {spread}; {w['lost']} lost; "
             f"p99 {fmt((w.get('latency_ms') or {}).get('p99'))} ms")
    if w["lost"] or w["connect_failed"] or min(w["sessions_per_worker"]) == 0:
        return float("inf"), shown + " — not every worker served, or frames were lost"
    return w["ratio_us_per_message"], shown


def _added_at(q: str) -> Reading:
    def read(r: dict[str, Any]) -> tuple[float | None, str]:
        p = _point_at(r, TARGET_SESSIONS)
        if p is None:
            return None, f"no run at ≥{TARGET_SESSIONS} sessions"
        v = p["added_ms"][q]
        if not p.get("baseline_ok", True):  # the difference of two saturated runs says nothing about switchd
            failed = _failed_below(r)
            if failed is not None:
                return v, (f"{fmt(v)} ms at {p['sessions']} sessions (direct baseline saturated there; switchd "
                           f"already missed the limits at {failed} sessions with the baseline within them)")
            return None, f"{fmt(v)} ms at {p['sessions']} sessions, but the direct baseline was saturated there"
        return v, f"{fmt(v)} ms at {p['sessions']} sessions"
    return read


def _lost(r: dict[str, Any]) -> tuple[float | None, str]:
    p = _point_at(r, TARGET_SESSIONS)
    if p is None:
        return None, f"no run at ≥{TARGET_SESSIONS} sessions"
    lost = p["lost"]["through"]
    failed = p["connect_failed"]["through"]
    if lost is None:
        return None, "no echo"
    return lost + failed, f"{lost} frames lost, {failed} connects failed at {p['sessions']} sessions"


def _cpu_per_msg(r: dict[str, Any]) -> tuple[float | None, str]:
    # Judged at the load the capacity target names: per-message cost falls as load rises (more
    # messages per wake-up), so the other points are shown beside it. Below that load it is shown, not judged.
    p = _point_at(r, TARGET_SESSIONS)
    shown_p = p or (r["realtime"][-1] if r["realtime"] else None)
    if shown_p is None or shown_p["switchd_us_per_relayed_message"] is None:
        return None, "not measured"
    judged = p is not None and p.get("baseline_ok", True)
    v = shown_p["switchd_us_per_relayed_message"]
    split = ""
    if shown_p.get("switchd_user_us_per_relayed_message") is not None:
        split = (f" = {fmt(shown_p['switchd_user_us_per_relayed_message'])} user + "
                 f"{fmt(shown_p['switchd_system_us_per_relayed_message'])} sys")
    others = ", ".join(f"{fmt(q['switchd_us_per_relayed_message'], 0)} at {q['sessions']}" for q in r["realtime"]
                       if q is not shown_p and q["sessions"] > 1 and q["switchd_us_per_relayed_message"] is not None)
    shown = (f"{fmt(v)} µs{split} at {shown_p['sessions']} sessions ({fmt(shown_p['switchd_cpu_pct_of_core'], 0)}% "
             f"of a core)" + (f"; {others}" if others else ""))
    # A saturated machine batches more messages per wake-up: its lower cost per message is not a
    # pass, but a cost above the goal even so is a miss.
    if p is not None and not p.get("baseline_ok", True):
        shown += " — the direct baseline was saturated there"
        judged = v > CPU_PER_MESSAGE_GOAL_US
    elif p is not None and not p.get("holds", True):
        shown += " — while that point missed its latency limits"
    fl = r.get("floor")
    if fl:
        shown += f"; in its place at {fl['sessions']} sessions: " + ", ".join(
            f"{name} {fmt(x['us_per_relayed_message'])}"
            + (f" ({fmt(x['system_us_per_relayed_message'])} sys)" if x.get("system_us_per_relayed_message") else "")
            for name, x in (("bare Trio TCP proxy", fl["floor"]), ("blocking threads TCP proxy", fl["threads"]),
                            ("asyncio + websockets relay", fl["websockets"])))
    return (v if judged else None), shown


def _added_rtt(r: dict[str, Any]) -> tuple[float | None, str]:
    """switchd's added median round trip over the asyncio + websockets relay's, measured in the same rounds."""
    c = r["closed_loop"]
    ws = c["websockets_relay"]
    direct, through = c["p50_ms"]["direct"] * 1000, c["p50_ms"]["through"] * 1000
    shown = (f"switchd +{fmt(c['added_median_rtt_us'], 0)} µs vs websockets relay +{fmt(ws['added_p50_us'], 0)} µs "
             f"(×{fmt(c['added_over_websockets_relay'], 3)}; p50 direct {fmt(direct, 0)}, "
             f"switchd {fmt(through, 0)} µs)")
    if ws["added_p50_us"] is None or ws["added_p50_us"] <= 0:
        return None, shown + " — the relay added nothing measurable, no bar"
    return c["added_over_websockets_relay"], shown


def _pipelined(r: dict[str, Any]) -> tuple[float | None, str]:
    f = r["pipelined"]
    fps = f["frames_per_s"]
    relays = f.get("relays") or {}
    ws = (relays.get("websockets") or {}).get("ratio_to_direct")
    return fps["ratio"], (f"×{fmt(fps['ratio'])} ({fmt(fps['through'])} vs {fmt(fps['direct'])} frames/s direct, "
                          f"{f['window']} in flight; websockets relay ×{fmt(ws)})")


def _memory(key: str) -> Reading:
    def read(r: dict[str, Any]) -> tuple[float | None, str]:
        m = r.get("memory")
        if not m or m.get(key) is None:
            return None, "not measured"
        return m[key], f"{fmt(m[key] / 1024, 1)} KiB per session ({m['sessions']} sessions, switchd's RSS)"
    return read


def _overload(r: dict[str, Any]) -> tuple[float | None, str]:
    """1 when graceful (bench_overload's criterion, at its reference storm rate), else 0; the figures in the text."""
    ref = r["storms"][0]
    st = ref["storm"]["storm"]
    if st is None:
        return None, "the storm did not run"
    lb, ls = ref["baseline"]["latency_ms"], ref["storm"]["latency_ms"]
    shown = (f"{ref['rate']:g}/s: {st['over_capacity_503']:,}/{st['attempts']:,} got 503 (p99 "
             f"{fmt((st['rejection_ms'] or {}).get('p99'))} ms); held p99 {fmt(lb.get('p99'))} → "
             f"{fmt(ls.get('p99'))} ms, {ref['storm']['lost']} lost, {ref['storm']['dropped']} dropped")
    shown += "".join(f"; {s['rate']:g}/s: held p99 {s['added_ms']['p99']:+.1f} ms" for s in r["storms"][1:])
    failed = [k for k, ok in ref["checks"].items() if not ok]
    if failed:
        shown += f" — failed: {', '.join(failed)}"
    return (1.0 if r["graceful"] else 0.0), shown


def _switchdb_stall(r: dict[str, Any]) -> tuple[float | None, str]:
    """The PING percentile under the steady writes (bench_switchdb says why), read beside idle and saturation."""
    q = f"p{r['stall_percentile']:g}"
    return r["stall_ms"], (f"{q} {fmt(r['stall_ms'], 2)} ms, max {fmt(r['worst_stall_ms'], 2)} at "
                           f"{r['stall_rate']:,} batches/s (idle {fmt(r['idle_stall_ms'], 2)} / "
                           f"{fmt(r['ping_idle_ms']['max'], 2)}; at saturation {fmt(r['saturated_stall_ms'], 2)} / "
                           f"{fmt(r['ping_saturated_ms']['max'], 2)})")


TARGETS: list[Target] = [
    # The relay's targets are judged on the TLS path (production's provider is always wss://); the
    # plain ws:// path's figure is shown beside each.
    Target("added median RTT over direct, switchd / asyncio + websockets relay (1 session, closed loop, 1 KB)",
           "< 1×", "relay", tls_path(_added_rtt), lambda v: v < 1),
    Target(f"pipelined throughput (1 session, {PIPELINE_WINDOW} in flight, 1 KB) through switchd / direct",
           "≥ 0.8×", "relay", tls_path(_pipelined), lambda v: v >= 0.8),
    Target("realtime sessions per switchd process (p99 added ≤ 5 ms, p99.9 ≤ 20 ms, 0 lost)", "≥ 150", "relay",
           tls_path(_capacity), lambda v: v >= TARGET_SESSIONS),
    Target(f"p99 added latency at {TARGET_SESSIONS} realtime sessions", "≤ 5 ms", "relay", tls_path(_added_at("p99")),
           lambda v: v <= 5),
    Target(f"p99.9 added latency at {TARGET_SESSIONS} realtime sessions", "≤ 20 ms", "relay",
           tls_path(_added_at("p99.9")), lambda v: v <= 20),
    Target(f"frames lost at {TARGET_SESSIONS} realtime sessions", "0", "relay", tls_path(_lost), lambda v: v == 0),
    # Near-linear: each added core (one more worker) brings at least 80 % of a whole process's capacity.
    Target("worker processes sharing the port: CPU per message vs one process at the same per-process load",
           "≤ 1.25×", "relay", tls_path(_workers), lambda v: v <= 1.25),
    Target(f"switchd CPU per relayed message at {TARGET_SESSIONS} realtime sessions",
           f"≤ {CPU_PER_MESSAGE_GOAL_US:g} µs", "relay", tls_path(_cpu_per_msg), lambda v: v <= CPU_PER_MESSAGE_GOAL_US),
    # Reported, not judged: the bound is the connection layer's stated limit, not a benchmark goal.
    Target("switchd memory per idle session", "reported", "relay", tls_path(_memory("idle_bytes_per_session")),
           None),
    Target("switchd memory per session holding a maximal partial frame", "reported", "relay",
           tls_path(_memory("partial_frame_bytes_per_session")), None),
    Target("overload graceful: new sessions past MAX_SESSIONS vs the held ones", "all 503, held p99 +≤ 5 ms",
           "overload", _overload, lambda v: v == 1),
    Target("metering cost on an audio frame", "≤ 1 µs", "metering",
           lambda r: (r["audio_delta_production_us"], f"{fmt(r['audio_delta_production_us'], 3)} µs"),
           lambda v: v <= 1),
    Target("metering vs json.loads of every frame (realistic mix)", "≥ 5× cheaper", "metering",
           lambda r: (r["json_over_production"], f"{fmt(r['json_over_production'])}× cheaper"), lambda v: v >= 5),
    Target("switchdb VALIDATE_AND_LOAD p99", "≤ 2 ms", "switchdb",
           lambda r: (r["validate_and_load_ms"]["p99"], f"{fmt(r['validate_and_load_ms']['p99'], 3)} ms"),
           lambda v: v <= 2),
    Target("switchdb RECORD_USAGE throughput", "≥ 20,000/s", "switchdb",
           lambda r: (r["record_usage_per_s_max"], f"{fmt(r['record_usage_per_s_max'])}/s"), lambda v: v >= 20_000),
    Target("switchdb event-loop stall while writing 10,000 batches/s (client-observed PING p99.9)", "≤ 5 ms",
           "switchdb", _switchdb_stall, lambda v: v <= 5),
    Target("switchdb on PostgreSQL: VALIDATE_AND_LOAD p99", "≤ 5 ms", "switchdb",
           lambda r: (r["postgres"]["validate_and_load_ms"]["p99"],
                      f"{fmt(r['postgres']['validate_and_load_ms']['p99'], 3)} ms"),
           lambda v: v <= 5),
    Target("switchdb on PostgreSQL: RECORD_USAGE batches/s with 2 replicas", "≥ 5,000/s", "switchdb",
           lambda r: (r["postgres"]["record_usage_2_replicas"]["per_s"],
                      f"{fmt(r['postgres']['record_usage_2_replicas']['per_s'])}/s"),
           lambda v: v >= 5_000),
]


def evaluate(results: dict[str, dict[str, Any] | None]) -> list[dict[str, Any]]:
    rows = []
    for t in TARGETS:
        r = results.get(t.benchmark)
        value, shown, status = None, "benchmark not run", NOT_MEASURED
        if r is not None:
            try:
                value, shown = t.read(r)
            except (KeyError, TypeError, IndexError) as exc:
                shown = f"unreadable result ({exc!r})"
            if value is not None and value == value:
                status = REPORTED if t.ok is None else MET if t.ok(value) else NOT_MET
        rows.append({"target": t.name, "goal": t.goal, "measured": shown, "value": value, "status": status,
                     "benchmark": t.benchmark})
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    return table("SUMMARY: performance targets", ["target", "goal", "measured", "status"],
                 [[r["target"], r["goal"], r["measured"], r["status"]] for r in rows])
