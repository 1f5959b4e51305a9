"""What the usage journal costs per usage report: `Ledger.add` with and without the journal.

`python -m perf.bench_journal [--reports N] [--dir PATH]`: meters N provider `response.done`
reports through a session's ledger, taking a batch every 5 as a session does, three ways: no
journal (metering only), JOURNAL_FSYNC=off (a write per report and per batch) and
JOURNAL_FSYNC=batch (the same, plus an fsync per batch), on PATH's file system (a temporary
directory by default), interleaved in rounds so a noisy neighbour hits all alike. Prints the
microseconds per report (median and p99 of `add`, and the mean over add + take_batch) as JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from switchd.billing import Ledger
from switchd.journal import Journal

EVENT = {
    "type": "response.done",
    "response": {"usage": {
        "total_tokens": 333, "input_tokens": 120, "output_tokens": 213,
        "input_token_details": {"text_tokens": 20, "audio_tokens": 100, "image_tokens": 0, "cached_tokens": 0},
        "output_token_details": {"text_tokens": 13, "audio_tokens": 200},
    }},
}


def per_report(ledger: Ledger, count: int) -> tuple[list[float], float]:
    """Each `add`'s time, and the total with the batches taken (where JOURNAL_FSYNC=batch pays)."""
    times = []
    started = time.perf_counter()
    for i in range(count):
        start = time.perf_counter()
        ledger.add(EVENT)
        times.append(time.perf_counter() - start)
        if i % 5 == 4:
            ledger.take_batch()
    return times, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reports", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    samples: dict[str, list[float]] = {"no journal": [], "fsync off": [], "fsync batch": []}
    totals = dict.fromkeys(samples, 0.0)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for _ in range(args.rounds):
            for name in samples:
                journal = None if name == "no journal" else Journal.create(Path(tmp), fsync=name == "fsync batch")
                ledger = Ledger("acct", "sess", "gpt-realtime", 10**12, journal=journal)
                times, total = per_report(ledger, args.reports // args.rounds)
                samples[name] += times
                totals[name] += total
                if journal is not None:
                    journal.close(delete=True)
        fs = Path(tmp).resolve()
    result = {
        name: {"add_median_us": round(statistics.median(t) * 1e6, 1),
               "add_p99_us": round(statistics.quantiles(t, n=100)[98] * 1e6, 1),
               "with_batches_mean_us": round(totals[name] / len(t) * 1e6, 1), "reports": len(t)}
        for name, t in samples.items()
    }
    print(json.dumps({"dir": str(fs.parent), **result}, indent=1))


if __name__ == "__main__":
    main()
