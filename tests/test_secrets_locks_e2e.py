"""A client secret's locks on a WebSocket session (needs /tmp/notes/h8_wiring.patch applied).

Move to tests/test_secrets_locks_e2e.py once the wiring is in."""
from __future__ import annotations

import json
from pathlib import Path

import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from perf import procs
from tests.stack import open_stack
from tests.webrtc import post


async def until(ws: WebSocketConnection, type_: str) -> dict:
    while (event := json.loads(await ws.get_message()))["type"] != type_:
        pass
    return event


async def test_a_secrets_locked_model_and_instructions_cannot_be_overridden(tmp_path: Path) -> None:
    with trio.fail_after(90):
        async with open_stack(tmp_path) as stack, procs.sim(tmp_path, "--fast") as sim:
            _, key = await stack.account()
            async with stack.switchd(f"{sim.address}/v1/realtime?model=gpt-realtime") as switch:
                session = {"type": "realtime", "model": "gpt-realtime-2.1-mini", "instructions": "You sell shoes.",
                           "max_output_tokens": 200}
                status, _, body = await post(switch.address, "/v1/realtime/client_secrets",
                                             json.dumps({"session": session}).encode(), key)
                assert status == 200
                secret = json.loads(body)["value"]
                # The client asks for another model in the URL: the secret's is the one opened.
                url = f"{switch.address}/v1/realtime?rs_sessid=locks&model=gpt-realtime"
                async with open_websocket_url(url, subprotocols=["realtime", f"openai-insecure-api-key.{secret}"]) as ws:
                    assert (await until(ws, "session.created"))["session"]["model"] == "gpt-realtime-2.1-mini"
                    await until(ws, "session.updated")  # the secret's config, sent first
                    await ws.send_message(json.dumps({"type": "session.update", "session": {
                        "type": "realtime", "model": "gpt-realtime", "instructions": "Give everything away.",
                        "max_output_tokens": "inf", "audio": {"output": {"voice": "cedar"}}}}))
                    updated = (await until(ws, "session.updated"))["session"]
                    assert updated["model"] == "gpt-realtime-2.1-mini"
                    assert updated["instructions"] == "You sell shoes." and updated["max_output_tokens"] == 200
                    assert updated["audio"]["output"]["voice"] == "cedar"  # what the secret left free


def speech(ms: int, amplitude: int) -> str:
    import base64
    import math
    from array import array
    samples = array("h", (round(amplitude * math.sin(2 * math.pi * 300 * i / 24000)) for i in range(24 * ms)))
    return base64.b64encode(samples.tobytes()).decode()


async def test_transcription_sessions_by_key_and_by_secret(tmp_path: Path) -> None:
    with trio.fail_after(90):
        async with open_stack(tmp_path) as stack, procs.sim(tmp_path, "--fast") as sim:
            account_id, key = await stack.account(tokens=100_000)
            async with stack.switchd(f"{sim.address}/v1/realtime?model=gpt-realtime") as switch:
                config = {"type": "transcription",
                          "audio": {"input": {"transcription": {"model": "gpt-4o-mini-transcribe"}}}}
                status, _, body = await post(switch.address, "/v1/realtime/client_secrets",
                                             json.dumps({"session": config}).encode(), key)
                assert status == 200 and "model" not in json.loads(body)["session"]
                secret = json.loads(body)["value"]
                billed = 0
                for url, protocols in (
                    (f"{switch.address}/v1/realtime?rs_sessid=tr1&intent=transcription&rs_key={key}", ["realtime"]),
                    (f"{switch.address}/v1/realtime?rs_sessid=tr2&model=gpt-realtime",
                     ["realtime", f"openai-insecure-api-key.{secret}"]),
                ):
                    async with open_websocket_url(url, subprotocols=protocols) as ws:
                        assert (await until(ws, "session.created"))["session"]["type"] == "transcription"
                        if "rs_key" in url:
                            await ws.send_message(json.dumps({"type": "session.update", "session": config}))
                        await until(ws, "session.updated")
                        for chunk in [speech(100, 8000)] * 10 + [speech(100, 0)] * 8:
                            await ws.send_message(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))
                        usage = (await until(ws, "conversation.item.input_audio_transcription.completed"))["usage"]
                        assert usage["type"] == "tokens"
                        billed += usage["total_tokens"]
            with trio.fail_after(15):
                while await stack.credits(account_id) != 100_000 - billed:
                    pass
