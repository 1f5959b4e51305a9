"""Usage accumulation: running totals (production) vs a list of per-report objects summed at flush.

Same work on both sides: every report goes through the same validation and attribution
(`UsageTotals.add_response`), every flush produces the same batch JSON (checked), at the same
batch sizes. Batch size 5
is production's BATCH_REPORTS; the larger ones are what piles up while switchdb is away and
the batcher cannot flush.
"""
from __future__ import annotations

import gc
import json
import statistics
import time
import tracemalloc
from dataclasses import fields
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from common.usage import UsageTotals
from perf import frames as fr
from perf.report import emit, ratio, table

Usage = Mapping[str, object]


def running_totals(reports: Sequence[Usage], batch: int) -> list[str]:
    out, totals = [], UsageTotals()
    for usage in reports:
        totals.add_response(usage)
        if totals.reports >= batch:
            out.append(totals.to_json())
            totals = UsageTotals()
    if totals.reports:
        out.append(totals.to_json())
    return out


# The counted fields of a report (the model's name is not a count).
_FIELDS = tuple(f.name for f in fields(UsageTotals) if f.type not in ("str", str))


def _report(usage: Usage) -> tuple[int | float, ...]:
    """One per-report object: every count add_response derives from the block (validated the same way)."""
    one = UsageTotals()
    one.add_response(usage)
    return tuple(getattr(one, name) for name in _FIELDS)


def _sum(pending: list[tuple[int | float, ...]]) -> str:
    t = UsageTotals()
    for r in pending:
        for name, value in zip(_FIELDS, r, strict=True):
            setattr(t, name, getattr(t, name) + value)
    return t.to_json()


def per_report_list(reports: Sequence[Usage], batch: int) -> list[str]:
    out: list[str] = []
    pending: list[tuple[int | float, ...]] = []
    for usage in reports:
        pending.append(_report(usage))
        if len(pending) >= batch:
            out.append(_sum(pending))
            pending = []
    if pending:
        out.append(_sum(pending))
    return out


METHODS: dict[str, Callable[[Sequence[Usage], int], list[str]]] = {
    "running totals": running_totals, "per-report list": per_report_list,
}


def retained_bytes_per_report(reports: Sequence[Usage]) -> dict[str, float]:
    """Memory held between flushes, per pending report (tracemalloc; the usage dicts themselves excluded)."""
    held: dict[str, float] = {}
    for name, make in (("running totals", _hold_totals), ("per-report list", _hold_list)):
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        keep = make(reports)
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        held[name] = (after - before) / len(reports)
        del keep
    return held


def _hold_totals(reports: Sequence[Usage]) -> object:
    totals = UsageTotals()
    for usage in reports:
        totals.add_response(usage)
    return totals


def _hold_list(reports: Sequence[Usage]) -> object:
    return [_report(u) for u in reports]


def run(mode: str) -> tuple[dict[str, Any], list[str]]:
    n, rounds, batches = {"full": (20_000, 7, (5, 100, 1000)), "quick": (5_000, 3, (5, 1000)),
                          "smoke": (200, 1, (5, 100))}[mode]
    # The usage blocks of real response.done frames, parsed once (parsing is not what is compared).
    blocks = [json.loads(f.text)["response"]["usage"] for f in fr.conversation(20, seed=3) if f.kind == "response.done"]
    reports = [blocks[i % len(blocks)] for i in range(n)]
    for batch in batches:
        if running_totals(reports, batch) != per_report_list(reports, batch):
            raise AssertionError(f"the two methods flush different batches at batch size {batch}")
    samples: dict[int, dict[str, list[float]]] = {b: {m: [] for m in METHODS} for b in batches}
    for _ in range(rounds):
        for batch in batches:
            for name, method in METHODS.items():
                gc.collect()
                t0 = time.perf_counter_ns()
                method(reports, batch)
                samples[batch][name].append((time.perf_counter_ns() - t0) / n / 1000)
    best = {b: {m: min(v) for m, v in by.items()} for b, by in samples.items()}
    held = retained_bytes_per_report(reports)
    results = {
        "reports": n, "rounds": rounds,
        "us_per_report": {str(b): v for b, v in best.items()},
        "us_per_report_median_round": {str(b): {m: statistics.median(v) for m, v in by.items()}
                                       for b, by in samples.items()},
        "list_over_totals": {str(b): ratio(v["per-report list"], v["running totals"]) for b, v in best.items()},
        "retained_bytes_per_pending_report": held,
    }
    emit(table(f"Usage accumulation: µs per report incl. flush ({n:,} reports, best of {rounds} rounds)",
               ["reports per flush", "running totals", "per-report list", "list / totals"],
               [[str(b), v["running totals"], v["per-report list"], results["list_over_totals"][str(b)]]
                for b, v in best.items()], digits=3))
    emit(table("Usage accumulation: memory held between flushes", ["method", "bytes per pending report"],
               [[k, v] for k, v in held.items()], digits=1))
    notes = [
        "Both methods validate every count the same way and flush byte-identical batch JSON (checked).",
        "Batch 5 is production's BATCH_REPORTS; larger batches model a switchdb outage.",
        "Running totals hold O(1) memory; the list grows with every pending report.",
    ]
    return results, notes
