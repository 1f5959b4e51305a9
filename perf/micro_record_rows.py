"""Micro-benchmark: switchdb.usage.record_rows on SQLite, a flood's rows (token account), and its pricing.

    .venv/bin/python -m perf.micro_record_rows [GROUP] [ROUNDS]
        CPU time (process time, so a shared machine's waits do not count) per row of
        record_rows in groups of GROUP rows a transaction, of `_costs` (pricing, the book
        included) and of `prices.load_book` alone; best and median of 5 runs of ROUNDS groups.
    valgrind --tool=callgrind .venv/bin/python -m perf.micro_record_rows --fixed GROUPS
        Fixed work for an instruction count: GROUPS transactions of 8 rows after the setup; the
        difference between GROUPS and 0 is the instructions of GROUPS record_rows.

Not part of `make perf`: the judged RECORD_USAGE throughput is perf.bench_switchdb's.
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

from common.usage import UsageTotals
from switchdb import accounts, db, prices, service, usage
from switchdb.usage import Row

USAGE_JSON = UsageTotals(input_tokens=120, output_tokens=40, input_audio=100, input_text=20, output_audio=30,
                         output_text=10, reports=5).to_json()


def store() -> tuple[db.Connection, str]:
    conn = db.open_database(os.path.join(tempfile.mkdtemp(), "bench.db"), None)
    db.migrate(conn)
    with db.transaction(conn):
        return conn, accounts.create_account(conn, "bench@example.com", "Free", 10**15).id


def groups(account_id: str, count: int, size: int, first: int = 0) -> list[list[Row]]:
    return [
        [service.read_row(f"b{first + g}-{i}", account_id, f"s{i % 8}", "openai", "gpt-realtime", USAGE_JSON)
         for i in range(size)]
        for g in range(count)
    ]


def main(argv: list[str]) -> None:
    if argv[:1] == ["--fixed"]:
        conn, account_id = store()
        now = db.utc_now()
        for rows in groups(account_id, int(argv[1]), 8):
            conn.execute("BEGIN IMMEDIATE")
            usage.record_rows(conn, rows, now)
            conn.execute("COMMIT")
        return
    size = int(argv[0]) if argv else 8
    rounds = int(argv[1]) if len(argv) > 1 else 1000
    conn, account_id = store()
    now = db.utc_now()
    made = 0

    def run(label: str, body: Callable[[list[Row]], object], begin: str = "BEGIN") -> None:
        nonlocal made
        times = []
        for _ in range(5):
            work = groups(account_id, rounds, size, made)
            made += rounds
            started = time.process_time()
            for rows in work:
                conn.execute(begin)
                body(rows)
                conn.execute("COMMIT")
            times.append((time.process_time() - started) / (rounds * size) * 1e6)
        best = min(times)
        print(f"{label:<30} best {best:6.2f} µs/row  median {statistics.median(times):6.2f}"
              f"  ({1e6 / best:,.0f} rows/s)", flush=True)

    run(f"record_rows, {size} rows a group", lambda rows: usage.record_rows(conn, rows, now), "BEGIN IMMEDIATE")
    run("_costs (load_book included)", lambda rows: usage._costs(conn, rows))
    run("load_book", lambda rows: prices.load_book(conn))


if __name__ == "__main__":
    main(sys.argv[1:])
