"""perf.dbflood sends exactly what switchd would (its frames are built by hand, for speed)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import trio

from common.wire import MessageType, encode_request
from perf.dbflood import request_frames

REPO = Path(__file__).resolve().parent.parent


def test_flood_requests_are_ordinary_record_usage() -> None:
    for n in (0, 96, 97, 12345):
        assert request_frames("p-", n, b"acct_1", b'{"input_tokens":1}') == encode_request(
            f"p-{n}", MessageType.RECORD_USAGE, f"p-b{n}", "acct_1", f"flood-session-{n % 97}", "openai",
            "gpt-realtime", '{"input_tokens":1}'
        )


async def test_paced_flood_sends_no_more_than_its_rate(tmp_path: Path) -> None:
    """`--rate` bounds what is sent (never a timed assertion: an upper bound the pacing guarantees)."""
    from perf.procs import open_stack

    async with open_stack(tmp_path) as stack:
        account, _ = await stack.account()
        done = await trio.run_process(
            [sys.executable, "-m", "perf.dbflood", "--endpoint", stack.env["ZMQ_SOCKET_PATH"], "--account", account,
             "--clients", "3", "--inflight", "8", "--duration", "0.5", "--rate", "400"],
            capture_stdout=True, capture_stderr=True, cwd=REPO)
    result = json.loads(done.stdout.decode().splitlines()[-1])
    assert result["statuses"] == {"OK": result["ok"]} and result["unanswered"] == 0
    assert 0 < result["acked_in_window"] <= 400 * 0.5 + 1
