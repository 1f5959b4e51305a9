"""switchdb's batch handler as the tests call it: every result as an Outcome (the daemon replies from Results)."""
from __future__ import annotations

from collections.abc import Sequence

from common.wire import OK, Request
from switchdb import usage
from switchdb.db import Connection
from switchdb.service import Outcome, Result, run_batch


def as_outcome(result: Result) -> Outcome:
    return Outcome(OK, (str(result),)) if isinstance(result, int) else result


def handle_batch(conn: Connection, requests: Sequence[Request | usage.Row], now: str) -> list[Outcome]:
    return [as_outcome(result) for result in run_batch(conn, requests, now)]
