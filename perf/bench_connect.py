"""Connect: WebSocket upgrade → first server event (session.created), through switchd vs direct to the sim.

Through switchd that span holds the client upgrade, VALIDATE_AND_LOAD on switchdb, switchd's
own upstream connect and the forwarded session.created; direct it is the sim's upgrade and
session.created alone, so "added" is what a client waits for the switch. Connects are
sequential (one at a time), from a separate load-generator process, alternating direct and
through in rounds; every through connect uses a new session id.
"""
from __future__ import annotations

import tempfile
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import trio

from perf import procs
from perf.bench_relay import load, quiesce
from perf.report import emit, percentile, ratio, table

PLANS = {"full": (4, 75), "quick": (2, 25), "smoke": (1, 3)}  # (rounds, connects per round per side)


async def run_async(mode: str) -> tuple[dict[str, Any], list[str]]:
    rounds, per_round = PLANS[mode]
    samples: dict[str, list[int]] = {"direct": [], "through": []}
    upgrade: dict[str, list[float]] = {"direct": [], "through": []}
    errors: dict[str, dict[str, int]] = {"direct": {}, "through": {}}
    with tempfile.TemporaryDirectory(prefix="perf-connect-") as tmp_name:
        tmp = Path(tmp_name)
        async with AsyncExitStack() as cm:
            stack = await cm.enter_async_context(procs.open_stack(tmp))
            _, key = await stack.account()
            sim = await cm.enter_async_context(procs.sim(tmp))
            switchd = await cm.enter_async_context(stack.switchd(f"{sim.address}/v1/realtime?model=gpt-realtime"))
            common = ["--pattern", "connect", "--count", str(per_round), "--samples"]
            for r in range(rounds):
                for side, args in (("direct", ["--url", f"{sim.address}/v1/realtime?model=gpt-realtime"]),
                                   ("through", ["--url", f"{switchd.address}/v1/realtime", "--key", key,
                                                "--session-prefix", f"connect{r}"])):
                    result = await load(*args, *common)
                    samples[side] += result["first_event_us_samples"]
                    upgrade[side].append(result["connect_ms"]["p50"])
                    for k, v in result["errors"].items():
                        errors[side][k] = errors[side].get(k, 0) + v
                    await quiesce(switchd)
    out: dict[str, Any] = {"connects_per_side": rounds * per_round, "rounds": rounds, "errors": errors}
    for q in (50, 99):
        d = percentile(sorted(samples["direct"]), q) / 1000
        t = percentile(sorted(samples["through"]), q) / 1000
        out[f"first_event_p{q}_ms"] = {"direct": d, "through": t, "added": t - d, "ratio": ratio(t, d)}
    out["upgrade_p50_ms_per_round"] = upgrade
    emit(table(f"Connect: upgrade → first server event, {rounds * per_round} sequential connects per side (ms)",
               ["percentile", "direct to sim", "through switchd", "added", "ratio"],
               [[f"p{q}", out[f"first_event_p{q}_ms"]["direct"], out[f"first_event_p{q}_ms"]["through"],
                 out[f"first_event_p{q}_ms"]["added"], out[f"first_event_p{q}_ms"]["ratio"]] for q in (50, 99)],
               digits=3))
    notes = ["Through switchd includes VALIDATE_AND_LOAD and switchd's own upstream connect to the sim.",
             "Sequential connects from a separate perf.load process; direct and through alternate per round."]
    return out, notes


def run(mode: str) -> tuple[dict[str, Any], list[str]]:
    return trio.run(run_async, mode)
