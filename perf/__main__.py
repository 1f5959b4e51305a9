"""`python -m perf [--quick | --smoke] [--only NAME ...] [--results-dir DIR]`: the benchmark suite.

Runs each benchmark, prints its tables, writes `<results-dir>/<name>.json` (machine, versions,
commit, results), then prints and writes the summary of the issue's targets, and last renders
every result file of the directory as Markdown (perf.results): perf/RESULTS.md for the default
directory, `<results-dir>/RESULTS.md` for any other. A benchmark that fails is reported (and the
exit status is 1) but does not stop the others.
"""
from __future__ import annotations

import argparse
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from perf import bench_connect, bench_metering, bench_overload, bench_relay, bench_switchdb, bench_usage, targets
from perf import results as markdown_results
from perf.report import DEFAULT_RESULTS, emit, envelope, write_json

Bench = Callable[[str], tuple[dict[str, Any], list[str]]]
# Cheap in-process benchmarks first; the relay (the long one, many processes) last.
BENCHMARKS: dict[str, Bench] = {
    "metering": bench_metering.run,
    "usage": bench_usage.run,
    "switchdb": bench_switchdb.run,
    "connect": bench_connect.run,
    "relay": bench_relay.run,
    "overload": bench_overload.run,  # MAX_SESSIONS reached: a storm of new sessions vs the held ones
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m perf", description=__doc__.split("\n\n")[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller, shorter runs (under 2 minutes)")
    size.add_argument("--smoke", action="store_true", help="tiny runs that only check everything works (tests)")
    p.add_argument("--only", action="append", choices=sorted(BENCHMARKS), metavar="NAME",
                   help=f"run only this benchmark (repeatable): {', '.join(BENCHMARKS)}")
    p.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    chosen = [n for n in BENCHMARKS if not args.only or n in args.only]
    results: dict[str, dict[str, Any] | None] = {}
    failed = []
    suite_started = time.time()
    for name in chosen:
        emit(f"\n=== {name} ({mode}) ===")
        started = time.time()
        try:
            data, notes = BENCHMARKS[name](mode)
        except Exception:
            failed.append(name)
            emit(f"{name} FAILED:\n{traceback.format_exc()}")
            write_json(args.results_dir, name, envelope(name, mode, started, {"error": traceback.format_exc()}, []))
            results[name] = None
            continue
        results[name] = data
        path = write_json(args.results_dir, name, envelope(name, mode, started, data, notes))
        emit(f"({name}: {time.time() - started:.1f} s, written to {path})")
    rows = targets.evaluate(results)
    emit(targets.render(rows))
    summary_notes = [
        "Measured on a shared 2-core machine: the load generator, the peer, switchd and switchdb compete for "
        "the cores, together with anything else running (see each relay row's cpu.machine).",
        "NOT MEASURED: the benchmark was not run, or this mode does not reach the load the target names.",
    ]
    write_json(args.results_dir, "summary",
               envelope("summary", mode, suite_started, {"targets": rows, "failed": failed}, summary_notes))
    markdown = markdown_results.write(args.results_dir, markdown_results.DEFAULT_OUT
                                      if args.results_dir == DEFAULT_RESULTS else args.results_dir / "RESULTS.md")
    emit(f"\nsuite: {time.time() - suite_started:.1f} s; results in {args.results_dir}, {markdown}"
         + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
