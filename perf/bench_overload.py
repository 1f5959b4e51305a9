"""Overload: past MAX_SESSIONS, new sessions get 503 EXTERNAL_OVER_CAPACITY while the sessions held go on unharmed.

switchdb and switchd run as processes, switchd with MAX_SESSIONS = M. perf.engine (as in the
relay benchmark: one epoll process playing the clients and the provider-like peer) holds M
realtime sessions — switchd is full — at the relay benchmark's realtime rate (50 appends/s of
20 ms audio each; the peer answers each with an audio delta, a transcript delta every 10, a
response.done every 3 s). Each storm rate R is measured against a baseline run just before it,
back to back on the same switchd:

- baseline: the M sessions alone;
- storm: the same M sessions while perf.storm (another lean epoll process) asks for new
  sessions with the same valid key at R attempts/s, open loop, every answer counted by status.

Reported: the sessions' latency p50/p99/p99.9 in both runs and the difference, frames lost and
sessions dropped (both must be 0), the storm's answers (all must be `503
EXTERNAL_OVER_CAPACITY`: any 101 is a session accepted past MAX_SESSIONS), how fast a 503
comes (connect() to complete answer), switchd's CPU in both runs, and switchd's own counters
(sessions accepted and rejected) as a cross-check. The first storm rate is the target's
reference; higher ones show where a storm starts to cost the held sessions. A last run (the
rejection cost) holds the M sessions nearly idle (1 append/s) under a fast storm, so switchd's
CPU is nearly all rejections: µs per 503, and 503s per second one core could answer.

Timing: the storm must cover the engine's measured window but end before the engine closes its
sessions (a freed slot then rightly takes a new session: a 101 that is no failure). The engine
says nothing until it exits, so its schedule start is found from switchd's /metrics: the first
relayed client frame falls between two polls POLL_S apart (the baseline runs are polled alike).
The storm starts then (the warmup lets it ramp up) and stops STOP_EARLY_S before the window's
earliest possible end. A 101 answered before that end is a session past MAX_SESSIONS; one
answered later (an attempt still queued in switchd when the held sessions closed) is reported
apart. The JSON says how much of the window the storm covered.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import trio

from perf import procs
from perf.bench_relay import (DISTURBED_OTHERS_CORES, DISTURBED_STEAL_CORES, DRAIN_S, Env, engine, open_env, peer_socket,
                              quiesce)
from perf.report import emit, ratio, table

OVER_CAPACITY = "503 EXTERNAL_OVER_CAPACITY"
P99_ADDED_LIMIT_MS = 5.0  # the relay capacity's own limit: a storm may not cost the held sessions more than that
POLL_S = 0.01
# Time for the last attempts to be answered while every held session is still open; the window's
# last STOP_EARLY_S (plus the poll's uncertainty) goes without storm.
STOP_EARLY_S = 0.1
UNCOVERED_SLACK_S = 0.1
TRIGGER_TIMEOUT_S = 60.0
REALTIME_APPENDS_PER_S = 50.0  # the relay benchmark's realtime rate: 20 ms of audio per append
# The rejection-cost run holds its sessions nearly idle, so switchd's CPU is the storm's.
IDLE_APPENDS_PER_S = 1.0
FRAMES_IN = 'switch_frames_relayed_total{direction="client_to_upstream"}'


@dataclass(frozen=True)
class Plan:
    sessions: int  # MAX_SESSIONS, and the realtime sessions that fill it
    storm_rates: tuple[float, ...]  # the first is the target's reference rate; the others show how far it holds
    duration: float
    warmup: float
    cost_rate: float  # the rejection-cost run: held sessions nearly idle, a storm at this rate
    cost_duration: float
    retry_disturbed: bool = True  # a second try costs a pair's time: full only


# MAX_SESSIONS is set where an operator would set it: at or below the relay's realtime capacity on
# this machine (the relay benchmark measured 34 sessions), so the baseline is a healthy switch.
PLANS = {
    "full": Plan(50, (100.0, 500.0), 6.0, 1.5, 1000.0, 4.0),
    "quick": Plan(20, (100.0,), 4.0, 1.0, 1000.0, 2.0, retry_disturbed=False),  # stays under 20 s
    "smoke": Plan(3, (50.0,), 0.8, 0.4, 100.0, 0.8, retry_disturbed=False),
}


async def metrics(switchd: procs.Daemon) -> dict[str, float]:
    return procs.metric_values(await procs.http_get(switchd.word_after("metrics") + "/metrics"))


def _storm_argv(env: Env, rate: float, tag: str, budget: float) -> list[str]:
    return [sys.executable, "-m", "perf.storm", "--url", f"{env.switchd.address}/v1/realtime", "--key", env.key,
            "--session-prefix", tag, "--rate", f"{rate:g}", "--duration", f"{budget:g}", "--control-stdin",
            "--json"]


async def _trigger(env: Env, plan: Plan, before: dict[str, float], go_fd: int | None, timeline: dict[str, Any]
                   ) -> None:
    """Find the engine's schedule start from switchd's counters; run the storm (if any) over its window.

    The poll that first sees a relayed client frame bounds the start from above, the poll before
    it (which saw none) from below. The lower bound is the safe one for everything that must
    happen before the engine closes its sessions: stopping the storm, and judging a 101.
    """
    try:
        previous = time.monotonic()
        with trio.move_on_after(TRIGGER_TIMEOUT_S) as waited:
            while True:
                asked = time.monotonic()
                values = await metrics(env.switchd)
                if values.get(FRAMES_IN, 0) > before.get(FRAMES_IN, 0):
                    break
                previous = asked
                await trio.sleep(POLL_S)
        if waited.cancelled_caught:
            # No frame relayed: the engine's own result says why; the storm never starts.
            timeline["storm_skipped"] = "the engine's schedule never started"
            return
        seen = time.monotonic()
        timeline["schedule_start_monotonic"] = [previous, seen]  # the engine's first frame fell in between
        timeline["sessions_open_at_start"] = int(values.get("switch_sessions_open", 0))
        # The window by its earliest possible start: its end bounds when the held sessions may begin to close.
        timeline["window_monotonic"] = [previous + plan.warmup, previous + plan.warmup + plan.duration]
        if go_fd is None:
            return
        if timeline["sessions_open_at_start"] < plan.sessions:
            # switchd is not full: a storm would rightly get sessions, which says nothing about overload.
            timeline["storm_skipped"] = f"only {timeline['sessions_open_at_start']} of {plan.sessions} sessions open"
            return
        os.write(go_fd, b"go\n")
        await trio.sleep(max(0.0, timeline["window_monotonic"][1] - STOP_EARLY_S - time.monotonic()))
    finally:
        if go_fd is not None:
            os.close(go_fd)  # end of input stops the storm (or, before "go", ends it with no attempt)


async def phase(env: Env, plan: Plan, tmp: Path, tag: str, storm_rate: float | None,
                append_rate: float = REALTIME_APPENDS_PER_S) -> dict[str, Any]:
    """M sessions (append_rate appends/s each) through a full switchd; with a storm at storm_rate/s if given."""
    await quiesce(env.switchd)
    before = await metrics(env.switchd)
    timeline: dict[str, Any] = {}
    storm: dict[str, Any] | None = None
    args = ["--sessions", str(plan.sessions), "--duration", str(plan.duration), "--warmup", str(plan.warmup),
            "--rate", f"{append_rate:g}", "--frame-ms", "20", "--connect-concurrency", "32", "--drain", DRAIN_S,
            *env.through(tag), "--watch", f"switchd={env.switchd.pid}", "--watch", f"switchdb={env.stack.db.pid}"]
    async with AsyncExitStack() as stack:
        go_fd: int | None = None
        proc: trio.Process | None = None
        if storm_rate is not None:
            # Started (and imported) before the engine, so it waits on its stdin ready to go at once.
            read_fd, go_fd = os.pipe()
            out = stack.enter_context(open(tmp / f"{tag}.storm.json", "wb"))
            err = stack.enter_context(open(tmp / f"{tag}.storm.log", "wb"))
            budget = plan.warmup + plan.duration + 5
            proc = await trio.lowlevel.open_process(_storm_argv(env, storm_rate, tag, budget), stdin=read_fd,
                                                    stdout=out, stderr=err)
            os.close(read_fd)
            args += ["--watch", f"storm={proc.pid}"]
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_trigger, env, plan, before, go_fd, timeline)
                go_fd = None  # the trigger owns (and closes) it now
                run = await engine(env, *args)
                nursery.cancel_scope.cancel()  # the trigger, if the engine ended before it did
        finally:
            if go_fd is not None:
                os.close(go_fd)
            if proc is not None:
                with trio.move_on_after(30):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
        if proc is not None:
            if proc.returncode != 0:
                raise RuntimeError(f"perf.storm failed:\n{(tmp / f'{tag}.storm.log').read_text()[-3000:]}")
            storm = json.loads((tmp / f"{tag}.storm.json").read_text())
    await quiesce(env.switchd)
    after = await metrics(env.switchd)
    return _summarize_phase(plan, run, storm, before, after, timeline)


def _delta(after: dict[str, float], before: dict[str, float], name: str) -> int:
    return int(after.get(name, 0) - before.get(name, 0))


def _summarize_phase(plan: Plan, run: dict[str, Any], storm: dict[str, Any] | None, before: dict[str, float],
                     after: dict[str, float], timeline: dict[str, Any]) -> dict[str, Any]:
    cpu = run["cpu"]
    # A held session ended by the server: a close frame before ours, or the connection cut.
    dropped = sum(run["close_codes"].values()) + run["errors"].get("closed by server", 0)
    out: dict[str, Any] = {
        "sessions_connected": run["sessions_connected"],
        "connect_failed": run["connect_failed"],
        "latency_ms": run["latency_ms"] or {},
        "lost": run["lost"],
        "dropped": dropped,
        "errors": run["errors"],
        "close_codes": run["close_codes"],
        "send_lag_ms_p99": (run["send_lag_ms"] or {}).get("p99"),
        "switchd_cpu_pct_of_core": (cpu.get("switchd") or {}).get("pct_of_one_core"),
        "switchd_cpu_s": (cpu.get("switchd") or {}).get("cpu_s"),
        "engine_cpu_pct_of_core": (cpu.get("engine") or {}).get("pct_of_one_core"),
        "storm_cpu_pct_of_core": (cpu.get("storm") or {}).get("pct_of_one_core"),
        "machine": cpu.get("machine"),
        # switchd's own counters over the phase: every session it accepted and every handshake it refused.
        "switchd_sessions_accepted": _delta(after, before, "switch_sessions_total"),
        "switchd_handshakes_rejected": _delta(after, before, "switch_sessions_rejected_total"),
        "timeline": timeline,
        "storm": None,
    }
    if storm is not None:
        outcomes = storm["outcomes"]
        rejected_ok = outcomes.get(OVER_CAPACITY, 0)
        window = timeline.get("window_monotonic")
        covered = uncovered = None
        # A 101 answered before the window's earliest end came while every held session was open: a
        # session past MAX_SESSIONS. One answered later may have taken a slot the engine had just
        # closed (an attempt still waiting in switchd's accept queue): reported, not judged.
        while_full = len(storm["accepted_monotonic"])
        if window and storm["monotonic_last_start"] is not None:
            span = max(0.0, min(storm["monotonic_last_start"], window[1]) - max(storm["monotonic_start"], window[0]))
            covered, uncovered = span / (window[1] - window[0]), (window[1] - window[0]) - span
            while_full = sum(1 for t in storm["accepted_monotonic"] if t < window[1])
        out["storm"] = {
            "rate": storm["config"]["rate"],
            "rate_achieved": storm["rate_achieved"],
            "attempts": storm["attempts"],
            "outcomes": outcomes,
            "over_capacity_503": rejected_ok,
            "accepted": storm["accepted"],  # 101
            "accepted_while_full": while_full,  # 101 while every held session was open: past MAX_SESSIONS
            "accepted_after_close_began": storm["accepted"] - while_full,
            "answers_after_window": (storm["monotonic_last_answer"] or 0) > (window or [0, float("inf")])[1],
            "other": storm["attempts"] - rejected_ok - storm["accepted"],  # other statuses, errors, timeouts
            "rejection_ms": storm["answer_ms_by_outcome"].get(OVER_CAPACITY),
            "start_lag_ms_p99": storm["start_lag_ms"].get("p99"),
            "max_inflight_seen": storm["max_inflight_seen"],
            "cpu": storm["cpu"],
            "covered_window_fraction": covered,
            "uncovered_window_s": uncovered,
        }
    return out


def _compare(plan: Plan, base: dict[str, Any], storm: dict[str, Any]) -> dict[str, Any]:
    """One storm rate: the storm run against the baseline just before it."""
    lb, ls = base["latency_ms"], storm["latency_ms"]
    added = {q: ls.get(q, float("nan")) - lb.get(q, float("nan")) for q in ("p50", "p99", "p99.9")}
    s = storm["storm"]
    extra_cpu_s = None
    us_per_rejection = None
    if base["switchd_cpu_s"] is not None and storm["switchd_cpu_s"] is not None and s:
        extra_cpu_s = storm["switchd_cpu_s"] - base["switchd_cpu_s"]
        # Attempts inside the engine's window (the CPU sample's span): the storm's achieved rate over it.
        in_window = (s["rate_achieved"] or 0) * plan.duration * (s["covered_window_fraction"] or 0)
        us_per_rejection = extra_cpu_s / in_window * 1e6 if in_window else None
    checks = {
        # By design it stops STOP_EARLY_S before the window's end; more than that uncovered means it started late.
        "storm ran over the window": bool(s and s["attempts"] > 0 and s["uncovered_window_s"] is not None
                                          and s["uncovered_window_s"] <= STOP_EARLY_S + UNCOVERED_SLACK_S),
        "every held session connected": storm["sessions_connected"] == plan.sessions == base["sessions_connected"],
        "no session accepted past MAX_SESSIONS": bool(s and s["accepted_while_full"] == 0),
        # Errors, timeouts or another status; a 101 after the held sessions began to close is no failure.
        "every other attempt answered 503 EXTERNAL_OVER_CAPACITY": bool(s and s["other"] == 0),
        # switchd's own count: the held sessions and whatever the storm saw accepted, nothing unseen.
        "switchd's accepted count agrees": bool(
            s and storm["switchd_sessions_accepted"] == plan.sessions + s["accepted"]),
        "0 frames lost": storm["lost"] == 0 and base["lost"] == 0,
        "0 held sessions dropped": storm["dropped"] == 0 and base["dropped"] == 0,
        f"p99 added by the storm ≤ {P99_ADDED_LIMIT_MS:g} ms": added["p99"] <= P99_ADDED_LIMIT_MS,
    }
    return {
        "rate": s["rate"] if s else None,
        "added_ms": added,
        "p99_ratio": ratio(ls.get("p99", float("nan")), lb.get("p99", float("nan"))),
        "switchd_extra_cpu_pct_of_core": (storm["switchd_cpu_pct_of_core"] or 0)
        - (base["switchd_cpu_pct_of_core"] or 0),
        "switchd_extra_cpu_s": extra_cpu_s,
        "switchd_us_per_rejection": us_per_rejection,
        "checks": checks,
        "graceful": all(checks.values()),
        "baseline": base,
        "storm": storm,
    }


def _disturbed(*phases: dict[str, Any]) -> bool:
    """Other users' work or the hypervisor took enough of the machine to matter (the relay benchmark's rule)."""
    return any((p["machine"] or {}).get("others_cores", 0) > DISTURBED_OTHERS_CORES
               or (p["machine"] or {}).get("steal_cores", 0) > DISTURBED_STEAL_CORES for p in phases)


async def storm_pair(env: Env, plan: Plan, tmp: Path, rate: float, retry: bool) -> dict[str, Any]:
    """Baseline then storm, back to back; re-measured once (if `retry`) if it failed while the machine was disturbed."""
    attempts = []
    for attempt in range(2 if retry else 1):
        tag = f"r{rate:g}-{attempt}"
        base = await phase(env, plan, tmp, f"base-{tag}", None)
        with_storm = await phase(env, plan, tmp, f"storm-{tag}", rate)
        pair = _compare(plan, base, with_storm)
        pair["disturbed"] = _disturbed(base, with_storm)
        if pair["graceful"] or not pair["disturbed"]:
            break
        attempts.append(pair)
    pair["disturbed_attempts"] = [{k: a[k] for k in ("added_ms", "checks", "graceful")}
                                  | {"machine": [a["baseline"]["machine"], a["storm"]["machine"]]}
                                  for a in attempts if a is not pair]
    return pair


async def rejection_cost(env: Env, plan: Plan, tmp: Path) -> dict[str, Any]:
    """What a 503 costs switchd when rejecting is nearly all it does: held sessions idle, a fast storm."""
    cost_plan = replace(plan, duration=plan.cost_duration)
    p = await phase(env, cost_plan, tmp, "cost", plan.cost_rate, append_rate=IDLE_APPENDS_PER_S)
    s = p["storm"] or {}
    in_window = (s.get("rate_achieved") or 0) * cost_plan.duration * (s.get("covered_window_fraction") or 0)
    cpu_s = p["switchd_cpu_s"]
    return {
        "rate": plan.cost_rate,
        "held_sessions": plan.sessions,
        "held_appends_per_s": IDLE_APPENDS_PER_S,
        "switchd_cpu_pct_of_core": p["switchd_cpu_pct_of_core"],
        # The held sessions' few frames included: at 1 append/s they cost well under 1 % of this.
        "switchd_us_per_rejection": cpu_s / in_window * 1e6 if cpu_s is not None and in_window else None,
        "rejections_per_s_per_core": in_window / cpu_s if cpu_s else None,
        "phase": p,
    }


async def run_async(mode: str) -> tuple[dict[str, Any], list[str]]:
    plan = PLANS[mode]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="perf-overload-") as tmp_name, peer_socket() as peer:
        tmp = Path(tmp_name)
        async with open_env(tmp, peer, MAX_SESSIONS=str(plan.sessions)) as env:
            # As in the relay's (c): switchd on a core of its own, the storm and the held load on the rest.
            with procs.dedicated_core(env.switchd.pid, env.stack.db.pid) as placement:
                # Only the reference rate is judged, so only it is worth a second try (the full run stays ~1 minute).
                storms = [await storm_pair(env, plan, tmp, rate, plan.retry_disturbed and i == 0)
                          for i, rate in enumerate(plan.storm_rates)]
                cost = await rejection_cost(env, plan, tmp)
    reference = storms[0]
    cost_storm = cost["phase"]["storm"] or {}
    results = {
        "max_sessions": plan.sessions,
        "realtime": {"appends_per_s": REALTIME_APPENDS_PER_S, "frame_ms": 20},
        "reference_rate": reference["rate"],
        "storms": storms,
        "rejection_cost": cost,
        # The target: graceful at the reference rate, and no session past MAX_SESSIONS in any run.
        "graceful": bool(reference["graceful"] and all(s["checks"]["no session accepted past MAX_SESSIONS"]
                                                        for s in storms)
                         and cost_storm.get("accepted_while_full") == 0),
        "graceful_by_rate": {f"{s['rate']:g}": s["graceful"] for s in storms},
        "placement": placement,
        "criterion": f"at {reference['rate']:g} new sessions/s against a full switchd: no session accepted while "
                     "every held session was open, every other extra attempt answered 503 EXTERNAL_OVER_CAPACITY "
                     "(no other status, no error or timeout), switchd's own count of accepted sessions agreeing; "
                     f"0 frames lost and 0 held sessions dropped; the held sessions' p99 at most "
                     f"{P99_ADDED_LIMIT_MS:g} ms above the baseline run just before (the relay capacity's own limit); "
                     f"the storm over the whole measured window but its last {STOP_EARLY_S:g} s. Higher rates are "
                     "reported, not judged (except that no run may accept a session past MAX_SESSIONS).",
        "plan": plan.__dict__,
        "elapsed_s": time.monotonic() - started,
    }
    _print(results)
    notes = [
        f"switchd runs with MAX_SESSIONS={plan.sessions}; perf.engine holds that many realtime sessions (50 × 20 ms "
        "appends/s each, the relay benchmark's realtime traffic) and measures their round trips from each frame's "
        "scheduled send time; perf.storm asks for new sessions (same valid key) at a fixed rate, open loop.",
        "Each storm run is compared with a baseline run of the same sessions just before it, on the same switchd; at "
        "the reference rate, a pair that failed while other users' work or steal disturbed the machine is measured "
        "a second time (the first stays in disturbed_attempts).",
        "Rejection time: the storm's connect() to the complete 503 answer, loopback.",
        "switchd µs per rejection: in the rejection-cost run, switchd's CPU over the storm attempts in its window "
        "(held sessions at 1 append/s); in a storm pair, (CPU with storm − without) / attempts, as noisy as two "
        "CPU samples.",
        "The engine, the storm, switchd and switchdb share this machine's cores with whatever else runs "
        "(see machine.others_cores).",
    ]
    return results, notes


def _row(name: str, p: dict[str, Any], added_p99: float | None, verdict: str | None) -> list[Any]:
    st = p["storm"] or {}
    rej = st.get("rejection_ms") or {}
    m = p["machine"] or {}
    return [name, p["latency_ms"].get("p50"), p["latency_ms"].get("p99"), p["latency_ms"].get("p99.9"), added_p99,
            p["lost"], p["dropped"], st.get("attempts"), st.get("over_capacity_503"), st.get("accepted_while_full"),
            st.get("accepted_after_close_began"), st.get("other"), rej.get("p50"), rej.get("p99"),
            p["switchd_cpu_pct_of_core"], p["storm_cpu_pct_of_core"], m.get("busy_cores"), m.get("others_cores"),
            verdict]


def _print(r: dict[str, Any]) -> None:
    rows = []
    for s in r["storms"]:
        verdict = ("yes" if s["graceful"] else "NO") + (" (2nd try)" if s["disturbed_attempts"] else "") \
            + (" *" if s["disturbed"] else "")
        rows.append(_row("baseline", s["baseline"], None, None))
        rows.append(_row(f"storm {s['rate']:g}/s", s["storm"], s["added_ms"]["p99"], verdict))
    cost = r["rejection_cost"]
    rows.append(_row(f"cost {cost['rate']:g}/s, held idle", cost["phase"], None, None))
    emit(table(f"Overload: {r['max_sessions']} sessions held at MAX_SESSIONS={r['max_sessions']}, new sessions "
               "asked for at R/s — ms, CPU % of one core",
               ["run", "held p50", "held p99", "held p99.9", "+p99", "lost", "dropped", "attempts", "503", "101 full",
                "101 late", "other", "503 p50", "503 p99", "switchd %", "storm %", "busy cores", "others", "graceful"],
               rows, digits=2))
    emit("held = the sessions switchd holds, 50 × 20 ms appends/s each (1/s in the cost run): round trip from each "
         "frame's scheduled send; +p99 = storm run − the baseline just before; 101 full = sessions accepted while "
         "every held session was open (past MAX_SESSIONS); 101 late = accepted after the held sessions began to "
         "close (attempts still queued in switchd); other = any other status, error or timeout; 503 p50/p99 = "
         "connect() to the complete 503; busy cores = the whole machine, others = processes not watched (other "
         f"users' work); * = others > {DISTURBED_OTHERS_CORES:g} or steal > {DISTURBED_STEAL_CORES:g} cores")
    for s in r["storms"]:
        failed = [k for k, ok in s["checks"].items() if not ok]
        emit(f"storm {s['rate']:g}/s: switchd +{s['switchd_extra_cpu_pct_of_core']:.1f} % of a core "
             f"(≈ {s['switchd_us_per_rejection'] or float('nan'):.0f} µs per rejection); "
             + ("graceful" if s["graceful"] else f"NOT graceful: {'; '.join(failed)}"))
    emit(f"rejection cost: {cost['switchd_us_per_rejection'] or float('nan'):.0f} µs of switchd CPU per 503 at "
         f"{cost['rate']:g}/s ({cost['rejections_per_s_per_core'] or float('nan'):.0f} rejections/s per core)")
    emit(f"overload graceful: {'yes' if r['graceful'] else 'NO'} — criterion: {r['criterion']}")


def run(mode: str) -> tuple[dict[str, Any], list[str]]:
    return trio.run(run_async, mode)

