"""perf.dbflood sends exactly what switchd would (its frames are built by hand, for speed)."""
from __future__ import annotations

from common.wire import MessageType, encode_request
from perf.dbflood import request_frames


def test_flood_requests_are_ordinary_record_usage() -> None:
    for n in (0, 96, 97, 12345):
        assert request_frames("p-", n, b"acct_1", b'{"input_tokens":1}') == encode_request(
            f"p-{n}", MessageType.RECORD_USAGE, f"p-b{n}", "acct_1", f"flood-session-{n % 97}", "openai",
            "gpt-realtime", '{"input_tokens":1}'
        )
