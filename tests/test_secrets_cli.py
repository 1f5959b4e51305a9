"""`switchdb secret list|revoke` through the real entry point (on both stores), and a revoked secret's
session ended end to end; the store of calls' owners (switchdb.calls) that hangups check."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from common.errors import ErrorCode, SwitchError
from common.wire import MessageType, Request
from perf import procs
from switchd.events import CLOSE_REVOKED
from switchdb import accounts, calls, db, secrets, service
from switchdb.db import transaction, utc_now
from tests.stack import open_stack
from tests.test_secrets_e2e import mint as mint_http
from tests.pg import store_kind, store_url  # noqa: F401
from tests.test_switchdb_cli import connect, fails, ok_json, run, store  # noqa: F401


def account_with_secrets(tmp_path: Path, store: tuple[str, str | None], count: int  # noqa: F811
                         ) -> tuple[str, str, list[str]]:
    """(account id, key, plaintext secrets minted by the key, the last one a transcription secret)."""
    account = ok_json(tmp_path, "account", "create", "--email", "s@example.com", "--tokens", "1000")
    key = ok_json(tmp_path, "key", "create", "--account", account["id"], "--label", "app")
    conn = connect(tmp_path, store)
    try:
        values = []
        for i in range(count):
            config = {"type": "transcription"} if i == count - 1 else {"type": "realtime"}
            with transaction(conn):
                values.append(secrets.mint(conn, key["key"], 600, json.dumps(config), utc_now())[0])
    finally:
        conn.close()
    return account["id"], key["key"], values


def test_secret_list_and_revoke(tmp_path: Path, store: tuple[str, str | None]) -> None:  # noqa: F811
    account_id, key, (first, second) = account_with_secrets(tmp_path, store, 2)
    listed = ok_json(tmp_path, "secret", "list", "--account", "s@example.com")
    assert listed["account_id"] == account_id
    rows = {row["id"]: row for row in listed["secrets"]}
    assert set(rows) == {accounts.hash_key(first), accounts.hash_key(second)}  # ids; no plaintext anywhere
    assert first not in json.dumps(listed) and second not in json.dumps(listed)
    row = rows[accounts.hash_key(second)]
    assert row["state"] == "active" and row["type"] == "transcription" and row["revoked_at"] is None
    assert row["key_indicator"] == accounts.key_indicator(key) and row["account_id"] == account_id
    # By the leaked plaintext: revoked, and the store refuses it (the path CHECK_SECRET takes).
    revoked = ok_json(tmp_path, "secret", "revoke", first)
    assert revoked["id"] == accounts.hash_key(first) and revoked["state"] == "revoked" and revoked["revoked_at"]
    conn = connect(tmp_path, store)
    try:
        with pytest.raises(SwitchError, match="revoked client secret"):
            secrets.find_usable_secret(conn, first, utc_now(), allow_expired=True)
        secrets.find_usable_secret(conn, second, utc_now())  # the other one is untouched
    finally:
        conn.close()
    # By its id, as listed; again is harmless and keeps the first revocation's time.
    second_id = accounts.hash_key(second)
    assert ok_json(tmp_path, "secret", "revoke", second_id.upper())["state"] == "revoked"
    again = ok_json(tmp_path, "secret", "revoke", accounts.hash_key(first))
    assert again["revoked_at"] == revoked["revoked_at"]
    text = run(tmp_path, "secret", "list", "--account", account_id)
    assert text.returncode == 0 and text.stdout.count("revoked ") == 2 and "minted by" in text.stdout


def test_secret_command_errors(tmp_path: Path, store: tuple[str, str | None]) -> None:  # noqa: F811
    account_id, _, _ = account_with_secrets(tmp_path, store, 1)
    unknown = "ab" * 32
    assert fails(tmp_path, "secret", "revoke", unknown) == f"switchdb: no client secret {unknown}\n"
    assert "no client secret" in fails(tmp_path, "secret", "revoke", "ek_never_minted")
    assert "ek_never_minted" not in fails(tmp_path, "secret", "revoke", "ek_never_minted")  # nor echoed back
    assert "neither a client secret (ek_...) nor a secret id" in fails(tmp_path, "secret", "revoke", "rsk_abc")
    assert "neither" in fails(tmp_path, "secret", "revoke", "zz" * 32)
    assert "no account" in fails(tmp_path, "secret", "list", "--account", "nobody@example.com")
    fails(tmp_path, "secret", "revoke", status=2, names="SECRET_OR_ID")
    fails(tmp_path, "secret", "list", status=2, names="--account")
    fails(tmp_path, "secret", "forget", status=2, names="forget")
    other = ok_json(tmp_path, "account", "create", "--email", "o@example.com")
    assert run(tmp_path, "secret", "list", "--account", other["id"]).stdout == f"no client secrets for {other['id']}\n"
    assert ok_json(tmp_path, "secret", "list", "--account", account_id)["secrets"][0]["state"] == "active"


async def test_revoking_a_secret_ends_its_session(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with open_stack(tmp_path) as stack, procs.sim(tmp_path, "--fast") as sim:
            _, key = await stack.account()
            async with stack.switchd(f"{sim.address}/v1/realtime?model=gpt-realtime") as switch:
                status, answer = await mint_http(switch, key, {})
                secret = answer["value"]
                url = f"{switch.address}/v1/realtime?rs_sessid=revoked"
                async with open_websocket_url(url, extra_headers=[("Authorization", f"Bearer {secret}")]) as ws:
                    await ws.get_message()
                    await stack.cli("secret", "revoke", secret)
                    with trio.fail_after(15):  # the next account check (5 s) closes it
                        with pytest.raises(ConnectionClosed):
                            while True:
                                await ws.get_message()
                    assert ws.closed is not None and ws.closed.code == CLOSE_REVOKED, ws.closed
                status, body = await mint_http(switch, secret, {})  # and it opens nothing more
                assert status == 401


# --- calls' owners (switchdb.calls) ---------------------------------------------------------------

def test_call_owners(tmp_path: Path, store: tuple[str, str | None]) -> None:  # noqa: F811
    conn = connect(tmp_path, store)
    try:
        db.migrate(conn)
        now = utc_now()
        with transaction(conn):
            owner = accounts.create_account(conn, "owner@example.com")
            stranger = accounts.create_account(conn, "stranger@example.com")
            key = accounts.create_key(conn, owner.id, "app")[0]
            other_key = accounts.create_key(conn, stranger.id, "app")[0]
            secret = secrets.mint(conn, key, 10, "{}", now)[0]
        run_ = [Request("1", MessageType.SAVE_CALL, ("rtc_one", owner.id, "shop"))]
        assert service.run_batch(conn, run_, now)[0].status == "OK"
        assert service.run_batch(conn, run_, now)[0].status == ErrorCode.EXTERNAL_CONFLICT  # never a new owner
        assert service.run_batch(conn, [Request("2", MessageType.SAVE_CALL, ("nope", owner.id, "s"))], now
                                 )[0].status == ErrorCode.EXTERNAL_BAD_PARAMS
        assert service.run_batch(conn, [Request("3", MessageType.SAVE_CALL, ("rtc_two", "acct_x", "s"))], now
                                 )[0].status == ErrorCode.EXTERNAL_NOT_FOUND
        with transaction(conn):
            assert calls.owner(conn, key, "rtc_one", now) == owner.id
            # The secret that started a call still hangs it up once it has expired.
            assert calls.owner(conn, secret, "rtc_one", "2999-01-01T00:00:00Z") == owner.id
            for who, call_id in ((other_key, "rtc_one"), (key, "rtc_unknown")):
                with pytest.raises(SwitchError) as info:
                    calls.owner(conn, who, call_id, now)
                assert info.value.code == ErrorCode.EXTERNAL_NOT_FOUND
            with pytest.raises(SwitchError) as info:
                calls.owner(conn, "rsk_not_a_key", "rtc_one", now)
            assert info.value.code == ErrorCode.EXTERNAL_INVALID_AUTH
        # Records past KEEP_S go as new calls are recorded.
        with transaction(conn):
            calls.save(conn, "rtc_later", owner.id, "shop", "2999-01-01T00:00:00Z")
            assert conn.execute("SELECT call_id FROM call_owners").fetchall() == [("rtc_later",)]
    finally:
        conn.close()
