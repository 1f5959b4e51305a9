"""WebRTC calls through the switch: an aiortc browser, switchd, switchdb and the simulator as processes."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import trio

from perf import procs
from tests.stack import metrics_url, open_stack
from tests.webrtc import browser, post

TEXT = {"type": "response.create", "response": {"output_modalities": ["text"]}}
MARKER = "Here is the previous conversation"


async def balance(stack, account_id: str, expected: int) -> None:
    with trio.fail_after(15):
        while await stack.credits(account_id) != expected:
            pass


async def test_a_call_by_secret_is_metered_remembered_and_hung_up(tmp_path: Path) -> None:
    with trio.fail_after(120):
        async with open_stack(tmp_path) as stack, procs.sim(tmp_path, "--fast") as sim:
            account_id, key = await stack.account(tokens=100_000)
            async with stack.switchd(f"{sim.address}/v1/realtime?model=gpt-realtime",
                                     OPENAI_API_KEY="sk-operator") as switch:
                status, _, body = await post(switch.address, "/v1/realtime/client_secrets", json.dumps(
                    {"session": {"type": "realtime", "instructions": "You sell shoes."}}).encode(), key)
                assert status == 200
                secret = json.loads(body)["value"]
                calls = switch.address.replace("ws://", "http://") + "/v1/realtime/calls"
                async with browser(calls + "?rs_sessid=shop", secret) as peer:
                    answered = await peer.until("answered")
                    assert answered["status"] == 201 and answered["location"].startswith("/v1/realtime/calls/rtc_")
                    call_id = answered["location"].rsplit("/", 1)[1]
                    created = (await peer.until("event", "session.created"))["event"]["session"]
                    assert created["instructions"] == "You sell shoes." and created["model"] == "gpt-realtime"
                    await peer.send(TEXT)
                    usage = (await peer.until("event", "response.done"))["event"]["response"]["usage"]
                    await balance(stack, account_id, 100_000 - usage["total_tokens"])  # metered through the sideband
                    # The browser's app hangs up through the switch; then the call is gone.
                    status, _, _ = await post(switch.address, f"/v1/realtime/calls/{call_id}/hangup", key=secret)
                    assert status == 200
                    await peer.until("closed")
                status, _, body = await post(switch.address, f"/v1/realtime/calls/{call_id}/hangup", key=secret)
                assert status == 404 and json.loads(body)["error"]["code"] == "EXTERNAL_NOT_FOUND"
                # The next call with the same rs_sessid starts from the session and conversation remembered.
                async with browser(calls + "?rs_sessid=shop", key) as peer:
                    await peer.until("answered")
                    created = (await peer.until("event", "session.created"))["event"]["session"]
                    assert created["instructions"].startswith("You sell shoes.") and MARKER in created["instructions"]
                    assert "agent:" in created["instructions"]


async def test_a_dry_account_is_hung_up_mid_call(tmp_path: Path) -> None:
    with trio.fail_after(120):
        async with open_stack(tmp_path) as stack, procs.sim(tmp_path, "--fast") as sim:
            account_id, key = await stack.account(tokens=20)
            async with stack.switchd(f"{sim.address}/v1/realtime?model=gpt-realtime") as switch:
                calls = switch.address.replace("ws://", "http://") + "/v1/realtime/calls"
                async with browser(calls, key, {"type": "realtime", "instructions": "Be brief."}) as peer:
                    first = await peer.next()
                    assert first["op"] == "answered", first
                    await peer.until("open")
                    await peer.send(TEXT)
                    usage = (await peer.until("event", "response.done"))["event"]["response"]["usage"]
                    assert usage["total_tokens"] > 20
                    await peer.until("closed")  # the switch hung the call up at the provider
                await balance(stack, account_id, 20 - usage["total_tokens"])
                metrics = procs.metric_values(await procs.http_get(metrics_url(switch)))
                assert metrics["switch_sessions_total"] == 1 and metrics["switch_credit_cutoffs_total"] == 1
                assert metrics["switch_tokens_metered_total"] == usage["total_tokens"]
                assert metrics["switch_sessions_open"] == 0
                # Dry now: no new call, and no secret.
                async with browser(calls, key) as peer:
                    refused = await peer.until("refused")
                    assert refused["status"] == 402
                    assert json.loads(refused["body"])["error"]["type"] == "insufficient_quota"


async def test_call_refusals(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with open_stack(tmp_path) as stack, procs.sim(tmp_path, "--fast") as sim:
            _, key = await stack.account()
            async with stack.switchd(f"{sim.address}/v1/realtime?model=gpt-realtime") as switch:
                path = "/v1/realtime/calls"
                offer = b"v=0\r\nm=audio 9 X 0\r\n"
                assert (await post(switch.address, path, offer, None, "application/sdp"))[0] == 401
                assert (await post(switch.address, path, offer, "rsk_nope", "application/sdp"))[0] == 401
                status, _, body = await post(switch.address, path, b"hello", key, "application/sdp")
                assert status == 400 and json.loads(body)["error"]["code"] == "EXTERNAL_BAD_PARAMS"
                # An offer the provider cannot answer: its 400 is passed on.
                status, _, body = await post(switch.address, path, offer, key, "application/sdp")
                assert status == 400 and "cannot be answered" in json.loads(body)["error"]["message"]
                status, headers, _ = await post(switch.address, "/v1/realtime/calls/rtc_x/hangup", b"", key)
                assert status == 404 and headers[b"content-type"] == b"application/json"


async def test_revoking_the_key_ends_the_call(tmp_path: Path) -> None:
    with trio.fail_after(90):
        async with open_stack(tmp_path) as stack, procs.sim(tmp_path, "--fast") as sim:
            _, key = await stack.account()
            async with stack.switchd(f"{sim.address}/v1/realtime?model=gpt-realtime") as switch:
                calls = switch.address.replace("ws://", "http://") + "/v1/realtime/calls"
                async with browser(calls, key) as peer:
                    await peer.until("open")
                    await stack.cli("key", "revoke", hashlib.sha256(key.encode()).hexdigest())
                    await peer.until("closed")  # within the account check's period


async def test_idle_calls_and_shutdown_hang_up(tmp_path: Path) -> None:
    with trio.fail_after(90):
        async with open_stack(tmp_path) as stack, procs.sim(tmp_path, "--fast") as sim:
            _, key = await stack.account()
            url = f"{sim.address}/v1/realtime?model=gpt-realtime"
            async with stack.switchd(url, IDLE_TIMEOUT="0.5") as switch:
                calls = switch.address.replace("ws://", "http://") + "/v1/realtime/calls"
                async with browser(calls, key) as peer:
                    call_id = (await peer.until("answered"))["location"].rsplit("/", 1)[1]
                    await peer.until("open")
                    await peer.until("closed")  # nothing on the sideband for IDLE_TIMEOUT: hung up
            # The reason is in the log (the provider has no way to pass it on to the browser).
            log = switch.log()
            assert f"call {call_id} idle: no sideband event for 0.5 s (IDLE_TIMEOUT); hanging up" in log
            assert f"call {call_id} ended (EXTERNAL_IDLE_TIMEOUT)" in log
            async with stack.switchd(url, name="switchd2") as switch:
                calls = switch.address.replace("ws://", "http://") + "/v1/realtime/calls"
                async with browser(calls, key) as peer:
                    await peer.until("open")
                    switch.terminate()  # a call the switch can no longer meter must not go on
                    await peer.until("closed")
                    with trio.fail_after(20):
                        assert await switch.proc.wait() == 0
