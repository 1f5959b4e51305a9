"""`switchdb copy`: an encrypted SQLite deployment moved into PostgreSQL, then used unchanged."""
from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from common.dbclient import open_db_client
from common.errors import ErrorCode, SwitchError
from common.usage import UsageTotals
from common.wire import MessageType, Request
from common.pricing import DEFAULT_PRICES, PRICE_TYPES
from switchdb import accounts, prices, secrets, sessions
from switchdb.db import format_time, migrate, open_database, transaction, utc_now
from tests.daemons import BIN, base_env, daemon
from tests.pg import pg_url  # noqa: F401
from tests.batches import handle_batch

KEY = "copy-secret"
EDITED_AUDIO_IN = 123_456  # milli-USD per 1M tokens: no shipped rate


def cli(tmp_path: Path, env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "switchdb"), *argv], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)


def build_sqlite(path: Path) -> dict[str, str]:
    """An encrypted store holding every kind of row; the keys' plaintexts by role."""
    conn = open_database(str(path), KEY)
    migrate(conn)
    soon = format_time(datetime.now(UTC) + timedelta(days=1))
    with transaction(conn):
        alice = accounts.create_account(conn, "Alice@Example.com", "Pro", topup=70)
        bob = accounts.create_account(conn, "bob@example.com", "Free")
        live, _ = accounts.create_key(conn, alice.id, "live")
        expiring, _ = accounts.create_key(conn, alice.id, "expiring", soon)
        revoked, _ = accounts.create_key(conn, bob.id, "revoked")
        accounts.revoke_key(conn, accounts.hash_key(revoked))
        secret = secrets.mint(conn, live, 600, "", utc_now())[0]
        # The operator's book: a rate changed, a model added and made the fallback.
        prices.set_price(conn, "gpt-realtime", {"audio_in": EDITED_AUDIO_IN})
        shipped = prices.load_book(conn).models["gpt-realtime"]
        prices.set_price(conn, "house-model", {name: getattr(shipped, name) for name in PRICE_TYPES}, "our own")
        prices.set_fallback(conn, "house-model")
    usage = UsageTotals(input_tokens=100, output_tokens=20, input_audio=100, output_audio=20, reports=2).to_json()
    handle_batch(conn, [
        Request("1", MessageType.RECORD_USAGE, ("b1", alice.id, "s1", "openai", "gpt-realtime", usage)),
        Request("2", MessageType.RECORD_USAGE, ("b2", alice.id, "s1", "openai", "gpt-realtime", usage)),
        Request("3", MessageType.SAVE_SESSION,
                (alice.id, "s1", '{"session":{"type":"realtime","instructions":"Be kind."}}')),
        Request("4", MessageType.APPEND_CONVERSATION, (alice.id, "s1", "user:héllo\n")),
        Request("5", MessageType.APPEND_CONVERSATION, (alice.id, "s1", "agent:hi ✓\n")),
        Request("6", MessageType.APPEND_CONVERSATION, (bob.id, "other", "user:x\n")),
    ], utc_now())
    conn.close()
    return {"alice": alice.id, "bob": bob.id, "live": live, "expiring": expiring, "revoked": revoked,
            "secret": secret}


async def test_copy_round_trip_of_an_encrypted_store(tmp_path: Path, pg_url: str) -> None:  # noqa: F811
    made = build_sqlite(tmp_path / "old.db")
    sqlite_env = base_env(DB_PATH=str(tmp_path / "old.db"), DB_ENCRYPTION_KEY=KEY)
    pg_env = base_env(DB_URL=pg_url)
    both = {**sqlite_env, "DB_URL": pg_url}

    done = cli(tmp_path, both, "copy", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["copied"] == {"accounts": 2, "api_keys": 3, "sessions": 3, "usage_metrics": 2, "client_secrets": 1,
                                "credit_entries": 2, "prices": len(DEFAULT_PRICES) + 1, "ledger_settings": 3}
    text = cli(tmp_path, both, "copy")  # refused now: the target holds accounts
    assert text.returncode == 1 and text.stdout == ""
    assert text.stderr.count("\n") == 1 and "already holds 2 accounts" in text.stderr

    # Every CLI answer is the same on both stores.
    for argv in (["account", "show", "alice@example.com"], ["account", "show", made["bob"]],
                 ["key", "list", "--account", made["alice"]], ["key", "list", "--account", made["bob"]],
                 ["usage", "--account", made["alice"]], ["price", "list"]):
        old, new = cli(tmp_path, sqlite_env, *argv, "--json"), cli(tmp_path, pg_env, *argv, "--json")
        assert old.returncode == new.returncode == 0, (old.stderr, new.stderr)
        assert json.loads(old.stdout) == json.loads(new.stdout)

    book = json.loads(cli(tmp_path, pg_env, "price", "list", "--json").stdout)
    assert book["fallback"] == "house-model"  # not the shipped book's
    rows = {row["model"]: row for row in book["prices"]}
    assert rows["house-model"]["source"] == "our own"
    assert Decimal(rows["gpt-realtime"]["audio_in"]) == Decimal(EDITED_AUDIO_IN) / 1000

    env = base_env(ZMQ_SOCKET_PATH=f"ipc://{tmp_path}/db.sock", DB_URL=pg_url)
    async with daemon(["switchdb", "serve"], env, tmp_path / "switchdb.log", cwd=tmp_path) as d, \
            open_db_client(d.address, 5000) as db:
        account_id, credits, update = await db.request(MessageType.VALIDATE_AND_LOAD, made["live"], "s1")
        assert (account_id, credits) == (made["alice"], str(50_000 + 70 - 240))
        assert json.loads(update)["session"]["instructions"] == (
            "Be kind." + sessions.MARKER + "user:héllo\nagent:hi ✓\n")
        assert (await db.request(MessageType.VALIDATE_AND_LOAD, made["expiring"], "s1"))[0] == made["alice"]
        assert (await db.request(MessageType.VALIDATE_AND_LOAD, made["secret"], "s1"))[0] == made["alice"]
        with pytest.raises(SwitchError) as err:
            await db.request(MessageType.VALIDATE_AND_LOAD, made["revoked"], "s1")
        assert err.value.code == ErrorCode.EXTERNAL_INVALID_AUTH
        # New usage rows go on after the copied ones; a copied batch id still counts once.
        usage = UsageTotals(input_tokens=10).to_json()
        assert await db.request(MessageType.RECORD_USAGE, "b3", made["alice"], "s1", "openai", "m", usage) == (
            str(50_000 + 70 - 250),)
        assert await db.request(MessageType.RECORD_USAGE, "b1", made["alice"], "s1", "openai", "m", usage) == (
            str(50_000 + 70 - 250),)
    assert KEY not in d.log()


def test_copy_needs_both_stores_and_says_so(tmp_path: Path, pg_url: str) -> None:  # noqa: F811
    missing = cli(tmp_path, base_env(DB_URL=pg_url), "copy")
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1 and "DB_PATH" in missing.stderr
    nofile = cli(tmp_path, base_env(DB_URL=pg_url, DB_PATH=str(tmp_path / "absent.db")), "copy")
    assert nofile.returncode == 1 and "no SQLite store" in nofile.stderr
    assert not (tmp_path / "absent.db").exists()
    build_sqlite(tmp_path / "x.db")
    wrong = cli(tmp_path, base_env(DB_URL=pg_url, DB_PATH=str(tmp_path / "x.db"), DB_ENCRYPTION_KEY="wrong"), "copy")
    assert wrong.returncode == 1 and "DB_ENCRYPTION_KEY" in wrong.stderr and wrong.stderr.count("\n") == 1
