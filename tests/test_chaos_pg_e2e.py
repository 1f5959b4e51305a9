"""The chaos run on the PostgreSQL store: switchdb replicas and the PostgreSQL server itself killed
with SIGKILL and restarted, besides switchd workers and upstream drops; nothing lost, nothing
billed twice. A correctness check, not a timing one."""
from __future__ import annotations

from pathlib import Path

from perf.chaos import Config, run


async def test_chaos_postgres_loses_nothing_bills_nothing_twice(tmp_path: Path) -> None:
    results = await run(Config(sessions=3, duration=20, fault_every=0.8, seed=11, postgres=True, replicas=3),
                        tmp_path)
    assert results["store"] == "postgresql"
    assert set(results["faults"]) == {"switchd worker", "switchdb replica", "postgres", "upstream drop"}
    assert results["responses_seen"] > 0 and results["tokens_seen"] > 0
    assert results["tokens_lost"] == 0
    assert results["tokens_billed_twice"] == 0
    assert results["balances_exact"] and results["journals_left"] == []
    # The server really died unclean each time: every restart began with crash recovery.
    log = (tmp_path / "postgres.log").read_text()
    assert log.count("automatic recovery in progress") == results["faults"]["postgres"]
