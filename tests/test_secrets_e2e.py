"""Client secrets end to end: switchdb, switchd and the simulator as processes."""
from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from pathlib import Path

import pytest
import trio
from trio_websocket import ConnectionRejected, WebSocketConnection, open_websocket_url

from perf import procs
from tests.stack import open_stack
from tests.webrtc import post

SESSION = {"type": "realtime", "instructions": "You sell shoes.", "audio": {"output": {"voice": "cedar"}}}


async def until(ws: WebSocketConnection, type_: str) -> dict:
    while (event := json.loads(await ws.get_message()))["type"] != type_:
        pass
    return event


async def mint(switch: procs.Daemon, key: str | None, body: dict | bytes) -> tuple[int, dict]:
    status, headers, payload = await post(switch.address, "/v1/realtime/client_secrets",
                                          body if isinstance(body, bytes) else json.dumps(body).encode(), key)
    assert headers[b"content-type"] == b"application/json" and headers[b"access-control-allow-origin"] == b"*"
    return status, json.loads(payload)


async def rejected(url: str, **kwargs) -> tuple[int, str]:
    with pytest.raises(ConnectionRejected) as info:
        async with open_websocket_url(url, **kwargs):
            pass
    return info.value.status_code, (info.value.body or b"").decode()


def browser_protocols(secret: str) -> list[str]:
    return ["realtime", f"openai-insecure-api-key.{secret}", "openai-agents-sdk.0.1"]


async def test_a_minted_secret_opens_sessions_with_its_config(tmp_path: Path) -> None:
    with trio.fail_after(90):
        async with open_stack(tmp_path) as stack, procs.sim(tmp_path, "--fast") as sim:
            account_id, key = await stack.account(tokens=100_000)
            async with stack.switchd(f"{sim.address}/v1/realtime?model=gpt-realtime") as switch:
                status, answer = await mint(switch, key, {"expires_after": {"anchor": "created_at", "seconds": 600},
                                                          "session": SESSION})
                assert status == 200 and answer["value"].startswith("ek_") and key not in json.dumps(answer)
                assert abs(answer["expires_at"] - (time.time() + 600)) < 30
                session = answer["session"]
                assert session["instructions"] == "You sell shoes." and session["model"] == "gpt-realtime"
                assert session["object"] == "realtime.session" and session["id"].startswith("sess_")
                secret = answer["value"]
                # A browser: the secret in the subprotocol; its config is in the first session.update.
                url = f"{switch.address}/v1/realtime?rs_sessid=shop"
                async with open_websocket_url(url, subprotocols=browser_protocols(secret)) as ws:
                    assert ws.subprotocol == "realtime"
                    await until(ws, "session.created")
                    updated = (await until(ws, "session.updated"))["session"]
                    assert updated["instructions"] == "You sell shoes."
                    assert updated["audio"]["output"]["voice"] == "cedar"
                    await ws.send_message(json.dumps({"type": "response.create",
                                                      "response": {"output_modalities": ["text"]}}))
                    usage = (await until(ws, "response.done"))["response"]["usage"]
                # The same secret again (not single-use), by Bearer this time.
                async with open_websocket_url(url, extra_headers=[("Authorization", f"Bearer {secret}")]) as ws:
                    assert (await until(ws, "session.updated"))["session"]["instructions"].startswith("You sell shoes.")
            # Metered to the account that minted it, exactly.
            with trio.fail_after(15):
                while await stack.credits(account_id) != 100_000 - usage["total_tokens"]:
                    pass


async def test_refusals(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with open_stack(tmp_path) as stack, procs.sim(tmp_path, "--fast") as sim:
            account_id, key = await stack.account(tokens=1000)
            async with stack.switchd(f"{sim.address}/v1/realtime?model=gpt-realtime") as switch:
                url = f"{switch.address}/v1/realtime?rs_sessid=s"
                status, error = await mint(switch, None, {})
                assert status == 401 and error["error"]["code"] == "EXTERNAL_INVALID_AUTH"
                assert (await mint(switch, "rsk_unknown", {}))[0] == 401
                status, error = await mint(switch, key, {"expires_after": {"seconds": 5}})
                assert status == 400 and error["error"]["type"] == "invalid_request_error"
                assert (await mint(switch, key, b"{not json"))[0] == 400
                expired, revoked, dry = [(await mint(switch, key, {}))[1]["value"] for _ in range(3)]
                assert (await mint(switch, expired, {}))[0] == 401  # a secret mints nothing
                # Expired: its time has passed (set in the store rather than waited for).
                with sqlite3.connect(tmp_path / "switch.db") as db:
                    db.execute("UPDATE client_secrets SET expires_at = '2000-01-01T00:00:00Z' WHERE secret_hash = ?",
                               (hashlib.sha256(expired.encode()).hexdigest(),))
                assert (await rejected(url, subprotocols=browser_protocols(expired)))[0] == 401
                async with open_websocket_url(url, subprotocols=browser_protocols(dry)) as ws:
                    await until(ws, "session.created")
                # Dry: the account has no credits at connect.
                with sqlite3.connect(tmp_path / "switch.db") as db:
                    db.execute("UPDATE accounts SET token_remaining = 0, topup_remaining = 0 WHERE id = ?",
                               (account_id,))
                assert (await rejected(url, subprotocols=browser_protocols(dry)))[0] == 402
                assert (await mint(switch, key, {}))[0] == 402
                # Revoked: the key that minted it is revoked (the account has credits again).
                await stack.cli("credits", "topup", "--account", account_id, "--tokens", "1000")
                async with open_websocket_url(url, subprotocols=browser_protocols(revoked)) as ws:
                    await until(ws, "session.created")
                await stack.cli("key", "revoke", hashlib.sha256(key.encode()).hexdigest())
                assert (await rejected(url, subprotocols=browser_protocols(revoked)))[0] == 401
                assert (await mint(switch, key, {}))[0] == 401


def sdk_mint_and_talk(base_url: str, key: str) -> tuple[str, str, int]:
    """The official SDK as an app server (mints) and as its client (connects with the secret)."""
    from openai import OpenAI

    server = OpenAI(api_key=key, base_url=base_url, max_retries=0)
    secret = server.realtime.client_secrets.create(
        expires_after={"anchor": "created_at", "seconds": 120},
        session={"type": "realtime", "instructions": "You sell shoes."})
    client = OpenAI(api_key=secret.value, base_url=base_url, max_retries=0)
    with client.realtime.connect(model="gpt-realtime", extra_query={"rs_sessid": "sdk-secret"}) as connection:
        connection.response.create(response={"output_modalities": ["text"]})
        instructions = ""
        for event in connection:
            if event.type == "session.updated":
                instructions = event.session.instructions or ""  # type: ignore[union-attr]
            if event.type == "response.done":
                return secret.value[:3], instructions, event.response.usage.total_tokens  # type: ignore[union-attr]
    raise AssertionError("no response.done")


async def test_the_official_sdk_mints_and_uses_a_secret(tmp_path: Path) -> None:
    with trio.fail_after(90):
        async with open_stack(tmp_path) as stack, procs.sim(tmp_path, "--fast") as sim:
            account_id, key = await stack.account(tokens=100_000)
            async with stack.switchd(f"{sim.address}/v1/realtime?model=gpt-realtime") as switch:
                base_url = switch.address.replace("ws://", "http://") + "/v1"
                prefix, instructions, tokens = await trio.to_thread.run_sync(sdk_mint_and_talk, base_url, key)
            assert prefix == "ek_" and instructions == "You sell shoes." and tokens > 0
            with trio.fail_after(15):
                while await stack.credits(account_id) != 100_000 - tokens:
                    pass


async def revoke(switch: procs.Daemon, key: str | None, body: dict | bytes) -> tuple[int, dict]:
    status, _, payload = await post(switch.address, "/v1/realtime/client_secrets/revoke",
                                    body if isinstance(body, bytes) else json.dumps(body).encode(), key)
    return status, json.loads(payload)


async def test_the_key_that_minted_a_secret_revokes_it(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with open_stack(tmp_path) as stack, procs.sim(tmp_path, "--fast") as sim:
            account_id, key = await stack.account(tokens=10_000)
            other_key = (await stack.cli("key", "create", "--account", account_id, "--label", "other"))["key"]
            async with stack.switchd(f"{sim.address}/v1/realtime?model=gpt-realtime") as switch:
                url = f"{switch.address}/v1/realtime?rs_sessid=r"
                secret, kept = [(await mint(switch, key, {}))[1]["value"] for _ in range(2)]
                # Only the key that minted it, and only a key: anything else changes nothing.
                assert (await revoke(switch, other_key, {"value": secret}))[0] == 404
                assert (await revoke(switch, kept, {"value": secret}))[0] == 401
                assert (await revoke(switch, "rsk_unknown", {"value": secret}))[0] == 401
                for body in (b"", b"{not json", {"value": 1}, {"value": "rsk_x"}, {"secret": secret}, ["ek_x"]):
                    status, error = await revoke(switch, key, body)
                    assert status == 400 and error["error"]["code"] == "EXTERNAL_BAD_PARAMS", body
                async with open_websocket_url(url, subprotocols=browser_protocols(secret)) as ws:
                    await until(ws, "session.created")
                assert await revoke(switch, key, {"value": secret}) == (200, {"revoked": True})
                assert (await rejected(url, subprotocols=browser_protocols(secret)))[0] == 401
                assert (await revoke(switch, key, {"value": secret}))[0] == 404  # once
                async with open_websocket_url(url, subprotocols=browser_protocols(kept)) as ws:
                    await until(ws, "session.created")  # the key's other secrets stay usable
