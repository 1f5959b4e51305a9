"""The ledger over the wire: the real `switchdb serve` driven over ZeroMQ as switchd drives it, on
both stores. A USD account's replies carry its unit, markup and the price book; its balance is
exact to the nano-USD; a batch beyond the limits is refused once, and the daemon stays up.
"""
from __future__ import annotations

from pathlib import Path

import trio

from common.dbclient import open_db_client
from common.errors import ErrorCode
from common.limits import MAX_REPORT_TOKENS
from common.usage import UsageTotals
from common.wire import MessageType
from switchdb import accounts, prices
from switchdb.db import transaction
from tests.daemons import BIN
from tests.pg import store_kind, store_url  # noqa: F401
from tests.test_switchdb_e2e import env, on_store, refused, store, switchdb  # noqa: F401


def _usd_account(tmp_path: Path) -> tuple[str, str]:
    with store(tmp_path) as conn, transaction(conn):
        account = accounts.create_account(conn, "wire@example.com", usd=30_000_000, markup=12_500)  # $0.03 at 1.25
        key, _ = accounts.create_key(conn, account.id, "wire")
    return account.id, key


async def test_a_usd_account_over_the_wire(tmp_path: Path, on_store: str) -> None:
    account_id, key = _usd_account(tmp_path)
    text = UsageTotals(input_tokens=1000, input_text=1000, output_tokens=100, output_audio=100, reports=1).to_json()
    cost = 1000 * 4000 + 100 * 64000  # 10,400,000 nano-USD at list price
    charged = cost * 12_500 // 10_000  # 13,000,000: exact, no rounding here
    async with switchdb(tmp_path) as d, open_db_client(d.address, 5000) as db:
        fields = await db.request(MessageType.VALIDATE_AND_LOAD, key, "s1")
        assert fields[:5] == (account_id, "30000000", "", "usd", "12500")
        assert prices.book_from_json(fields[5]).models["gpt-realtime"].text_in == 4000
        args = ("b1", account_id, "s1", "openai", "gpt-realtime", text)
        assert await db.request(MessageType.RECORD_USAGE, *args) == (
            str(30_000_000 - charged), "usd", "12500", str(cost))
        assert await db.request(MessageType.RECORD_USAGE, *args) == (  # a retry: counted once
            str(30_000_000 - charged), "usd", "12500", str(cost))
        assert await db.request(MessageType.GET_CREDITS, account_id) == (str(30_000_000 - charged),)

        # The operator changes a price while the daemon runs: the next batch is priced by it.
        with trio.fail_after(30):
            proc = await trio.run_process(
                [str(BIN / "switchdb"), "price", "set", "--model", "gpt-realtime", "--text-in", "8"],
                env=env(tmp_path), cwd=tmp_path, capture_stdout=True, capture_stderr=True, check=False,
            )
        assert proc.returncode == 0, proc.stderr
        cost2 = 1000 * 8000 + 100 * 64000
        after = 30_000_000 - charged - cost2 * 12_500 // 10_000
        reply = await db.request(MessageType.RECORD_USAGE, "b2", account_id, "s1", "openai", "gpt-realtime", text)
        assert reply == (str(after), "usd", "12500", str(cost2))
        assert after < 0
        err = await refused(db, MessageType.VALIDATE_AND_LOAD, key, "s1")  # 402 at connect, as for tokens
        assert err.code == ErrorCode.EXTERNAL_NO_CREDITS and err.fields[:4] == (  # type: ignore[attr-defined]
            account_id, str(after), "", "usd")

        # Beyond the limits: refused for good (switchd does not retry it), nothing recorded, daemon alive.
        for count in (MAX_REPORT_TOKENS + 1, 2**63 - 1):
            big = UsageTotals(input_tokens=count, input_text=count, reports=1).to_json()
            err = await refused(db, MessageType.RECORD_USAGE, f"big{count}", account_id, "s1", "openai", "m", big)
            assert err.code == ErrorCode.INTERNAL_BAD_USAGE
        assert await db.request(MessageType.PING) == ()
        assert await db.request(MessageType.GET_CREDITS, account_id) == (str(after),)

        # A suspended account is refused at connect like a revoked key (401).
        with store(tmp_path) as conn, transaction(conn):
            conn.execute("UPDATE accounts SET status = 'suspended' WHERE id = ?", (account_id,))
        err = await refused(db, MessageType.VALIDATE_AND_LOAD, key, "s1")
        assert err.code == ErrorCode.EXTERNAL_INVALID_AUTH
    assert d.proc.returncode == 0
    with store(tmp_path) as conn:
        rows = conn.execute("SELECT batch_id, cost_nano, charged_nano FROM usage_metrics ORDER BY batch_id").fetchall()
    assert [tuple(r) for r in rows] == [("b1", cost, charged), ("b2", cost2, cost2 * 12_500 // 10_000)]
