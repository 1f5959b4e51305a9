"""Pure parts of switchd: handshake parsing, upstream policy, spool format, ledger arithmetic."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.errors import ErrorCode, SwitchError
from common.usage import UsageTotals
from switchd.billing import Batch, Ledger, Outbox, parse_spool, spool_lines
from switchd.events import error_event
from switchd.handshake import parse_client_request, redact, upstream_url
from switchd.upstream import BACKOFF_CAP_S, CloseAction, backoff, close_action


def test_key_sources_in_order() -> None:
    p = parse_client_request("/v1/realtime?rs_key=k1&rs_sessid=s", [(b"authorization", b"Bearer k2")], ())
    assert p.key == "k1"
    p = parse_client_request("/v1/realtime?rs_sessid=s", [(b"Authorization", b"Bearer k2")], ())
    assert p.key == "k2" and p.subprotocol is None
    p = parse_client_request("/?rs_sessid=s&model=m", [], ("realtime", "openai-insecure-api-key.k3", "openai-beta.realtime-v1"))
    assert (p.key, p.subprotocol, p.model) == ("k3", "realtime", "m")
    assert "k3" not in repr(p)


@pytest.mark.parametrize(
    "path,code",
    [
        ("/?rs_sessid=s", ErrorCode.EXTERNAL_MISSING_PARAMS),
        ("/?rs_key=k", ErrorCode.EXTERNAL_MISSING_PARAMS),
        ("/?rs_key=k&rs_sessid=", ErrorCode.EXTERNAL_MISSING_PARAMS),
        ("/?rs_key=k&rs_sessid=a%20b", ErrorCode.EXTERNAL_BAD_PARAMS),
        ("/?rs_key=k&rs_sessid=" + "a" * 129, ErrorCode.EXTERNAL_BAD_PARAMS),
        ("/?rs_key=k%0A&rs_sessid=s", ErrorCode.EXTERNAL_BAD_PARAMS),
        ("/?rs_key=k&rs_sessid=s&rs_api=GEMINI", ErrorCode.EXTERNAL_BAD_PARAMS),
    ],
)
def test_bad_requests(path: str, code: ErrorCode) -> None:
    with pytest.raises(SwitchError) as exc:
        parse_client_request(path, [], ())
    assert exc.value.code == code


@given(st.text(), st.lists(st.tuples(st.binary(max_size=20), st.binary(max_size=40)), max_size=4),
       st.lists(st.text(max_size=30), max_size=3))
def test_parse_never_raises_anything_but_switch_error(path: str, headers: list, protocols: list) -> None:
    try:
        p = parse_client_request(path, headers, protocols)
    except SwitchError as exc:
        assert exc.code in (ErrorCode.EXTERNAL_MISSING_PARAMS, ErrorCode.EXTERNAL_BAD_PARAMS)
    else:
        assert 1 <= len(p.session_id) <= 128


def test_redact_and_model_passthrough() -> None:
    assert "secret" not in redact("/v1/realtime?rs_key=secret&rs_sessid=s")
    assert upstream_url("wss://h/v1/realtime?model=gpt-realtime", "mini").endswith("model=mini")
    assert upstream_url("wss://h/v1/realtime?model=gpt-realtime", None) == "wss://h/v1/realtime?model=gpt-realtime"


def test_close_policy() -> None:
    assert close_action(1000) is CloseAction.END
    assert close_action(3000) is CloseAction.FATAL and close_action(4000) is CloseAction.FATAL
    for code in (1001, 1006, 1011, 1012, None):
        assert close_action(code) is CloseAction.RETRY
    rng = random.Random(1)
    assert all(0 <= backoff(n, rng) <= BACKOFF_CAP_S for n in range(1, 30))


def test_error_event_shape() -> None:
    event = json.loads(error_event(ErrorCode.EXTERNAL_NO_CREDITS, "no credits"))
    assert event["type"] == "error" and event["error"]["type"] == "insufficient_credits"
    assert event["error"]["code"] == "EXTERNAL_NO_CREDITS"


batches = st.builds(
    Batch, st.text(), st.text(), st.text(), st.text(), st.text(),
    st.builds(lambda n: UsageTotals(input_tokens=n, reports=1).to_json(), st.integers(0, 10**9)),
)


@given(st.lists(batches, max_size=10))
def test_spool_round_trips(items: list[Batch]) -> None:
    assert parse_spool(spool_lines(items)) == items


@given(st.text())
def test_spool_parser_only_raises_value_error(text: str) -> None:
    try:
        parse_spool(text)
    except ValueError:
        pass


def test_unreadable_spool_is_kept_aside(tmp_path: Path) -> None:
    good = Batch("b1", "a", "s", "openai", "m", UsageTotals(input_tokens=5, reports=1).to_json())
    (tmp_path / "usage-1.jsonl").write_text(spool_lines([good]))
    (tmp_path / "usage-2.jsonl").write_text("garbage\n")
    outbox = Outbox(tmp_path)
    assert outbox.load_spool() == 1
    assert list(outbox.unacked) == ["b1"]
    assert (tmp_path / "usage-2.bad").exists() and not (tmp_path / "usage-2.jsonl").exists()


async def test_ledger_keeps_running_totals_and_balance() -> None:
    ledger = Ledger("a", "s", "m", credits=1000)
    tokens = ledger.totals.add_response({"input_tokens": 100, "output_tokens": 50})
    ledger.added(tokens)
    assert ledger.credits == 850 and ledger.wake.is_set()
    batch = ledger.take_batch()
    assert batch is not None and UsageTotals.from_json(batch.usage_json).tokens == 150
    ledger.added(ledger.totals.add_response({"input_tokens": 10, "output_tokens": 0}))
    ledger.acknowledged(800)  # switchdb's balance after the batch; 10 tokens since are still pending
    assert ledger.credits == 790
    assert ledger.take_batch() is not None and ledger.take_batch() is None
