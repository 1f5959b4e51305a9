"""The admin CLI through its real entry point, `.venv/bin/switchdb`, as an operator runs it.

Tests taking `store` run on both stores (DB_PATH, or DB_URL alone).
"""
from __future__ import annotations

import json
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common.usage import UsageTotals
from common.wire import MessageType, Request
from switchdb import accounts, service
from switchdb import db
from switchdb.db import transaction, utc_now
from tests.daemons import BIN, base_env, daemon
from tests.pg import open_conn, store_env, store_kind, store_url  # noqa: F401
from tests.batches import handle_batch

_ENV: dict[Path, dict[str, str]] = {}


@pytest.fixture
def store(tmp_path: Path, store_kind: str, store_url: str | None) -> Iterator[tuple[str, str | None]]:  # noqa: F811
    """The test's store, which `run` then uses by default."""
    _ENV[tmp_path] = base_env(**store_env(store_kind, tmp_path, store_url))
    yield store_kind, store_url
    del _ENV[tmp_path]


def connect(tmp_path: Path, store: tuple[str, str | None]) -> db.Connection:
    return open_conn(store[0], tmp_path, store[1])


def run(tmp_path: Path, *argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    default = _ENV.get(tmp_path) or base_env(DB_PATH=str(tmp_path / "db.sqlite"))
    return subprocess.run(
        [str(BIN / "switchdb"), *argv],
        env=default if env is None else env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )


def ok_json(tmp_path: Path, *argv: str, **kw: Any) -> dict[str, Any]:
    proc = run(tmp_path, *argv, "--json", **kw)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("\n") == 1  # one JSON object and nothing else
    return json.loads(proc.stdout)


def fails(tmp_path: Path, *argv: str, status: int = 1, names: str = "", **kw: Any) -> str:
    proc = run(tmp_path, *argv, **kw)
    assert proc.returncode == status, (proc.stdout, proc.stderr)
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert names in proc.stderr
    return proc.stderr


ACCOUNT_KEYS = {"id", "email", "plan_name", "token_remaining", "topup_remaining", "credits", "status", "created_at",
                "unit", "markup"}


def test_accounts_and_credits(tmp_path: Path, store: tuple[str, str | None]) -> None:
    first = ok_json(tmp_path, "migrate")
    assert first["migrations"] == first["applied_now"] and first["migrations"][0] == "0001_create_accounts"
    assert ok_json(tmp_path, "migrate") == {"migrations": first["migrations"], "applied_now": []}
    free = ok_json(tmp_path, "account", "create", "--email", "free@example.com")
    assert set(free) == ACCOUNT_KEYS
    assert (free["plan_name"], free["token_remaining"], free["topup_remaining"], free["credits"]) == ("Free", 1000, 0, 1000)
    assert free["id"].startswith("acct_") and free["status"] == "active"
    pro = ok_json(tmp_path, "account", "create", "--email", "pro@example.com", "--plan", "Pro", "--topup", "5")
    assert (pro["token_remaining"], pro["credits"]) == (50_000, 50_005)
    ent = ok_json(tmp_path, "--json", "account", "create", "--email", "e@example.com", "--plan", "Enterprise")
    assert ent["token_remaining"] == 500_000
    custom = ok_json(tmp_path, "account", "create", "--email", "c@example.com", "--plan", "Pro", "--tokens", "7")
    assert custom["credits"] == 7
    assert ok_json(tmp_path, "account", "show", "pro@example.com") == pro
    assert ok_json(tmp_path, "account", "show", pro["id"]) == pro
    topped = ok_json(tmp_path, "credits", "topup", "--account", pro["id"], "--tokens", "100")
    assert (topped["topup_remaining"], topped["credits"]) == (105, 50_105)

    text = run(tmp_path, "account", "show", free["id"])
    assert text.returncode == 0 and free["id"] in text.stdout and "1000" in text.stdout

    fails(tmp_path, "account", "create", "--email", "free@example.com", names="already exists")
    fails(tmp_path, "account", "show", "nobody@example.com", names="nobody@example.com")
    fails(tmp_path, "credits", "topup", "--account", "acct_nope", "--tokens", "5", names="acct_nope")
    fails(tmp_path, "account", "create", "--email", "x@example.com", "--plan", "Gold", status=2, names="--plan")
    fails(tmp_path, "account", "create", "--email", "x@example.com", "--tokens", "-1", status=2, names="--tokens")
    fails(tmp_path, "account", "create", "--email", "not-an-email", names="not an email")
    fails(tmp_path, "account", "create", status=2, names="--email")
    fails(tmp_path, "credits", "topup", "--account", free["id"], "--tokens", "0", status=2, names="--tokens")
    fails(tmp_path, "credits", "topup", "--account", free["id"], "--tokens", "lots", status=2, names="--tokens")
    fails(tmp_path, "frobnicate", status=2, names="frobnicate")
    fails(tmp_path, "account", "show", "x", env=base_env(), names="DB_PATH")


def test_keys(tmp_path: Path, store: tuple[str, str | None]) -> None:
    account = ok_json(tmp_path, "account", "create", "--email", "k@example.com")
    created = ok_json(tmp_path, "key", "create", "--account", account["id"], "--label", "laptop",
                      "--expires-at", "2999-01-02T03:04:05+01:00")
    assert set(created) == {"key", "key_hash", "key_indicator", "account_id", "label", "expires_at"}
    assert created["key"].startswith("rsk_") and created["expires_at"] == "2999-01-02T02:04:05Z"
    assert accounts.hash_key(created["key"]) == created["key_hash"]
    other = ok_json(tmp_path, "key", "create", "--account", account["id"], "--label", "phone")
    assert other["expires_at"] is None

    listed = ok_json(tmp_path, "key", "list", "--account", account["id"])["keys"]
    assert {k["key_hash"] for k in listed} == {created["key_hash"], other["key_hash"]}
    assert created["key"] not in json.dumps(listed)
    if store[0] == "sqlite":
        assert created["key"] not in (tmp_path / "db.sqlite").read_bytes().decode("latin-1")

    revoked = ok_json(tmp_path, "key", "revoke", created["key_indicator"])
    assert revoked["key_hash"] == created["key_hash"] and revoked["revoked_at"]
    again = ok_json(tmp_path, "key", "revoke", other["key_hash"])
    assert again["revoked_at"]

    # Two keys sharing an indicator: refused, naming the problem.
    conn = connect(tmp_path, store)
    with transaction(conn):
        conn.execute("UPDATE api_keys SET key_indicator = 'rsk_dupe...dupe'")
    conn.close()
    fails(tmp_path, "key", "revoke", "rsk_dupe...dupe", names="matches 2 keys")
    fails(tmp_path, "key", "revoke", "rsk_none...none", names="rsk_none...none")
    fails(tmp_path, "key", "create", "--account", "acct_nope", "--label", "x", names="acct_nope")
    fails(tmp_path, "key", "list", "--account", "acct_nope", names="acct_nope")
    fails(tmp_path, "key", "create", "--account", account["id"], "--label", "x", "--expires-at", "2001-01-01",
          status=2, names="past")
    fails(tmp_path, "key", "create", "--account", account["id"], "--label", "x", "--expires-at", "soon",
          status=2, names="ISO 8601")
    fails(tmp_path, "key", "create", "--account", account["id"], status=2, names="--label")


def test_usage_report(tmp_path: Path, store: tuple[str, str | None]) -> None:
    account = ok_json(tmp_path, "account", "create", "--email", "u@example.com", "--plan", "Pro")
    conn = connect(tmp_path, store)
    totals = UsageTotals(input_tokens=1000, output_tokens=500, input_text=200, input_audio=800, input_cached=100,
                         output_text=100, output_audio=400, transcription_tokens=50, reports=2)
    handle_batch(conn, [
        Request(str(i), MessageType.RECORD_USAGE, (f"b{i}", account["id"], "s", "openai", "gpt-realtime", totals.to_json()))
        for i in range(2)
    ], utc_now())
    conn.close()
    report = ok_json(tmp_path, "usage", "--account", account["id"])
    assert {k: report[k] for k in ("account_id", "input_tokens", "output_tokens", "total_tokens", "batches",
                                   "breakdown")} == {
        "account_id": account["id"], "input_tokens": 2000, "output_tokens": 1000, "total_tokens": 3100, "batches": 2,
        "breakdown": {"input_text": 400, "input_audio": 1600, "input_image": 0, "input_cached": 200,
                      "output_text": 200, "output_audio": 800, "transcription": 100},
    }
    # Exact, in decimal: the cached 200 are part of the 400 text tokens (gpt-realtime list prices);
    # the 100 transcription tokens without a model are priced by the transcription fallback.
    assert report["cost_usd"] == report["charged_usd"] == "0.10708"
    assert ok_json(tmp_path, "account", "show", account["id"])["credits"] == 50_000 - 3100
    text = run(tmp_path, "usage", "--account", account["id"])
    assert text.returncode == 0 and "at list prices" in text.stdout
    fails(tmp_path, "usage", "--account", "acct_nope", names="acct_nope")


def test_seed_reuses_its_key_while_valid(tmp_path: Path, store: tuple[str, str | None]) -> None:
    first = ok_json(tmp_path, "seed")
    assert set(first) == {"account_id", "key", "session_id", "created"}
    assert first["created"] is True and first["session_id"] == "demo"
    key_file = tmp_path / ("db.sqlite.demo-key" if store[0] == "sqlite" else "var/switchdb.demo-key")
    assert key_file.read_text().strip() == first["key"]
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    second = ok_json(tmp_path, "seed")
    assert second == {**first, "created": False}
    demo = ok_json(tmp_path, "account", "show", "demo@realtime-switch.local")
    assert demo["plan_name"] == "Pro" and demo["id"] == first["account_id"]

    ok_json(tmp_path, "key", "revoke", accounts.hash_key(first["key"]))
    third = ok_json(tmp_path, "seed")
    assert third["key"] != first["key"] and third["account_id"] == first["account_id"]
    assert key_file.read_text().strip() == third["key"]

    custom = tmp_path / "keys" / "demo.key"
    fourth = ok_json(tmp_path, "seed", "--key-file", str(custom))
    assert custom.read_text().strip() == fourth["key"] != third["key"]

    conn = connect(tmp_path, store)
    with transaction(conn):
        outcome = service.validate_and_load(conn, third["key"], "demo", utc_now())
    conn.close()
    assert outcome.status == "OK"
    assert json.loads(outcome.fields[2])["session"]["type"] == "realtime"
    text = run(tmp_path, "seed")
    assert text.returncode == 0 and third["key"] in text.stdout


def test_encrypted_database_from_the_cli(tmp_path: Path) -> None:
    enc = base_env(DB_PATH=str(tmp_path / "db.sqlite"), DB_ENCRYPTION_KEY="k1")
    account = ok_json(tmp_path, "account", "create", "--email", "x@example.com", env=enc)
    assert ok_json(tmp_path, "account", "show", account["id"], env=enc) == account
    fails(tmp_path, "account", "show", account["id"], env={**enc, "DB_ENCRYPTION_KEY": "k2"}, names="DB_ENCRYPTION_KEY")
    fails(tmp_path, "migrate", names="DB_ENCRYPTION_KEY")  # no key at all


def test_db_url_errors_are_one_line_without_the_password(tmp_path: Path) -> None:
    unreachable = base_env(DB_URL="postgresql://admin:s3cret-pw@127.0.0.1:1/ledger")
    message = fails(tmp_path, "account", "show", "x", env=unreachable, names="cannot connect to DB_URL")
    assert "s3cret-pw" not in message and "127.0.0.1" in message
    fails(tmp_path, "migrate", env=base_env(DB_URL="mysql://x@y/z"), names="DB_URL must be a postgresql:// URL")


async def test_ping(tmp_path: Path) -> None:
    env = base_env(ZMQ_SOCKET_PATH=f"ipc://{tmp_path}/db.sock", DB_PATH=str(tmp_path / "db.sqlite"))
    async with daemon(["switchdb", "serve"], env, tmp_path / "switchdb.log", cwd=tmp_path):
        assert ok_json(tmp_path, "ping", env=env)["ok"] is True
        assert run(tmp_path, "ping", env=env).returncode == 0
    fails(tmp_path, "ping", "--timeout-ms", "200", env=env, names="did not answer")
    fails(tmp_path, "ping", env=base_env(), names="ZMQ_SOCKET_PATH")
    fails(tmp_path, "serve", env=base_env(DB_PATH=str(tmp_path / "db.sqlite")), names="ZMQ_SOCKET_PATH")
    fails(tmp_path, "serve", env={**env, "ZMQ_SOCKET_PATH": "bogus://x"}, names="cannot bind")
    fails(tmp_path, "serve", env={**env, "DB_PATH": "/proc/no/such/dir/db"}, names="cannot open DB_PATH")
